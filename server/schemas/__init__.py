"""The wire contract: pydantic models of every request, response and watch event.

Imported by the server, the agent and the TUI, so it must stay light: pydantic and
the standard library only. Why one module of this size: `schemas.X` names every wire model in one
place for three packages; an area that grows apart moves to a module of its own and stays re-exported
here (backend_traits, rollout, telemetry, people).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.schemas.backend_traits import BACKEND_TRAITS, args_problems, env_name_problem, flag_name, template_problem

# Backends the cluster knows how to run: the traits table (server/schemas/backend_traits.py) says what
# each accepts; the agent's backends/ package holds how each one starts.
KNOWN_BACKENDS: tuple[str, ...] = tuple(BACKEND_TRAITS)
# Backends whose memory the scheduler estimates from a Hugging Face layout (config.json + safetensors).
HF_BACKENDS: tuple[str, ...] = ("vllm", "sglang")

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"

# admin: everything. operator: workers, backends and every team's models; no users or teams.
# member: its teams' models, instances, logs; its own keys and usage. viewer: reads its teams' objects.
Role = Literal["admin", "operator", "member", "viewer"]
ROLES: tuple[str, ...] = get_args(Role)
# A user's role in one team: member (deploys and changes the team's models) or viewer (reads them).
TeamRole = Literal["member", "viewer"]
TEAM_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"
DEFAULT_TEAM = "default"
# What a model serves; the gateway routes a /v1 endpoint only to models of its category.
ModelCategory = Literal["llm", "embedding", "reranker", "speech_to_text", "text_to_speech", "image"]
MODEL_CATEGORIES: tuple[str, ...] = get_args(ModelCategory)


def derive_categories(backend: str, args: list[str] | tuple[str, ...] = (),
                      categories: list[str] | None = None) -> tuple[str, ...]:
    """The categories a model serves: as given, else from the backend and its args. Text generation
    (llm) by default; llama.cpp's --embedding(s)/--reranking add embedding/reranker (what that server
    then answers); vox-box serves speech both ways."""
    if categories:
        return tuple(categories)
    if backend == "vox-box":
        return ("speech_to_text", "text_to_speech")
    derived = ["llm"]
    if any(a in ("--embedding", "--embeddings") for a in args):
        derived.append("embedding")
    if any(a in ("--reranking", "--rerank") for a in args):
        derived.append("reranker")
    return tuple(derived)


# Backends users register (`maas backend add -f FILE`) are deployed as `custom:NAME`.
CUSTOM_BACKEND_PREFIX = "custom:"
BACKEND_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
CUSTOM_BACKEND_REF = re.compile(r"^custom:[a-z0-9][a-z0-9._-]{0,63}$")


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
    scopes: list[Scope] = Field(default_factory=lambda: ["inference"], min_length=1, description=(
        "management: the /v2 API; inference: the /v1 gateway (the default: a key for an application)"))
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


class ApiKeyListed(ApiKeyOut):
    owner: str = Field(description="the user the key belongs to")


class SessionOut(Schema):
    """A login session (from `maas login` or the SSH front door): revocable, never readable again."""

    prefix: str
    username: str
    kind: Literal["login", "ssh"]
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret. Shown once; only its hash is stored.")


class UsageRow(Schema):
    """Gateway usage summed over whatever the query grouped by; absent groupings are None."""

    day: date | None = None
    hour: int | None = None  # 0-23 UTC, with by=hour
    api_key: str | None = None
    model: str | None = None  # the model that served (a route's target)
    route: str | None = None  # the route called ("" for the model called by its own name)
    team: str | None = None
    user: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int


# --- workers ----------------------------------------------------------------


class GPUProcess(Schema):
    pid: int
    used_memory: int | None = Field(default=None, ge=0, description="bytes; None where the driver does not say")
    kind: Literal["compute", "graphics"] = "compute"


class GPUDevice(Schema):
    index: int
    name: str
    vendor: str = "nvidia"
    uuid: str | None = None
    memory_total: int = Field(ge=0, description="bytes")
    memory_used: int = Field(default=0, ge=0, description="bytes")
    utilization: float = Field(default=0.0, ge=0, le=100)
    temperature: float | None = None
    power_watts: float | None = Field(default=None, ge=0, description="power draw (NVML)")
    mig_mode: bool | None = Field(default=None, description="MIG enabled (None: not supported or unknown)")
    processes: list[GPUProcess] = Field(default_factory=list, description="processes using this GPU (NVML)")
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


# A DNS name: dot-separated labels of letters, digits and inner hyphens, 63 characters at most each.
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def address_problem(address: str) -> str | None:
    """Why `address` is not an IP address or a DNS name (None when it is one). The server, the gateway
    and Ray put it into URLs and command lines, so nothing else may pass."""
    if "%" in address:  # an IPv6 zone takes any text after the %
        return f"{address[:80]!r}: an IPv6 zone (%...) is not taken; give the address without it"
    try:
        ipaddress.ip_address(address)
        return None
    except ValueError:
        pass
    name = address[:-1] if address.endswith(".") else address
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        return f"{address[:80]!r} is neither an IP address nor a DNS name"
    if name.replace(".", "").isdigit():
        return f"{address[:80]!r} is neither an IP address nor a DNS name (all digits)"
    return None


class WorkerRegister(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    address: str = Field(min_length=1, max_length=255,
                         description="where the server and gateway reach this worker: an IP address or a DNS name")
    agent_port: int = Field(ge=1, le=65535)
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GPUDevice] = Field(default_factory=list)
    host: HostInfo = Field(default_factory=HostInfo)
    token: str | None = Field(default=None, max_length=200, description=(
        "the worker's current token, when it registers again under its name (a restarted agent keeps "
        "its identity); without it a taken name waits for `maas worker approve NAME`"))

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if problem := address_problem(value):
            raise ValueError(problem)
        return value


class InstanceUsage(Schema):
    """What an instance's processes really use on its worker (agent/usage.py), sent with heartbeats and
    compared with the claim by the server (server/memory_drift.py)."""

    instance_id: int = Field(ge=1)
    ram_bytes: int = Field(default=0, ge=0, description="resident memory of the process tree (host RSS)")
    gpu_bytes: dict[int, int] = Field(default_factory=dict, description="GPU index -> bytes its processes use (NVML)")


class WorkerHeartbeat(Schema):
    gpus: list[GPUDevice] = Field(default_factory=list)
    host: HostInfo = Field(default_factory=HostInfo)
    usage: list[InstanceUsage] = Field(default_factory=list, max_length=4096)


class WorkerOut(Schema):
    id: int
    name: str
    address: str
    agent_port: int
    labels: dict[str, str]
    state: WorkerState
    state_message: str = ""
    cordoned: bool = False
    draining: bool = False
    gpus: list[GPUDevice]
    host: HostInfo
    last_heartbeat_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class WorkerRegistrationRequest(Schema):
    """A registration under a taken worker name that did not present the worker's current token."""

    address: str
    agent_port: int
    requested_at: datetime


