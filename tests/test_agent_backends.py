"""Custom and uninstalled backends through the real server and agent (SQLite, simulated GPUs)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agent.agent import Agent, AgentConfig
from conftest import eventually
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server.schemas import KNOWN_BACKENDS

pytestmark = pytest.mark.timeout(90)

TINY_LLAMA = {
    "name": "tiny-llama",
    "description": "llama.cpp started from a user-registered template",
    "command": [sys.executable, "-m", "agent.backends.llamacpp_server", "--model", "{model_path}",
                "--alias", "{model_name}", "--host", "{host}", "--port", "{port}"],
    "env": {"MAAS_TEST_GPUS": "{gpus}"},
    "health_path": "/health",
    "metrics": {"llamacpp:tokens_predicted_total": "generation_tokens_total"},
}


@pytest.fixture
async def gpu_agent(server, tmp_path: Path):
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "gpu-agent",
                              name="gpu-1", address="127.0.0.1", simulate_gpus="1xL4-24GB", heartbeat_interval=1.0,
                              drain_seconds=0.2))
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 10)
    try:
        yield agent
    finally:
        await agent.stop()


async def _state(admin: MaasClient, model: str, state: str) -> bool:
    instances = await admin.list_instances(model)
    return bool(instances) and all(i.state == state for i in instances)


def run_cli(server, key: str, tmp_path: Path, *args: str):
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": key, "MAAS_CONFIG": str(tmp_path / "cli.json"), "COLUMNS": "250"}
    return CliRunner().invoke(cli_app, list(args), env=env)


async def test_custom_backend_registered_with_the_cli_serves(server, admin: MaasClient, api_key: str, gpu_agent,
                                                             tiny_model: Path, tmp_path: Path):
    definition = tmp_path / "backend.yaml"
    definition.write_text(yaml.safe_dump(TINY_LLAMA))
    added = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "backend", "add", "-f", str(definition))
    assert added.exit_code == 0, added.output
    again = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "backend", "add", "-f", str(definition))
    assert again.exit_code == 1 and "already registered" in again.output
    listed = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "backend", "list")
    assert "custom:tiny-llama" in listed.output and "vllm" in listed.output
    assert [b.name for b in await admin.list_backends()] == [*KNOWN_BACKENDS, "tiny-llama"]

    await admin.create_model({"name": "custom-tiny", "source": str(tiny_model), "backend": "custom:tiny-llama",
                              "replicas": 1})
    await eventually(lambda: _state(admin, "custom-tiny", "running"), message="the custom backend running")
    instance = (await admin.list_instances("custom-tiny"))[0]
    assert instance.claim.device == "gpu" and instance.claim.gpu_indexes == [0]
    workload = gpu_agent.workloads[instance.id]
    assert workload.launch.command[0] == sys.executable
    assert workload.launch.command[-2:] == ["--port", str(instance.port)]
    assert workload.launch.env == {"MAAS_TEST_GPUS": "0"}  # simulated GPUs: no CUDA_VISIBLE_DEVICES
    async for reply in admin.chat("custom-tiny", "hello", max_tokens=4):
        assert isinstance(reply, str)


async def test_unusable_backends_end_in_error_not_a_hang(server, admin: MaasClient, gpu_agent):
    # vLLM is not installed in this environment; the definition of custom:ghost does not exist.
    await admin.create_model({"name": "no-vllm", "source": "org/llama", "backend": "vllm", "memory_bytes": 10**9})
    await admin.create_model({"name": "ghost", "source": "org/x", "backend": "custom:ghost", "memory_bytes": 10**9})
    await eventually(lambda: _state(admin, "no-vllm", "error"), timeout=20, message="vllm instance in error")
    await eventually(lambda: _state(admin, "ghost", "error"), timeout=20, message="ghost instance in error")
    vllm_instance = (await admin.list_instances("no-vllm"))[0]
    assert "vllm is not installed on this host" in vllm_instance.state_message
    assert "MAAS_VLLM_PYTHON" in vllm_instance.state_message
    ghost = (await admin.list_instances("ghost"))[0]
    assert "custom:ghost is not registered" in ghost.state_message


async def test_backend_registration_is_validated_and_replaceable(server, admin: MaasClient, api_key: str):
    with pytest.raises(ApiClientError) as bad:
        await admin.add_backend(TINY_LLAMA | {"command": "serve {nope}"})
    assert bad.value.status == 422 and "unknown placeholder" in bad.value.message + str(bad.value.details)
    created = await admin.add_backend(TINY_LLAMA)
    assert created.name == "tiny-llama" and not created.builtin
    replaced = await admin.add_backend(TINY_LLAMA | {"health_path": "/ready"}, replace=True)
    assert replaced.health_path == "/ready"
    assert (await admin.get_backend("tiny-llama")).health_path == "/ready"
    await admin.delete_backend("tiny-llama")
    with pytest.raises(ApiClientError) as gone:
        await admin.get_backend("tiny-llama")
    assert gone.value.status == 404
