"""What agents call: registration, heartbeats and instance status reports.

A heartbeat renews the worker's lease and its live telemetry in memory (server/liveness.py,
server/telemetry.py) and touches the database only when something durable changed; the same bytes
as the worker's last validated heartbeat are not parsed and validated again. Calls that do
need the database are admitted up to a limit; past it they get 503 with Retry-After (the agent backs
off with jitter) instead of queueing into timeouts. A heartbeat is never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from datetime import UTC, datetime
from typing import Any, Awaitable, Callable

from aiohttp import web
from sqlalchemy import delete, select

from server import schemas
from server.api.errors import ApiError, conflict, database_unavailable, first_line, not_found, parse_whole_number, read_json
from server.api.routing import json_out, principal_of, route, server_of
from server.api.security import hash_secret, new_worker_token
from server.db import tables
from server.db.settings import put_setting
from server.liveness import inventory
from server.services import backend_keys, workers
from server.events import record_event
from server.telemetry import reading_of

log = logging.getLogger(__name__)
S = schemas.InstanceState

# Agent calls that need the database, at once, on one server. Below the pool (10 + 20 overflow), so
# operators' requests and the controllers still get connections. A burst (500 instances reported
# running together) waits in a short queue; past it, or after QUEUE_SECONDS, a call is refused.
# Few at once: their work is mostly CPU on the one event loop, so 16 interleaved transactions each
# took about 16 times as long to commit (and to reach the watchers) for no more throughput
# (bench/cluster.py, 100 workers: "running" lines' lag p99 370 -> 223 ms with 6).
MAX_AGENT_WRITES = 6
MAX_QUEUED = 1000
QUEUE_SECONDS = 2.0
RETRY_AFTER_SECONDS = 2


class AgentAdmission:
    """Admits agent calls that use the database: `limit` at once, a bounded queue behind them, and
    503 with Retry-After beyond, so overload is answered at once instead of running into timeouts."""

    def __init__(self, limit: int = MAX_AGENT_WRITES, queued: int = MAX_QUEUED, wait: float = QUEUE_SECONDS):
        self.limit = limit
        self.max_queued = queued
        self.wait = wait
        self.in_flight = 0
        self.queued = 0
        self.refused = 0
        self._slot = asyncio.Condition()

    async def run(self, work: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self.in_flight >= self.limit:
            if self.queued >= self.max_queued or not await self._wait_for_slot():
                self.refused += 1
                return busy("overloaded", f"the server is busy with {self.in_flight} agent calls that write and "
                            f"{self.queued} waiting; retry after the Retry-After delay")
        self.in_flight += 1
        try:
            return await work()
        finally:
            self.in_flight -= 1
            async with self._slot:
                self._slot.notify()

    async def _wait_for_slot(self) -> bool:
        self.queued += 1
        try:
            async with self._slot:
                async with asyncio.timeout(self.wait):  # not wait_for: see server/reconcile.py
                    await self._slot.wait_for(lambda: self.in_flight < self.limit)
            return True
        except TimeoutError:
            return False
        finally:
            self.queued -= 1


def busy(code: str, message: str, status: int = 503) -> web.Response:
    """A refusal that says when to come back (seconds, with jitter so agents do not return together)."""
    retry = RETRY_AFTER_SECONDS + random.randint(0, RETRY_AFTER_SECONDS)
    return web.json_response({"error": {"code": code, "message": message, "details": {"retry_after": retry}}},
                             status=status, headers={"Retry-After": str(retry)})


# Registrations have a smaller lane of their own: a whole cluster registering at once (a server
# restart, a rack booting) must not starve heartbeats and status reports of the loop and the pool.
MAX_REGISTERING = 4


def _admission(request: web.Request, registering: bool = False) -> AgentAdmission:
    server = server_of(request)
    name = "agent_registration" if registering else "agent_admission"
    admission = getattr(server, name, None)
    if admission is None:
        admission = AgentAdmission(MAX_REGISTERING) if registering else AgentAdmission()
        setattr(server, name, admission)
    return admission


def instance_workers(obj: dict[str, Any]) -> set[int]:
    """The workers an instance change concerns: where it runs and its Ray subordinates (bus routing)."""
    return {obj.get("worker_id")} | subordinate_ids(obj.get("claim"))


@route("POST", "/v2/agent/register", "Register (or re-register) a worker with the cluster token", auth="registrar",
       body=schemas.WorkerRegister, response=schemas.WorkerRegistered, status=201)
async def register(request: web.Request) -> web.StreamResponse:
    # Admitted before the body is read: refusing a registration storm must cost next to nothing.
    return await _admission(request, registering=True).run(
        lambda: _register(request, read_json(request, schemas.WorkerRegister)))


async def _register(request: web.Request, reading: Awaitable[schemas.WorkerRegister]) -> web.Response:
    body = await reading
    server = server_of(request)
    async with server.db.session() as s:
        worker = (await s.execute(select(tables.Worker).where(tables.Worker.name == body.name))).scalar_one_or_none()
        reason = "Reregistered"
        if worker is None:
            worker = tables.Worker(name=body.name)
            s.add(worker)
            reason = "Registered"
        elif not workers.presents_token(worker, body.token, hash_secret(body.token) if body.token else None):
            # A taken name: only its current token or an approval moves the identity (services/workers.py).
            approval = await workers.take_approval(s, worker)
            if approval is None:
                if await workers.hold(s, worker, body):
                    record_event(s, "workers", worker, "RegistrationHeld",
                                 f"from {body.address}:{body.agent_port} without the worker's token; "
                                 f"`maas worker approve {body.name}` lets it through", body.name)
                await s.commit()
                raise ApiError(409, "approval_required", workers.held_message(body.name),
                               {"worker": body.name, "approve": f"maas worker approve {body.name}"})
            reason = "Reregistered"
            record_event(s, "workers", worker, "TakeoverApproved",
                         f"registered from {body.address}:{body.agent_port} as approved by {approval.approved_by}",
                         body.name)
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
    server.auth.invalidate(worker_id=worker.id)  # the previous token stops working at once
    seen = server.heartbeats.heard_from(worker.id)  # registering is a sign of life
    server.heartbeats.remember(out.worker.model_dump(mode="json"))
    server.telemetry.update(worker.id, reading_of(schemas.WorkerHeartbeat(gpus=body.gpus, host=body.host), seen))
    return json_out(out, status=201)


async def _recover_unreachable(session, worker: tables.Worker) -> None:
    """A worker that answers again gets its unreachable instances back as `scheduled`:
    the agent then adopts the ones still running or starts them anew."""
    rows = (await session.execute(select(tables.ModelInstance).where(
        tables.ModelInstance.worker_id == worker.id, tables.ModelInstance.state == S.unreachable))).scalars()
    for instance in rows:
        instance.state = S.scheduled
        instance.state_message = "worker is back"


@route("POST", "/v2/agent/heartbeat", "Renew the worker's lease and report device usage (live telemetry)",
       auth="worker", body=schemas.WorkerHeartbeat, response=schemas.WorkerOut)
async def heartbeat(request: web.Request) -> web.StreamResponse:
    worker_id = principal_of(request).worker_id
    server = server_of(request)
    raw = await request.read()  # kept by the request: read_json reads these same bytes
    body = server.heartbeats.validated(worker_id, raw)  # the same report as last time (an idle worker)
    if body is None:
        body = await read_json(request, schemas.WorkerHeartbeat)
        server.heartbeats.passed_validation(worker_id, raw, body)
    seen = server.heartbeats.heard_from(worker_id)
    server.telemetry.update(worker_id, reading_of(body, seen))
    server.telemetry.observe_heartbeat(worker_id, body)  # history and memory drift, in memory
    gpus = [g.__dict__ for g in body.gpus]  # the fields as given; only the durable ones are compared
    stored = server.heartbeats.current(worker_id, gpus, body.host.__dict__, seen)
    if stored is not None:  # ready, same hardware: the lease and telemetry were all there was to do
        return web.Response(body=stored, content_type="application/json")
    try:
        return await _admission(request).run(lambda: _durable_heartbeat(request, body, seen))
    except ApiError:
        raise
    except Exception as exc:  # the lease is renewed in memory; the write comes with a later heartbeat
        if not database_unavailable(exc):
            log.exception("heartbeat of worker %s: the durable write failed", worker_id)
        else:
            log.warning("heartbeat of worker %s: database unavailable (%s)", worker_id, first_line(exc))
        return busy("database_unavailable", "the heartbeat was taken, but its change could not be stored yet; "
                    "it is stored with a later heartbeat")


async def _durable_heartbeat(request: web.Request, body: schemas.WorkerHeartbeat, seen: datetime) -> web.Response:
    """The worker comes back from not_ready, or its hardware changed: write the row (and its events)."""
    server = server_of(request)
    principal = principal_of(request)
    async with server.db.session() as s:
        worker = await s.get(tables.Worker, principal.worker_id)
        if worker is None:
            raise not_found("worker")
        gpus = [g.model_dump(mode="json") for g in body.gpus]
        host = body.host.model_dump(mode="json")
        same_hardware = inventory(worker.gpus or (), worker.host or {}) == inventory(gpus, host)
        if not same_hardware:
            worker.gpus = gpus
            worker.host = host
        if worker.state != schemas.WorkerState.ready:
            worker.state = schemas.WorkerState.ready
            worker.state_message = ""
            worker.last_heartbeat_at = seen
            record_event(s, "workers", worker, "Ready", "heartbeats resumed", worker.name)
            await _recover_unreachable(s, worker)
        await s.commit()
        row = schemas.WorkerOut.model_validate(worker).model_dump(mode="json")
    server.heartbeats.remember(row)
    return web.json_response(row | {"last_heartbeat_at": seen.isoformat()})


# Unreachable instances come back only through their worker's heartbeat (see _recover_unreachable).
_ALLOWED_FROM = {
    schemas.AgentInstanceState.downloading: {S.scheduled, S.downloading, S.error},
    schemas.AgentInstanceState.starting: {S.scheduled, S.downloading, S.starting, S.running, S.error},
    schemas.AgentInstanceState.running: {S.scheduled, S.downloading, S.starting, S.running},
    schemas.AgentInstanceState.error: {S.scheduled, S.downloading, S.starting, S.running, S.error},
}


@route("PUT", "/v2/agent/instances/{id}/status", "Report an instance's state from its agent", auth="worker",
       body=schemas.InstanceStatusReport, response=schemas.InstanceOut)
async def report_status(request: web.Request) -> web.StreamResponse:
    return await _admission(request).run(lambda: _report_status(request, read_json(request,
                                                                                  schemas.InstanceStatusReport)))


async def _report_status(request: web.Request, reading: Awaitable[schemas.InstanceStatusReport]) -> web.Response:
    body = await reading
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


@route("GET", "/v2/agent/instances/{id}/backend-key", "The key an instance's backend requires of its callers "
       "(the gateway presents it); null where the backend takes none (its main worker)", auth="worker",
       response=schemas.BackendKey)
async def get_backend_key(request: web.Request) -> web.Response:
    server = server_of(request)
    async with server.db.session() as s:
        instance = await _instance_of_worker(s, request, main_only=True)
        backend = (instance.spec or {}).get("backend")
    # Higress reaches the backends itself and cannot present a key per instance: no key there.
    via_higress = bool(server.config.higress_dir or server.config.higress_kubeconfig)
    keyed = backend in backend_keys.KEYED_BACKENDS and not via_higress
    return json_out(schemas.BackendKey(key=server.backend_keys.key(instance.id) if keyed else None))