class WorkerApproval(Schema):
    """A worker name's takeover: the registration waiting for approval, and the approval once given
    (it lets the next registration under the name through, once, until `approved_until`)."""

    worker: str
    pending: WorkerRegistrationRequest | None = None
    approved_by: str = ""
    approved_until: datetime | None = None


class WorkerRegistered(Schema):
    worker: WorkerOut
    token: str = Field(description="the worker's own credential for heartbeats, status and the watch")
    agent_secret: str = Field(description="what the server presents when it calls the agent (logs)")


# --- models -----------------------------------------------------------------


LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")


class GPUSelection(Schema):
    """Manual placement: the worker and the GPU indexes an instance must use."""

    worker: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    gpu_indexes: list[int] = Field(min_length=1, max_length=64)

    @field_validator("gpu_indexes")
    @classmethod
    def _indexes(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("GPU indexes are 0 or more")
        if len(set(value)) != len(value):
            raise ValueError("a GPU index is given twice")
        return value


SECRET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class SecretRef(Schema):
    """An env value kept as a team secret (`maas secret set NAME`): the agent fetches it when it starts
    the instance; the spec, its history, events and the watch hold only the name."""

    secret: str = Field(pattern=SECRET_NAME_PATTERN)


PRIORITY_PATTERN = r"^[a-z][a-z0-9_-]{0,39}$"


class ModelSpec(Schema):
    """Everything that shapes an instance. A change to it is a new generation."""

    source: str = Field(min_length=1, max_length=2000, description="local path, or a repository id")
    backend: str
    backend_version: str | None = None
    args: list[str] = Field(default_factory=list, description="extra arguments for the backend")
    env: dict[str, str | SecretRef] = Field(default_factory=dict, description=(
        "variables for the backend: a value, or {secret: NAME} for a secret of the model's team"))
    context_length: int = Field(default=2048, ge=64, le=1_048_576)
    cpu_only: bool = Field(default=False, description="never claim a GPU, serve from host RAM")
    # --- scheduling (see server/scheduler) ---
    max_model_len: int | None = Field(default=None, ge=16, le=10_485_760, description=(
        "vllm/sglang: longest sequence (prompt + output) served; default: the model's max_position_embeddings"))
    concurrency: int = Field(default=1, ge=1, le=4096, description=(
        "vllm/sglang: full-length sequences the KV cache must hold at once (the claim grows with it)"))
    memory_bytes: int | None = Field(default=None, ge=1, le=2**50, description=(
        "claim this many bytes per replica instead of the estimate (e.g. a hub model without local metadata)"))
    worker_selector: dict[str, str] = Field(default_factory=dict, description="only workers with all these labels")
    gpu_selector: list[GPUSelection] = Field(default_factory=list, max_length=64, description=(
        "manual placement: these GPUs of these workers (more than one worker needs distributed)"))
    gpu_type: str | None = Field(default=None, min_length=1, max_length=100,
                                 description="only GPUs whose name contains this (case-insensitive), e.g. H100")
    gpu_vendor: str | None = Field(default=None, min_length=1, max_length=40, description="only GPUs of this vendor")
    placement_strategy: Literal["spread", "binpack"] = Field(default="spread", description=(
        "spread: replicas on different workers first (least loaded first); binpack: fill GPUs tightly"))
    distributed: bool = Field(default=False, description=(
        "vllm/sglang/custom:NAME: may span several workers (a Ray cluster over them) when no single worker fits; "
        "a custom backend gets the head's address as {ray_address} and RAY_ADDRESS"))
    partial_offload: bool = Field(default=False, description=(
        "llama.cpp: when no GPU holds the whole model, keep some layers in host RAM"))
    categories: list[ModelCategory] | None = Field(default=None, min_length=1, max_length=len(MODEL_CATEGORIES),
                                                   description=(
        "what the model serves, which gates the /v1 endpoints: llm (chat, completions), embedding, reranker, "
        "speech_to_text (audio/transcriptions), text_to_speech (audio/speech), image (images/generations); "
        "default: llm, plus embedding/reranker for llama.cpp's --embeddings/--reranking, speech both ways for vox-box"))

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in KNOWN_BACKENDS and not CUSTOM_BACKEND_REF.match(value):
            raise ValueError(f"unknown backend {value!r}; known backends: {', '.join(KNOWN_BACKENDS)}, "
                             f"or {CUSTOM_BACKEND_PREFIX}NAME for one registered with `maas backend add`")
        return value

    @field_validator("categories")
    @classmethod
    def _unique_categories(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))

    def served_categories(self) -> tuple[str, ...]:
        return derive_categories(self.backend, self.args, self.categories)

    @field_validator("worker_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 32:
            raise ValueError("at most 32 labels")
        for key, item in value.items():
            if not LABEL_KEY.match(key):
                raise ValueError(f"label key {key!r}: use letters, digits, '.', '_', '-' and '/', at most 100 characters")
            if len(item) > 200:
                raise ValueError(f"label {key!r}: value longer than 200 characters")
        return value

    @model_validator(mode="after")
    def _scheduling_fields_fit_the_backend(self) -> "ModelSpec":
        hf = self.backend in HF_BACKENDS
        if not hf and self.max_model_len is not None:
            raise ValueError(f"max_model_len applies to {'/'.join(HF_BACKENDS)}; {self.backend} uses context_length")
        # A custom backend may be distributed (the agents form the Ray cluster, its command drives it)
        # and may serve from host RAM: what it runs is its own.
        traits = BACKEND_TRAITS.get(self.backend)
        if traits is not None and self.distributed and not traits.distributed:
            raise ValueError(f"distributed applies to {'/'.join(b for b, t in BACKEND_TRAITS.items() if t.distributed)} "
                             f"and custom backends, not {self.backend}")
        if traits is not None and self.cpu_only and not traits.cpu_only:
            raise ValueError(f"{self.backend} has no CPU build, so cpu_only does not apply (it does to "
                             f"{' and '.join(b for b, t in BACKEND_TRAITS.items() if t.cpu_only)})")
        if self.cpu_only and self.distributed:
            raise ValueError("cpu_only and distributed exclude each other: multi-worker placements are on GPUs")
        if self.partial_offload and self.backend != "llama.cpp":
            raise ValueError("partial_offload applies to llama.cpp only")
        if self.partial_offload and self.cpu_only:
            raise ValueError("partial_offload and cpu_only exclude each other")
        if self.cpu_only and (self.gpu_selector or self.gpu_type or self.gpu_vendor):
            raise ValueError("cpu_only cannot be combined with gpu_selector, gpu_type or gpu_vendor")
        if self.gpu_selector:
            workers = [s.worker for s in self.gpu_selector]
            if len(set(workers)) != len(workers):
                raise ValueError("gpu_selector names a worker twice")
            if len(workers) > 1 and not self.distributed:
                raise ValueError("gpu_selector spans several workers: set distributed (vllm/sglang/custom)")
            if len({len(s.gpu_indexes) for s in self.gpu_selector}) > 1:
                raise ValueError("gpu_selector: every worker must give the same number of GPUs (the tensor-parallel size)")
        return self


class ModelCreate(ModelSpec):
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    team: str | None = Field(default=None, pattern=TEAM_NAME_PATTERN, description=(
        "the owning team; default: the caller's only team where it is a member (admins and operators: default)"))
    replicas: int = Field(default=1, ge=0, le=1000)
    max_surge: int = Field(default=1, ge=0, le=1000, description="rollouts: instances above replicas while replacing")
    max_unavailable: int = Field(default=0, ge=0, le=1000, description="rollouts: running instances that may be missing")
    # Autoscaling and priority (server/controllers/autoscale.py): policy, not spec, so no new generation.
    min_replicas: int | None = Field(default=None, ge=0, le=1000, description=(
        "autoscaling: fewest replicas (0: scale to zero after idle_timeout); needs max_replicas"))
    max_replicas: int | None = Field(default=None, ge=1, le=1000, description=(
        "autoscaling: most replicas; setting it turns autoscaling on (replicas is then the autoscaler's)"))
    target_concurrency: int = Field(default=8, ge=1, le=100_000, description=(
        "autoscaling: requests in flight (or held) per replica the autoscaler aims at"))
    scale_down_delay: float = Field(default=60.0, ge=0, le=86_400, description=(
        "autoscaling: seconds the load must stay low before replicas are removed"))
    idle_timeout: float = Field(default=900.0, ge=1, le=30 * 86_400, description=(
        "autoscaling with min_replicas 0: seconds without a request before the model goes to zero replicas"))
    cold_start_timeout: float = Field(default=120.0, ge=1, le=3600, description=(
        "seconds the gateway holds a request while a replica starts, then 503 with Retry-After"))
    priority: str = Field(default="normal", pattern=PRIORITY_PATTERN, description=(
        "priority class (server config, default critical, high, normal, low): a pending instance may preempt "
        "instances of strictly lower classes"))

    @model_validator(mode="after")
    def _rollout_can_progress(self) -> "ModelCreate":
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: a rollout could never progress")
        if (problem := scaling_range_problem(self.min_replicas, self.max_replicas)) is not None:
            raise ValueError(problem)
        return self


def scaling_range_problem(min_replicas: int | None, max_replicas: int | None) -> str | None:
    """Why an autoscaling range is wrong, or None (one rule for create, edit and the TUI)."""
    if min_replicas is not None and max_replicas is None:
        return "min_replicas needs max_replicas: autoscaling is on when max_replicas is set"
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        return f"min_replicas ({min_replicas}) is above max_replicas ({max_replicas})"
    return None


# Fields of ModelCreate that are not part of the instance spec.
SCALING_FIELDS = frozenset({"min_replicas", "max_replicas", "target_concurrency", "scale_down_delay", "idle_timeout",
                            "cold_start_timeout", "priority"})
MODEL_POLICY_FIELDS = frozenset({"name", "team", "replicas", "max_surge", "max_unavailable"}) | SCALING_FIELDS


class ModelUpdate(Schema):
    replicas: int | None = Field(default=None, ge=0, le=1000, description=(
        "manual scale; on an autoscaled model it turns autoscaling off unless max_replicas is given too"))
    min_replicas: int | None = Field(default=None, ge=0, le=1000)
    max_replicas: int | None = Field(default=None, ge=1, le=1000)
    target_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    scale_down_delay: float | None = Field(default=None, ge=0, le=86_400)
    idle_timeout: float | None = Field(default=None, ge=1, le=30 * 86_400)
    cold_start_timeout: float | None = Field(default=None, ge=1, le=3600)
    priority: str | None = Field(default=None, pattern=PRIORITY_PATTERN)
    max_surge: int | None = Field(default=None, ge=0, le=1000)
    max_unavailable: int | None = Field(default=None, ge=0, le=1000)
    source: str | None = Field(default=None, min_length=1, max_length=2000)
    backend: str | None = None
    backend_version: str | None = None
    args: list[str] | None = None
    env: dict[str, str | SecretRef] | None = None
    context_length: int | None = Field(default=None, ge=64, le=1_048_576)
    cpu_only: bool | None = None
    max_model_len: int | None = Field(default=None, ge=16, le=10_485_760)
    concurrency: int | None = Field(default=None, ge=1, le=4096)
    memory_bytes: int | None = Field(default=None, ge=1, le=2**50)
    worker_selector: dict[str, str] | None = None
    gpu_selector: list[GPUSelection] | None = Field(default=None, max_length=64)
    gpu_type: str | None = Field(default=None, min_length=1, max_length=100)
    gpu_vendor: str | None = Field(default=None, min_length=1, max_length=40)
    placement_strategy: Literal["spread", "binpack"] | None = None
    distributed: bool | None = None
    partial_offload: bool | None = None

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
    paused: bool = False
    max_surge: int = 1
    max_unavailable: int = 0
    rollout_message: str = ""
    team: str | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_concurrency: int = 8
    scale_down_delay: float = 60.0
    idle_timeout: float = 900.0
    cold_start_timeout: float = 120.0
    priority: str = "normal"
    scale_reason: str = Field(default="", description="the autoscaler's last decision and why")
    scaled_at: datetime | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas is not None


class ModelRevisionOut(Schema):
    revision: int
    spec: ModelSpec
    change: str
    created_at: datetime


class RolloutStatus(Schema):
    """Where a model's rollout stands: `updated` instances run the newest spec, `ready` of them are running."""

    model: str
    generation: int
    replicas: int
    updated: int
    ready: int
    available: int = Field(description="running instances of any generation")
    outdated: int = Field(description="instances of older generations still present")
    paused: bool
    complete: bool
    message: str = ""


class RolloutUndo(Schema):
    to_revision: int | None = Field(default=None, ge=1, description="default: the revision before the current one")


# --- instances --------------------------------------------------------------


class InstanceState(StrEnum):
    pending = "pending"
    scheduled = "scheduled"
    downloading = "downloading"  # the agent fetches the model or the container image (download_progress)
    starting = "starting"
    running = "running"
    error = "error"
    unreachable = "unreachable"
    terminating = "terminating"


# Placed on a worker but not serving yet: what "not ready" means for rollouts, routing and the UI.
NOT_READY_STATES: frozenset[str] = frozenset({"scheduled", "downloading", "starting"})


class MemoryEstimateOut(Schema):
    """What one replica needs and why (bytes)."""

    method: str = Field(description="where the weights came from: safetensors, index, config, gguf, file_size, override")
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    overhead_bytes: int = Field(default=0, description="per GPU: activations, CUDA graphs, CUDA context, buffers")
    total_bytes: int = Field(default=0, description="on one device (one GPU, or host RAM)")
    max_model_len: int | None = None
    concurrency: int | None = None
    tensor_parallel_sizes: list[int] | None = Field(default=None, description="sizes the attention heads allow")
    notes: list[str] = Field(default_factory=list)


class SubordinateClaim(Schema):
    """The part of a multi-worker placement on another worker (a Ray worker of the main instance)."""

    worker_id: int
    worker_name: str
    address: str | None = None
    gpu_indexes: list[int] = Field(default_factory=list)
    vram_bytes_per_gpu: int = 0


class ResourceClaim(Schema):
    """What the scheduler reserved for an instance; allocation is computed from these."""

    device: Literal["cpu", "gpu"]
    gpu_indexes: list[int] = Field(default_factory=list)
    vram_bytes_per_gpu: int = 0
    ram_bytes: int = 0
    # Multi-GPU and multi-worker placements (defaults describe one GPU or the CPU).
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1, description="workers: this one plus subordinate_workers")
    subordinate_workers: list[SubordinateClaim] = Field(default_factory=list)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description=(
        "vllm --gpu-memory-utilization (sglang --mem-fraction-static): the claim over the smallest chosen GPU"))
    gpu_layers: int | None = Field(default=None, ge=0, description="llama.cpp partial offload: layers on the GPU")
    estimate: MemoryEstimateOut | None = None


