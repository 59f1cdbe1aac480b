"""Live telemetry on the watch: what heartbeats report that is not state.

GPU utilisation, memory in use, temperature, power and the host's CPU and RAM load move with
every heartbeat. Servers hold them in memory (server/telemetry.py) and send them to watchers of
`workers` as one coalesced message a second, an ordinary watch event of kind `telemetry`:

    {"type": "event", "version": V, "kind": "telemetry", "action": "updated",
     "object": {"full": false, "workers": {"<worker id>": WorkerReading, ...}}}

`full` frames (the first a watcher gets) hold every worker this server hears; the others only the
workers heard since the previous frame. They are not changes: never replayed, no version of their own.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from server.schemas import Schema

TELEMETRY_KIND = "telemetry"


class GPUReading(Schema):
    index: int
    utilization: float = Field(default=0.0, ge=0, le=100)
    memory_used: int = Field(default=0, ge=0, description="bytes")
    temperature: float | None = None
    power_watts: float | None = None


class WorkerReading(Schema):
    gpus: list[GPUReading] = Field(default_factory=list)
    cpu_percent: float = 0.0
    memory_used: int = Field(default=0, ge=0, description="host RAM in use, bytes")
    last_heartbeat_at: datetime


class TelemetryFrame(Schema):
    full: bool = False
    workers: dict[int, WorkerReading] = Field(default_factory=dict)
