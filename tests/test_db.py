"""Stores: the upgrade path from the first schema, backups of the embedded PostgreSQL, copies
between stores, and the server's behaviour when its database goes away.

Tests that take `store_url` run on every store (SQLite, the embedded PostgreSQL, MariaDB; see
conftest.py). The other PostgreSQL tests share one embedded cluster (one database per test);
they are marked `postgres` and skipped without the server binaries.
"""

from __future__ import annotations

import os
import stat
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import asyncpg
import pytest
from sqlalchemy import Column, MetaData, Table, func, insert, select, text

from conftest import HAVE_POSTGRES, eventually, free_port
from server.api.security import hash_password
from server.app import MaasServer
from server.config import ServerConfig
from server.db import maintenance, tables
from server.db.database import PUBLISHED, Database, to_wire
from server.db.embedded import EmbeddedPostgres

postgres = [pytest.mark.postgres,
            pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> AsyncIterator[EmbeddedPostgres]:
    if not HAVE_POSTGRES:
        pytest.skip("PostgreSQL server binaries not installed")
    base = Path(tempfile.mkdtemp(prefix="maas-db-", dir="/tmp"))
    os.chmod(base, 0o711)
    pg = EmbeddedPostgres(base / "data")
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _admin_sql(pg: EmbeddedPostgres, *statements: str) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="maas",
                                 password=pg.password_file.read_text().strip(), database="postgres")
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def fresh_database(pg: EmbeddedPostgres, name: str) -> str:
    await _admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


# --------------------------------------------------------------------------- the upgrade path

T0 = datetime(2026, 11, 1, 12, 30, 15, 123456, tzinfo=UTC)
SPEC = {"source": "/models/tiny.gguf", "backend": "llama.cpp", "context_length": 512, "args": ["--x", "ü"]}


def _typed(reflected: Table) -> Table:
    """A reflected table with the columns typed as the code types them (MariaDB reflects a
    JSON column as LONGTEXT, which would not take a dict)."""
    head = tables.Base.metadata.tables.get(reflected.name)
    return Table(reflected.name, MetaData(), *[
        Column(c.name, head.c[c.name].type if head is not None and c.name in head.c else c.type,
               primary_key=c.primary_key) for c in reflected.columns])