class UnschedulableReason(Schema):
    worker: str | None = None
    reason: str
    message: str
    need_bytes: int | None = None
    free_bytes: int | None = None
    gpu: int | None = None
    gpus_needed: int | None = Field(default=None, description="GPUs the closest option needs (tensor-parallel size)")
    gpus_fitting: int | None = Field(default=None, description="GPUs with need_bytes free on this worker")
    count: int | None = Field(default=None, description="a summary line: how many workers share this reason")
    # quota_exceeded: which of the team's limits (a TeamQuota field), and need / used / limit in its unit
    team: str | None = None
    quota: str | None = Field(default=None, description="quota_exceeded: gpus, vram_bytes, ram_bytes or replicas")
    need: int | None = Field(default=None, description="quota_exceeded: what this instance would add")
    used: int | None = Field(default=None, description="quota_exceeded: what the team's instances hold now")
    limit: int | None = Field(default=None, description="quota_exceeded: the team's limit")


class InstanceOut(Schema):
    id: int
    name: str
    model_id: int
    model_name: str
    team: str | None = None
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
    download_progress: float | None = Field(default=None, ge=0, le=1, description=(
        "while downloading: the fraction of the model or image fetched so far"))
    created_at: datetime
    updated_at: datetime


class ReplicaPlacement(Schema):
    replica: int
    scheduled: bool
    worker: str | None = None
    claim: ResourceClaim | None = None
    reasons: list[UnschedulableReason] = Field(default_factory=list)


