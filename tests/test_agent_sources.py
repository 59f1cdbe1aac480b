"""Hub sources through the real server and agent: the instance shows `downloading` with progress while the
agent fetches a GGUF from the Hub test server (tests/test_sources.py), then serves it with llama.cpp;
a wrong repository ends in `error` with a clear message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import eventually
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from test_sources import HubTestServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def gguf_hub(tiny_model: Path, monkeypatch):
    hub = await HubTestServer({"acme/tiny-gguf": {"tiny.gguf": tiny_model.read_bytes(),
                                                  "README.md": b"# tiny\n"}}).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read by the agent's model cache at each download
    try:
        yield hub
    finally:
        await hub.stop()


async def test_hub_gguf_downloads_with_progress_then_serves(server, admin: MaasClient, api_key: str, agent,
                                                            gguf_hub: HubTestServer, tmp_path: Path):
    gguf_hub.gated_file = "tiny.gguf"  # held back until the test has seen `downloading`
    await admin.create_model({"name": "hubby", "source": "hf://acme/tiny-gguf/tiny.gguf", "backend": "llama.cpp",
                              "context_length": 512})

    async def downloading() -> bool:
        found = await admin.list_instances("hubby")
        return bool(found) and found[0].state == "downloading" and found[0].download_progress is not None

    await eventually(downloading, timeout=30, message="the instance to show downloading")
    [instance] = await admin.list_instances("hubby")
    assert 0.0 <= instance.download_progress < 1.0
    assert "hf://acme/tiny-gguf/tiny.gguf" in instance.state_message
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "200"}
    listed = await asyncio.to_thread(CliRunner().invoke, cli_app, ["instance", "list"], env=env)
    assert listed.exit_code == 0 and f"downloading {instance.download_progress * 100:.0f}%" in listed.output

    gguf_hub.gate.set()

    async def running() -> bool:
        found = await admin.list_instances("hubby")
        return bool(found) and found[0].state == "running"

    await eventually(running, timeout=60, message="the downloaded model to serve")
    [instance] = await admin.list_instances("hubby")
    assert instance.download_progress is None  # cleared once past downloading
    cached = tmp_path / "agent" / "models" / "huggingface" / "hub" / "models--acme--tiny-gguf"
    launched = agent.workloads[instance.id].launch.command
    model_path = Path(launched[launched.index("--model") + 1])
    assert model_path.is_relative_to(cached) and model_path.name == "tiny.gguf"
    assert gguf_hub.downloads == ["tiny.gguf"]  # only the file asked for
    async for reply in admin.chat("hubby", "hello", max_tokens=4):
        assert isinstance(reply, str)
    events = [e.reason for e in await admin.list_events(name=instance.name)]
    assert "Downloading" in events and "Running" in events


async def test_wrong_hub_source_ends_in_error_with_the_reason(admin: MaasClient, agent, gguf_hub: HubTestServer):
    await admin.create_model({"name": "nohub", "source": "hf://acme/absent/model.gguf", "backend": "llama.cpp"})

    async def failed() -> bool:
        found = await admin.list_instances("nohub")
        return bool(found) and found[0].state == "error"

    await eventually(failed, timeout=30, message="the instance to fail")
    [instance] = await admin.list_instances("nohub")
    assert "acme/absent was not found at " + gguf_hub.url in instance.state_message
    assert instance.download_progress is None


@pytest.mark.parametrize("body, message", [
    ({"source": "hf://acme/tiny-gguf", "backend": "llama.cpp"}, "llama.cpp serves one GGUF file"),
    ({"source": "hf://nope", "backend": "vllm"}, "write hf://ORG/NAME"),
])
async def test_server_checks_the_form_of_hub_sources(admin: MaasClient, body: dict, message: str):
    with pytest.raises(ApiClientError) as refused:
        await admin.create_model({"name": "formcheck", **body})
    assert refused.value.status == 400 and message in refused.value.message


async def test_repo_id_sources_are_not_taken_for_local_paths(admin: MaasClient):
    created = await admin.create_model({"name": "qwen", "source": "Qwen/Qwen2.5-0.5B-Instruct", "backend": "vllm",
                                        "memory_bytes": 10**9, "replicas": 0})
    assert created.spec.source == "Qwen/Qwen2.5-0.5B-Instruct"
