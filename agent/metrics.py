"""The agent's `/metrics`: host, GPUs, instance states, and each instance's own metrics re-exported
under unified names (`maas_instance_*`, labels model / instance / backend)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Iterable

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from server.schemas import GPUDevice, HostInfo, UNIFIED_INSTANCE_METRICS

INSTANCE_STATES = ("downloading", "starting", "running", "error")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class InstanceSample:
    """One instance as the agent sees it, plus what its backend answered on /metrics (None: no answer)."""

    instance: str
    model: str
    backend: str
    state: str
    scraped: str | None = None
    metrics: dict[str, str] | None = None  # backend sample name -> unified name


async def scrape(http: aiohttp.ClientSession, url: str, timeout: float = 2.0, key: str | None = None) -> str | None:
    """A backend's exposition text (None when it does not answer); `key`: the instance's, where it has one."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout), headers=headers) as response:
            if response.status != 200:
                return None
            return await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError, asyncio.TimeoutError):
        return None


def unify(text: str, mapping: dict[str, str]) -> dict[str, float]:
    """The unified values in a backend's exposition text (samples summed over the backend's own labels)."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                unified = mapping.get(sample.name)
                if unified is not None:
                    values[unified] = values.get(unified, 0.0) + float(sample.value)
    except ValueError:  # not Prometheus text: nothing usable
        return {}
    return values


def families(host: HostInfo, gpus: Iterable[GPUDevice], instances: Iterable[InstanceSample],
             worker: str, power_watts: dict[int, float] | None = None) -> list[Metric]:
    out: list[Metric] = []

    def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=labels)
        out.append(family)
        return family

    gauge("maas_host_cpu_percent", "Host CPU utilisation", ["worker"]).add_metric([worker], host.cpu_percent)
    gauge("maas_host_cpu_count", "Host CPUs", ["worker"]).add_metric([worker], host.cpu_count)
    gauge("maas_host_memory_total_bytes", "Host RAM", ["worker"]).add_metric([worker], host.memory_total)
    gauge("maas_host_memory_used_bytes", "Host RAM in use", ["worker"]).add_metric([worker], host.memory_used)

    labels = ["worker", "gpu", "uuid", "name", "simulated"]
    util = gauge("maas_gpu_utilization_percent", "GPU utilisation", labels)
    total = gauge("maas_gpu_memory_total_bytes", "GPU memory", labels)
    used = gauge("maas_gpu_memory_used_bytes", "GPU memory in use", labels)
    temperature = gauge("maas_gpu_temperature_celsius", "GPU temperature", labels)
    power = gauge("maas_gpu_power_watts", "GPU power draw", labels)
    for g in gpus:
        values = [worker, str(g.index), g.uuid or "", g.name, str(g.simulated).lower()]
        util.add_metric(values, g.utilization)
        total.add_metric(values, g.memory_total)
        used.add_metric(values, g.memory_used)
        if g.temperature is not None:
            temperature.add_metric(values, g.temperature)
        watts = g.power_watts if g.power_watts is not None else (power_watts or {}).get(g.index)
        if watts is not None:
            power.add_metric(values, watts)

    instances = list(instances)
    state = gauge("maas_instance_state", "1 for the state each instance on this worker is in",
                  ["worker", "model", "instance", "backend", "state"])
    up = gauge("maas_instance_metrics_up", "1 when the instance answered its metrics scrape",
               ["worker", "model", "instance", "backend"])
    unified: dict[str, Metric] = {}
    for name, kind in UNIFIED_INSTANCE_METRICS.items():
        # CounterMetricFamily appends _total itself; `_sum`/`_count` parts are exported as gauges under their names.
        if kind == "counter" and name.endswith("_total"):
            unified[name] = CounterMetricFamily(f"maas_instance_{name[:-6]}", f"unified {name}",
                                                labels=["worker", "model", "instance", "backend"])
        else:
            unified[name] = GaugeMetricFamily(f"maas_instance_{name}", f"unified {name}",
                                labels=["worker", "model", "instance", "backend"])
    for item in instances:
        base = [worker, item.model, item.instance, item.backend]
        for s in INSTANCE_STATES:
            state.add_metric(base + [s], 1.0 if item.state == s else 0.0)
        if item.state == "running":
            up.add_metric(base, 1.0 if item.scraped is not None else 0.0)
        if item.scraped is not None and item.metrics:
            for name, value in unify(item.scraped, item.metrics).items():
                unified[name].add_metric(base, value)
    out.extend(unified.values())
    return out


class _Fixed:
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def render(metrics: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry)