class ModelEvaluation(Schema):
    """`POST /v2/models/evaluate`: where each replica would go now, or why not. Nothing is written."""

    name: str
    estimate: MemoryEstimateOut | None = None
    replicas: list[ReplicaPlacement] = Field(default_factory=list)
    schedulable: int = 0
    pending_ahead: int = Field(default=0, description="pending instances the scheduler would place first")
    message: str = ""


class ModelDescription(Schema):
    model: ModelOut
    estimate: MemoryEstimateOut | None = None
    estimate_error: str | None = None
    instances: list[InstanceOut] = Field(default_factory=list)
    events: list[EventOut] = Field(default_factory=list)


class AgentInstanceState(StrEnum):
    downloading = "downloading"
    starting = "starting"
    running = "running"
    error = "error"
    terminated = "terminated"  # the workload is gone; the server removes a terminating instance


class InstanceStatusReport(Schema):
    state: AgentInstanceState
    message: str = Field(default="", max_length=20_000)
    port: int | None = Field(default=None, ge=1, le=65535)
    pid: int | None = None
    download_progress: float | None = Field(default=None, ge=0, le=1, description="with downloading: 0..1")


class BackendKey(Schema):
    """The key the gateway presents to an instance's backend; null where the backend takes none (or where
    Higress, which reaches backends directly, serves /v1)."""

    key: str | None = None


