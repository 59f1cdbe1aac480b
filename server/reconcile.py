"""Reconcile loops, neutral ground for the controllers, the scheduler and the Higress sync: run
`reconcile()` after relevant bus events (batched) and on a timer, or per object with a work queue."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

log = logging.getLogger(__name__)


class ReconcileLoop:
    name = "reconciler"
    kinds: Iterable[str] = ()

    def __init__(self, server: Any, interval: float):
        self.server = server
        self.interval = interval
        self.next_wake: float | None = None  # reconcile() may ask to run again sooner than `interval`
        self._task: asyncio.Task[None] | None = None

    async def reconcile(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        subscription = self.server.bus.subscribe(self.kinds)
        try:
            while True:
                try:
                    await self.reconcile()
                except Exception:
                    log.exception("%s failed; retrying", self.name)
                    await asyncio.sleep(1)
                try:
                    timeout = self.interval if self.next_wake is None else max(0.05, min(self.interval, self.next_wake))
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                    # that races with a result, and stop() would then wait forever.
                    async with asyncio.timeout(timeout):
                        event = await subscription.get()
                    if event is None:  # overflowed: a full reconcile catches up
                        subscription = self.server.bus.subscribe(self.kinds)
                except TimeoutError:
                    continue
                # Batch what arrives together into one pass.
                while not subscription.queue.empty():
                    subscription.queue.get_nowait()
        finally:
            subscription.close()


ALL = object()  # keys_of's answer for "everything": a full reconcile


class WorkQueue:
    """Objects waiting to be reconciled, each at most once: now, or not before a given time.

    Pure bookkeeping (times are passed in); the loop below waits on the bus and the clock.
    """

    def __init__(self) -> None:
        self.full = False
        self._now: set[Any] = set()
        self._later: dict[Any, float] = {}
        self._taken: dict[Any, float] = {}  # key -> when it was last handed out

    def add(self, key: Any) -> None:
        self._now.add(key)
        self._later.pop(key, None)

    def add_after(self, key: Any, delay: float, now: float) -> None:
        """Reconcile `key` again at `now + delay` (sooner if it is already due sooner)."""
        if key in self._now:
            return
        due = now + delay
        if due < self._later.get(key, float("inf")):
            self._later[key] = due

    def add_all(self) -> None:
        self.full = True

    def take(self, now: float, spacing: float = 0.0) -> tuple[bool, set[Any]]:
        """(full, keys) due now; both are cleared. A full pass covers every key, due or not.
        A key taken less than `spacing` seconds ago waits out the rest: a burst of changes to one
        object (500 instances of a model reporting running) becomes a few passes, not 500."""
        due = {k for k, at in self._later.items() if at <= now}
        for key in due:
            del self._later[key]
        keys, self._now = self._now | due, set()
        full, self.full = self.full, False
        if spacing > 0 and not full:
            for key in [k for k in keys if now - self._taken.get(k, float("-inf")) < spacing]:
                keys.discard(key)
                self._later[key] = self._taken[key] + spacing
        for key in keys:
            self._taken[key] = now
        if full:
            self._taken.clear()
        return full, keys

    def next_due(self, now: float) -> float | None:
        """Seconds until something is due (0 when something is), None when nothing waits."""
        if self.full or self._now:
            return 0.0
        if not self._later:
            return None
        return max(0.0, min(self._later.values()) - now)

    def __len__(self) -> int:
        return len(self._now) + len(self._later)


class KeyedReconcileLoop(ReconcileLoop):
    """A reconcile loop with a queue per object, as Kubernetes controllers have: each bus event names
    the objects it concerns (`keys_of`), only those are reconciled (`reconcile_keys`), and a full
    `reconcile()` every `interval` seconds is the safety net for anything missed."""

    spacing = 1.0  # seconds between two passes over the same object (WorkQueue.take)

    def __init__(self, server: Any, interval: float):
        super().__init__(server, interval)
        self.queue = WorkQueue()
        self.passes = {"full": 0, "keyed": 0}

    def keys_of(self, event: Any) -> Iterable[Any] | object:
        """The objects an event concerns: keys, ALL, or nothing (an event this controller ignores)."""
        raise NotImplementedError

    async def reconcile_keys(self, keys: set[Any]) -> None:
        raise NotImplementedError

    def _enqueue(self, event: Any) -> None:
        keys = self.keys_of(event)
        if keys is ALL:
            self.queue.add_all()
        else:
            for key in keys:
                self.queue.add(key)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        subscription = self.server.bus.subscribe(self.kinds)
        last_full = float("-inf")
        try:
            while True:
                now = loop.time()
                if now - last_full >= self.interval:
                    self.queue.add_all()
                full, keys = self.queue.take(now, self.spacing)
                try:
                    if full:
                        last_full = now
                        self.passes["full"] += 1
                        await self.reconcile()
                    elif keys:
                        self.passes["keyed"] += 1
                        await self.reconcile_keys(keys)
                except Exception:
                    log.exception("%s failed; retrying with a full pass", self.name)
                    self.queue.add_all()
                    await asyncio.sleep(1)
                    continue
                now = loop.time()
                timeout = self.interval - (now - last_full)
                due = self.queue.next_due(now)
                if due is not None:
                    timeout = min(timeout, due)
                if timeout <= 0:
                    continue
                try:
                    async with asyncio.timeout(timeout):  # not wait_for: see ReconcileLoop._run
                        event = await subscription.get()
                except TimeoutError:
                    continue
                events = [event]
                while not subscription.queue.empty():
                    events.append(subscription.queue.get_nowait())
                for event in events:
                    if event is None:  # overflowed: a full pass catches up
                        subscription = self.server.bus.subscribe(self.kinds)
                        self.queue.add_all()
                    else:
                        self._enqueue(event)
        finally:
            subscription.close()
