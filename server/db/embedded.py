"""Embedded PostgreSQL: a private cluster that the MaaS server starts and stops itself.

The cluster lives in ``DATA_DIR/postgres``; its superuser is ``maas`` with a random
password kept in ``DATA_DIR/postgres-password`` (mode 0600).  The server listens on
127.0.0.1 only, on a free TCP port chosen at start, with Unix sockets switched off (so
long data paths never hit the 107-byte socket path limit; ``pg_ctl -w`` detects
readiness from ``postmaster.pid``, not through a socket).

PostgreSQL refuses to run as root.  When this process is root, ``initdb`` and ``pg_ctl``
run as the existing unprivileged user ``postgres`` through ``runuser`` (or ``su``); no
system user is ever created.

All calls are synchronous (subprocesses); async callers run :meth:`start`, :meth:`stop` and
:meth:`restart_after_crash` in a thread: ``await in_own_thread(pg.restart_after_crash)`` gives the
call a thread of its own, so a busy default executor never delays bringing the database back.

This module is the object's life cycle (prepare directories, initdb, start, restart after a crash,
stop). Apart from it: finding the binaries (server/db/pg_binaries.py), adopting a postmaster that already
runs on the cluster (server/db/pg_adopt.py), and the user-facing message of each way it can fail
(server/db/pg_messages.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote

from server.db import pg_messages
from server.db.pg_adopt import adopt_running, pid_is_postgres, pidfile_lines, port_accepts
from server.db.pg_binaries import EmbeddedPostgresError, find_pg_bin_dir

T = TypeVar("T")

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "find_pg_bin_dir", "in_own_thread"]

SUPERUSER = "maas"
#: Unprivileged OS user that runs PostgreSQL when this process is root.
POSTGRES_OS_USER = "postgres"
_START_TIMEOUT_S = 60
_logged_root = False  # the "runs as user postgres" notice is logged once per process


async def in_own_thread(function: Callable[[], T]) -> T:
    """Run a blocking call on a new thread (not the loop's default executor) and await its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=f"maas-{getattr(function, '__name__', 'call')}", daemon=True).start()
    return await future


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


# --------------------------------------------------------------------------- main class


class EmbeddedPostgres:
    """A private PostgreSQL cluster in ``data_dir / "postgres"``.

    >>> pg = EmbeddedPostgres(Path("/var/lib/maas"))
    >>> url = pg.start()      # "postgresql+asyncpg://maas:...@127.0.0.1:PORT/maas"
    >>> pg.stop()
    """

    def __init__(self, data_dir: Path, database: str = "maas", log: logging.Logger | None = None):
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.database = database
        self.log = log or logging.getLogger(__name__)
        self.cluster_dir = self.data_dir / "postgres"
        self.password_file = self.data_dir / "postgres-password"
        self.log_file = self.data_dir / "postgres.log"
        self.port: int | None = None
        self._url: str | None = None
        self._bin: Path | None = None
        self._lock = threading.Lock()
        self._as_root = os.geteuid() == 0
        self._pg_user: pwd.struct_passwd | None = None
        #: True when start() found the cluster already running (another process started it);
        #: callers that only borrow the cluster (``maas db backup``) then leave it running.
        self.reused = False
        # A restart by this object comes back on the same port when it is still free, so the
        # URLs that engines already hold stay valid (a server recovers by itself).
        self._last_port: int | None = None

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str | None:
        """The SQLAlchemy async URL while started, else None."""
        return self._url

    def start(self) -> str:
        """Create the cluster if needed, start it (or reuse a running one), create the
        database if missing, and return ``postgresql+asyncpg://maas:PW@127.0.0.1:PORT/DB``."""
        with self._lock:
            if self._url is not None:
                return self._url
            t0 = time.perf_counter()
            self._prepare_dirs()
            initialized = (self.cluster_dir / "PG_VERSION").is_file()
            version = (self.cluster_dir / "PG_VERSION").read_text().strip() if initialized else None
            self._bin = find_pg_bin_dir(version)
            if initialized:
                password = self._read_password()
            else:
                password = self._initdb()
            port = self._adopt_running()
            reused = self.reused = port is not None
            if port is None:
                port = self._start_server()
            self._ensure_database(port, password)
            self.port = port
            self._url = (
                f"postgresql+asyncpg://{quote(SUPERUSER, safe='')}:{quote(password, safe='')}"
                f"@127.0.0.1:{port}/{quote(self.database, safe='')}"
            )
            self.log.info(
                "embedded PostgreSQL %s on 127.0.0.1:%d (%s, %.2f s, data in %s)",
                "reused" if reused else "started",
                port,
                "existing cluster" if initialized else "new cluster",
                time.perf_counter() - t0,
                self.cluster_dir,
            )
            return self._url

    def stop(self) -> None:
        """Stop the cluster (``pg_ctl stop -m fast``) if this instance started it.  Idempotent; a
        cluster it found running (``reused``: another server's, or one left behind) is only let go,
        never stopped: stopping it would take the database from under whoever runs it."""
        with self._lock:
            if self._url is None or self._bin is None:
                return
            if self.reused:
                self._url = None
                self._last_port, self.port = self.port, None
                self.log.info("left the embedded PostgreSQL in %s running (this process did not start it)",
                              self.cluster_dir)
                return
            t0 = time.perf_counter()
            res = self._run(
                [self._pg("pg_ctl"), "stop", "-D", str(self.cluster_dir), "-m", "fast", "-w",
                 "-t", str(_START_TIMEOUT_S)],
                timeout=_START_TIMEOUT_S + 30,
            )
            if res.returncode != 0 and self._status() == "running":
                raise pg_messages.did_not_stop(self.cluster_dir, res.stdout, self._log_tail())
            self._url = None
            self._last_port, self.port = self.port, None
            if res.returncode == 0:
                self.log.info("embedded PostgreSQL stopped (%.2f s)", time.perf_counter() - t0)
            else:
                self.log.info("embedded PostgreSQL in %s was not running", self.cluster_dir)

    def alive(self) -> bool:
        """Whether the postmaster of this started cluster still runs (cheap: reads postmaster.pid)."""
        if self._url is None:
            return False
        lines = pidfile_lines(self.cluster_dir)
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return False
        return pid_is_postgres(pid)

    async def postmaster_exit(self, timeout: float) -> None:
        """Return as soon as the running postmaster exits (a pidfd on the event loop), or after
        `timeout` seconds: the watchdog learns of a kill -9 at once instead of at its next poll."""
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(int(pidfile_lines(self.cluster_dir)[0])) if self._url is not None else None
        except (AttributeError, IndexError, ValueError, OSError):  # no pidfd, no pidfile, already gone
            pidfd = None
        if pidfd is None:
            await asyncio.sleep(timeout)
            return
        exited = loop.create_future()
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await exited
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    def restart_after_crash(self) -> str:
        """Start the cluster again after its postmaster died under us (kill -9, the OOM killer),
        on the same port when it is free, so pooled connections find it again. PostgreSQL's
        crash recovery replays the WAL: every committed transaction is there."""
        with self._lock:
            if self._url is not None:
                self._last_port, self.port, self._url = self.port, None, None
        return self.start()

    # ------------------------------------------------------------------ directories

    def _postgres_user(self) -> pwd.struct_passwd:
        if self._pg_user is None:
            try:
                self._pg_user = pwd.getpwnam(POSTGRES_OS_USER)
            except KeyError:
                raise pg_messages.no_postgres_user(POSTGRES_OS_USER) from None
        return self._pg_user

    def _traversable_by_pg(self, st: os.stat_result, pg: pwd.struct_passwd) -> bool:
        if st.st_uid == pg.pw_uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in os.getgrouplist(pg.pw_name, pg.pw_gid):
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def _prepare_dirs(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise pg_messages.data_dir_not_created(self.data_dir, e) from e
        if not self._as_root:
            if not self.cluster_dir.exists():
                self.cluster_dir.mkdir(mode=0o700)
            return

        pg = self._postgres_user()
        global _logged_root
        if not _logged_root:
            self.log.info(
                "running PostgreSQL as user '%s' because this process is root "
                "(PostgreSQL refuses to run as root)",
                pg.pw_name,
            )
            _logged_root = True
        # the postgres user must be able to reach DATA_DIR/postgres
        mode = stat.S_IMODE(self.data_dir.stat().st_mode)
        if mode & 0o711 != 0o711:
            os.chmod(self.data_dir, mode | 0o711)
        for parent in self.data_dir.resolve().parents:
            if not self._traversable_by_pg(parent.stat(), pg):
                raise pg_messages.data_dir_not_traversable(pg.pw_name, self.data_dir, parent)
        if not self.cluster_dir.exists():
            self.cluster_dir.mkdir(mode=0o700)
        st = self.cluster_dir.stat()
        if st.st_uid != pg.pw_uid or st.st_gid != pg.pw_gid:
            if any(self.cluster_dir.iterdir()):
                self.log.info("giving %s to user '%s'", self.cluster_dir, pg.pw_name)
            for root, dirs, files in os.walk(self.cluster_dir):
                os.chown(root, pg.pw_uid, pg.pw_gid)
                for name in dirs + files:
                    os.chown(os.path.join(root, name), pg.pw_uid, pg.pw_gid, follow_symlinks=False)
        os.chmod(self.cluster_dir, 0o700)
        # pg_ctl -l appends to the log as the postgres user: it must own the file
        if not self.log_file.exists():
            self.log_file.touch(mode=0o640)
        lst = self.log_file.stat()
        if lst.st_uid != pg.pw_uid:
            os.chown(self.log_file, pg.pw_uid, pg.pw_gid)

    # ------------------------------------------------------------------ subprocesses

    def bin_path(self, name: str) -> Path:
        """A PostgreSQL program (``pg_dump``, ``pg_restore``, ...) of the version that runs this
        cluster; valid after :meth:`start`."""
        if self._bin is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not started")
        return self._bin / name

    def run_client(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run a client program (pg_dump, pg_restore, psql) as this process's user, connected
        over TCP with the cluster's password: no need to be the ``postgres`` user, and the files
        it writes belong to the caller."""
        if self._url is None or self.port is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not started")
        env = self._env()
        env.update(PGPASSWORD=self._read_password(), PGCONNECT_TIMEOUT="10", PGHOST="127.0.0.1",
                   PGPORT=str(self.port), PGUSER=SUPERUSER, PGDATABASE=self.database)
        return self._run(argv, timeout=timeout, privileged=False, env=env)

    def _pg(self, name: str) -> str:
        assert self._bin is not None
        return str(self._bin / name)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.setdefault("LC_MESSAGES", "C")
        return env

    def _run(self, argv: list[str], timeout: float, privileged: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run argv (as the postgres user when root and ``privileged``), stdout+stderr merged."""
        if privileged and self._as_root:
            user = self._postgres_user().pw_name
            runuser = shutil.which("runuser")
            if runuser:
                argv = [runuser, "-u", user, "--", *argv]
            else:
                su = shutil.which("su") or "su"
                argv = [su, user, "-s", "/bin/sh", "-c", shlex.join(argv)]
        try:
            return subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=str(self.data_dir),
                env=env or self._env(),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise pg_messages.command_timed_out(argv, timeout, self.cluster_dir, self._log_tail()) from e
        except OSError as e:
            raise pg_messages.command_not_run(argv[0], e) from e

    def _log_tail(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        tail = pg_messages.tail(text)
        return f"Last lines of {self.log_file}:\n{tail}" if tail else ""

    # ------------------------------------------------------------------ initdb

    def _read_password(self) -> str:
        try:
            pw = self.password_file.read_text().strip()
        except FileNotFoundError:
            pw = ""
        if not pw:
            raise pg_messages.password_missing(self.cluster_dir, self.password_file)
        return pw

    def _write_password(self, pw: str) -> None:
        tmp = self.password_file.with_name(f".{self.password_file.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (pw + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.password_file)

    def _locale_args(self) -> list[str]:
        try:
            out = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for name in out.split():
            if name.lower() in ("c.utf8", "c.utf-8"):
                return [f"--locale={name}"]
        return ["--no-locale"]

    def _initdb(self) -> str:
        if any(self.cluster_dir.iterdir()):
            raise pg_messages.cluster_dir_not_empty(self.cluster_dir)
        password = secrets.token_urlsafe(32)
        # written first: a cluster must never exist without its password on disk
        self._write_password(password)
        t0 = time.perf_counter()
        help_text = self._run([self._pg("initdb"), "--help"], timeout=30).stdout
        pwfile = self.data_dir / f".initdb-pwfile-{secrets.token_hex(8)}"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (password + "\n").encode())
            if self._as_root:
                pg = self._postgres_user()
                os.fchown(fd, pg.pw_uid, pg.pw_gid)
            os.close(fd)
            fd = -1
            argv = [
                self._pg("initdb"),
                "-D", str(self.cluster_dir),
                "-U", SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                *self._locale_args(),
            ]
            if "--no-instructions" in help_text:
                argv.append("--no-instructions")
            res = self._run(argv, timeout=300)
        finally:
            if fd >= 0:
                os.close(fd)
            pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise pg_messages.initdb_failed(self.cluster_dir, res.returncode, res.stdout)
        self.log.info("created PostgreSQL cluster in %s (%.2f s)", self.cluster_dir,
                      time.perf_counter() - t0)
        return password

    # ------------------------------------------------------------------ start / reuse

    def _status(self) -> str:
        """'running', 'stopped' (rc 3) or 'missing' (rc 4)."""
        res = self._run([self._pg("pg_ctl"), "status", "-D", str(self.cluster_dir)], timeout=30)
        return {0: "running", 3: "stopped"}.get(res.returncode, "missing")

    def _adopt_running(self) -> int | None:
        """The port of an already running postmaster on this cluster, or None (server/db/pg_adopt.py)."""
        return adopt_running(self.cluster_dir, _START_TIMEOUT_S, self._status, self._run, self.log, self._log_tail)

    def _start_server(self) -> int:
        attempts = 0
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            attempts += 1
            port = self._last_port if attempts == 1 and self._last_port and not port_accepts(self._last_port, 0.5) else _free_port()
            try:
                log_start = self.log_file.stat().st_size
            except OSError:
                log_start = 0
            t0 = time.perf_counter()
            opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
            res = self._run(
                [self._pg("pg_ctl"), "start", "-D", str(self.cluster_dir), "-l", str(self.log_file),
                 "-w", "-t", str(_START_TIMEOUT_S), "-o", opts],
                timeout=_START_TIMEOUT_S + 30,
            )
            if res.returncode == 0:
                self.log.info("PostgreSQL started on 127.0.0.1:%d (%.2f s)", port,
                              time.perf_counter() - t0)
                return port
            try:
                with open(self.log_file, errors="replace") as f:
                    f.seek(log_start)
                    new_log = f.read()
            except OSError:
                new_log = ""
            # someone else (another MaaS process) started it meanwhile
            adopted = self._adopt_running()
            if adopted is not None:
                return adopted
            retry = (
                "could not bind" in new_log  # lost the race for the free port
                or "Address already in use" in new_log
                # children of a postmaster killed with -9 still hold the old shared memory
                or "is still in use" in new_log
            )
            if retry and attempts < 20 and time.monotonic() < deadline:
                self.log.info("PostgreSQL did not start (attempt %d), retrying: %s", attempts,
                              pg_messages.tail(new_log, 1))
                time.sleep(min(0.25 * attempts, 2.0))
                continue
            raise pg_messages.did_not_start(self.cluster_dir, res.returncode, self.log_file, res.stdout,
                                            self._log_tail())

    # ------------------------------------------------------------------ database

    def _ensure_database(self, port: int, password: str) -> None:
        psql = self._bin / "psql" if self._bin else None
        if psql is None or not os.access(psql, os.X_OK):
            found = shutil.which("psql")
            psql = Path(found) if found else None
        if psql is None:
            self._ensure_database_asyncpg(port, password)
            return
        env = self._env()
        env.update(PGPASSWORD=password, PGCONNECT_TIMEOUT="10", PGAPPNAME="maas-embedded")
        base = [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                "-p", str(port), "-U", SUPERUSER, "-d", "postgres"]
        check = f"SELECT 1 FROM pg_database WHERE datname = {_sql_literal(self.database)}"
        res = self._run([*base, "-c", check], timeout=60, privileged=False, env=env)
        if res.returncode == 0 and res.stdout.strip() == "1":
            return
        if res.returncode == 0:
            res = self._run([*base, "-c", f"CREATE DATABASE {_sql_ident(self.database)}"],
                            timeout=120, privileged=False, env=env)
            if res.returncode == 0 or "already exists" in res.stdout:
                self.log.info("created database '%s'", self.database)
                return
        raise pg_messages.database_not_ready(port, self.database, pg_messages.tail(res.stdout, 3),
                                             self.password_file, self.cluster_dir, self._log_tail())

    def _ensure_database_asyncpg(self, port: int, password: str) -> None:
        import asyncio

        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=SUPERUSER,
                                         password=password, database="postgres", timeout=10)
            try:
                if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database):
                    return
                try:
                    await conn.execute(f"CREATE DATABASE {_sql_ident(self.database)}")
                except asyncpg.DuplicateDatabaseError:
                    pass
            finally:
                await conn.close()

        errors: list[BaseException] = []

        def runner() -> None:  # own thread: start() may be called from inside an event loop
            try:
                asyncio.run(go())
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=runner, name="maas-embedded-pg-createdb")
        t.start()
        t.join()
        if errors:
            raise pg_messages.database_not_ready(port, self.database, str(errors[0]), self.password_file,
                                                 self.cluster_dir) from errors[0]
