"""Deploy a real llama.cpp model through the in-process server and agent (SQLite), chat through /v1."""

from __future__ import annotations

from pathlib import Path

import openai
import psutil
import pytest

from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from server.app import MaasServer

pytestmark = pytest.mark.timeout(120)


async def _running(admin: MaasClient, model: str, count: int) -> bool:
    instances = await admin.list_instances(model)
    return len(instances) == count and all(i.state == "running" for i in instances)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_deploy_chat_scale_delete(server: MaasServer, admin: MaasClient, api_key: str, agent, tiny_model: Path):
    await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 2})
    await eventually(lambda: _running(admin, "tiny", 2), message="2 running replicas")
    instances = await admin.list_instances("tiny")
    assert {i.worker_name for i in instances} == {"worker-1"}
    assert all(i.claim and i.claim.device == "cpu" and i.claim.ram_bytes > tiny_model.stat().st_size for i in instances)
    assert len({i.port for i in instances}) == 2
    pids = [i.pid for i in instances]
    assert all(_alive(pid) for pid in pids)

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    reply = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    # Streams, each followed by a plain request: the gateway must survive llama.cpp dropping
    # keep-alive connections after a stream.
    for _ in range(6):
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
        assert len(pieces) >= 2
        await client.completions.create(model="tiny", prompt="once upon", max_tokens=4)
    await client.close()

    log = b"".join([chunk async for chunk in admin.stream_logs(instances[0].name, tail=-1)])
    assert b"llama.cpp server listening on" in log

    await admin.update_model("tiny", {"replicas": 1})
    await eventually(lambda: _running(admin, "tiny", 1), message="scale down to 1")
    survivor = (await admin.list_instances("tiny"))[0]
    gone = [pid for pid in pids if pid != survivor.pid]
    await eventually(lambda: _false(any(_alive(p) for p in gone)), message="the scaled-down process to exit")

    await admin.delete_model("tiny")

    async def model_gone() -> bool:
        try:
            await admin.get_model("tiny")
            return False
        except ApiClientError as exc:
            return exc.status == 404

    await eventually(model_gone, message="model deleted")
    await eventually(lambda: _false(_alive(survivor.pid)), message="backend process gone")
    assert await admin.list_instances() == []


async def test_deleted_instance_is_replaced(admin: MaasClient, agent, tiny_model: Path):
    await admin.create_model({"name": "heal", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})
    await eventually(lambda: _running(admin, "heal", 1), message="1 running replica")
    first = (await admin.list_instances("heal"))[0]
    await admin.delete_instance(first.name)

    async def replaced() -> bool:
        instances = await admin.list_instances("heal")
        return [i.state for i in instances] == ["running"] and instances[0].id != first.id

    await eventually(replaced, message="a replacement instance running")
    await eventually(lambda: _false(_alive(first.pid)), message="the deleted instance's process to exit")


async def test_broken_model_file_reports_error_with_log_tail(admin: MaasClient, agent, traversable_tmp: Path):
    broken = traversable_tmp / "broken.gguf"
    broken.write_bytes(b"GGUF but not really a model")
    await admin.create_model({"name": "broken", "source": str(broken), "backend": "llama.cpp", "replicas": 1})

    async def errored() -> bool:
        instances = await admin.list_instances("broken")
        return bool(instances) and instances[0].state == "error"

    await eventually(errored, message="the instance to report error")
    instance = (await admin.list_instances("broken"))[0]
    assert "exit code 1" in instance.state_message
    assert "llama.cpp server: error" in instance.state_message  # the log tail travels with the state


async def _false(value: bool) -> bool:
    return not value


async def test_simulated_gpus_are_labelled_and_claimed(server: MaasServer, admin: MaasClient, tmp_path: Path,
                                                       tiny_model: Path):
    from agent.agent import Agent, AgentConfig

    sim = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "sim-agent",
                            name="sim-worker", address="127.0.0.1", simulate_gpus="2xH100-80GB"))
    await sim.start()
    try:
        await eventually(lambda: _has_worker(admin, "sim-worker"), message="the simulated worker to register")
        worker = await admin.get_worker("sim-worker")
        assert [g.simulated for g in worker.gpus] == [True, True]
        assert all("(simulated)" in g.name and g.memory_total == 80 * 1000**3 for g in worker.gpus)

        await admin.create_model({"name": "on-gpu", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 2})
        await eventually(lambda: _running(admin, "on-gpu", 2), message="2 replicas on simulated GPUs")
        claims = [i.claim for i in await admin.list_instances("on-gpu")]
        # First fit: both claims are small enough to share GPU 0.
        assert all(c.device == "gpu" and c.gpu_indexes == [0] and c.vram_bytes_per_gpu > 0 for c in claims)
    finally:
        await sim.stop()


async def _has_worker(admin: MaasClient, name: str) -> bool:
    return name in [w.name for w in await admin.list_workers()]


async def test_silent_worker_goes_unreachable_and_recovers(server: MaasServer, admin: MaasClient, tmp_path: Path,
                                                           tiny_model: Path):
    """No heartbeat for worker_timeout -> not_ready and its instances unreachable; the gateway keeps
    routing to them while their backend answers its probes; the next heartbeat brings them back,
    still served by the same process."""
    from agent.agent import Agent, AgentConfig

    quiet = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "quiet",
                              name="quiet-worker", address="127.0.0.1", heartbeat_interval=3600))
    await quiet.start()
    try:
        await admin.create_model({"name": "lonely", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1})
        await eventually(lambda: _running(admin, "lonely", 1), message="1 running replica")
        pid = (await admin.list_instances("lonely"))[0].pid
        server.config.worker_timeout = 0.5

        async def unreachable() -> bool:
            worker = await admin.get_worker("quiet-worker")
            states = [i.state for i in await admin.list_instances("lonely")]
            return worker.state == "not_ready" and states == ["unreachable"]

        await eventually(unreachable, timeout=15, message="worker not_ready and instance unreachable")
        assert server.routes.serving_models() == ["lonely"]  # the agent is silent, the backend is not
        async for piece in admin.chat("lonely", "hi", max_tokens=3):
            assert isinstance(piece, str)
        assert server.routes.backend_answers((await admin.list_instances("lonely"))[0].id, within=5) is not False

        server.config.worker_timeout = 3600
        await quiet.heartbeat()
        await eventually(lambda: _running(admin, "lonely", 1), message="the instance running again")
        assert (await admin.list_instances("lonely"))[0].pid == pid  # adopted, not restarted
        assert server.routes.serving_models() == ["lonely"]
    finally:
        await quiet.stop()


async def test_embeddings_through_the_gateway(server: MaasServer, admin: MaasClient, api_key: str, agent,
                                              tiny_model: Path):
    await admin.create_model({"name": "embedder", "source": str(tiny_model), "backend": "llama.cpp",
                              "replicas": 1, "args": ["--embeddings"]})
    await eventually(lambda: _running(admin, "embedder", 1), message="the embedding model running")
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    result = await client.embeddings.create(model="embedder", input=["hello world", "good night"])
    await client.close()
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 64  # the tiny model's width
    assert result.data[0].embedding != result.data[1].embedding
