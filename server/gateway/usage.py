"""Usage metering: counted in memory on the request path, written in batches.

One row per (hour, key, model, route): a request through a route counts under the model that
served it, with the route's name beside it, so sums by model and by route both add up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from datetime import UTC, date, datetime
from typing import Any, Callable

from server.db.usage import add_usage

log = logging.getLogger(__name__)

# (day, hour, api_key_id, api_key_name, user_id, model, route, team) -> [requests, prompt_tokens, completion_tokens]
UsageKey = tuple[date, int, int | None, str, int | None, str, str, str]


def _counts() -> list[int]:
    return [0, 0, 0]


class UsageMeter:
    def __init__(self, db: Any, interval: float = 2.0):
        self.db = db
        self.interval = interval
        self._pending: defaultdict[UsageKey, list[int]] = defaultdict(_counts)
        self._task: asyncio.Task[None] | None = None
        self._hour_ends = 0.0  # the current hour, computed once an hour rather than per request
        self._hour: tuple[date, int] = (date.min, 0)
        self.tokens_listener: Callable[[int], None] | None = None  # told each answer's tokens

    def _now(self) -> tuple[date, int]:
        now = time.time()
        if now >= self._hour_ends:
            moment = datetime.fromtimestamp(now, UTC)
            self._hour = (moment.date(), moment.hour)
            self._hour_ends = now - now % 3600 + 3600
        return self._hour

    def record(self, principal: Any, model: str, usage: dict[str, Any] | None, route: str = "",
               team: str | None = None) -> None:
        day, hour = self._now()
        key = (day, hour, principal.api_key_id, principal.api_key_name or principal.name, principal.user_id, model,
               route, team or "")
        counts = self._pending[key]
        counts[0] += 1
        if usage.__class__ is dict:
            prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
            completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
            counts[1] += prompt
            counts[2] += completion
            if self.tokens_listener is not None:  # the gateway's limits (server/gateway/limits.py)
                self.tokens_listener(prompt + completion)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-meter")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, defaultdict(_counts)
        try:
            async with self.db.session() as session:
                await add_usage(session, batch)
                await session.commit()
        except Exception:
            log.exception("could not write usage; keeping it for the next flush")
            for key, counts in batch.items():
                pending = self._pending[key]
                for i in range(3):
                    pending[i] += counts[i]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()


def _count(value: Any) -> int:
    return value if value.__class__ is int and value >= 0 else 0
