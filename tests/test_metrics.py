"""Agent and server /metrics against real processes (the tiny llama.cpp model), plus the unification unit."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.backends import LLAMACPP_METRICS, VLLM_METRICS
from agent.metrics import InstanceSample, families, render, unify
from conftest import eventually
from maas_tui.client import MaasClient
from server.schemas import GPUDevice, HostInfo

pytestmark = pytest.mark.timeout(90)

LLAMACPP_TEXT = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 34
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 99
"""
VLLM_TEXT = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="m"} 10.0
"""


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    found = [v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= ls]
    return sum(found) if found else None


def test_backend_metrics_are_unified():
    assert unify(LLAMACPP_TEXT, LLAMACPP_METRICS) == {"prompt_tokens_total": 12, "generation_tokens_total": 34,
                                                      "requests_running": 2}
    assert unify(VLLM_TEXT, VLLM_METRICS) == {"requests_running": 3, "generation_tokens_total": 10}
    assert unify("not prometheus {{{", LLAMACPP_METRICS) == {}


def test_rendered_families():
    gpu = GPUDevice(index=0, name="H100", uuid="GPU-1", memory_total=80, memory_used=10, utilization=55, temperature=61)
    items = [InstanceSample("m-1", "m", "llama.cpp", "running", LLAMACPP_TEXT, LLAMACPP_METRICS),
             InstanceSample("m-2", "m", "llama.cpp", "starting")]
    text = render(families(HostInfo(cpu_count=2, cpu_percent=12.5, memory_total=100, memory_used=40), [gpu], items,
                           "w1")).decode()
    assert value(text, "maas_host_cpu_percent", worker="w1") == 12.5
    assert value(text, "maas_gpu_utilization_percent", gpu="0", uuid="GPU-1") == 55
    assert value(text, "maas_gpu_temperature_celsius", gpu="0") == 61
    assert value(text, "maas_instance_state", instance="m-1", state="running") == 1
    assert value(text, "maas_instance_state", instance="m-2", state="running") == 0
    assert value(text, "maas_instance_state", instance="m-2", state="starting") == 1
    assert value(text, "maas_instance_generation_tokens_total", instance="m-1", model="m", backend="llama.cpp") == 34
    assert value(text, "maas_instance_requests_running", instance="m-1") == 2
    assert value(text, "maas_instance_metrics_up", instance="m-1") == 1
    assert value(text, "maas_instance_requests_running", instance="m-2") is None


async def _get(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return await response.text()


async def test_agent_and_server_metrics_with_a_real_backend(server, admin: MaasClient, api_key: str, agent,
                                                            tiny_model: Path):
    await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})

    async def running() -> bool:
        instances = await admin.list_instances("tiny")
        return len(instances) == 1 and instances[0].state == "running"

    await eventually(running, message="the instance running")
    instance = (await admin.list_instances("tiny"))[0]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    reply = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    await client.close()
    generated = reply.usage.completion_tokens

    # The agent's endpoint answers the server's credential (or MAAS_METRICS_TOKEN), never anyone.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agent.config.port}/metrics") as response:
            assert response.status == 401
    agent_text = await _get(f"http://127.0.0.1:{agent.config.port}/metrics", agent.api.agent_secret)
    labels = {"model": "tiny", "instance": instance.name, "backend": "llama.cpp", "worker": "worker-1"}
    assert value(agent_text, "maas_instance_state", state="running", **labels) == 1
    assert value(agent_text, "maas_instance_metrics_up", **labels) == 1
    assert value(agent_text, "maas_instance_generation_tokens_total", **labels) == generated
    assert value(agent_text, "maas_instance_prompt_tokens_total", **labels) > 0
    assert value(agent_text, "maas_host_memory_total_bytes", worker="worker-1") > 0
    assert value(agent_text, "maas_host_cpu_count", worker="worker-1") >= 1

    server_text = await _get(f"{server.url}/metrics")
    assert value(server_text, "maas_model_replicas_desired", model="tiny") == 1
    assert value(server_text, "maas_model_replicas_running", model="tiny") == 1
    assert value(server_text, "maas_instances", model="tiny", state="running") == 1
    assert value(server_text, "maas_instances_by_state", state="running") == 1
    assert value(server_text, "maas_instances_by_state", state="error") == 0
    assert value(server_text, "maas_workers", state="ready") == 1
    assert value(server_text, "maas_bus_lag_seconds") >= 0

    async def metered() -> bool:  # the gateway's usage meter flushes every 2 s
        text = await _get(f"{server.url}/metrics")
        return value(text, "maas_gateway_requests_total", model="tiny") == 1 and \
            value(text, "maas_gateway_completion_tokens_total", model="tiny") == generated

    await eventually(metered, timeout=10, message="gateway usage in the server's metrics")


def test_grafana_dashboard_queries_known_metrics():
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    known = ("maas_host_", "maas_gpu_", "maas_instance_", "maas_model_", "maas_instances", "maas_workers",
             "maas_gateway_", "maas_bus_lag_seconds")
    for expr in exprs:
        assert any(name in expr for name in known), expr


class FakeNVML:
    """Just enough of pynvml for one GPU (the suite never needs a real one)."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, index): return index
    def nvmlDeviceGetMemoryInfo(self, handle): return type("M", (), {"total": 80 * 2**30, "used": 3 * 2**30})()
    def nvmlDeviceGetUtilizationRates(self, handle): return type("U", (), {"gpu": 37})()
    def nvmlDeviceGetTemperature(self, handle, kind): return 55
    def nvmlDeviceGetPowerUsage(self, handle): return 312_500
    def nvmlDeviceGetName(self, handle): return b"NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetUUID(self, handle): return "GPU-abc"


def test_nvml_readings_reach_the_metrics():
    from agent.devices import GPUInventory

    inventory = GPUInventory()
    inventory._nvml = FakeNVML()
    gpus = inventory.read()
    assert (gpus[0].name, gpus[0].uuid, gpus[0].utilization, gpus[0].temperature) == \
        ("NVIDIA H100 80GB HBM3", "GPU-abc", 37, 55)
    text = render(families(HostInfo(), gpus, [], "w", inventory.power_watts)).decode()
    assert value(text, "maas_gpu_power_watts", uuid="GPU-abc") == 312.5
    assert value(text, "maas_gpu_memory_used_bytes", gpu="0") == 3 * 2**30
