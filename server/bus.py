"""The event bus: every committed row change, in order, with a resource version.

In-process for now (one server process). Subscribers get bounded queues; one that
falls behind is dropped and must resync (the watch stream then sends a new snapshot).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

RING_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class BusEvent:
    version: int
    kind: str
    action: str  # created | updated | deleted
    object: dict[str, Any]


class Subscription:
    def __init__(self, bus: "EventBus", kinds: frozenset[str] | None, maxsize: int):
        self._bus = bus
        self.kinds = kinds
        self.queue: asyncio.Queue[BusEvent | None] = asyncio.Queue(maxsize=maxsize)
        self.overflowed = False

    def offer(self, event: BusEvent) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._bus.unsubscribe(self)
            # Wake the reader so it notices the overflow.
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    async def get(self) -> BusEvent | None:
        """The next event, or None when the subscription overflowed and was dropped."""
        return await self.queue.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self) -> None:
        # Start from wall-clock microseconds so versions keep growing across restarts.
        self._version = time.time_ns() // 1000
        self._ring: deque[BusEvent] = deque(maxlen=RING_SIZE)
        self._subscribers: set[Subscription] = set()

    @property
    def version(self) -> int:
        return self._version

    def publish(self, kind: str, action: str, obj: dict[str, Any]) -> BusEvent:
        self._version += 1
        event = BusEvent(self._version, kind, action, obj)
        self._ring.append(event)
        for sub in list(self._subscribers):
            sub.offer(event)
        return event

    def subscribe(self, kinds: Iterable[str] | None = None, maxsize: int = 10_000) -> Subscription:
        sub = Subscription(self, frozenset(kinds) if kinds is not None else None, maxsize)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def since(self, version: int) -> list[BusEvent] | None:
        """Events after `version`, or None when the ring no longer reaches back that far."""
        if version == self._version:
            return []
        if not self._ring or version < self._ring[0].version - 1 or version > self._version:
            return None
        return [e for e in self._ring if e.version > version]
