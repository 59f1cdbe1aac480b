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


# --- history: GET /v2/telemetry (server/telemetry_history.py) ----------------------------------
# Columnar series: `t` holds unix seconds (the start of each bucket), every other list one value per
# `t` (null where nothing was reported in that bucket, e.g. power on a GPU without a power sensor).


class GPUHistory(Schema):
    worker_id: int
    worker: str
    gpu: int
    t: list[float] = Field(default_factory=list)
    utilization: list[float | None] = Field(default_factory=list, description="percent")
    memory_used: list[float | None] = Field(default_factory=list, description="bytes")
    power_watts: list[float | None] = Field(default_factory=list)
    temperature: list[float | None] = Field(default_factory=list, description="Celsius")


class InstanceMemory(Schema):
    """Claimed vs actual memory of an instance (server/memory_drift.py)."""

    device: str = Field(description="gpu: claim and use per GPU; cpu: host RAM")
    claimed_bytes: int = Field(description="the placement claim (per GPU summed, or RAM)")
    used_bytes: int = Field(description="what its processes use: NVML per GPU, host RSS for CPU backends")
    per_gpu: dict[int, list[int]] = Field(default_factory=dict, description="GPU index -> [claimed, used]")
    ratio: float | None = Field(default=None, description="used / claimed")
    drift: str | None = Field(default=None, description="over, under, or null when within the thresholds")
    suggested_memory: str | None = Field(default=None, description="a --memory value that fits what it uses")
    reported_at: float = Field(description="unix seconds of the agent's report")


class InstanceHistory(Schema):
    instance_id: int
    instance: str
    model: str
    t: list[float] = Field(default_factory=list)
    requests_per_s: list[float | None] = Field(default_factory=list)
    tokens_per_s: list[float | None] = Field(default_factory=list, description="completion tokens the gateway metered")
    latency_s: list[float | None] = Field(default_factory=list, description="mean gateway latency")
    memory_used: list[float | None] = Field(default_factory=list, description="bytes its processes use")
    memory: InstanceMemory | None = None


class TelemetryHistory(Schema):
    """This server's history: each server keeps what its own heartbeats and gateway saw."""

    server: str
    step_seconds: float = Field(description="bucket width of the finest points returned")
    gpus: list[GPUHistory] = Field(default_factory=list)
    instances: list[InstanceHistory] = Field(default_factory=list)


# --- maas doctor (agent/doctor.py) -------------------------------------------------------------


class DoctorCheck(Schema):
    name: str
    status: str = Field(pattern=r"^(ok|warn|fail|skip)$")
    detail: str = ""
    fix: str = Field(default="", description="one line: what to do about a warn or fail")


class DoctorReport(Schema):
    worker: str
    checks: list[DoctorCheck] = Field(default_factory=list)
    error: str | None = Field(default=None, description="set when the agent could not be asked")


class DoctorRequest(Schema):
    """What the server tells an agent when it asks for a doctor report."""

    server_time: float = Field(description="the server's unix time when it asked (clock skew)")
    peers: list[str] = Field(default_factory=list, max_length=1000, description="host:port of other workers to reach")
