"""What agents call: registration, heartbeats and instance status reports."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import delete, select

from server import schemas
from server.api.errors import conflict, not_found, parse_whole_number, read_json
from server.api.routing import json_out, principal_of, route, server_of
from server.api.security import hash_secret, new_worker_token
from server.db import tables
from server.db.settings import put_setting
from server.events import record_event

S = schemas.InstanceState


@route("POST", "/v2/agent/register", "Register (or re-register) a worker with the cluster token", auth="registrar",
       body=schemas.WorkerRegister, response=schemas.WorkerRegistered, status=201)
async def register(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.WorkerRegister)
    async with server_of(request).db.session() as s:
        worker = (await s.execute(select(tables.Worker).where(tables.Worker.name == body.name))).scalar_one_or_none()
        reason = "Reregistered"
        if worker is None:
            worker = tables.Worker(name=body.name)
            s.add(worker)
            reason = "Registered"
        worker.address = body.address
        worker.agent_port = body.agent_port
        worker.labels = body.labels
        worker.gpus = [g.model_dump(mode="json") for g in body.gpus]
        worker.host = body.host.model_dump(mode="json")
        worker.state = schemas.WorkerState.ready
        worker.state_message = ""
        worker.last_heartbeat_at = datetime.now(UTC)
        worker.agent_secret = secrets.token_urlsafe(32)
        await s.flush()
        token = new_worker_token(worker.id)
        worker.token_hash = hash_secret(token)
        gpus = f"{len(body.gpus)} GPUs" + (" (simulated)" if any(g.simulated for g in body.gpus) else "")
        record_event(s, "workers", worker, reason, f"{body.address}:{body.agent_port}, {gpus}", body.name)
        await _recover_unreachable(s, worker)
        await s.commit()
        out = schemas.WorkerRegistered(worker=schemas.WorkerOut.model_validate(worker), token=token,
                                       agent_secret=worker.agent_secret)
    server_of(request).auth.invalidate(worker_id=worker.id)  # the previous token stops working at once
    return json_out(out, status=201)


async def _recover_unreachable(session, worker: tables.Worker) -> None:
    """A worker that answers again gets its unreachable instances back as `scheduled`:
    the agent then adopts the ones still running or starts them anew."""
    rows = (await session.execute(select(tables.ModelInstance).where(
        tables.ModelInstance.worker_id == worker.id, tables.ModelInstance.state == S.unreachable))).scalars()
    for instance in rows:
        instance.state = S.scheduled
        instance.state_message = "worker is back"


@route("POST", "/v2/agent/heartbeat", "Report liveness and device usage", auth="worker",
       body=schemas.WorkerHeartbeat, response=schemas.WorkerOut)
async def heartbeat(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.WorkerHeartbeat)
    principal = principal_of(request)
    async with server_of(request).db.session() as s:
        worker = await s.get(tables.Worker, principal.worker_id)
        if worker is None:
            raise not_found("worker")
        worker.gpus = [g.model_dump(mode="json") for g in body.gpus]
        worker.host = body.host.model_dump(mode="json")
        worker.last_heartbeat_at = datetime.now(UTC)
        if worker.state != schemas.WorkerState.ready:
            worker.state = schemas.WorkerState.ready
            worker.state_message = ""
            record_event(s, "workers", worker, "Ready", "heartbeats resumed", worker.name)
            await _recover_unreachable(s, worker)
        await s.commit()
        return json_out(schemas.WorkerOut.model_validate(worker))


# Unreachable instances come back only through their worker's heartbeat (see _recover_unreachable).
_ALLOWED_FROM = {
    schemas.AgentInstanceState.downloading: {S.scheduled, S.downloading, S.error},
    schemas.AgentInstanceState.starting: {S.scheduled, S.downloading, S.starting, S.running, S.error},
    schemas.AgentInstanceState.running: {S.scheduled, S.downloading, S.starting, S.running},
    schemas.AgentInstanceState.error: {S.scheduled, S.downloading, S.starting, S.running, S.error},
}


@route("PUT", "/v2/agent/instances/{id}/status", "Report an instance's state from its agent", auth="worker",
       body=schemas.InstanceStatusReport, response=schemas.InstanceOut)
async def report_status(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.InstanceStatusReport)
    principal = principal_of(request)
    ref = request.match_info["id"]
    instance_id = parse_whole_number(ref, low=1)
    if instance_id is None:
        raise not_found(f"instance {ref!r}")
    async with server_of(request).db.session() as s:
        instance = await s.get(tables.ModelInstance, instance_id)
        if instance is None or instance.worker_id != principal.worker_id:
            raise not_found(f"instance {ref} on worker {principal.name}")
        if body.state == schemas.AgentInstanceState.terminated:
            if instance.state != S.terminating:
                raise conflict(f"instance {instance.name} is {instance.state}, not terminating")
            await s.delete(instance)
            await s.execute(delete(tables.Setting).where(tables.Setting.key == f"{RAY_HEAD_PREFIX}{instance.id}"))
            record_event(s, "instances", instance, "Stopped", body.message, principal.name)
            await s.commit()
            return web.json_response({"deleted": instance.name})
        if instance.state not in _ALLOWED_FROM[body.state]:
            raise conflict(f"instance {instance.name} is {instance.state}; cannot become {body.state}")
        changed = instance.state != body.state
        instance.state = body.state.value
        instance.state_message = body.message
        if body.port is not None:
            instance.port = body.port
        if body.pid is not None:
            instance.pid = body.pid
        # The fraction means something only while downloading; any other state clears it.
        instance.download_progress = body.download_progress if body.state == S.downloading else None
        if changed:
            record_event(s, "instances", instance, body.state.value.capitalize(), body.message[-2000:], principal.name)
        await s.commit()
        return json_out(schemas.InstanceOut.model_validate(instance))


# --- multi-host placements: the Ray head's address and what subordinates have to say -----------
# Kept in the settings table (several servers may share the database) under one key per instance;
# the row goes with the instance (see report_status) and is replaced on each restart.

RAY_HEAD_PREFIX = "ray-head/"


async def _instance_of_worker(session, request: web.Request, main_only: bool) -> tables.ModelInstance:
    """The instance in the path, placed on the calling worker (as main, or also as a subordinate)."""
    principal = principal_of(request)
    ref = request.match_info["id"]
    instance_id = parse_whole_number(ref, low=1)
    instance = await session.get(tables.ModelInstance, instance_id) if instance_id is not None else None
    if instance is not None and instance.worker_id == principal.worker_id:
        return instance
    if instance is not None and not main_only and principal.worker_id in subordinate_ids(instance.claim):
        return instance
    raise not_found(f"instance {ref} on worker {principal.name}")


def subordinate_ids(claim: Any) -> set[int]:
    """Worker ids of a claim's subordinate workers (a claim as stored: a dict, or None)."""
    if not isinstance(claim, dict):
        return set()
    return {s.get("worker_id") for s in claim.get("subordinate_workers") or () if isinstance(s, dict)}


