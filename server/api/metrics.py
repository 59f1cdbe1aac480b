"""The server's `/metrics` (Prometheus text, no auth): models desired/running, instances and workers
by state, gateway requests and tokens (from the usage table, so every server reports the same
cluster-wide totals), this server's gateway latency and answers by model and status, the Higress
sync, and the event bus lag.

Everything is read at scrape time with a few aggregate queries; the gateway's counters are
in-memory additions on the request path (server/gateway/stats.py).
"""

from __future__ import annotations

from typing import Any, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select

from server import schemas
from server.api.routing import server_of
from server.db import tables

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Fixed:
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


async def collect(server: Any) -> list[Metric]:
    out: list[Metric] = []
    async with server.db.session() as s:
        models = (await s.execute(select(tables.Model.name, tables.Model.replicas, tables.Model.state))).all()
        by_model_state = (await s.execute(
            select(tables.ModelInstance.model_id, tables.Model.name, tables.ModelInstance.state, func.count())
            .join(tables.Model, tables.Model.id == tables.ModelInstance.model_id)
            .group_by(tables.ModelInstance.model_id, tables.Model.name, tables.ModelInstance.state))).all()
        workers = (await s.execute(select(tables.Worker.state, func.count()).group_by(tables.Worker.state))).all()
        usage = (await s.execute(select(tables.Usage.model_name, func.sum(tables.Usage.requests),
                                        func.sum(tables.Usage.prompt_tokens), func.sum(tables.Usage.completion_tokens))
                                 .group_by(tables.Usage.model_name))).all()

    desired = GaugeMetricFamily("maas_model_replicas_desired", "Replicas asked for", labels=["model"])
    running = GaugeMetricFamily("maas_model_replicas_running", "Instances running", labels=["model"])
    running_by_model: dict[str, int] = {}
    for _model_id, name, state, count in by_model_state:
        if str(state) == "running":
            running_by_model[name] = running_by_model.get(name, 0) + count
    for name, replicas, state in models:
        desired.add_metric([name], 0 if str(state) == "deleting" else replicas)
        running.add_metric([name], running_by_model.get(name, 0))
    out += [desired, running]

    instances = GaugeMetricFamily("maas_instances", "Instances by model and state", labels=["model", "state"])
    totals = {state.value: 0 for state in schemas.InstanceState}
    for _model_id, name, state, count in by_model_state:
        instances.add_metric([name, str(state)], count)
        totals[str(state)] = totals.get(str(state), 0) + count
    by_state = GaugeMetricFamily("maas_instances_by_state", "Instances by state", labels=["state"])
    for state, count in totals.items():
        by_state.add_metric([state], count)
    out += [instances, by_state]

    worker_states = GaugeMetricFamily("maas_workers", "Workers by state", labels=["state"])
    counts = {state.value: 0 for state in schemas.WorkerState} | {str(state): count for state, count in workers}
    for state, count in counts.items():
        worker_states.add_metric([state], count)
    out.append(worker_states)

    requests = CounterMetricFamily("maas_gateway_requests", "Requests through the /v1 gateway", labels=["model"])
    prompt = CounterMetricFamily("maas_gateway_prompt_tokens", "Prompt tokens through the gateway", labels=["model"])
    completion = CounterMetricFamily("maas_gateway_completion_tokens", "Completion tokens through the gateway",
                                     labels=["model"])
    for name, n_requests, n_prompt, n_completion in usage:
        requests.add_metric([name], float(n_requests or 0))
        prompt.add_metric([name], float(n_prompt or 0))
        completion.add_metric([name], float(n_completion or 0))
    out += [requests, prompt, completion]

    # This server's own gateway: latency and answers by model and status, counted in memory
    # on the request path (server/gateway/stats.py) and read here.
    latency = HistogramMetricFamily("maas_gateway_request_duration_seconds",
                                    "Time to the last byte of /v1 requests through this server's gateway",
                                    labels=["model", "status"])
    answered = CounterMetricFamily("maas_gateway_http_requests",
                                   "/v1 requests answered by this server's gateway, by model and HTTP status",
                                   labels=["model", "status"])
    for model, status, buckets, count, total in server.routes.stats.snapshot():
        latency.add_metric([model, str(status)], buckets, total)
        answered.add_metric([model, str(status)], float(count))
    out += [latency, answered]
    out += _autoscaling_metrics(server)

    out += _telemetry_metrics(server)

    lag = GaugeMetricFamily("maas_bus_lag_seconds", "Commit to publication delay of the newest change read")
    lag.add_metric([], float(getattr(server.feed, "lag_seconds", 0.0) or 0.0))
    out.append(lag)

    # Higress sync, on the server that runs it (the leader): is each applier in sync, how often it failed.
    sync = server.higress_status
    if sync:
        up = GaugeMetricFamily("maas_higress_sync_up", "1 when the last Higress apply succeeded",
                               labels=["applier", "target"])
        failures = CounterMetricFamily("maas_higress_sync_failures", "Failed Higress applies",
                                       labels=["applier", "target"])
        conflicts = CounterMetricFamily("maas_higress_sync_conflicts", "409 Conflicts met and retried",
                                        labels=["applier", "target"])
        for status in sync:
            labels = [status.applier, status.target]
            up.add_metric(labels, 1.0 if status.ok else 0.0)
            failures.add_metric(labels, float(status.failures))
            conflicts.add_metric(labels, float(status.conflicts))
        out += [up, failures, conflicts]
    return out


def _autoscaling_metrics(server: Any) -> list[Metric]:
    """Requests this server's gateway holds for a cold start; on the leader, the load each autoscaled model had at
    the autoscaler's last decision (desired and running replicas are maas_model_replicas_desired/_running)."""
    held = GaugeMetricFamily("maas_gateway_held_requests", "Requests this server holds while a replica starts",
                             labels=["model"])
    for name in sorted(server.routes.models):
        held.add_metric([name], float(server.cold_start.held.get(name, 0)))
    load = GaugeMetricFamily("maas_model_autoscale_load", "Requests in flight plus held, all servers, at the "
                             "autoscaler's last decision (leader only)", labels=["model"])
    autoscaler = next((loop for loop in getattr(server, "_loops", []) if loop.__class__.__name__ == "Autoscaler"), None)
    for name, seen in sorted(autoscaler.load.items()) if autoscaler is not None else ():
        load.add_metric([name], seen.in_flight + seen.held)
    return [held, load]


def _telemetry_metrics(server: Any) -> list[Metric]:
    """Per-GPU readings of the workers whose heartbeats this server takes (live telemetry, in memory)."""
    util = GaugeMetricFamily("maas_worker_gpu_utilization_percent", "GPU utilisation from the latest heartbeat",
                             labels=["worker", "gpu"])
    used = GaugeMetricFamily("maas_worker_gpu_memory_used_bytes", "GPU memory in use from the latest heartbeat",
                             labels=["worker", "gpu"])
    stored = server.heartbeats.stored if server.heartbeats else {}
    for worker_id, reading in list(server.telemetry.readings.items()):
        name = (stored.get(worker_id) or {}).get("name")
        if name is None:
            continue
        for gpu in reading["gpus"]:
            util.add_metric([name, str(gpu["index"])], float(gpu["utilization"]))
            used.add_metric([name, str(gpu["index"])], float(gpu["memory_used"]))
    return [util, used]


async def metrics_handler(request: web.Request) -> web.Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(await collect(server_of(request))))
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})


def add_metrics_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_handler)
