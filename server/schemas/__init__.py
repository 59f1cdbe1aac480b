"""The wire contract: pydantic models of every request, response and watch event.

Imported by the server, the agent and the TUI, so it must stay light: pydantic and
the standard library only.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Backends the cluster knows how to run. The agent's backends/ package holds what each
# one needs; the server only validates names against this list.
KNOWN_BACKENDS: tuple[str, ...] = ("llama.cpp",)

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True, extra="forbid")


# --- errors -----------------------------------------------------------------


class ErrorBody(Schema):
    code: str
    message: str
    details: Any = None


class ErrorResponse(Schema):
    error: ErrorBody


# --- auth and keys ----------------------------------------------------------


class LoginRequest(Schema):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class LoginResponse(Schema):
    token: str
    username: str
    expires_at: datetime


Scope = Literal["management", "inference"]
SCOPES: tuple[str, ...] = ("management", "inference")


class ApiKeyCreate(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)
    scopes: list[Scope] = Field(default_factory=lambda: list(SCOPES), min_length=1,
                                description="management: the /v2 API; inference: the /v1 gateway")
    allowed_models: list[str] = Field(default_factory=list, max_length=1000,
                                      description="models this key may call through /v1; empty: all")


class ApiKeyOut(Schema):
    id: int
    name: str
    prefix: str
    scopes: list[Scope] = Field(default_factory=lambda: list(SCOPES))
    allowed_models: list[str] = Field(default_factory=list)
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret. Shown once; only its hash is stored.")


class UsageRow(Schema):
    """Gateway usage summed over whatever the query grouped by; absent groupings are None."""

    day: date | None = None
    api_key: str | None = None
    model: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int


# --- workers ----------------------------------------------------------------


class GPUDevice(Schema):
    index: int
    name: str
    vendor: str = "nvidia"
    uuid: str | None = None
    memory_total: int = Field(ge=0, description="bytes")
    memory_used: int = Field(default=0, ge=0, description="bytes")
    utilization: float = Field(default=0.0, ge=0, le=100)
    temperature: float | None = None
    simulated: bool = False


class HostInfo(Schema):
    hostname: str = ""
    os: str = ""
    cpu_count: int = Field(default=0, ge=0)
    cpu_percent: float = Field(default=0.0, ge=0)
    memory_total: int = Field(default=0, ge=0, description="bytes")
    memory_used: int = Field(default=0, ge=0, description="bytes")


class WorkerState(StrEnum):
    ready = "ready"
    not_ready = "not_ready"


class WorkerRegister(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    address: str = Field(min_length=1, max_length=255, description="where the server and gateway reach this worker")
    agent_port: int = Field(ge=1, le=65535)
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GPUDevice] = Field(default_factory=list)
    host: HostInfo = Field(default_factory=HostInfo)


class WorkerHeartbeat(Schema):
    gpus: list[GPUDevice] = Field(default_factory=list)
    host: HostInfo = Field(default_factory=HostInfo)


class WorkerOut(Schema):
    id: int
    name: str
    address: str
    agent_port: int
    labels: dict[str, str]
    state: WorkerState
    state_message: str = ""
    cordoned: bool = False
    gpus: list[GPUDevice]
    host: HostInfo
    last_heartbeat_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class WorkerRegistered(Schema):
    worker: WorkerOut
    token: str = Field(description="the worker's own credential for heartbeats, status and the watch")
    agent_secret: str = Field(description="what the server presents when it calls the agent (logs)")


# --- models -----------------------------------------------------------------


class ModelSpec(Schema):
    """Everything that shapes an instance. A change to it is a new generation."""

    source: str = Field(min_length=1, max_length=2000, description="local path, or a repository id")
    backend: str
    backend_version: str | None = None
    args: list[str] = Field(default_factory=list, description="extra arguments for the backend")
    env: dict[str, str] = Field(default_factory=dict)
    context_length: int = Field(default=2048, ge=64, le=1_048_576)
    cpu_only: bool = Field(default=False, description="never claim a GPU, serve from host RAM")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in KNOWN_BACKENDS:
            raise ValueError(f"unknown backend {value!r}; known backends: {', '.join(KNOWN_BACKENDS)}")
        return value


class ModelCreate(ModelSpec):
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    replicas: int = Field(default=1, ge=0, le=1000)


class ModelUpdate(Schema):
    replicas: int | None = Field(default=None, ge=0, le=1000)
    source: str | None = Field(default=None, min_length=1, max_length=2000)
    backend: str | None = None
    backend_version: str | None = None
    args: list[str] | None = None
    env: dict[str, str] | None = None
    context_length: int | None = Field(default=None, ge=64, le=1_048_576)
    cpu_only: bool | None = None

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        return None if value is None else ModelSpec._known_backend(value)


class ModelState(StrEnum):
    active = "active"
    deleting = "deleting"


class ModelOut(Schema):
    id: int
    name: str
    spec: ModelSpec
    replicas: int
    generation: int
    state: ModelState
    ready_replicas: int = 0
    created_at: datetime
    updated_at: datetime


# --- instances --------------------------------------------------------------


class InstanceState(StrEnum):
    pending = "pending"
    scheduled = "scheduled"
    starting = "starting"
    running = "running"
    error = "error"
    unreachable = "unreachable"
    terminating = "terminating"


class ResourceClaim(Schema):
    """What the scheduler reserved for an instance; allocation is computed from these."""

    device: Literal["cpu", "gpu"]
    gpu_indexes: list[int] = Field(default_factory=list)
    vram_bytes_per_gpu: int = 0
    ram_bytes: int = 0


class UnschedulableReason(Schema):
    worker: str | None = None
    reason: str
    message: str
    need_bytes: int | None = None
    free_bytes: int | None = None
    gpu: int | None = None


class InstanceOut(Schema):
    id: int
    name: str
    model_id: int
    model_name: str
    generation: int
    spec: ModelSpec
    state: InstanceState
    state_message: str = ""
    worker_id: int | None = None
    worker_name: str | None = None
    address: str | None = None
    port: int | None = None
    pid: int | None = None
    claim: ResourceClaim | None = None
    schedule_reasons: list[UnschedulableReason] = Field(default_factory=list)
    restart_count: int = 0
    created_at: datetime
    updated_at: datetime


class AgentInstanceState(StrEnum):
    starting = "starting"
    running = "running"
    error = "error"
    terminated = "terminated"  # the workload is gone; the server removes a terminating instance


class InstanceStatusReport(Schema):
    state: AgentInstanceState
    message: str = Field(default="", max_length=20_000)
    port: int | None = Field(default=None, ge=1, le=65535)
    pid: int | None = None


# --- events and the watch stream -------------------------------------------


class EventOut(Schema):
    id: int
    kind: str
    object_id: int | None = None
    object_name: str
    reason: str
    message: str = ""
    actor: str = ""
    created_at: datetime


WATCH_KINDS: tuple[str, ...] = ("workers", "models", "instances", "events")


class WatchMessage(Schema):
    """One line of `GET /v2/watch`.

    `snapshot` carries `items` (kind -> list of objects); `event` carries `kind`,
    `action` and `object`; `heartbeat` only the version. Clients resume with
    `?since=<version>`; a version the server no longer holds yields a new snapshot.
    """

    type: Literal["snapshot", "event", "heartbeat"]
    version: int
    kind: str | None = None
    action: Literal["created", "updated", "deleted"] | None = None
    object: dict[str, Any] | None = None
    items: dict[str, list[dict[str, Any]]] | None = None