# Multi-host placements: what the main worker publishes of its Ray head, what subordinates report.


class RayHead(Schema):
    head_address: str = Field(min_length=3, max_length=300, pattern=r"^[A-Za-z0-9.:\[\]_-]+:\d{1,5}$",
                              description="host:port of the Ray head's GCS")
    restart_count: int = Field(default=0, ge=0, description="the run of the instance this head belongs to")


class AgentEvent(Schema):
    reason: str = Field(pattern=r"^[A-Z][A-Za-z]{2,63}$", description="CamelCase, e.g. RayJoinFailed")
    message: str = Field(default="", max_length=4000)


# --- events and the watch stream -------------------------------------------


class EventOut(Schema):
    id: int
    kind: str
    object_id: int | None = None
    object_name: str
    reason: str
    message: str = ""
    actor: str = ""
    team: str | None = None
    created_at: datetime


WATCH_KINDS: tuple[str, ...] = ("workers", "models", "instances", "events", "files", "alerts")


class WatchMessage(Schema):
    """One line of `GET /v2/watch`.

    `snapshot` carries `items` (kind -> list of objects); `event` carries `kind`,
    `action` and `object`; `heartbeat` only the version. Clients resume with
    `?since=<version>`; a version the server no longer holds yields a new snapshot.
    A large snapshot comes as several `snapshot` lines, all but the last with `more`
    (server/ndjson.py joins them).
    """

    type: Literal["snapshot", "event", "heartbeat"]
    version: int
    kind: str | None = None
    action: Literal["created", "updated", "deleted"] | None = None
    object: dict[str, Any] | None = None
    items: dict[str, list[dict[str, Any]]] | None = None
    more: bool = False



