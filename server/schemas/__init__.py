"""The wire contract: pydantic models of every request, response and watch event.

Imported by the server, the agent and the TUI, so it must stay light: pydantic and
the standard library only. This module holds what every area shares (the base `Schema`, errors,
name patterns, roles, model categories, sizes); each area is a module of its own (auth, workers,
models, instances, events, backends, sources, people, routes, files), re-exported here, so that
`from server.schemas import X` names every wire model.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

from server.schemas.backend_traits import BACKEND_TRAITS

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


# Each area of the contract is a module of its own, re-exported here so that `schemas.X` names every
# wire model; imported last, because they build on the base above (and the later ones on the earlier).
# Signing in: logins, API keys, sessions, usage.
from server.schemas.auth import (SCOPES, ApiKeyCreate, ApiKeyCreated, ApiKeyListed, ApiKeyOut,  # noqa: E402
                                 LoginRequest, LoginResponse, Scope, SessionOut, UsageRow)
# Workers: registration, heartbeats, GPUs.
from server.schemas.workers import (GPUDevice, GPUProcess, HostInfo, InstanceUsage, WorkerApproval,  # noqa: E402
                                    WorkerHeartbeat, WorkerOut, WorkerRegister, WorkerRegistered,
                                    WorkerRegistrationRequest, WorkerState, address_problem)
# Models: the spec, create and edit, revisions, rollouts.
from server.schemas.models import (LABEL_KEY, MODEL_POLICY_FIELDS, PRIORITY_PATTERN, SCALING_FIELDS,  # noqa: E402
                                   SECRET_NAME_PATTERN, GPUSelection, ModelCreate, ModelOut, ModelRevisionOut,
                                   ModelSpec, ModelState, ModelUpdate, RolloutStatus, RolloutUndo, SecretRef,
                                   scaling_range_problem)
# Events and the watch stream.
from server.schemas.events import WATCH_KINDS, EventOut, WatchMessage  # noqa: E402
# Instances: states, claims, why-not reasons, agents' reports.
from server.schemas.instances import (NOT_READY_STATES, AgentEvent, AgentInstanceState, BackendKey,  # noqa: E402
                                      InstanceOut, InstanceState, InstanceStatusReport, MemoryEstimateOut,
                                      ModelDescription, ModelEvaluation, RayHead, ReplicaPlacement, ResourceClaim,
                                      SubordinateClaim, UnschedulableReason)
# Backends users register, allow-lists, unified metric names.
from server.schemas.backends import (BACKEND_PLACEHOLDERS, UNIFIED_INSTANCE_METRICS, BackendAllowList,  # noqa: E402
                                     BackendDefinition, BackendOut)
# Where a model comes from (`spec.source`).
from server.schemas.sources import HUBS, ModelSource, SourceError, parse_model_source  # noqa: E402

# People and what they own apart from models.
from server.schemas.people import (AuditEntryOut, InstanceSecrets, SecretOut, SecretSet,  # noqa: E402
                                   SshKeyCreate, SshKeyOut, SshSessionCreate, SshSessionOut, TeamCreate,
                                   TeamMemberOut, TeamMemberSet, TeamOut, TeamQuota, TeamUsage, UserCreate,
                                   UserOut, UserUpdate)

# Model routes (aliases, canaries, fallbacks): their own module, built on the base above.
from server.schemas.routes import RouteCreate, RouteOut, RouteTarget, RouteUpdate  # noqa: E402
# Model files in the workers' caches (issue 19).
from server.schemas.files import (FILE_STATES, AgentFileEntry, AgentFileInventory, FilePull,  # noqa: E402
                                  FileState, ModelFileOut, file_key)
