"""Usage metering: counted in memory on the request path, written in batches."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from datetime import UTC, date, datetime
from typing import Any

from server.db.usage import add_usage

log = logging.getLogger(__name__)

# (day, api_key_id, api_key_name, user_id, model) -> [requests, prompt_tokens, completion_tokens]
UsageKey = tuple[date, int | None, str, int | None, str]


class UsageMeter:
    def __init__(self, db: Any, interval: float = 2.0):
        self.db = db
        self.interval = interval
        self._pending: defaultdict[UsageKey, list[int]] = defaultdict(lambda: [0, 0, 0])
        self._task: asyncio.Task[None] | None = None

    def record(self, principal: Any, model: str, usage: dict[str, Any] | None) -> None:
        key = (datetime.now(UTC).date(), principal.api_key_id, principal.api_key_name or principal.name,
               principal.user_id, model)
        counts = self._pending[key]
        counts[0] += 1
        if isinstance(usage, dict):
            counts[1] += _count(usage.get("prompt_tokens"))
            counts[2] += _count(usage.get("completion_tokens"))

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
        batch, self._pending = self._pending, defaultdict(lambda: [0, 0, 0])
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
    return value if isinstance(value, int) and value >= 0 else 0