# --- backends users register, and metrics names ------------------------------

# Unified names each backend's own metrics are re-exported under (by the agent's /metrics,
# with model, instance and backend labels). A backend definition maps its metric names to these.
UNIFIED_INSTANCE_METRICS: dict[str, str] = {
    "requests_running": "gauge",
    "requests_waiting": "gauge",
    "prompt_tokens_total": "counter",
    "generation_tokens_total": "counter",
    "kv_cache_usage_ratio": "gauge",
    "time_to_first_token_seconds_sum": "counter",
    "time_to_first_token_seconds_count": "counter",
}
# What a custom backend's command, image and env may refer to.
# {ray_address}: the Ray head (host:port) of a distributed placement, empty on one worker.
BACKEND_PLACEHOLDERS: tuple[str, ...] = ("model_path", "port", "host", "model_name", "gpus", "instance_name",
                                         "ray_address")


def _placeholders(text: str) -> list[str]:
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


class BackendDefinition(Schema):
    """A backend registered by users: how to start it (a command template), and what it answers."""

    name: str = Field(pattern=BACKEND_NAME_PATTERN, description="deploy it with --backend custom:NAME")
    description: str = Field(default="", max_length=1000)
    command: list[str] = Field(min_length=1, max_length=200, description=(
        "argv template; a string is split like a shell would. Placeholders: "
        "{model_path} {port} {host} {model_name} {gpus} {instance_name} {ray_address}; the model's args are appended"))
    image: str | None = Field(default=None, max_length=500, description="container image for the docker runtime")
    env: dict[str, str] = Field(default_factory=dict, description="values may use the same placeholders")
    health_path: str = Field(default="/health", pattern=r"^/[^\s]*$", max_length=500)
    metrics_path: str | None = Field(default="/metrics", pattern=r"^/[^\s]*$", max_length=500)
    metrics: dict[str, str] = Field(default_factory=dict, description=(
        "the backend's metric name -> a unified name (requests_running, prompt_tokens_total, ...)"))

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            import shlex

            return shlex.split(value)
        return value

    @model_validator(mode="after")
    def _known_placeholders(self) -> "BackendDefinition":
        for text in [*self.command, *self.env.values(), *([self.image] if self.image else [])]:
            unknown = [n for n in _placeholders(text) if n not in BACKEND_PLACEHOLDERS]
            if unknown:
                raise ValueError(f"unknown placeholder {{{unknown[0]}}} in {text!r}; "
                                 f"use {', '.join('{' + p + '}' for p in BACKEND_PLACEHOLDERS)}")
        if problem := template_problem(self.command):
            raise ValueError(problem)
        for source, unified in self.metrics.items():
            if unified not in UNIFIED_INSTANCE_METRICS:
                raise ValueError(f"metrics: {source!r} maps to {unified!r}, which is not one of "
                                 f"{', '.join(UNIFIED_INSTANCE_METRICS)}")
        return self


