"""Scheduling endpoints: a dry run of a deploy, and a model's full description (placement, reasons, events)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from sqlalchemy import or_, select

from server import schemas
from server.api.errors import read_json
from server.api.resources import check_spec, get_model, instance_out, model_out, ready_counts, team_for_new_model
from server.api.routing import json_out, principal_of, route, server_of
from server.db import tables
from server.scheduler.estimate import EstimateError, estimate
from server.scheduler.placement import Request, evaluate
from server.scheduler.priorities import dry_run_preemption, load_policies
from server.scheduler.service import load_state
from server.scheduler.snapshot import Reserves

S = schemas.InstanceState


@route("POST", "/v2/models/evaluate", "Dry run of a deploy: where each replica would go now, or why not. "
       "Writes nothing.", body=schemas.ModelCreate, response=schemas.ModelEvaluation)
async def evaluate_model(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.ModelCreate)
    spec = schemas.ModelSpec.model_validate(body.model_dump(exclude=schemas.MODEL_POLICY_FIELDS))
    server = server_of(request)
    async with server.db.session() as s:
        team = await team_for_new_model(request, s, body.team)  # may the caller deploy there at all?
        await check_spec(request, s, spec, team)
        state = await load_state(s, Reserves.from_env())
        policies = await load_policies(s, server.config)
        existing = (await s.execute(select(tables.Model.id).where(tables.Model.name == body.name))).scalar_one_or_none()
    pending = len(state.pending)
    try:
        memory = await asyncio.to_thread(estimate, spec)
    except EstimateError as exc:
        reasons = [schemas.UnschedulableReason(reason=exc.reason, message=str(exc))]
        replicas = [schemas.ReplicaPlacement(replica=n, scheduled=False, reasons=reasons) for n in range(body.replicas)]
        return json_out(schemas.ModelEvaluation(name=body.name, replicas=replicas, pending_ahead=pending,
                                                message=f"cannot estimate the memory: {exc}"))
    key = existing if existing is not None else f"evaluate:{body.name}"
    request = Request(spec, memory, key, team=team)
    request.holders = state.files.holders(spec.source)  # where the files already are (scheduler/locality.py)
    placements = evaluate(request, state.cluster, body.replicas)  # within its quota
    fit = sum(1 for p in placements if p.scheduled)
    message = f"{fit} of {body.replicas} replicas fit now"
    if fit < body.replicas and (would := dry_run_preemption(placements, state, policies, request, body.name,
                                                             body.priority, server.config)):
        message += f"; {would} more by preempting lower-priority instances"
    if existing is not None:
        message += f"; model {body.name!r} exists, so these would be extra replicas next to its own"
    if pending:
        message += f"; {pending} pending instances would be placed first"
    return json_out(schemas.ModelEvaluation(name=body.name, estimate=memory.to_out(), replicas=placements,
                                            schedulable=fit, pending_ahead=pending, message=message))


@route("GET", "/v2/models/{name}/describe", "A model with its memory estimate, instances (placement or the "
       "reasons they wait) and recent events", response=schemas.ModelDescription)
async def describe_model(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"])
        caller = principal_of(request)
        spec = schemas.ModelSpec.model_validate(model.spec)  # the estimate reads the real one, not a redacted copy
        out = model_out(model, await ready_counts(s, [model.id]), caller)
        instances = (await s.execute(select(tables.ModelInstance).where(
            tables.ModelInstance.model_id == model.id).order_by(tables.ModelInstance.id))).scalars().all()
        names = [model.name] + [i.name for i in instances]
        events = (await s.execute(select(tables.Event).where(or_(
            tables.Event.object_name.in_(names), tables.Event.object_name.like(f"{model.name}-%"))).order_by(
            tables.Event.id.desc()).limit(50))).scalars().all()
        listed = [instance_out(i, caller) for i in instances]
    description = schemas.ModelDescription(model=out, instances=listed,
                                           events=[schemas.EventOut.model_validate(e) for e in reversed(events)])
    try:
        description.estimate = (await asyncio.to_thread(estimate, spec)).to_out()
    except EstimateError as exc:
        description.estimate_error = str(exc)
    return json_out(description)
