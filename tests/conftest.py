"""Shared fixtures: a tiny GGUF model, an in-process server, a local agent, clients, and the stores.

The fast tier runs the real server and agent in the test's event loop over real HTTP on
127.0.0.1 with SQLite; the integration tier (test_integration.py) runs them as separate
processes on the embedded PostgreSQL.

Store tiers: a module named in EVERY_STORE_MODULES (or that sets ``EVERY_STORE = True``) runs each of its tests that use the
``server`` (or ``store_url``) fixture once per store, marked ``sqlite``, ``postgres`` or
``mariadb`` (``pytest -m mariadb`` runs one tier; MAAS_TEST_ALL_STORES=1 does so for every
module). The PostgreSQL and MariaDB servers are started once per session, on loopback ports with data folders of their own; each test gets a
new, empty database. A store whose server binaries are missing skips its tier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import write_tiny_gguf  # noqa: E402

from agent.agent import Agent, AgentConfig  # noqa: E402
from maas_tui.client import MaasClient  # noqa: E402
from server.app import MaasServer  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.db.embedded import EmbeddedPostgresError, find_pg_bin_dir  # noqa: E402


def _postgres_binaries() -> bool:
    try:
        find_pg_bin_dir()
        return True
    except EmbeddedPostgresError:
        return False


HAVE_POSTGRES = _postgres_binaries()  # the embedded PostgreSQL can run here

# Local model sources must lie under the model roots (server/schemas/backend_traits.py). The tests
# write their models under /tmp or ship them in tests/fixtures; servers and agents they start in
# subprocesses inherit this too. Tests of the roots themselves pass roots of their own.
os.environ.setdefault("MAAS_MODEL_ROOTS", os.pathsep.join(["/tmp", str(Path(__file__).parent / "fixtures")]))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.1,
                     message: str = "condition") -> None:
    """Poll `check` until it is true; a bounded wait, never a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def traversable_tmp() -> Path:
    """A temp folder the `postgres` user can traverse (pytest's own tmp root is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="maas-tests-", dir="/tmp"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(traversable_tmp: Path) -> Path:
    return write_tiny_gguf(traversable_tmp / "tiny.gguf", seed=0)


# --------------------------------------------------------------------------- stores

STORES = [pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("postgres", marks=pytest.mark.postgres),
          pytest.param("mariadb", marks=pytest.mark.mariadb)]
_database_names = itertools.count(1)


# The store-dependent modules: their tests that use the `server` (or `store_url`) fixture run on
# every store. The rest of the suite runs on SQLite, the fastest, where the store does not matter.
EVERY_STORE_MODULES = {"test_api", "test_db", "test_store_cluster"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    every = (getattr(metafunc.module, "EVERY_STORE", False) or metafunc.module.__name__ in EVERY_STORE_MODULES
             or os.environ.get("MAAS_TEST_ALL_STORES") == "1")  # a developer's check of the whole suite
    if "store" in metafunc.fixturenames and every:
        metafunc.parametrize("store", STORES, indirect=True)


def mariadb_binaries() -> tuple[str, str] | None:
    """(mariadbd, mariadb-install-db), or None when MariaDB's server is not installed."""
    daemon = shutil.which("mariadbd") or next((p for p in ("/usr/sbin/mariadbd",) if os.path.exists(p)), None)
    install = shutil.which("mariadb-install-db")
    return (daemon, install) if daemon and install else None


