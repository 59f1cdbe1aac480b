"""`GET /v2/telemetry`: this server's history of GPUs and instances (server/telemetry_history.py), with
each instance's claimed-vs-actual memory (server/memory_drift.py); `maas doctor`'s routes, which ask
agents for their checks (agent/doctor.py) the way instance logs are fetched: the server calls the
agent's own endpoint with the agent's secret.

Who sees what: GPU history goes with the workers (any signed-in user may list workers); an instance's
history only to its team (its requests and memory say what the team runs), as for the instance itself.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time

import aiohttp
from aiohttp import web
from sqlalchemy import select

from server.api.errors import bad_request, not_found, parse_whole_number
from server.api.permissions import only_visible, require_cluster_role, team_row
from server.api.routing import Query, json_out, route, server_of
from server.db import tables
from server.schemas.telemetry import (DoctorReport, DoctorRequest, GPUHistory, InstanceHistory,
                                      TelemetryHistory)

MAX_SINCE = 24 * 3600
_DURATION = re.compile(r"^(\d{1,6})([smh]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}
DOCTOR_TIMEOUT = 30.0


def parse_since(text: str | None) -> int:
    """How far back: 90, 90s, 15m, 1h (default 1h, at most 24h)."""
    if text is None:
        return 3600
    match = _DURATION.match(text)
    if not match:
        raise bad_request("since: a duration such as 300, 15m or 1h (at most 24h)", {"field": "since"})
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if not 0 < seconds <= MAX_SINCE:
        raise bad_request("since: more than 0 and at most 24h", {"field": "since"})
    return seconds


@route("GET", "/v2/telemetry", "This server's telemetry history: GPUs per worker, and instances of your teams "
       "with claimed vs actual memory", response=TelemetryHistory,
       query={"worker": Query("only this worker's GPUs and instances", {"type": "string", "maxLength": 253}),
              "instance": Query("only this instance (id or name)", {"type": "string", "maxLength": 253}),
              "model": Query("only this model's instances", {"type": "string", "maxLength": 253}),
              "since": Query("how far back: 300, 15m, 1h (default 1h, at most 24h)",
                             {"type": "string", "pattern": _DURATION.pattern})})
async def telemetry_history(request: web.Request) -> web.Response:
    server = server_of(request)
    since = time.time() - parse_since(request.query.get("since"))
    worker_name, instance_ref, model_name = (request.query.get(k) for k in ("worker", "instance", "model"))
    hub = server.telemetry
    async with server.db.session() as s:
        workers_query = select(tables.Worker.id, tables.Worker.name).order_by(tables.Worker.name)
        if worker_name is not None:
            workers_query = workers_query.where(tables.Worker.name == worker_name)
        workers = (await s.execute(workers_query)).all()
        if worker_name is not None and not workers:
            raise not_found(f"worker {worker_name!r}")
        instances_query = select(tables.ModelInstance).order_by(tables.ModelInstance.name)
        if instance_ref is not None:
            instance_id = parse_whole_number(instance_ref, low=1)  # an id, else a name (as GET /v2/instances/{ref})
            where = tables.ModelInstance.name == instance_ref if instance_id is None \
                else tables.ModelInstance.id == instance_id
            instances = [await team_row(request, s, tables.ModelInstance, where, f"instance {instance_ref!r}")]
        else:
            if model_name is not None:
                model = await team_row(request, s, tables.Model, tables.Model.name == model_name,
                                       f"model {model_name!r}")
                instances_query = instances_query.where(tables.ModelInstance.model_id == model.id)
            if worker_name is not None:
                instances_query = instances_query.where(tables.ModelInstance.worker_name == worker_name)
            instances_query = only_visible(request, instances_query, tables.ModelInstance.team)
            instances = [i for i in (await s.execute(instances_query)).scalars().all() if i.id in hub.history.instances]
    out = TelemetryHistory(server=server.url or socket.gethostname(), step_seconds=hub.history.tiers[0].seconds)
    steps = []
    if instance_ref is None and model_name is None:
        for worker_id, name in workers:
            for index, step, columns in hub.history.gpu_history(worker_id, since):
                steps.append(step)
                out.gpus.append(GPUHistory(worker_id=worker_id, worker=name, gpu=index, **columns))
    for instance in instances:
        found = hub.history.instance_history(instance.id, since)
        step, columns = found if found else (hub.history.tiers[0].seconds, {})
        steps.append(step)
        out.instances.append(InstanceHistory(instance_id=instance.id, instance=instance.name,
                                             model=instance.model_name, memory=hub.drift.memory_of(instance.id),
                                             **columns))
    out.step_seconds = max(steps, default=out.step_seconds)
    return json_out(out)


# --- maas doctor -----------------------------------------------------------------------------------


async def _ask_agent(server, worker: tables.Worker, peers: list[str]) -> DoctorReport:
    url = f"http://{worker.address}:{worker.agent_port}/doctor"
    body = DoctorRequest(server_time=time.time(), peers=peers).model_dump(mode="json")
    try:
        async with server.http.post(url, json=body, headers={"Authorization": f"Bearer {worker.agent_secret}"},
                                    timeout=aiohttp.ClientTimeout(total=DOCTOR_TIMEOUT, sock_connect=5)) as response:
            if response.status != 200:
                return DoctorReport(worker=worker.name, error=f"the agent answered HTTP {response.status}: "
                                    f"{(await response.text())[:300]}")
            report = DoctorReport.model_validate(await response.json())
            report.worker = worker.name
            return report
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
        return DoctorReport(worker=worker.name, error=f"the agent at {worker.address}:{worker.agent_port} did not "
                            f"answer: {exc or type(exc).__name__}")


async def _doctor(request: web.Request, name: str | None) -> list[DoctorReport]:
    require_cluster_role(request, "run doctor checks on workers")
    server = server_of(request)
    async with server.db.session() as s:
        workers = (await s.execute(select(tables.Worker).order_by(tables.Worker.name))).scalars().all()
    chosen = [w for w in workers if name is None or w.name == name]
    if name is not None and not chosen:
        raise not_found(f"worker {name!r}")
    reports = []
    for worker in chosen:  # other workers' agent ports: the path Ray and the gateway take between hosts
        peers = [f"{w.address}:{w.agent_port}" for w in workers if w.id != worker.id and w.state == "ready"]
        reports.append(_ask_agent(server, worker, peers[:50]))
    return list(await asyncio.gather(*reports))


@route("GET", "/v2/workers/{name}/doctor", "Ask the worker's agent to check its environment (maas doctor)",
       response=DoctorReport, also=(502,))
async def worker_doctor(request: web.Request) -> web.Response:
    return json_out((await _doctor(request, request.match_info["name"]))[0])


@route("GET", "/v2/doctor", "Ask every worker's agent to check its environment (maas doctor --all)",
       response=DoctorReport, response_list=True)
async def cluster_doctor(request: web.Request) -> web.Response:
    return json_out(await _doctor(request, None))
