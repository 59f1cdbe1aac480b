"""Who runs the scheduler and controllers, and who may use a store at all.

PostgreSQL: several servers may share the database. The leader holds an advisory lock on a
connection of its own; when that server dies its connection closes, the lock is released,
and another server takes it within one retry interval.

SQLite and MySQL/MariaDB: one server per database (the event bus has no LISTEN/NOTIFY
there). The server holds an exclusive claim for as long as it runs: an OS lock on a file next
to the SQLite file, a named lock (GET_LOCK) on a connection of its own for MySQL. Both vanish
with the process, even after a kill -9. A second server asking for the same store is refused
before it changes anything (:class:`StoreInUse`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

from server.db.errors import database_unavailable, first_line

log = logging.getLogger(__name__)

LOCK_KEY = 0x6D616173  # "maas"
SEVERAL_SERVERS = "several servers can share one database only on PostgreSQL"


class StoreInUse(Exception):
    """Another server already uses this single-server store."""


def _mysql_lock_name(db: Any) -> str:
    # GET_LOCK names are global to the MySQL server: one per database (64 characters at most).
    from sqlalchemy.engine import make_url

    database = make_url(db.url).database or ""
    return "maas_leader_" + hashlib.sha256(database.encode()).hexdigest()[:32]


class LeaderElection:
    def __init__(self, db: Any, on_elected: Callable[[], Awaitable[None]], on_lost: Callable[[], Awaitable[None]],
                 retry_seconds: float = 2.0):
        self.db = db
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.retry_seconds = retry_seconds
        self.is_leader = False
        self._task: asyncio.Task[None] | None = None
        self._connection: Any = None
        self._lock_file: Any = None
        self._claimed = False  # holds the store's exclusive claim (SQLite, MySQL)

    async def claim_store(self) -> None:
        """On a single-server store, take its exclusive claim or raise :class:`StoreInUse`."""
        if self.db.is_sqlite:
            self._claim_sqlite_file()
        elif self.db.dialect == "mysql":
            if not await self._mysql_lock():
                raise StoreInUse(f"another MaaS-Base server is using this MySQL/MariaDB database "
                                 f"({await self._mysql_holder()}); {SEVERAL_SERVERS}")
            self._claimed = True  # the campaign's first round leads on this lock

    def _claim_sqlite_file(self) -> None:
        import fcntl

        from sqlalchemy.engine import make_url

        database = make_url(self.db.url).database
        if not database or database == ":memory:":
            return  # in memory: nothing another process could open
        path = Path(database).absolute().with_name(Path(database).name + ".maas-lock")
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise StoreInUse(f"another MaaS-Base server is using the SQLite database {database} ({holder}); "
                             f"{SEVERAL_SERVERS}") from None
        except BaseException:  # a file system without flock, say: not left open
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock_file = handle

    async def start(self) -> None:
        if self.db.is_sqlite:
            self.is_leader = True
            await self.on_elected()
            return
        self._task = asyncio.create_task(self._campaign(), name="leader-election")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.is_leader:
            self.is_leader = False
            await self.on_lost()
        await self._drop_connection(close=True)  # releases the lock at once for the next leader
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    async def _drop_connection(self, close: bool) -> None:
        conn, self._connection = self._connection, None
        if conn is None:
            return
        if self.db.is_postgres:
            if close:
                await conn.close()
            else:
                conn.terminate()
            return
        try:
            if close:
                await conn.close()
            else:
                await conn.invalidate()
        except Exception:  # already broken
            pass

    # ------------------------------------------------------------------ the lock, per store

    async def _mysql_lock(self) -> bool:
        from sqlalchemy import text

        if self._connection is None:
            self._connection = await self.db.engine.connect()
        got = (await self._connection.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": _mysql_lock_name(self.db)})).scalar()
        await self._connection.commit()  # a named lock outlives transactions; no transaction stays open
        return got == 1

    async def _mysql_holder(self) -> str:
        from sqlalchemy import text

        async with self.db.engine.connect() as conn:
            holder = (await conn.execute(text("SELECT IS_USED_LOCK(:n)"), {"n": _mysql_lock_name(self.db)})).scalar()
            host = None
            try:  # visible with the PROCESS privilege only
                host = (await conn.execute(text("SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = :i"),
                                           {"i": holder})).scalar()
            except Exception:
                pass
        return f"its connection {holder}" + (f" from {host}" if host else "")

    async def _try_lock(self) -> bool:
        if self.db.is_postgres:
            if self._connection is None:
                self._connection = await self.db.connect_raw()
            return bool(await self._connection.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY))
        return await self._mysql_lock()

    async def _check_lock(self) -> None:
        """Raises when the lock's connection is gone (and the lock with it)."""
        if self.db.is_postgres:
            await self._connection.fetchval("SELECT 1")
            return
        from sqlalchemy import text

        mine = (await self._connection.execute(text("SELECT IS_USED_LOCK(:n) = CONNECTION_ID()"),
                                               {"n": _mysql_lock_name(self.db)})).scalar()
        await self._connection.commit()
        if mine != 1:
            raise ConnectionError("the leader lock is no longer held")

    async def _campaign(self) -> None:
        while True:
            try:
                if self._claimed and not self.is_leader and self._connection is not None:
                    # MySQL: claim_store took the lock already.
                    self._claimed = False
                    self.is_leader = True
                    await self.on_elected()
                elif not self.is_leader:
                    if await self._try_lock():
                        self.is_leader = True
                        log.info("this server is now the leader: running the scheduler and controllers")
                        await self.on_elected()
                    elif not self.db.is_postgres:
                        log.error("another MaaS-Base server took this database while it was unreachable; "
                                  "%s: this server leaves the scheduling to it", SEVERAL_SERVERS)
                else:
                    await self._check_lock()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: the lock with it
                if not (database_unavailable(exc) or isinstance(exc, (OSError, TimeoutError, ConnectionError))):
                    log.exception("leader election failed")
                else:
                    log.warning("leader election: database connection lost (%s)", first_line(exc))
                await self._drop_connection(close=False)
                if self.is_leader:
                    self.is_leader = False
                    await self.on_lost()
            await asyncio.sleep(self.retry_seconds)
