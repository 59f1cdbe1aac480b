"""The event bus: every committed row change, in order, with a resource version.

Commits write their changes to the `change_log` table (server/db/database.py). The
ChangeFeed follows that table, woken by PostgreSQL's NOTIFY (changes made by any server
process) or directly after a local commit (the only wake-up on SQLite and MySQL/MariaDB), and publishes each row to this process's
subscribers. A change's id in the log is its resource version, the same on every server.
Subscribers get bounded queues; one that falls behind is dropped and must resync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Callable, Iterable

from sqlalchemy import delete, func, or_, select

from server.db.errors import database_unavailable, first_line

log = logging.getLogger(__name__)

RING_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class BusEvent:
    version: int
    kind: str
    action: str  # created | updated | deleted
    object: dict[str, Any]
    _encoded: list[bytes] = field(default_factory=list, compare=False, repr=False)

    def line(self) -> bytes:
        """This event as a watch line, encoded once however many watchers send it."""
        if not self._encoded:
            self._encoded.append(json.dumps({"type": "event", "version": self.version, "kind": self.kind,
                                             "action": self.action, "object": self.object},
                                            separators=(",", ":")).encode() + b"\n")
        return self._encoded[0]


@dataclass(frozen=True, slots=True)
class Frame:
    """A telemetry frame (server/telemetry.py), already encoded as the watch line it is sent as.
    Not a change: it has no version of its own and is never replayed."""

    line: bytes


class Subscription:
    def __init__(self, bus: "EventBus", kinds: frozenset[str] | None, maxsize: int, worker_id: int | None = None,
                 telemetry: bool = False):
        self._bus = bus
        self.kinds = kinds
        self.queue: asyncio.Queue[BusEvent | Frame | None] = asyncio.Queue(maxsize=maxsize)
        self.overflowed = False
        # An agent's watch: only the instances placed on (or spanning) this worker are offered.
        self.worker_id = worker_id
        # Telemetry frames too; the first one it gets holds every worker, later ones what changed.
        self.telemetry = telemetry
        self.needs_full_frame = telemetry

    def offer(self, event: BusEvent | Frame) -> None:
        if isinstance(event, BusEvent) and self.kinds is not None and event.kind not in self.kinds:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._bus.unsubscribe(self)
            # Wake the reader so it notices the overflow.
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    async def get(self) -> BusEvent | Frame | None:
        """The next event, or None when the subscription overflowed and was dropped."""
        return await self.queue.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    """In-process fan-out of published changes to subscribers, with a replay ring."""

    def __init__(self) -> None:
        self._version = 0
        self._ring: deque[BusEvent] = deque(maxlen=RING_SIZE)
        self._subscribers: set[Subscription] = set()
        # Agents' watches by worker id: an instance change is offered to the watches of the workers
        # it concerns only, not to all of them (1,000 agents would wake 1,000 streams per change).
        self._by_worker: dict[int, set[Subscription]] = {}
        self._telemetry: set[Subscription] = set()
        # Which workers an instance change concerns (its worker, its Ray subordinates); set by the server.
        self.workers_of: Callable[[dict[str, Any]], Iterable[int]] = lambda obj: (obj.get("worker_id"),)

    @property
    def version(self) -> int:
        return self._version

    def publish(self, kind: str, action: str, obj: dict[str, Any], version: int | None = None) -> BusEvent:
        self._version = max(self._version + 1 if version is None else version, self._version)
        event = BusEvent(self._version, kind, action, obj)
        self._ring.append(event)
        for sub in list(self._subscribers):
            sub.offer(event)
        if self._by_worker and kind in ("instances", "files"):
            for worker_id in set(self.workers_of(obj)):
                for sub in list(self._by_worker.get(worker_id, ())):
                    sub.offer(event)
        return event

    def publish_frame(self, delta: Callable[[], bytes | None], full: Callable[[], bytes]) -> None:
        """Offer a telemetry frame to the subscriptions that take them: the full frame to new ones,
        the delta to the rest. Each is built (encoded) once, and only when someone takes it."""
        lines: dict[str, bytes | None] = {}
        for sub in list(self._telemetry):
            which = "full" if sub.needs_full_frame else "delta"
            if which not in lines:
                lines[which] = full() if which == "full" else delta()
            if lines[which] is not None:
                sub.needs_full_frame = False
                sub.offer(Frame(lines[which]))

    def start_at(self, version: int) -> None:
        """Versions continue from here (the newest change already in the log)."""
        self._version = max(self._version, version)

    def subscribe(self, kinds: Iterable[str] | None = None, maxsize: int = 10_000, worker_id: int | None = None,
                  telemetry: bool = False) -> Subscription:
        sub = Subscription(self, frozenset(kinds) if kinds is not None else None, maxsize, worker_id, telemetry)
        if worker_id is not None:
            self._by_worker.setdefault(worker_id, set()).add(sub)
        else:
            self._subscribers.add(sub)
        if telemetry:
            self._telemetry.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        self._telemetry.discard(sub)
        if sub.worker_id is not None:
            subs = self._by_worker.get(sub.worker_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_worker[sub.worker_id]

    def since(self, version: int) -> list[BusEvent] | None:
        """Events after `version`, or None when the ring no longer reaches back that far."""
        if version == self._version:
            return []
        if not self._ring or version < self._ring[0].version - 1 or version > self._version:
            return None
        return [e for e in self._ring if e.version > version]


class ChangeFeed:
    """Follows the change log and publishes it on the local bus, in id order.

    Ids come from a sequence, so a transaction that commits late can land below ids
    already seen; such holes are re-read for GAP_SECONDS before they are given up
    (the controllers' periodic resync covers a change missed even so).
    """

    GAP_SECONDS = 10.0
    POLL_SECONDS = 1.0  # a safety net for a lost notification
    RETAIN = timedelta(hours=1)

    def __init__(self, db: Any, bus: EventBus):
        self.db = db
        self.bus = bus
        self._wake = asyncio.Event()
        self._last = 0
        self._gaps: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._listener: Any = None
        self.lag_seconds = 0.0  # commit to publication, for the newest change read

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        from server.db import tables

        async with self.db.session() as s:
            self._last = (await s.execute(select(func.max(tables.ChangeLog.id)))).scalar() or 0
        self.bus.start_at(self._last)
        self._task = asyncio.create_task(self._run(), name="change-feed")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_listener()

    async def _listen(self) -> None:
        """On PostgreSQL, a NOTIFY from any server wakes us. On SQLite and MySQL/MariaDB only
        this process writes (one server per store there): its own commits wake the feed
        directly, and the poll below is the safety net."""
        if not self.db.is_postgres or self._listener is not None:
            return
        import asyncpg

        try:
            self._listener = await self.db.connect_raw()
            await self._listener.add_listener("maas_changes", lambda *_args: self._wake.set())
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("cannot LISTEN for changes (%s); polling every %.0f s", exc, self.POLL_SECONDS)
            await self._close_listener()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await listener.close(timeout=2)
            except Exception:  # already broken
                listener.terminate()

    async def _run(self) -> None:
        last_cleanup = time.monotonic()
        backoff = 0.5
        while True:
            await self._listen()
            try:
                async with asyncio.timeout(self.POLL_SECONDS):  # not wait_for: see server/reconcile.py
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.read_new()
                if time.monotonic() - last_cleanup > 60:
                    last_cleanup = time.monotonic()
                    await self._clean_up()
                backoff = 0.5
            except Exception as exc:
                backoff = min(5.0, backoff * 2)  # a database that is down is not hammered
                if database_unavailable(exc):
                    log.warning("the change log is unreachable (%s); retrying in %.0f s",
                                first_line(exc), backoff)
                else:
                    log.exception("reading the change log failed; retrying in %.0f s", backoff)
                await self._close_listener()
                await asyncio.sleep(backoff)

    async def read_new(self) -> None:
        from server.db import tables

        now = time.monotonic()
        self._gaps = {gap: seen for gap, seen in self._gaps.items() if now - seen < self.GAP_SECONDS}
        condition = tables.ChangeLog.id > self._last
        if self._gaps:
            condition = or_(condition, tables.ChangeLog.id.in_(list(self._gaps)))
        log_table = tables.ChangeLog
        async with self.db.session() as s:  # plain rows, not ORM objects: a burst is hundreds of them
            rows = (await s.execute(select(log_table.id, log_table.kind, log_table.action, log_table.object,
                                           log_table.created_at).where(condition).order_by(log_table.id))).all()
        for row in rows:
            if row.id in self._gaps:
                self._gaps.pop(row.id)
            elif row.id > self._last + 1:
                for missing in range(self._last + 1, min(row.id, self._last + 1001)):
                    self._gaps[missing] = now
            self._last = max(self._last, row.id)
            self.bus.publish(row.kind, row.action, row.object, version=row.id)
        if rows:
            created = rows[-1].created_at
            created = created if created.tzinfo else created.replace(tzinfo=UTC)
            self.lag_seconds = max(0.0, (datetime.now(UTC) - created).total_seconds())

    async def _clean_up(self) -> None:
        from server.db import tables

        async with self.db.session() as s:
            await s.execute(delete(tables.ChangeLog).where(tables.ChangeLog.created_at < datetime.now(UTC) - self.RETAIN))
            await s.commit()
