"""Store maintenance: backups of the embedded PostgreSQL and copies between stores.

- :func:`backup` / :func:`restore`: ``pg_dump -Fc`` / ``pg_restore --clean`` of the embedded
  PostgreSQL of a data folder, run with the binaries of the cluster's own version, as this
  process's user over TCP with the cluster's password (never as the ``postgres`` user, so the
  dump file belongs to whoever asked for it). The cluster may be running (a live server; it
  is left running) or stopped (it is started for the job and stopped again).
- :func:`copy_store`: every table from one store to another (SQLite, PostgreSQL, MySQL/MariaDB,
  any direction), in dependency order, in one target transaction (on MySQL the id counters are
  set just after it: ALTER TABLE commits), from one consistent read of the source; the target
  must be at the newest schema and empty. Verified by row counts and a checksum per
  table that does not depend on the dialect (:func:`table_checksum`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import JSON, DateTime, Integer, Table, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from server.db import tables
from server.db.tables import UtcDateTime
from server.db.database import Database
from server.db.embedded import EmbeddedPostgres, EmbeddedPostgresError


class MaintenanceError(Exception):
    """A user-facing refusal or failure: the message says what to do."""


# --------------------------------------------------------------------------- backup / restore


def _with_embedded(data_dir: Path, work: Callable[[EmbeddedPostgres], Any]) -> Any:
    pg = EmbeddedPostgres(data_dir)
    if not (pg.cluster_dir / "PG_VERSION").is_file():
        raise MaintenanceError(f"no embedded PostgreSQL in {data_dir} (no {pg.cluster_dir}/PG_VERSION); "
                               "pass the --data-dir that `maas start` uses")
    try:
        pg.start()
    except EmbeddedPostgresError as exc:
        raise MaintenanceError(str(exc)) from exc
    try:
        return work(pg)
    finally:
        if not pg.reused:  # started for this job only
            pg.stop()


def backup(data_dir: Path, file: Path) -> dict[str, Any]:
    """Dump the embedded PostgreSQL of ``data_dir`` to ``file`` (custom format, compressed).
    Written to a temporary name and renamed: a failed dump never leaves a truncated file. The dump
    holds every credential hash and secret of the cluster: readable by its owner only (0600), from
    its first byte on."""
    file = Path(file).absolute()
    tmp = file.with_name(f".{file.name}.{os.getpid()}.partial")

    def work(pg: EmbeddedPostgres) -> dict[str, Any]:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))  # pg_dump keeps the mode it finds
        os.chmod(tmp, 0o600)  # an older partial file of the same name
        res = pg.run_client([str(pg.bin_path("pg_dump")), "-Fc", "--no-owner", "-f", str(tmp)], timeout=3600)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise MaintenanceError(f"pg_dump failed (exit status {res.returncode}): {res.stdout.strip()[-2000:]}")
        os.replace(tmp, file)
        return {"file": str(file), "bytes": file.stat().st_size, "server_was_running": pg.reused}

    return _with_embedded(data_dir, work)


def restore(data_dir: Path, file: Path) -> dict[str, Any]:
    """Replace the embedded PostgreSQL's tables with those of a :func:`backup` file, in one
    transaction (a failed restore changes nothing). The file is checked before anything is dropped."""
    file = Path(file).absolute()
    if not file.is_file():
        raise MaintenanceError(f"backup file {file} does not exist")

    def work(pg: EmbeddedPostgres) -> dict[str, Any]:
        pg_restore = str(pg.bin_path("pg_restore"))
        check = pg.run_client([pg_restore, "--list", str(file)], timeout=300)
        if check.returncode != 0:
            raise MaintenanceError(f"{file} is not a backup made by `maas db backup` (pg_dump -Fc): "
                                   f"{check.stdout.strip()[-500:]}")
        res = pg.run_client([pg_restore, "--clean", "--if-exists", "--no-owner", "--single-transaction",
                             "--exit-on-error", "-d", pg.database, str(file)], timeout=3600)
        if res.returncode != 0:
            raise MaintenanceError(f"pg_restore failed (exit status {res.returncode}); nothing was changed: "
                                   f"{res.stdout.strip()[-2000:]}")
        return {"file": str(file), "server_was_running": pg.reused}

    return _with_embedded(data_dir, work)


# --------------------------------------------------------------------------- checksums


def _normal(value: Any) -> Any:
    if isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.isoformat(timespec="microseconds")
    if isinstance(value, date):
        return value.isoformat()
    return value


def normal_row(row: dict[str, Any]) -> str:
    """One row as text that is the same whichever store it was read from: UTC ISO datetimes
    (SQLite gives them back naive), JSON with sorted keys."""
    return json.dumps({k: _normal(v) for k, v in row.items()}, sort_keys=True, separators=(",", ":"), default=str)


class _Digest:
    def __init__(self) -> None:
        self.rows = 0
        self._hash = hashlib.sha256()

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.rows += 1
            self._hash.update(normal_row(row).encode())
            self._hash.update(b"\n")

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def copied_tables() -> list[Table]:
    """Every table of the schema, parents before children."""
    return list(tables.Base.metadata.sorted_tables)


def _ordered(table: Table) -> Any:
    return select(table).order_by(*table.primary_key.columns)


async def table_checksum(conn: AsyncConnection, table: Table) -> tuple[int, str]:
    digest = _Digest()
    result = await conn.stream(_ordered(table))
    async for part in result.mappings().partitions(1000):
        digest.add(part)
    return digest.rows, digest.hexdigest


async def checksums(db: Database) -> dict[str, tuple[int, str]]:
    async with db.engine.connect() as conn:
        return {t.name: await table_checksum(conn, t) for t in copied_tables()}


# --------------------------------------------------------------------------- copy between stores


@dataclass
class TableCopy:
    table: str
    rows: int
    source_checksum: str
    target_rows: int = -1
    target_checksum: str = ""

    @property
    def ok(self) -> bool:
        return self.rows == self.target_rows and self.source_checksum == self.target_checksum


async def schema_revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        def current(sync_conn: Any) -> str | None:
            from alembic.runtime.migration import MigrationContext

            return MigrationContext.configure(sync_conn).get_current_revision()

        return await conn.run_sync(current)


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def _integer_id(table: Table) -> bool:
    cols = list(table.primary_key.columns)
    return len(cols) == 1 and cols[0].name == "id" and isinstance(cols[0].type, Integer)


async def _id_counter(conn: AsyncConnection, table: Table) -> int:
    """The highest id the store ever handed out for `table` (deleted rows included), so the
    copy never gives a deleted id out again."""
    if conn.dialect.name == "postgresql":
        seq = (await conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table.name})).scalar()
        if seq:
            last, called = (await conn.execute(text(f"SELECT last_value, is_called FROM {seq}"))).one()
            return int(last) if called else 0
        return 0
    if conn.dialect.name == "mysql":
        # The next id the table hands out, minus one (InnoDB keeps it across restarts since
        # MariaDB 10.2.4 / MySQL 8.0). MySQL 8 caches these statistics: ask for fresh ones.
        if not conn.dialect.is_mariadb:
            await conn.execute(text("SET SESSION information_schema_stats_expiry = 0"))
        value = (await conn.execute(text("SELECT AUTO_INCREMENT FROM information_schema.TABLES "
                                         "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t"),
                                    {"t": table.name})).scalar()
        return int(value) - 1 if value else 0
    if conn.dialect.name == "sqlite":
        try:
            value = (await conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = :t"),
                                        {"t": table.name})).scalar()
        except Exception:  # no AUTOINCREMENT table yet: no sqlite_sequence
            return 0
        return int(value or 0)
    return 0


async def _set_id_counter(conn: AsyncConnection, table: Table, value: int) -> None:
    if value <= 0:
        return
    if conn.dialect.name == "postgresql":
        seq = (await conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table.name})).scalar()
        if seq:
            await conn.execute(text("SELECT setval(CAST(:s AS regclass), :v, true)"), {"s": seq, "v": value})
    elif conn.dialect.name == "mysql":
        # ALTER TABLE commits by itself in MySQL: the caller runs this after the copy committed.
        await conn.execute(text(f"ALTER TABLE `{table.name}` AUTO_INCREMENT = {int(value) + 1}"))
    elif conn.dialect.name == "sqlite":
        updated = await conn.execute(text("UPDATE sqlite_sequence SET seq = max(seq, :v) WHERE name = :t"),
                                     {"t": table.name, "v": value})
        if updated.rowcount == 0:
            await conn.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"),
                               {"t": table.name, "v": value})


def _for_insert(table: Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Naive timestamps (from a store read without the tables' types) are UTC; PostgreSQL wants them aware."""
    stamps = [c.name for c in table.columns if isinstance(c.type, (DateTime, UtcDateTime))]
    if not stamps:
        return rows
    out = []
    for row in rows:
        row = dict(row)
        for name in stamps:
            value = row.get(name)
            if isinstance(value, datetime) and value.tzinfo is None:
                row[name] = value.replace(tzinfo=UTC)
        out.append(row)
    return out