async def seed_first_schema(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Rows in every table of revision 0001, written as that version wrote them (ids from the store)."""
    async with db.engine.begin() as conn:
        meta = MetaData()
        await conn.run_sync(meta.reflect)
        t = {name: _typed(table) for name, table in meta.tables.items()}
        stamp = {"created_at": T0, "updated_at": T0 + timedelta(seconds=1)}
        rows: dict[str, list[dict[str, Any]]] = {
            "users": [dict(username="admin", password_hash=hash_password("pw-admin"), is_admin=True, **stamp),
                      dict(username="ops", password_hash=hash_password("pw-ops"), is_admin=False, **stamp)],
            "settings": [dict(key="cluster_token_hash", value="abc", **stamp)],
            "workers": [dict(name=f"w{i}", address=f"10.0.0.{i}", agent_port=10150 + i, labels={"zone": f"z{i}"},
                             state="ready", state_message="", cordoned=i == 2,
                             gpus=[{"index": 0, "name": "H100", "memory_total": 80 * 2**30}],
                             host={"hostname": f"h{i}", "cpu_count": 8, "cpu_percent": 1.5}, token_hash=f"th{i}", agent_secret=f"s{i}",
                             last_heartbeat_at=T0 if i == 1 else None, **stamp) for i in (1, 2)],
            "models": [dict(name="tiny", spec=SPEC, replicas=2, generation=3, state="active", **stamp)],
            "events": [dict(kind="model", object_id=1, object_name="tiny", reason="Created", message="m ✓",
                            actor="admin", created_at=T0 + timedelta(minutes=i)) for i in range(3)],
        }
        for name in ("users", "settings", "workers", "models", "events"):
            await conn.execute(insert(t[name]), rows[name])
        user_ids = dict((await conn.execute(select(t["users"].c.username, t["users"].c.id))).all())
        worker_ids = dict((await conn.execute(select(t["workers"].c.name, t["workers"].c.id))).all())
        model_id = (await conn.execute(select(t["models"].c.id))).scalar_one()
        rows["api_keys"] = [dict(user_id=user_ids["admin"], kind=kind, name=f"k-{kind}", prefix=f"maas_{kind}",
                                 secret_hash=f"h{kind}", expires_at=T0 + timedelta(days=30) if kind == "api" else None,
                                 last_used_at=None, **stamp) for kind in ("api", "session")]
        rows["model_instances"] = [
            dict(name=f"tiny-{i}", model_id=model_id, model_name="tiny", generation=3, spec=SPEC,
                 state="running" if i == 0 else "pending", state_message="",
                 worker_id=worker_ids["w1"] if i == 0 else None, worker_name="w1" if i == 0 else None,
                 address="10.0.0.1" if i == 0 else None, port=40000 if i == 0 else None, pid=None,
                 claim={"device": "gpu", "gpu_indexes": [0], "vram_bytes_per_gpu": 2**30} if i == 0 else None,
                 schedule_reasons=[] if i == 0 else [{"worker": "w2", "reason": "cordoned", "message": "cordoned"}],
                 restart_count=i, **stamp) for i in range(2)]
        for name in ("api_keys", "model_instances"):
            await conn.execute(insert(t[name]), rows[name])
    return rows


async def _checksums_at(url: str) -> dict[str, tuple[int, str]]:
    """The per-table counts and checksums of the database at `url`."""
    db = Database(url)
    try:
        return await maintenance.checksums(db)
    finally:
        await db.dispose()


async def _seeded_checksums(url: str) -> dict[str, tuple[int, str]]:
    """Seed a head-schema database with rows in every table; its per-table checksums."""
    db = Database(url)
    try:
        await _seed_head(db)
        return await maintenance.checksums(db)
    finally:
        await db.dispose()


async def test_upgrade_from_first_schema_keeps_data(store_url: str):
    db = Database(store_url)
    try:
        await db.migrate("0001")
        seeded = await seed_first_schema(db)
        await db.migrate()  # to head, over existing rows
        assert await maintenance.schema_revision(db) == maintenance.head_revision()

        async with db.engine.connect() as conn:
            for name, rows in seeded.items():
                table = tables.Base.metadata.tables[name]
                got = (await conn.execute(maintenance._ordered(table))).mappings().all()
                assert len(got) == len(rows), name
                for want, have in zip(rows, got):  # the old columns: unchanged
                    if name == "users":  # 0007 turned is_admin into a role
                        want = {**{k: v for k, v in want.items() if k != "is_admin"},
                                "role": "admin" if want["is_admin"] else "member"}
                    assert maintenance.normal_row({k: have[k] for k in want}) == maintenance.normal_row(want), name

            keys = (await conn.execute(select(tables.ApiKey.__table__))).mappings().all()
            assert all(k["scopes"] == ["management", "inference"] and k["allowed_models"] == [] for k in keys)
            model = (await conn.execute(select(tables.Model.__table__))).mappings().one()
            assert (model["paused"], model["max_surge"], model["max_unavailable"], model["rollout_message"]) == \
                (False, 1, 0, "")
            assert [w["draining"] for w in (await conn.execute(select(tables.Worker.__table__))).mappings()] == \
                [False, False]
            revision = (await conn.execute(select(tables.ModelRevision.__table__))).mappings().one()
            assert (revision["model_id"], revision["revision"], revision["spec"]) == (model["id"], 3, SPEC)
            # 0007: everything belongs to the default team, whose member every user but the admin is.
            assert model["team"] == "default"
            assert {i["team"] for i in (await conn.execute(select(tables.ModelInstance.__table__))).mappings()} == \
                {"default"}
            members = (await conn.execute(select(tables.User.username, tables.TeamMember.role, tables.Team.name)
                                          .select_from(tables.TeamMember).join(tables.User).join(tables.Team))).all()
            assert [tuple(m) for m in members] == [("ops", "member", "default")]
            for empty in ("usage", "change_log", "ssh_keys"):
                count = (await conn.execute(select(func.count()).select_from(tables.Base.metadata.tables[empty])))
                assert count.scalar_one() == 0

        # This version's code reads every upgraded row into its wire shapes, and writes new rows
        # next to them (ids continue after the old ones).
        async with db.session() as s:
            for cls in PUBLISHED:
                for obj in (await s.execute(select(cls))).scalars():
                    to_wire(obj)
            s.add(tables.Model(name="after-upgrade", spec=SPEC))
            s.add(tables.ApiKey(user_id=1, name="new", prefix="maas_new", secret_hash="x"))
            await s.commit()
            new = (await s.execute(select(tables.Model).where(tables.Model.name == "after-upgrade"))).scalar_one()
            assert new.id == 2 and new.max_surge == 1 and not new.paused
    finally:
        await db.dispose()


# --------------------------------------------------------------------------- copies between stores


async def _seed_head(db: Database) -> None:
    await db.migrate("0001")
    await seed_first_schema(db)
    await db.migrate()
    async with db.session() as s:  # rows in the newer tables too, some written through the ORM hooks
        s.add(tables.SshKey(user_id=1, name="me@laptop", fingerprint="SHA256:abc", public_key="ssh-ed25519 AAAA me"))
        s.add(tables.Secret(team="default", name="hf", ciphertext="gAAAA-sealed"))
        s.add(tables.AuditEntry(actor="admin", address="127.0.0.1", method="POST", path="/v2/models", status=201,
                                summary='{"name":"tiny"}'))
        s.add(tables.Usage(day=T0.date(), api_key_id=1, api_key_name="k-api", user_id=1, model_name="tiny",
                           requests=5, prompt_tokens=100, completion_tokens=2**40))
        s.add(tables.Usage(day=T0.date(), hour=13, api_key_id=1, api_key_name="k-api", user_id=1, model_name="tiny",
                           route="assistant", team="default", requests=2, prompt_tokens=7, completion_tokens=9))
        s.add(tables.ModelRoute(name="assistant", team="default", targets=[{"model": "tiny", "weight": 95}],
                                fallbacks=["tiny-old"]))  # model routes
        s.add(tables.Event(kind="model", object_id=1, object_name="tiny", reason="Scaled"))
        s.add(tables.GatewayLoad(server_id="s1", loads={"tiny": [1.5, 0, 12]}))  # a server's gateway load (autoscaling)
        s.add(tables.GatewayLimit(scope="key", api_key_id=1, rpm=60, budget_day=10**6))  # gateway limits
        s.add(tables.GatewayLimitCounter(server_id="s1", scope="key", subject="1", window_index=29_000_000,
                                         requests=3, tokens=40, in_flight=1, cap_requests=30, cap_tokens=0,
                                         cap_in_flight=2, demand=7))
        s.add(tables.Alert(rule="InstanceFailing", severity="critical", state="firing", object_kind="model",
                           object_name="tiny", team="default", message="1 instance failing"))  # alerts
        s.add(tables.AlertSilence(rule="WorkerNotReady", object_name="gpu-2", created_by="admin", ends_at=T0))
        s.add(tables.AlertWebhook(url="https://hooks.example/maas", secret_ciphertext="gAAAA-sealed", created_by="admin"))
        s.add(tables.BenchResult(model_id=1, model_name="tiny", generation=1, source="cli", created_by="admin",
                                 prompt_tokens=64, max_tokens=16, levels=[{"concurrency": 1, "ttft_p50": 0.05}]))
        s.add(tables.ModelFile(worker_id=1, worker_name="gpu-1", source="hf://org/tiny@main", size_bytes=2**33,
                               state="ready", file_metadata={"gguf": {"layers": 2}}))  # model files
        gone = tables.Event(kind="model", object_id=1, object_name="tiny", reason="Deleted-later")
        s.add(gone)
        await s.commit()
        await s.delete(gone)  # the highest event id was handed out, then deleted: never to come back
        await s.commit()


@pytest.mark.postgres
@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")
async def test_copy_sqlite_to_postgres_and_back_gives_identical_rows(cluster, tmp_path: Path):
    sqlite_url = f"sqlite:///{tmp_path / 'source.db'}"
    source = Database(sqlite_url)
    await _seed_head(source)
    want = await maintenance.checksums(source)
    await source.dispose()
    assert all(rows for rows, _ in want.values()), want  # every table has rows

    pg_url = await fresh_database(cluster, "copy_target")
    report = await maintenance.copy_store(sqlite_url, pg_url)
    assert {e.table: (e.target_rows, e.target_checksum) for e in report} == want
    assert [e.table for e in report].index("users") < [e.table for e in report].index("api_keys")

    target = Database(pg_url)
    try:
        assert await maintenance.checksums(target) == want
        async with target.session() as s:  # ids go on after the highest ever handed out
            event = tables.Event(kind="model", object_name="tiny", reason="New")
            s.add(event)
            await s.commit()
            assert event.id == want["events"][0] + 2
    finally:
        await target.dispose()

    # Refused: a target that is not empty.
    with pytest.raises(maintenance.MaintenanceError, match="not empty"):
        await maintenance.copy_store(sqlite_url, pg_url)

    # And back, from PostgreSQL into a new SQLite file.
    back_url = f"sqlite:///{tmp_path / 'back.db'}"
    cleanup = Database(pg_url)
    async with cleanup.engine.begin() as conn:  # drop the rows added above
        await conn.execute(text("DELETE FROM events WHERE reason = 'New'"))
        await conn.execute(text("DELETE FROM change_log WHERE id = (SELECT max(id) FROM change_log)"))
    await cleanup.dispose()
    report = await maintenance.copy_store(pg_url, back_url)
    assert {e.table: (e.target_rows, e.target_checksum) for e in report} == want


async def test_copy_refuses_a_source_behind_head(tmp_path: Path):
    old = Database(f"sqlite:///{tmp_path / 'old.db'}")
    await old.migrate("0002")
    await old.dispose()
    with pytest.raises(maintenance.MaintenanceError, match="revision '0002'"):
        await maintenance.copy_store(f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}")


# --------------------------------------------------------------------------- backup and restore


@pytest.mark.postgres
@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")
def test_backup_wipe_restore_through_the_cli(tmp_path: Path):
    """A stopped server's data folder: `maas db backup`, drop the database, `maas db restore`."""
    import asyncio

    from typer.testing import CliRunner

    from maas_tui.cli.main import app

    base = Path(tempfile.mkdtemp(prefix="maas-bk-", dir="/tmp"))
    os.chmod(base, 0o711)
    data_dir = base / "data"
    pg = EmbeddedPostgres(data_dir)
    try:
        url = pg.start()

        want = asyncio.run(_seeded_checksums(url))
        pg.stop()  # a stopped server: the command starts the cluster for the job and stops it again

        runner = CliRunner()
        dump = tmp_path / "maas.dump"
        result = runner.invoke(app, ["db", "backup", str(dump), "--data-dir", str(data_dir)])
        assert result.exit_code == 0, result.output
        assert dump.stat().st_size > 0 and "backed up" in result.output
        assert stat.S_IMODE(dump.stat().st_mode) == 0o600  # every credential hash of the cluster is in it
        assert not (data_dir / "postgres" / "postmaster.pid").exists()

        pg.start()  # wipe, with the cluster running (as under a live server)
        asyncio.run(_admin_sql(pg, 'DROP DATABASE "maas" WITH (FORCE)', 'CREATE DATABASE "maas"'))
        result = runner.invoke(app, ["db", "restore", str(dump), "--data-dir", str(data_dir), "--yes"])
        assert result.exit_code == 0, result.output
        assert (data_dir / "postgres" / "postmaster.pid").exists()  # left running: it was running before

        async def after() -> dict[str, tuple[int, str]]:
            db = Database(url)
            try:
                assert await maintenance.schema_revision(db) == maintenance.head_revision()
                return await maintenance.checksums(db)
            finally:
                await db.dispose()

        assert asyncio.run(after()) == want

        bad = tmp_path / "not-a-dump"
        bad.write_text("hello")
        result = runner.invoke(app, ["db", "restore", str(bad), "--data-dir", str(data_dir), "--yes"])
        assert result.exit_code == 1 and "not a backup" in result.output
        assert asyncio.run(after()) == want  # nothing was dropped
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- connection loss


@pytest.mark.postgres
@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")
async def test_database_loss_is_a_503_and_the_server_recovers(tmp_path: Path, tiny_model: Path):
    import asyncio

    base = Path(tempfile.mkdtemp(prefix="maas-loss-", dir="/tmp"))
    os.chmod(base, 0o711)
    server = MaasServer(ServerConfig(data_dir=base / "data", port=free_port(), resync_interval=2.0))
    await server.start()  # its own embedded PostgreSQL
    try:
        password = server.admin_password_file.read_text().strip()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/v2/auth/login",
                                 json={"username": "admin", "password": password}) as resp:
                assert resp.status == 200, await resp.text()
                token = (await resp.json())["token"]
            headers = {"Authorization": f"Bearer {token}"}

            async def get(path: str) -> tuple[int, Any]:
                async with http.get(f"{server.url}{path}", headers=headers) as resp:
                    return resp.status, await resp.json(content_type=None)

            assert (await get("/v2/models"))[0] == 200
            url = server.embedded.url
            await asyncio.to_thread(server.embedded.stop)

            status, body = await get("/v2/workers")  # never read before: nothing to answer it from
            assert status == 503, body
            assert body["error"]["code"] == "database_unavailable"
            assert "database" in body["error"]["message"]
            assert (await get("/v2/models")) == (200, {"items": []})  # read before: answered from memory
            async with http.post(f"{server.url}/v2/models", headers=headers,
                                 json={"name": "m", "source": str(tiny_model), "backend": "llama.cpp"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "database_unavailable"

            assert await asyncio.to_thread(server.embedded.start) == url  # back on the same port

            async def works() -> bool:
                return (await get("/v2/models"))[0] == 200
            await eventually(works, timeout=20, message="requests to work again")
            subscription = server.bus.subscribe(["models"])
            async with http.post(f"{server.url}/v2/models", headers=headers,
                                 json={"name": "m", "source": str(tiny_model), "backend": "llama.cpp",
                                       "replicas": 0}) as resp:
                assert resp.status in (200, 201), await resp.text()
            # The change feed and the leader election reconnected too.
            event = await asyncio.wait_for(subscription.get(), 10)
            assert event is not None and event.object["name"] == "m"
            subscription.close()

            async def leads() -> bool:
                return server.leadership.is_leader
            await eventually(leads, timeout=20, message="the server to lead again")
    finally:
        await server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_database_errors_that_mean_unavailable():
    import asyncpg
    from sqlalchemy import exc as sa

    from server.api.errors import database_unavailable

    assert database_unavailable(sa.OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert database_unavailable(sa.InterfaceError("SELECT 1", {}, Exception("connection is closed")))
    assert database_unavailable(sa.DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True))
    assert database_unavailable(sa.TimeoutError("QueuePool limit reached"))
    assert database_unavailable(asyncpg.exceptions.ConnectionDoesNotExistError("gone"))
    try:
        try:
            raise asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command")
        except Exception as inner:
            raise RuntimeError("while loading") from inner
    except RuntimeError as outer:
        assert database_unavailable(outer)  # found through the cause
    # Errors in the statement or elsewhere stay what they are (a bug: 500).
    assert not database_unavailable(sa.IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not database_unavailable(sa.DBAPIError("SELECT", {}, Exception("syntax error")))
    assert not database_unavailable(ConnectionRefusedError("an agent's port"))  # not raised by the driver
    assert not database_unavailable(ValueError("x"))


def test_cli_migrate_between_sqlite_files(tmp_path: Path):
    import asyncio

    from typer.testing import CliRunner

    from maas_tui.cli.main import app

    source_url = f"sqlite:///{tmp_path / 'a.db'}"

    want = asyncio.run(_seeded_checksums(source_url))
    target_url = f"sqlite:///{tmp_path / 'b.db'}"
    runner = CliRunner()
    result = runner.invoke(app, ["db", "migrate", "--from", source_url, "--to", target_url])
    assert result.exit_code == 0, result.output
    assert "counts and checksums match" in result.output and "model_instances: 2 rows" in result.output

    assert asyncio.run(_checksums_at(target_url)) == want
    result = runner.invoke(app, ["db", "migrate", "--from", source_url, "--to", target_url])
    assert result.exit_code == 1 and "not empty" in result.output
    result = runner.invoke(app, ["db", "migrate", "--from", source_url, "--to", "mongodb://x/y"])
    assert result.exit_code == 1 and "unsupported database URL" in result.output


@pytest.mark.postgres
@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")
def test_cli_migrate_from_a_data_dir(cluster, tmp_path: Path):
    """`maas db migrate --data-dir DIR`: the embedded PostgreSQL (running: left running) to SQLite."""
    import asyncio

    from typer.testing import CliRunner

    from maas_tui.cli.main import app

    runner = CliRunner()
    target_url = f"sqlite:///{tmp_path / 'out.db'}"
    args = ["db", "migrate", "--data-dir", str(cluster.data_dir), "--to", target_url]
    asyncio.run(fresh_database(cluster, "maas"))
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "no MaaS-Base schema" in result.output

    want = asyncio.run(_seeded_checksums(cluster.url))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    assert asyncio.run(_checksums_at(target_url)) == want
    assert (cluster.cluster_dir / "postmaster.pid").exists()  # the cluster it borrowed still runs


# --------------------------------------------------------------------------- the same behaviour on every store


async def test_every_store_keeps_names_times_and_json_alike(store_url: str):
    from datetime import timezone

    from sqlalchemy.exc import IntegrityError

    from server.db.usage import add_usage

    db = Database(store_url)
    try:
        await db.migrate()
        async with db.session() as s:
            # Unique names are case-sensitive everywhere (MySQL's default collation is not).
            s.add_all([tables.Model(name="Tiny", spec=SPEC), tables.Model(name="tiny", spec=SPEC)])
            await s.commit()
        async with db.session() as s:
            s.add(tables.Model(name="tiny", spec=SPEC))
            with pytest.raises(IntegrityError):
                await s.commit()

        two_hours_east = datetime(2026, 11, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
        nested = {"args": ["--x", "ü ✓"], "deep": {"list": [1, None, 2.5, True], "empty": {}}}
        async with db.session() as s:
            event = tables.Event(kind="model", object_name="Tiny", reason="Test", created_at=two_hours_east)
            instance = tables.ModelInstance(name="tiny-0", model_id=1, model_name="Tiny", generation=1, spec=SPEC)
            free = tables.ChangeLog(kind="test", action="json", object=nested)  # a JSON column of any shape
            s.add_all([event, instance, free])
            await s.commit()
        async with db.session() as s:
            got = (await s.execute(select(tables.Event).where(tables.Event.reason == "Test"))).scalar_one()
            # The same instant, given back in UTC with its microseconds, whichever store.
            assert got.created_at == two_hours_east and got.created_at.utcoffset() == timedelta(0)
            assert got.created_at.microsecond == 123456
            row = (await s.execute(select(tables.ModelInstance))).scalar_one()
            assert row.spec == SPEC and row.claim is None and row.created_at.tzinfo is not None
            assert (await s.execute(select(tables.ChangeLog.object).where(tables.ChangeLog.kind == "test"))
                    ).scalar_one() == nested
            # Comparisons with aware values work in SQL too (stored as UTC where the store has no zone).
            earlier = await s.execute(select(func.count()).select_from(tables.Event)
                                      .where(tables.Event.created_at < two_hours_east + timedelta(microseconds=1)))
            assert earlier.scalar_one() == 1
            logged = (await s.execute(select(tables.ChangeLog.kind, tables.ChangeLog.action))).all()
            assert ("models", "created") in logged and ("instances", "created") in logged

        day = T0.date()
        async with db.session() as s:  # the gateway's usage upsert adds up per (day, hour, key, model, route)
            await add_usage(s, {(day, 3, None, "k", 1, "Tiny", "", "red"): [1, 10, 20]})
            await add_usage(s, {(day, 3, None, "k", 1, "Tiny", "", "red"): [2, 5, 5],
                                (day, 3, None, "k", 1, "tiny", "", "red"): [1, 1, 1]})
            await s.commit()
            rows = (await s.execute(select(tables.Usage.model_name, tables.Usage.requests, tables.Usage.prompt_tokens,
                                           tables.Usage.completion_tokens).order_by(tables.Usage.id))).all()
        # A NULL key never conflicts in a unique index (on any of the three stores): rows add up per key.
        assert sorted(tuple(r) for r in rows) == [("Tiny", 1, 10, 20), ("Tiny", 2, 5, 5), ("tiny", 1, 1, 1)]
    finally:
        await db.dispose()


@pytest.mark.mariadb
def test_migrate_sqlite_to_mariadb_to_postgres_gives_identical_rows(mariadb_store, postgres_store, tmp_path: Path):
    """`maas db migrate --to mysql://...` and on to PostgreSQL: the same counts and checksums."""
    import asyncio

    from typer.testing import CliRunner

    from maas_tui.cli.main import app

    sqlite_url = f"sqlite:///{tmp_path / 'source.db'}"
    want = asyncio.run(_seeded_checksums(sqlite_url))
    mysql_url = asyncio.run(mariadb_store.new_database("copy_target"))
    runner = CliRunner()
    result = runner.invoke(app, ["db", "migrate", "--from", sqlite_url, "--to", mysql_url])
    assert result.exit_code == 0, result.output
    assert "counts and checksums match" in result.output
    assert mariadb_store.password not in result.output

    async def on_mysql() -> tuple[dict[str, tuple[int, str]], int]:
        db = Database(mysql_url)
        try:
            sums = await maintenance.checksums(db)
            async with db.session() as s:  # ids go on after the highest ever handed out, deleted ones too
                event = tables.Event(kind="model", object_name="tiny", reason="New")
                s.add(event)
                await s.commit()
                new_id = event.id
                await s.delete(event)
                await s.commit()
            return sums, new_id
        finally:
            await db.dispose()

    sums, new_id = asyncio.run(on_mysql())
    assert sums == want and new_id == want["events"][0] + 2

    pg_url = asyncio.run(postgres_store.new_database("copy_from_mysql"))
    result = runner.invoke(app, ["db", "migrate", "--from", mysql_url, "--to", pg_url])
    assert result.exit_code == 0, result.output

    after = asyncio.run(_checksums_at(pg_url))
    # The event added and deleted on MariaDB left a change-log pair behind: the rest is identical.
    assert {k: v for k, v in after.items() if k != "change_log"} == {k: v for k, v in want.items() if k != "change_log"}
    assert after["change_log"][0] == want["change_log"][0] + 2


@pytest.mark.mariadb
async def test_mariadb_schema_is_case_sensitive_and_keeps_microseconds(mariadb_store):
    """Every table the migrations make (a later one too) in utf8mb4_bin, every timestamp DATETIME(6)."""
    db = Database(await mariadb_store.new_database("schema_check"))
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            collations = dict((await conn.execute(text(
                "SELECT TABLE_NAME, TABLE_COLLATION FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME != 'alembic_version'"))).all())
            stamps = (await conn.execute(text(
                "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE, DATETIME_PRECISION FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND DATA_TYPE IN ('datetime', 'timestamp', 'float')"))).all()
        assert set(collations) == set(tables.Base.metadata.tables)
        assert set(collations.values()) == {"utf8mb4_bin"}, collations
        assert stamps and all(kind == "datetime" and precision == 6 for _, _, kind, precision in stamps), stamps
    finally:
        await db.dispose()
