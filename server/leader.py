"""Who runs the scheduler and controllers when several servers share one PostgreSQL.

The leader holds a PostgreSQL advisory lock on a connection of its own. When that
server dies, its connection closes, the lock is released, and another server takes
it within one retry interval. On SQLite there is only one server: it always leads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

LOCK_KEY = 0x6D616173  # "maas"


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
        if self._connection is not None:
            await self._connection.close()  # releases the lock at once for the next leader
            self._connection = None

    async def _campaign(self) -> None:
        import asyncpg

        while True:
            try:
                if self._connection is None:
                    self._connection = await asyncpg.connect(self.db.asyncpg_dsn, timeout=10)
                if not self.is_leader:
                    if await self._connection.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                        self.is_leader = True
                        log.info("this server is now the leader: running the scheduler and controllers")
                        await self.on_elected()
                else:
                    await self._connection.fetchval("SELECT 1")  # still connected, so still holding the lock
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("leader election: database connection lost (%s)", exc)
                if self._connection is not None:
                    self._connection.terminate()
                    self._connection = None
                if self.is_leader:
                    self.is_leader = False
                    await self.on_lost()
            await asyncio.sleep(self.retry_seconds)
