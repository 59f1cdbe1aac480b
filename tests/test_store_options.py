"""Store options: TLS for an external PostgreSQL (sslmode, sslrootcert, sslcert, sslkey), database
URL checks, and one server per SQLite or MySQL/MariaDB database (`maas start` refuses a second)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import event, text

from conftest import HAVE_POSTGRES, eventually, free_port
from server.app import MaasServer
from server.config import ServerConfig
from server.db.database import Database, normalize_url
from server.db.embedded import EmbeddedPostgres
from server.leader import StoreInUse

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- certificates


def _certificates(folder: Path, host_ip: str = "127.0.0.1") -> dict[str, Path]:
    """A CA, a server certificate for `host_ip` and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key, issuer_name, issuer_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return path

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    cert_pem = lambda cert: cert.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("maas test CA", ca_key, name("maas test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = issue("db", server_key, ca.subject, ca_key, ca=False,
                   san=[x509.IPAddress(ipaddress.ip_address(host_ip)), x509.DNSName("localhost")])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("maas", client_key, ca.subject, ca_key, ca=False)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = issue("another CA", other_key, name("another CA"), other_key, ca=True)
    return {
        "ca": write(folder / "ca.pem", cert_pem(ca)),
        "other_ca": write(folder / "other-ca.pem", cert_pem(other_ca)),
        "server_cert": write(folder / "server.crt", cert_pem(server)),
        "server_key": write(folder / "server.key", key_pem(server_key)),
        "client_cert": write(folder / "client.crt", cert_pem(client)),
        "client_key": write(folder / "client.key", key_pem(client_key)),
    }


# --------------------------------------------------------------------------- TLS options


async def test_tls_options_reach_the_connect_arguments(tmp_path: Path):
    files = _certificates(tmp_path)
    url = (f"postgresql://maas:pw@127.0.0.1:{free_port()}/maas?sslmode=verify-full&sslrootcert={files['ca']}"
           f"&sslcert={files['client_cert']}&sslkey={files['client_key']}")
    db = Database(url)
    seen: list[dict] = []

    @event.listens_for(db.engine.sync_engine, "do_connect")
    def capture(_dialect, _record, _cargs, cparams):
        seen.append(dict(cparams))

    try:
        assert "ssl" not in db.url  # libpq's names are not asyncpg's: taken out of the URL
        with pytest.raises(Exception):  # nothing listens on that port
            async with db.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        context = seen[0]["ssl"]
        assert isinstance(context, ssl.SSLContext) and context is db.raw_connect_args["ssl"]
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.get_ca_certs()[0]["subject"] == ((("commonName", "maas test CA"),),)
    finally:
        await db.dispose()

    modes = {"require": (ssl.CERT_NONE, False), "verify-ca": (ssl.CERT_REQUIRED, False),
             "verify-full": (ssl.CERT_REQUIRED, True)}
    for mode, (verify, hostname) in modes.items():
        db = Database(f"postgresql://u:p@127.0.0.1/db?sslmode={mode}")
        context = db.raw_connect_args["ssl"]
        assert (context.verify_mode, context.check_hostname) == (verify, hostname), mode
        await db.dispose()
    # libpq: `require` with a root certificate checks the chain.
    db = Database(f"postgresql://u:p@127.0.0.1/db?sslmode=require&sslrootcert={files['ca']}")
    assert db.raw_connect_args["ssl"].verify_mode == ssl.CERT_REQUIRED
    await db.dispose()
    for mode, expected in (("disable", False), ("prefer", "prefer"), ("allow", "allow")):
        db = Database(f"postgresql://u:p@127.0.0.1/db?sslmode={mode}")
        assert db.raw_connect_args["ssl"] == expected
        await db.dispose()
    db = Database("postgresql://u:p@127.0.0.1/db")
    assert "ssl" not in db.raw_connect_args
    await db.dispose()


@pytest.mark.parametrize("query, message", [
    ("sslmode=bogus", "sslmode='bogus' in the database URL: use one of disable, allow"),
    ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "sslrootcert='/nonexistent/ca.pem' in the database URL: no such file"),
    ("sslmode=require&sslcert=CERT", "sslcert without sslkey"),
    ("sslmode=verify-ca&sslrootcert=NOT_A_CERT", "cannot use the TLS files of the database URL"),
    ("sslmode=require&sslmode=disable", "sslmode option must be given once, with a value"),
    ("sslcompression=1", "unsupported TLS option(s) in the database URL: sslcompression"),
])
def test_bad_tls_options_are_a_clear_error(query: str, message: str, tmp_path: Path):
    files = _certificates(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    query = query.replace("NOT_A_CERT", str(junk)).replace("CERT", str(files["client_cert"]))
    with pytest.raises(ValueError) as caught:
        Database(f"postgresql://maas:secret@127.0.0.1:1/maas?{query}")
    assert message in str(caught.value)


def test_a_bad_tls_option_is_one_line_from_maas_start(tmp_path: Path):
    done = _maas("start", "--no-agent", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
                 "--database-url", "postgresql://maas:secret@127.0.0.1:1/maas?sslmode=bogus")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0 and "sslmode='bogus'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "secret" not in done.stderr


@pytest.mark.parametrize("url, message", [
    ("mongodb://x/y", "unsupported database URL scheme 'mongodb'"),
    ("mysql://maas:pw@127.0.0.1:3306", "names no database"),
    ("not a url", "malformed database URL"),
])
def test_bad_database_urls(url: str, message: str):
    with pytest.raises(ValueError, match=message):
        normalize_url(url)


def test_mysql_and_mariadb_urls_use_aiomysql_with_full_unicode():
    assert normalize_url("mysql://u:p@db:3306/maas") == "mysql+aiomysql://u:p@db:3306/maas?charset=utf8mb4"
    assert normalize_url("mariadb://u:p@db/maas?charset=utf8mb4") == "mysql+aiomysql://u:p@db/maas?charset=utf8mb4"


@pytest.mark.postgres
@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")
async def test_a_server_over_tls_to_postgresql(tmp_path: Path):
    """A PostgreSQL that requires TLS: the server connects with verify-full and a client
    certificate; a root certificate that did not sign the server's is refused, with a clear error."""
    base = Path(tempfile.mkdtemp(prefix="maas-tls-", dir="/tmp"))
    os.chmod(base, 0o711)
    pg = EmbeddedPostgres(base / "pg")
    server = None
    try:
        url = await asyncio.to_thread(pg.start)
        files = _certificates(tmp_path)
        owner = pg.cluster_dir.stat()
        for key in ("server_cert", "server_key", "ca"):
            target = pg.cluster_dir / files[key].name
            target.write_bytes(files[key].read_bytes())
            os.chmod(target, 0o600)
            os.chown(target, owner.st_uid, owner.st_gid)
        admin = Database(url)
        async with admin.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            for setting in ("ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'",
                            "ssl_ca_file = 'ca.pem'"):
                await conn.execute(text(f"ALTER SYSTEM SET {setting}"))
            await conn.execute(text("SELECT pg_reload_conf()"))
        await admin.dispose()
        # Only TLS connections from now on (a hostssl rule with a client certificate and the password).
        hba = pg.cluster_dir / "pg_hba.conf"
        hba.write_text("local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n")
        reload = Database(url + "?sslmode=require")
        async with reload.engine.connect() as conn:
            await conn.execute(text("SELECT pg_reload_conf()"))
        await reload.dispose()

        plain = url.replace("postgresql+asyncpg://", "postgresql://")
        tls = (f"{plain}?sslmode=verify-full&sslrootcert={files['ca']}&sslcert={files['client_cert']}"
               f"&sslkey={files['client_key']}")
        server = MaasServer(ServerConfig(data_dir=base / "data", port=free_port(), database_url=tls))
        await server.start()
        async with server.db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))).scalar()
        # LISTEN and the leader lock connect with the same TLS settings (the feed connects in the background;
        # pg_hba above admits only TLS connections, so a connected listener is a TLS one).
        async def listening() -> bool:
            return server.feed._listener is not None
        await eventually(listening, timeout=20, message="the LISTEN connection")
        assert server.feed._listener.get_settings() is not None
        assert await server.database_status() == {"database": "ok"}
        await server.stop()
        server = None

        # Without TLS: refused by the server's rules. With another CA: the certificate check fails.
        done = _maas("start", "--no-agent", "--data-dir", str(base / "data2"), "--port", str(free_port()),
                     "--database-url", f"{plain}?sslmode=verify-full&sslrootcert={files['other_ca']}")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "cannot use the database" in done.stderr and "certificate verify failed" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        if server is not None:
            await server.stop()
        await asyncio.to_thread(pg.stop)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- one server per SQLite / MySQL


