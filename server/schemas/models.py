"""The wire contract of models: the spec that shapes an instance (a change is a new generation), create
and edit with the scaling policy, revisions and rollout status. Re-exported by `server.schemas`."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from server.schemas import (CUSTOM_BACKEND_PREFIX, CUSTOM_BACKEND_REF, HF_BACKENDS, KNOWN_BACKENDS, MODEL_CATEGORIES,
                            MODEL_NAME_PATTERN, TEAM_NAME_PATTERN, ModelCategory, Schema, derive_categories)
from server.schemas.backend_traits import BACKEND_TRAITS


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
