"""Operator actions: rollouts (status, restart, undo, pause, resume, history) and worker
cordon, uncordon and drain. They change rows; the controllers do the rest."""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select

from server import schemas
from server.api.errors import ApiError, conflict, not_found, read_json
from server.api.permissions import require_cluster_role
from server.api.resources import (_get_worker, check_spec, get_instance, get_model, instance_out, model_out, new_revision,
                                  ready_counts, redacted_spec)
from server.api.routing import json_out, principal_of, route, server_of
from server.db import tables
from server.events import record_event
from server.schemas.rollout import rollout_status
from server.services import workers as worker_identity

S = schemas.InstanceState


async def _model_instances(s, model: tables.Model) -> list[tables.ModelInstance]:
    return list((await s.execute(select(tables.ModelInstance).where(
        tables.ModelInstance.model_id == model.id))).scalars())


async def _active_model(request: web.Request, s, name: str) -> tables.Model:
    model = await get_model(request, s, name, write=True)
    if model.state == schemas.ModelState.deleting:
        raise conflict(f"model {model.name!r} is being deleted")
    return model


@route("GET", "/v2/models/{name}/rollout", "Rollout progress: updated / ready / desired", response=schemas.RolloutStatus)
async def get_rollout(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"])
        return json_out(rollout_status(model, await _model_instances(s, model)))


@route("POST", "/v2/models/{name}/rollout/restart", "Replace every instance with a fresh one (a new generation, same spec)",
       response=schemas.ModelOut)
async def restart_rollout(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        model = await _active_model(request, s, request.match_info["name"])
        new_revision(s, model, dict(model.spec), "restart")
        record_event(s, "models", model, "RolloutRestart", f"generation {model.generation}", principal_of(request).name)
        await s.commit()
        return json_out(model_out(model, await ready_counts(s, [model.id]), principal_of(request)))


@route("POST", "/v2/models/{name}/rollout/undo", "Roll back to an earlier revision's spec (a new generation)",
       body=schemas.RolloutUndo, response=schemas.ModelOut)
async def undo_rollout(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.RolloutUndo) if request.can_read_body else schemas.RolloutUndo()
    async with server_of(request).db.session() as s:
        model = await _active_model(request, s, request.match_info["name"])
        revisions = {r.revision: r for r in (await s.execute(select(tables.ModelRevision).where(
            tables.ModelRevision.model_id == model.id))).scalars()}
        if body.to_revision is not None:
            target = revisions.get(body.to_revision)
            if target is None:
                raise not_found(f"revision {body.to_revision} of model {model.name!r}")
        else:
            # The newest revision whose spec differs from the current one.
            earlier = [r for n, r in sorted(revisions.items(), reverse=True) if n < model.generation and r.spec != model.spec]
            if not earlier:
                raise ApiError(409, "no_revision", f"model {model.name!r} has no earlier spec to go back to")
            target = earlier[0]
        # A spec stored before today's rules, or naming a secret since deleted, is not brought back.
        await check_spec(request, s, schemas.ModelSpec.model_validate(target.spec), model.team)
        new_revision(s, model, dict(target.spec), f"undo to revision {target.revision}")
        model.paused = False
        record_event(s, "models", model, "RolloutUndo", f"to revision {target.revision}: generation {model.generation}",
                     principal_of(request).name)
        await s.commit()
        return json_out(model_out(model, await ready_counts(s, [model.id]), principal_of(request)))


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    async with server_of(request).db.session() as s:
        model = await _active_model(request, s, request.match_info["name"])
        if model.paused != paused:
            model.paused = paused
            record_event(s, "models", model, "RolloutPaused" if paused else "RolloutResumed", "",
                         principal_of(request).name)
            await s.commit()
        return json_out(model_out(model, await ready_counts(s, [model.id]), principal_of(request)))


@route("POST", "/v2/models/{name}/rollout/pause", "Freeze a rollout where it stands", response=schemas.ModelOut)
async def pause_rollout(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


@route("POST", "/v2/models/{name}/rollout/resume", "Let a paused rollout go on", response=schemas.ModelOut)
async def resume_rollout(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


@route("GET", "/v2/models/{name}/history", "A model's revisions, oldest first", response=schemas.ModelRevisionOut,
       response_list=True)
async def model_history(request: web.Request) -> web.Response:
    caller = principal_of(request)
    async with server_of(request).db.session() as s:
        model = await get_model(request, s, request.match_info["name"])
        rows = (await s.execute(select(tables.ModelRevision).where(tables.ModelRevision.model_id == model.id)
                                .order_by(tables.ModelRevision.revision))).scalars().all()
    revisions = [schemas.ModelRevisionOut.model_validate(r) for r in rows]
    for revision in revisions:
        revision.spec = redacted_spec(revision.spec, caller, model.team)
    return json_out(revisions)


@route("POST", "/v2/instances/{ref}/restart", "Restart an instance's workload on its worker", response=schemas.InstanceOut)
async def restart_instance(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        instance = await get_instance(request, s, request.match_info["ref"], write=True)
        if instance.worker_id is None or instance.state in (S.pending, S.terminating):
            raise conflict(f"instance {instance.name} is {instance.state}: nothing to restart")
        instance.restart_count += 1
        instance.state = S.scheduled
        instance.state_message = f"restart requested by {principal_of(request).name}"
        record_event(s, "instances", instance, "Restarting", instance.state_message, principal_of(request).name)
        await s.commit()
        return json_out(instance_out(instance, principal_of(request)))


async def _set_schedulable(request: web.Request, cordoned: bool, draining: bool, reason: str) -> web.Response:
    require_cluster_role(request, "cordon, uncordon or drain workers")
    async with server_of(request).db.session() as s:
        worker = await _get_worker(s, request.match_info["name"])
        if (worker.cordoned, worker.draining) != (cordoned, draining):
            worker.cordoned, worker.draining = cordoned, draining
            record_event(s, "workers", worker, reason, "", principal_of(request).name)
            await s.commit()
        return json_out(schemas.WorkerOut.model_validate(worker))


@route("POST", "/v2/workers/{name}/cordon", "Stop placing new instances on a worker", response=schemas.WorkerOut)
async def cordon(request: web.Request) -> web.Response:
    return await _set_schedulable(request, True, False, "Cordoned")


@route("POST", "/v2/workers/{name}/uncordon", "Place instances on a worker again", response=schemas.WorkerOut)
async def uncordon(request: web.Request) -> web.Response:
    return await _set_schedulable(request, False, False, "Uncordoned")


@route("POST", "/v2/workers/{name}/drain", "Cordon a worker and move its instances away, without downtime "
       "where capacity allows (the rollout rules)", response=schemas.WorkerOut)
async def drain(request: web.Request) -> web.Response:
    return await _set_schedulable(request, True, True, "Draining")


@route("POST", "/v2/workers/{name}/approve", "Let the next registration under a taken worker name through without "
       f"the worker's token (once, within {worker_identity.APPROVAL_SECONDS // 60} minutes): the one held now, "
       "which keeps retrying, or a reinstalled host's", response=schemas.WorkerApproval)
async def approve_worker(request: web.Request) -> web.Response:
    require_cluster_role(request, "approve worker registrations")
    actor = principal_of(request).name
    async with server_of(request).db.session() as s:
        worker = await _get_worker(s, request.match_info["name"])
        approval = await worker_identity.approve(s, worker, actor)
        pending = f" (held: {approval.pending.address}:{approval.pending.agent_port})" if approval.pending else ""
        record_event(s, "workers", worker, "RegistrationApproved", f"the next registration goes through{pending}", actor)
        await s.commit()
    return json_out(approval)