class BackendAllowList(Schema):
    """What an admin lets other users pass to one backend, beyond its built-in allow-list."""

    env: list[str] = Field(default_factory=list, max_length=256, description="environment variable names")
    args: list[str] = Field(default_factory=list, max_length=256, description="flags, e.g. --max-num-seqs")

    @model_validator(mode="after")
    def _allowable(self) -> "BackendAllowList":
        for name in self.env:
            if problem := env_name_problem(name):
                raise ValueError(f"env {name!r}: {problem}")
        for flag in self.args:
            if flag_name(flag) != flag:
                raise ValueError(f"args: {flag!r} is not a flag (write it as --name, without a value)")
            if problems := args_problems([flag], None):
                raise ValueError(problems[0].message)
        self.env, self.args = sorted(set(self.env)), sorted(set(self.args))
        return self


class BackendOut(BackendDefinition):
    builtin: bool = False
    allowed_env: list[str] = Field(default_factory=list, description="env names users other than admins may set")
    allowed_args: list[str] = Field(default_factory=list, description="flags users other than admins may pass")
    created_at: datetime | None = None
    updated_at: datetime | None = None


# Sizes as people write them (flags, labels, environment variables).
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "KI": 1024, "M": 1000**2, "MB": 1000**2, "MI": 1024**2,
          "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GI": 1024**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4,
          "TI": 1024**4, "TIB": 1024**4}