@route("PUT", "/v2/agent/instances/{id}/ray", "Publish the Ray head of a multi-host instance (its main worker)",
       auth="worker", body=schemas.RayHead, response=schemas.RayHead)
async def put_ray_head(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.RayHead)
    async with server_of(request).db.session() as s:
        instance = await _instance_of_worker(s, request, main_only=True)
        if not subordinate_ids(instance.claim):
            raise conflict(f"instance {instance.name} is placed on one worker; it has no Ray cluster")
        await put_setting(s, f"{RAY_HEAD_PREFIX}{instance.id}", body.model_dump_json())
        await s.commit()
    return json_out(body)


@route("GET", "/v2/agent/instances/{id}/ray", "The Ray head of a multi-host instance (its main or subordinate workers)",
       auth="worker", response=schemas.RayHead)
async def get_ray_head(request: web.Request) -> web.Response:
    async with server_of(request).db.session() as s:
        instance = await _instance_of_worker(s, request, main_only=False)
        row = await s.get(tables.Setting, f"{RAY_HEAD_PREFIX}{instance.id}")
        if row is None:
            raise not_found(f"a Ray head of instance {instance.name} (its main worker has not started one yet)")
        return json_out(schemas.RayHead.model_validate_json(row.value))


@route("POST", "/v2/agent/instances/{id}/events", "Record an event on an instance from one of its workers "
       "(a subordinate's Ray join failing: it never reports the instance's state)", auth="worker",
       body=schemas.AgentEvent, status=201)
async def post_instance_event(request: web.Request) -> web.Response:
    body = await read_json(request, schemas.AgentEvent)
    async with server_of(request).db.session() as s:
        instance = await _instance_of_worker(s, request, main_only=False)
        record_event(s, "instances", instance, body.reason, body.message, principal_of(request).name)
        await s.commit()
    return web.json_response({"recorded": body.reason}, status=201)