class MariaDBServer:
    """A MariaDB server of the tests' own: its data folder, a Unix socket in it, 127.0.0.1:port.

    As root it runs as the `mysql` user (the Debian package creates it), which owns the folder."""

    def __init__(self, base: Path):
        self.base = base
        self.datadir = base / "data"
        self.socket = base / "mariadb.sock"
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.process: subprocess.Popen | None = None
        self.daemon, self.install = mariadb_binaries() or ("", "")
        self.as_root = os.geteuid() == 0

    def _user_args(self) -> list[str]:
        return ["--user=mysql"] if self.as_root else []

    def start(self) -> None:
        first = not self.datadir.exists()
        if first:
            self.base.mkdir(parents=True, exist_ok=True)
            if self.as_root:
                mysql = pwd.getpwnam("mysql")
                os.chown(self.base, mysql.pw_uid, mysql.pw_gid)
            subprocess.run([self.install, "--no-defaults", *self._user_args(), f"--datadir={self.datadir}",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           check=True, capture_output=True, timeout=120)
        log = open(self.base / "server.log", "ab")
        self.process = subprocess.Popen(
            [self.daemon, "--no-defaults", *self._user_args(), f"--datadir={self.datadir}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-networking=0", "--skip-name-resolve",
             f"--pid-file={self.base / 'mariadb.pid'}", "--log-error=" + str(self.base / "error.log"),
             # A test server: small, and durable only as far as a clean stop (kill -9 tests restart it;
             # InnoDB's redo log still recovers every committed transaction there).
             "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=32M", "--innodb-flush-log-at-trx-commit=2",
             "--innodb-doublewrite=0", "--skip-log-bin", "--performance-schema=0", "--max-connections=1000"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        if first:
            self.admin(f"CREATE USER 'maas'@'127.0.0.1' IDENTIFIED BY '{self.password}'",
                       "GRANT ALL PRIVILEGES ON *.* TO 'maas'@'127.0.0.1'")

    def _wait_ready(self) -> None:
        import pymysql

        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.process.returncode}: "
                                   + (self.base / "error.log").read_text()[-2000:])
            try:
                pymysql.connect(unix_socket=str(self.socket), user="root", connect_timeout=2).close()
                return
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def admin(self, *statements: str) -> None:
        import pymysql

        conn = pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=True)
        try:
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        finally:
            conn.close()

    def url(self, database: str) -> str:
        return f"mysql://maas:{self.password}@127.0.0.1:{self.port}/{database}"

    async def new_database(self, name: str) -> str:
        await asyncio.to_thread(self.admin, f"DROP DATABASE IF EXISTS `{name}`", f"CREATE DATABASE `{name}`")
        return self.url(name)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


class PostgresServer:
    """The embedded PostgreSQL, started once for a session's store tier."""

    def __init__(self, base: Path):
        from server.db.embedded import EmbeddedPostgres

        self.pg = EmbeddedPostgres(base / "pg")

    def start(self) -> None:
        self.pg.start()

        async def tune() -> None:
            # A throwaway test cluster: no flushes to disk (each test's CREATE DATABASE and
            # migration would otherwise wait for them). Reloadable settings: no restart.
            conn = await self._admin()
            try:
                for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off"):
                    await conn.execute(f"ALTER SYSTEM SET {setting}")
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()

        # Its own thread: a session fixture may be set up while a test's event loop runs.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, tune()).result()

    async def _admin(self):
        import asyncpg

        return await asyncpg.connect(host="127.0.0.1", port=self.pg.port, user="maas",
                                     password=self.pg.password_file.read_text().strip(), database="postgres")

    async def new_database(self, name: str) -> str:
        conn = await self._admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.pg.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        self.pg.stop()


@pytest.fixture(scope="session")
def mariadb_store(traversable_tmp: Path) -> Iterator[MariaDBServer]:
    if mariadb_binaries() is None:
        pytest.skip("MariaDB server binaries not installed (scripts/ensure-mariadb.sh installs them)")
    server = MariaDBServer(traversable_tmp / "mariadb")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_store(traversable_tmp: Path) -> Iterator[PostgresServer]:
    if not HAVE_POSTGRES:
        pytest.skip("PostgreSQL server binaries not installed")
    server = PostgresServer(traversable_tmp / "postgres-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """sqlite, postgres or mariadb: every store in an EVERY_STORE module, else SQLite."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
async def store_url(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database on the test's store."""
    if store == "sqlite":
        return f"sqlite:///{tmp_path / 'maas.db'}"
    server = request.getfixturevalue("postgres_store" if store == "postgres" else "mariadb_store")
    return await server.new_database(f"t{next(_database_names)}_{os.getpid()}")


@pytest.fixture
async def server(tmp_path: Path, store_url: str) -> AsyncIterator[MaasServer]:
    config = ServerConfig(data_dir=tmp_path / "data", port=free_port(), database_url=store_url, resync_interval=2.0)
    srv = MaasServer(config)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def admin(server: MaasServer) -> AsyncIterator[MaasClient]:
    """A client logged in as the admin with the generated first-start password."""
    password = server.admin_password_file.read_text().strip()
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("admin", password)).token
    async with MaasClient(server.url, token) as client:
        yield client


@pytest.fixture
async def api_key(admin: MaasClient) -> str:
    return (await admin.create_key("tests", scopes=["management", "inference"])).key


@pytest.fixture
async def agent(server: MaasServer, tmp_path: Path) -> AsyncIterator[Agent]:
    local = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="worker-1", address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=1.0))
    await local.start()
    await asyncio.wait_for(local.registered.wait(), 10)
    try:
        yield local
    finally:
        await local.stop()