def parse_size(text: str | None) -> int | None:
    """'4GiB', '512MiB', '8G', '1073741824' -> bytes; None when absent or unreadable."""
    if not text:
        return None
    match = _SIZE.match(text)
    if not match:
        return None
    unit = (match[2] or "").upper()
    if unit not in _UNITS:
        return None
    return int(float(match[1]) * _UNITS[unit])


# --- where a model comes from ------------------------------------------------------
#
# `spec.source` is one of:
#   /abs/path                            a local file or folder on the worker (the CLI makes relative paths absolute)
#   hf://ORG/NAME[@REV][/FILE]           a Hugging Face repository, optionally one file of it (a .gguf for llama.cpp)
#   ms://ORG/NAME[@REV][/FILE]           the same on ModelScope
#   ORG/NAME                             short for hf://ORG/NAME (exactly two parts, not absolute, not a .gguf)
# Anything else is taken as a local path and fails on the worker when it does not exist there.

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_REF = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._-]{{0,99}}))?"
                      r"(?:/(?P<file>[^\s@]+))?$")
_BARE_REPO = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
HUBS = {"hf://": "huggingface", "ms://": "modelscope"}


class ModelSource(BaseModel):
    kind: Literal["local", "huggingface", "modelscope"]
    path: str | None = None  # local
    repo_id: str | None = None  # hubs
    revision: str | None = None
    filename: str | None = None  # one file of the repository (e.g. a GGUF)


class SourceError(ValueError):
    pass


def parse_model_source(source: str) -> ModelSource:
    """What `spec.source` names (see the table above). Raises SourceError for a malformed hub reference."""
    for prefix, kind in HUBS.items():
        if source.startswith(prefix):
            match = _HUB_REF.match(source[len(prefix):])
            if not match or ".." in (match["file"] or "").split("/"):
                raise SourceError(f"model source {source!r}: write {prefix}ORG/NAME, {prefix}ORG/NAME@REVISION "
                                  f"or {prefix}ORG/NAME/FILE")
            return ModelSource(kind=kind, repo_id=match["repo"], revision=match["revision"], filename=match["file"])
    if _BARE_REPO.match(source) and not source.startswith(".") and not source.lower().endswith(".gguf"):
        return ModelSource(kind="huggingface", repo_id=source)
    return ModelSource(kind="local", path=source)


# People and what they own apart from models live in their own module; imported last, because it
# builds on the base and the names above.
from server.schemas.people import (AuditEntryOut, InstanceSecrets, SecretOut, SecretSet,  # noqa: E402
                                   SshKeyCreate, SshKeyOut, SshSessionCreate, SshSessionOut, TeamCreate,
                                   TeamMemberOut, TeamMemberSet, TeamOut, TeamQuota, TeamUsage, UserCreate,
                                   UserOut, UserUpdate)

# Model routes (aliases, canaries, fallbacks): their own module, built on the base above.
from server.schemas.routes import RouteCreate, RouteOut, RouteTarget, RouteUpdate  # noqa: E402
# Model files in the workers' caches (issue 19).
from server.schemas.files import (FILE_STATES, AgentFileEntry, AgentFileInventory, FilePull,  # noqa: E402
                                  FileState, ModelFileOut, file_key)
