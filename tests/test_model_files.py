"""Model files as a resource (issue 19): `/v2/files` and `maas file`, real agents pulling from the Hub test
server, placement that prefers the workers holding the files, `rm` refused while in use, LRU eviction,
and estimates from a worker's reading when the server cannot reach the hub.

Three real agents run in-process against a real server (SQLite). The agents download from the Hub test
server (tests/hub_test_server.py); the server's own HF_ENDPOINT points at a closed port, so every piece
of metadata it has about the model came from a worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.agent import Agent, AgentConfig
from agent.cache import FileCache, _files_under, read_metadata
from agent.sources import ModelCache
from conftest import eventually, free_port
from hub_test_server import COMMIT, HubTestServer
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server import schemas
from server.scheduler import estimate as est
from server.scheduler import hub as hub_metadata
from server.scheduler.estimate import MemoryEstimate
from server.scheduler.locality import REPORTED, FileIndex
from server.scheduler.placement import Cluster, Request, WorkerSnapshot, plan

pytestmark = pytest.mark.timeout(150)

SOURCE = "hf://acme/tiny-gguf/tiny.gguf"


@pytest.fixture(autouse=True)
def fresh_metadata():
    """The server's metadata caches are per process: what a test's dead hub left must not answer for the next."""
    hub_metadata.CACHE.clear()
    REPORTED.clear()
    yield
    hub_metadata.CACHE.clear()
    REPORTED.clear()


# --- the score, on a snapshot ---------------------------------------------------------------


def _workers(*free_gib: int) -> list[WorkerSnapshot]:
    return [WorkerSnapshot(id=n, name=f"w{n}", address="", ready=True, cordoned=False, ram_total=64 << 30,
                           gpu_total={0: size << 30}) for n, size in enumerate(free_gib, start=1)]


def _request(strategy: str = "spread", need_gib: int = 4) -> Request:
    spec = schemas.ModelSpec.model_validate({"source": "hf://acme/big", "backend": "vllm",
                                             "placement_strategy": strategy})
    return Request(spec, MemoryEstimate.fixed(need_gib << 30, cpu_capable=False), model_key=1)


def test_placement_prefers_holders_as_a_score_not_a_filter():
    cluster = Cluster(_workers(24, 24, 24))
    request = _request()
    assert plan(request, cluster).worker.name == "w1"  # nobody holds the files: least loaded, lowest id
    request.holders = frozenset({3})
    chosen = plan(request, cluster)
    assert chosen.worker.name == "w3" and chosen.note == "model files already in its cache"
    cluster.commit(chosen, request.model_key)
    # Spread first: the next replica goes to a worker without one, holding the files or not.
    second = plan(request, cluster)
    assert second.worker.name == "w1" and second.note == "model files not in its cache"
    # A holder that does not fit is passed over, and the why-not reasons name it.
    small = Cluster(_workers(24, 2))
    request = _request(need_gib=8)
    request.holders = frozenset({2})
    assert plan(request, small).worker.name == "w1"
    request = _request(need_gib=30)
    request.holders = frozenset({2})
    reasons = plan(request, small)
    assert isinstance(reasons, list)
    assert [r.worker for r in reasons if "holds the model's files" in r.message] == ["w2"]
    # binpack: the tightest fit among the holders beats a tighter fit elsewhere.
    request = _request("binpack")
    request.holders = frozenset({1})
    assert plan(request, Cluster(_workers(24, 8))).worker.name == "w1"


# --- estimates from a worker's reading ------------------------------------------------------------


def test_a_workers_reading_estimates_like_the_files_themselves(tmp_path: Path, tiny_model: Path):
    from test_hub_estimates import sharded_repo, write

    index = FileIndex()
    for n, (backend, path) in enumerate((("vllm", Path(write(tmp_path / "model", sharded_repo()))),
                                         ("llama.cpp", tiny_model)), start=1):
        elsewhere = f"/elsewhere/{path.name}"  # where the workers have it; this server has no copy
        local = est.estimate(schemas.ModelSpec(source=str(path), backend=backend))
        row = {"id": n, "worker_id": 7, "worker_name": "w7", "source": elsewhere, "state": "ready",
               "metadata": read_metadata(path, _files_under(path), None)}
        assert index.apply("created", row)
        remote = est.estimate(schemas.ModelSpec(source=elsewhere, backend=backend))
        assert (remote.method, remote.weights, remote.kv_cache, remote.total()) == \
            (local.method, local.weights, local.kv_cache, local.total()) and remote.total() > 0
        assert any("read by worker w7 from its copy" in note for note in remote.notes)
        assert index.holders(elsewhere) == {7}
        index.apply("deleted", row)
        assert REPORTED.get(elsewhere) is None and index.holders(elsewhere) == frozenset()


# --- the agent's cache: LRU eviction ----------------------------------------------------------


@pytest.fixture
async def hub(tiny_model: Path):
    data = tiny_model.read_bytes()
    hub = await HubTestServer({"acme/tiny-gguf": {"tiny.gguf": data, "README.md": b"# tiny\n"},
                               "acme/other-gguf": {"other.gguf": data},
                               "acme/third-gguf": {"third.gguf": data}}).start()
    try:
        yield hub
    finally:
        await hub.stop()


async def test_lru_eviction_keeps_the_cache_under_its_limit(hub: HubTestServer, tiny_model: Path, tmp_path: Path):
    size = tiny_model.stat().st_size
    using: set[str] = set()
    cache = FileCache(ModelCache(tmp_path / "models", hf_endpoint=hub.url, report_every=0.05),
                      limit_bytes=2 * size + size // 2, in_use=lambda: using)
    first = await cache.fetch(SOURCE)
    await cache.fetch("hf://acme/other-gguf/other.gguf")
    assert {e.state for e in cache.entries.values()} == {"ready"} and Path(first).exists()
    using.add("hf://acme/other-gguf@main/other.gguf")
    cache.entries["hf://acme/tiny-gguf@main/tiny.gguf"].last_used_at = "2000-01-01T00:00:00+00:00"
    await cache.fetch("hf://acme/third-gguf/third.gguf")  # over the limit: the oldest unused goes
    assert sorted(cache.entries) == ["hf://acme/other-gguf@main/other.gguf", "hf://acme/third-gguf@main/third.gguf"]
    assert not Path(first).exists() and not (tmp_path / "models/huggingface/hub/models--acme--tiny-gguf").exists()
    entry = cache.entries["hf://acme/third-gguf@main/third.gguf"]
    assert entry.revision == COMMIT and entry.size_bytes == size and entry.metadata["gguf"]["n_layers"] > 0
    # A restart reads the inventory back (and what is gone stays gone).
    again = FileCache(ModelCache(tmp_path / "models"))
    again.load()
    assert sorted(again.entries) == sorted(cache.entries)


# --- the whole thing, with real agents ----------------------------------------------------------


async def _gone(admin: MaasClient, source: str) -> bool:
    return not await admin.list_files(source=source)


async def _agent(server, hub: HubTestServer, base: Path, name: str) -> Agent:
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=base / name,
                              name=name, heartbeat_interval=1.0, drain_seconds=0.0))
    agent.models.hf_endpoint = hub.url  # the workers reach the hub; the server does not
    agent.files.report_every = 0.1
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 10)
    return agent


async def test_pull_place_remove_and_estimate_from_a_worker(server, admin: MaasClient, api_key: str,
                                                           hub: HubTestServer, tiny_model: Path, tmp_path: Path,
                                                           monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # the server's hub: nobody answers
    agents = [await _agent(server, hub, tmp_path, f"w{n}") for n in (1, 2, 3)]
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": api_key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "200"}
    cli = CliRunner()
    try:
        # Pull to two of the three workers, with the CLI.
        pulled = await asyncio.to_thread(cli.invoke, cli_app, ["file", "pull", SOURCE, "--workers", "w2,w3"], env=env)
        assert pulled.exit_code == 0, pulled.output

        async def two_ready() -> bool:
            rows = await admin.list_files(source=SOURCE)
            return len(rows) == 2 and all(r.state == "ready" for r in rows)

        await eventually(two_ready, timeout=30, message="w2 and w3 to hold the files")
        rows = {r.worker_name: r for r in await admin.list_files()}
        assert sorted(rows) == ["w2", "w3"]
        assert rows["w2"].source == "hf://acme/tiny-gguf@main/tiny.gguf" and rows["w2"].revision == COMMIT
        assert rows["w2"].size_bytes == tiny_model.stat().st_size and Path(rows["w2"].path).is_file()
        assert rows["w2"].last_used_at is not None and rows["w2"].metadata["gguf"]["n_layers"] > 0
        listed = await asyncio.to_thread(cli.invoke, cli_app, ["file", "list"], env=env)
        assert listed.exit_code == 0 and "hf://acme/tiny-gguf@main/tiny.gguf" in listed.output
        assert listed.output.count("ready") == 2

        # A source that does not exist: the error is shown on the row; pulling again retries.
        await admin.pull_files("hf://acme/missing", workers=["w1"])

        async def failed() -> bool:
            found = await admin.list_files(source="hf://acme/missing")
            return bool(found) and found[0].state == "error"

        await eventually(failed, timeout=30, message="the missing repository to fail")
        [missing] = await admin.list_files(source="hf://acme/missing")
        assert "acme/missing" in missing.message and "not found" in missing.message
        [again] = await admin.pull_files("hf://acme/missing", workers=["w1"])
        assert again.state == "pending"

        # A local path: checked and listed with what the agent read of it; removing it only forgets it.
        await admin.pull_files(str(tiny_model), workers=["w1"])

        async def local_ready() -> bool:
            found = await admin.list_files(source=str(tiny_model))
            return bool(found) and found[0].state == "ready"

        await eventually(local_ready, timeout=30, message="the local path to be listed")
        [local] = await admin.list_files(source=str(tiny_model))
        assert local.path == str(tiny_model) and local.metadata["gguf"]["n_layers"] > 0
        assert (await admin.remove_file(local.id))["state"] == "removing"
        await eventually(lambda: _gone(admin, str(tiny_model)), timeout=30, message="the local entry to go")
        assert tiny_model.exists()

        # Deploy: the server cannot read the hub, so its estimate comes from a worker's reading; the
        # scheduler puts the replica where the files are, and nothing is downloaded again.
        downloads = len(hub.downloads)
        dry_run = await admin.evaluate_model({"name": "what-if", "source": SOURCE, "backend": "llama.cpp",
                                              "context_length": 512, "replicas": 1})
        assert dry_run.replicas[0].worker in ("w2", "w3"), dry_run
        await admin.create_model({"name": "near", "source": SOURCE, "backend": "llama.cpp", "context_length": 512})

        async def running() -> bool:
            found = await admin.list_instances("near")
            return bool(found) and found[0].state == "running"

        await eventually(running, timeout=60, message="the replica to serve")
        [instance] = await admin.list_instances("near")
        assert instance.worker_name in ("w2", "w3")
        assert "model files already in its cache" in instance.state_message or any(
            "model files already in its cache" in e.message for e in await admin.list_events(name=instance.name))
        notes = " ".join(instance.claim.estimate.notes)
        assert instance.claim.estimate.method == "gguf" and "read by worker" in notes, notes
        assert len(hub.downloads) == downloads

        # rm: refused while the instance uses the files there; the other copy goes, files and row.
        used, spare = rows[instance.worker_name], rows["w3" if instance.worker_name == "w2" else "w2"]
        with pytest.raises(ApiClientError) as refused:
            await admin.remove_file(used.id)
        assert refused.value.status == 409 and instance.name in refused.value.message
        removed = await asyncio.to_thread(cli.invoke, cli_app, ["file", "rm", SOURCE, "--workers", spare.worker_name],
                                          env=env)
        assert removed.exit_code == 0, removed.output

        async def spare_gone() -> bool:
            return [r.worker_name for r in await admin.list_files(source=SOURCE)] == [used.worker_name]

        await eventually(spare_gone, timeout=30, message="the unused copy to be removed")
        assert not Path(spare.path).exists() and Path(used.path).exists()

        # A worker removed: its rows go with it, and the change is published (the watch and the scheduler).
        await agents[0].stop()
        version = server.bus.version
        await admin.request("DELETE", "/v2/workers/w1")
        assert not await admin.list_files(worker="w1")
        assert any(e.kind == "files" and e.action == "deleted" for e in server.bus.since(version) or ())
    finally:
        for agent in agents:
            await agent.stop()
