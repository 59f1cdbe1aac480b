"""The wire contract of instances: states, the scheduler's claims and "why not" reasons, placement
evaluations, and what agents report of an instance (state, Ray head, events). Re-exported by `server.schemas`."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from server.schemas import Schema
from server.schemas.events import EventOut
from server.schemas.models import ModelOut, ModelSpec


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