def _insert_table(table: Table) -> Table:
    """`table` with JSON columns that store Python None as SQL NULL (as the rows had it)."""
    from sqlalchemy import Column, MetaData

    copy = Table(table.name, MetaData(),
                 *[Column(c.name, JSON(none_as_null=True) if isinstance(c.type, JSON) else c.type,
                          primary_key=c.primary_key) for c in table.columns])
    return copy


async def copy_store(source_url: str, target_url: str,
                     progress: Callable[[str, int], None] | None = None) -> list[TableCopy]:
    """Copy every table of the store at ``source_url`` into the (empty) store at ``target_url``.

    The source must be at the newest schema (a server of this version has started on it); the
    target is migrated to it first and must hold no rows. Returns one verified entry per table;
    raises :class:`MaintenanceError` when anything does not match.
    """
    source = Database(source_url)
    try:
        target = Database(target_url)
    except Exception:
        await source.dispose()
        raise
    try:
        head = head_revision()
        current = await schema_revision(source)
        if current is None:
            raise MaintenanceError("the source database holds no MaaS-Base schema (empty, or not a MaaS-Base "
                                   "database): check the --from URL or --data-dir")
        if current != head:
            raise MaintenanceError(
                f"the source database is at schema revision {current!r}, not {head!r} (this version's): start "
                "`maas start` of this version on it once (it upgrades the schema), then copy")
        await target.migrate()
        async with target.engine.connect() as conn:
            busy = [f"{t.name} ({n} rows)" for t in copied_tables()
                    if (n := (await conn.execute(select(func.count()).select_from(t))).scalar_one())]
        if busy:
            raise MaintenanceError("the target database is not empty: " + ", ".join(busy) +
                                   ". Copy into a new, empty database (or drop this one's tables first)")

        report: list[TableCopy] = []
        # One snapshot of the source for every table (PostgreSQL's default, READ COMMITTED, and
        # the one set for MySQL would give each statement its own).
        src_options = {"isolation_level": "REPEATABLE READ"} if source.dialect != "sqlite" else {}
        counters: list[tuple[Table, int]] = []
        async with source.engine.connect() as src, target.engine.begin() as dst:
            if src_options:
                await src.execution_options(**src_options)
            await src.begin()  # one snapshot of the source for every table
            for table in copied_tables():
                digest = _Digest()
                insert_into = _insert_table(table)
                result = await src.stream(_ordered(table))
                async for part in result.mappings().partitions(1000):
                    rows = [dict(r) for r in part]
                    digest.add(rows)
                    await dst.execute(insert_into.insert(), _for_insert(table, rows))
                if _integer_id(table):
                    top = (await dst.execute(select(func.max(table.c.id)))).scalar() or 0
                    counters.append((table, max(int(top), await _id_counter(src, table))))
                    if target.dialect != "mysql":  # in the copy's transaction
                        await _set_id_counter(dst, table, counters[-1][1])
                report.append(TableCopy(table.name, digest.rows, digest.hexdigest))
                if progress:
                    progress(table.name, digest.rows)
            await src.rollback()
        if target.dialect == "mysql":
            async with target.engine.connect() as conn:
                for table, value in counters:
                    await _set_id_counter(conn, table, value)

        after = await checksums(target)
        for entry in report:
            entry.target_rows, entry.target_checksum = after[entry.table]
        bad = [e for e in report if not e.ok]
        if bad:
            raise MaintenanceError("the copy does not match the source in: " + ", ".join(
                f"{e.table} ({e.rows} rows, {e.target_rows} copied)" for e in bad))
        return report
    finally:
        await source.dispose()
        await target.dispose()
