"""A reconcile loop: run `reconcile()` after relevant bus events (batched) and on a timer."""

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
