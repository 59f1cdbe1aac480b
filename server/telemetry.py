"""Live telemetry of workers, in memory, sent to watchers as coalesced frames.

A heartbeat replaces its worker's reading here (server/api/agent_api.py); nothing goes to the
database or the change log. Once a second the frame of the readings that changed is encoded once
and offered to every watch that takes telemetry (server/bus.py publish_frame); a new watch gets a
full frame first. The wire shape is server/schemas/telemetry.py.

The hub also keeps the bounded history of those readings (server/telemetry_history.py, for
GET /v2/telemetry, the TUI's graphs and `maas top`) and the instances' real memory use against their
claims (server/memory_drift.py), both from the same heartbeats and equally without database writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

from server.schemas import WorkerHeartbeat
from server.memory_drift import MemoryDrift
from server.schemas.telemetry import TELEMETRY_KIND
from server.telemetry_history import TelemetryHistory

log = logging.getLogger(__name__)

FRAME_SECONDS = 1.0


def reading_of(body: WorkerHeartbeat, seen: datetime) -> dict[str, Any]:
    """A heartbeat's moving values as a WorkerReading wire dict (built by hand: on every heartbeat)."""
    return {"gpus": [{"index": g.index, "utilization": g.utilization, "memory_used": g.memory_used,
                      "temperature": g.temperature, "power_watts": g.power_watts} for g in body.gpus],
            "cpu_percent": body.host.cpu_percent, "memory_used": body.host.memory_used,
            "last_heartbeat_at": seen.isoformat()}


class TelemetryHub:
    def __init__(self, bus: Any, frame_seconds: float = FRAME_SECONDS):
        self.bus = bus
        self.frame_seconds = frame_seconds
        self.readings: dict[int, dict[str, Any]] = {}  # worker id -> WorkerReading wire dict
        self._changed: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._drift_task: asyncio.Task[None] | None = None
        self.frames = 0
        self.history = TelemetryHistory()
        self.drift = MemoryDrift()

    def observe_heartbeat(self, worker_id: int, body: WorkerHeartbeat) -> None:
        """The history's and the drift check's share of a heartbeat (memory only)."""
        self.history.observe_worker(worker_id, body.gpus, body.usage)
        if body.usage:
            self.drift.report(body.usage)

    def update(self, worker_id: int, reading: dict[str, Any]) -> None:
        self.readings[worker_id] = reading
        self._changed.add(worker_id)

    def drop(self, worker_id: int) -> None:
        self.readings.pop(worker_id, None)
        self._changed.discard(worker_id)

    def _line(self, workers: dict[int, dict[str, Any]], full: bool) -> bytes:
        message = {"type": "event", "version": self.bus.version, "kind": TELEMETRY_KIND, "action": "updated",
                   "object": {"full": full, "workers": workers}}
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"

    def publish(self) -> None:
        changed, self._changed = self._changed, set()

        def delta() -> bytes | None:
            workers = {w: self.readings[w] for w in changed if w in self.readings}
            return self._line(workers, full=False) if workers else None

        self.bus.publish_frame(delta, lambda: self._line(self.readings, full=True))
        self.frames += 1

    def start(self, db: Any = None) -> None:
        self._task = asyncio.create_task(self._run(), name="telemetry-frames")
        if db is not None:
            self._drift_task = asyncio.create_task(self.drift.run(db), name="memory-drift")

    async def stop(self) -> None:
        for task in (self._task, self._drift_task):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.frame_seconds)
            try:
                self.publish()
            except Exception:  # a bug here must not end the frames for good
                log.exception("publishing a telemetry frame failed")
