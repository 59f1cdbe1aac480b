"""Model specs: what a deploy or an edit may ask of the workers.

Every spec is checked here before it is stored (`spec_problems`): size caps, what nobody may pass
(loader variables, bind flags, shell tricks), the backend's allow-list for users other than admins,
and local sources under the model roots with the backend's file type. The agent checks again before
it starts anything (server/schemas/backend_traits.py holds the shared rules).
"""

from __future__ import annotations

import json
import os
from typing import Any

from server import schemas
from server.schemas.backend_traits import BACKEND_TRAITS, SpecProblem, source_problem, spec_problems
from server.services import secrets
from server.services.backends import allowed_for


def source_form_problems(spec: schemas.ModelSpec, model_roots: list[str]) -> list[SpecProblem]:
    """Hub references well formed; local paths absolute, under a model root, of the backend's type.
    A custom backend may take a name of its own (not a path) as its source."""
    try:
        source = schemas.parse_model_source(spec.source)
    except schemas.SourceError as exc:
        return [SpecProblem("source", str(exc))]
    if source.kind != "local":
        if spec.backend == "llama.cpp" and not (source.filename or "").endswith(".gguf"):
            hub = "ms" if source.kind == "modelscope" else "hf"
            return [SpecProblem("source", f"llama.cpp serves one GGUF file: name it in the source, e.g. "
                                          f"{hub}://{source.repo_id}/FILE.gguf")]
        return []
    path = source.path or spec.source
    traits = BACKEND_TRAITS.get(spec.backend)
    if traits is None and not path.startswith("/"):
        return []  # a custom backend's own name for what it serves
    try:
        problem = source_problem(path, model_roots, traits.layout if traits else "any", must_exist=False)
    except (OSError, ValueError) as exc:  # a name too long for the file system
        problem = f"{path!r} is not a usable path: {exc}"
    if problem is None and spec.backend == "llama.cpp":
        if not os.path.isfile(path):  # the server reads its header for the estimate
            problem = f"model file not found: {path}"
    return [SpecProblem("source", problem)] if problem else []


async def check_spec(session, spec: schemas.ModelSpec, *, admin: bool, model_roots: list[str],
                     team: str | None) -> list[SpecProblem]:
    """Why this spec may not be stored for this user in `team`; [] when it may."""
    allowed_env: frozenset[str] | None = None
    allowed_args: frozenset[str] | None = None
    if not admin:
        allowed_env, allowed_args = await allowed_for(session, spec.backend)
    spec_bytes = len(json.dumps(spec.model_dump(mode="json"), separators=(",", ":")).encode())
    problems = spec_problems(spec, spec_bytes=spec_bytes, allowed_env=allowed_env, allowed_args=allowed_args)
    if problems:
        return problems
    refs = secrets.referenced(spec.env)
    gone = await secrets.missing(session, team, set(refs.values()))
    problems = [SpecProblem(f"env.{env}", f"team {team} has no secret {secret!r} (maas secret set {secret})")
                for env, secret in refs.items() if secret in gone]
    return problems or source_form_problems(spec, model_roots)


# --- autoscaling and priority (policy fields of a model: no new generation) -----------------------------


def scaling_changes(model: Any, body: schemas.ModelCreate | schemas.ModelUpdate,
                    priority_ranks: dict[str, int]) -> list[str]:
    """Apply a create's or an edit's autoscaling and priority fields to the model row; what changed, in words.

    Autoscaling is on when max_replicas is set; `replicas` then belongs to the autoscaler. An edit that sets
    `replicas` without max_replicas turns it off (the manual mode). Raises ApiError for a wrong class or range."""
    from server.api.errors import ApiError  # the rule's error, in the API's shape

    given = body.model_dump(exclude_unset=True) if isinstance(body, schemas.ModelUpdate) else body.model_dump()
    if given.get("priority") is not None and given["priority"] not in priority_ranks:
        raise ApiError(400, "bad_request", f"unknown priority class {given['priority']!r}; the classes are "
                       + ", ".join(priority_ranks), {"field": "priority"})
    before = {f: getattr(model, f, None) for f in schemas.SCALING_FIELDS}
    for name in ("target_concurrency", "scale_down_delay", "idle_timeout", "cold_start_timeout", "priority"):
        if given.get(name) is not None:
            setattr(model, name, given[name])
    if given.get("max_replicas") is not None:
        model.max_replicas = given["max_replicas"]
        model.min_replicas = given.get("min_replicas") if given.get("min_replicas") is not None else (
            model.min_replicas if model.min_replicas is not None else 1)
    elif given.get("min_replicas") is not None:
        model.min_replicas = given["min_replicas"]
    elif given.get("replicas") is not None and isinstance(body, schemas.ModelUpdate):
        model.min_replicas = model.max_replicas = None  # scaled by hand: the manual mode
    if model.max_replicas is None:
        model.min_replicas = None
    problem = schemas.scaling_range_problem(model.min_replicas, model.max_replicas)
    if problem is not None:
        raise ApiError(422, "invalid", problem, [{"field": "min_replicas", "message": problem}])
    if model.max_replicas is not None:  # the range holds at once; the autoscaler moves within it
        replicas = model.replicas if model.replicas is not None else 1
        model.replicas = max(model.min_replicas or 0, min(model.max_replicas, replicas))
    return [f"{f} {before[f]} -> {getattr(model, f)}" for f in sorted(schemas.SCALING_FIELDS)
            if before[f] is not None and before[f] != getattr(model, f)
            or before[f] is None and getattr(model, f) is not None and not isinstance(body, schemas.ModelCreate)]


def scaling_summary(model: Any) -> str:
    """`autoscaling 0-4, 8 in flight per replica, priority high` or `priority normal`."""
    words = []
    if model.max_replicas is not None:
        words.append(f"autoscaling {model.min_replicas}-{model.max_replicas}, {model.target_concurrency} in flight "
                     f"per replica")
    words.append(f"priority {model.priority}")
    return ", ".join(words)