def _maas(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "maas_tui", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("kind", [pytest.param("sqlite", marks=pytest.mark.sqlite),
                                  pytest.param("mariadb", marks=pytest.mark.mariadb)])
async def test_a_second_server_on_a_single_server_store_is_refused(kind: str, request, tmp_path: Path):
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'maas.db'}"
    else:
        url = await request.getfixturevalue("mariadb_store").new_database(f"single_{os.getpid()}")
    first = MaasServer(ServerConfig(data_dir=tmp_path / "a", port=free_port(), database_url=url))
    await first.start()
    try:
        done = await asyncio.to_thread(_maas, "start", "--no-agent", "--data-dir", str(tmp_path / "b"),
                                       "--port", str(free_port()), "--database-url", url)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "another MaaS-Base server is using" in lines[0], done.stderr
        assert "several servers can share one database only on PostgreSQL" in lines[0]
        assert not (tmp_path / "b" / "token").exists()  # refused before it wrote anything

        second = MaasServer(ServerConfig(data_dir=tmp_path / "c", port=free_port(), database_url=url))
        with pytest.raises(StoreInUse):
            await second.start()
        await second.stop()
    finally:
        await first.stop()
    # Released with the first server: the next one starts.
    third = MaasServer(ServerConfig(data_dir=tmp_path / "d", port=free_port(), database_url=url))
    await third.start()
    await third.stop()


def test_a_killed_servers_claim_goes_with_it(tmp_path: Path):
    """kill -9 of the server holding a SQLite database: the next `maas start` is not refused."""
    import signal

    url = f"sqlite:///{tmp_path / 'maas.db'}"
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "maas_tui", "start", "--no-agent", "--data-dir",
                                str(tmp_path / "a"), "--port", str(port), "--database-url", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "a" / "token").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    async def start_again() -> None:
        server = MaasServer(ServerConfig(data_dir=tmp_path / "b", port=free_port(), database_url=url))
        await server.start()
        await server.stop()

    asyncio.run(start_again())


def test_database_errors_that_mean_busy_or_unavailable():
    """MySQL reports lost connections and deadlocks alike as OperationalError: told apart by number."""
    import asyncpg
    import pymysql
    from sqlalchemy import exc as sa

    from server.api.errors import database_contention, database_unavailable

    gone = sa.OperationalError("SELECT 1", {}, pymysql.err.OperationalError(2013, "Lost connection to MySQL server"))
    refused = sa.OperationalError("SELECT 1", {}, pymysql.err.OperationalError(2003, "Can't connect to MySQL server"))
    deadlock = sa.OperationalError("UPDATE", {}, pymysql.err.OperationalError(1213, "Deadlock found"))
    lock_wait = sa.OperationalError("UPDATE", {}, pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"))
    assert database_unavailable(gone) and database_unavailable(refused)
    assert database_unavailable(pymysql.err.OperationalError(2006, "MySQL server has gone away"))
    assert not database_unavailable(deadlock) and not database_unavailable(lock_wait)
    assert database_contention(deadlock) and database_contention(lock_wait)
    assert database_contention(sa.DBAPIError("UPDATE", {}, asyncpg.exceptions.DeadlockDetectedError("deadlock")))
    assert not database_contention(gone)
    assert not database_contention(sa.IntegrityError("INSERT", {}, pymysql.err.IntegrityError(1062, "Duplicate entry")))
    assert not database_unavailable(sa.IntegrityError("INSERT", {}, pymysql.err.IntegrityError(1062, "Duplicate")))


@pytest.mark.mariadb
async def test_a_mysql_without_insert_returning_is_refused_clearly(mariadb_store):
    from server.db.database import UnsupportedStore

    db = Database(await mariadb_store.new_database(f"old_{os.getpid()}"))
    try:
        async with db.engine.connect() as conn:  # the dialect learns the server's version here
            await conn.execute(text("SELECT 1"))
        db.engine.dialect.insert_returning = False  # as on MySQL 8 or MariaDB before 10.5
        with pytest.raises(UnsupportedStore, match=r"lacks INSERT \.\.\. RETURNING.*MariaDB 10\.5 or newer"):
            await db.migrate()
    finally:
        await db.dispose()
