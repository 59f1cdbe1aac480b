"""Memory estimates of hub models from metadata alone: config.json, safetensors headers by range request,
a GGUF's header, file sizes. The real huggingface_hub client and HTTP stack talk to HubTestServer on
127.0.0.1; the scheduler and the API run in a real in-process server (SQLite).

The estimate of a hub model must equal the estimate of the same files in a local directory.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from conftest import eventually, free_port
from hub_test_server import COMMIT, HubTestServer
from maas_tui.client import MaasClient
from server import schemas
from server.app import MaasServer
from server.config import ServerConfig
from server.db import tables
from server.scheduler import estimate as est
from server.scheduler import hub
from test_scheduler_api import add_worker

pytestmark = pytest.mark.timeout(120)

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
          "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
ST_SIZE = {"BF16": 2, "F32": 4, "I8": 1}


def safetensors(tensors: dict[str, tuple[str, list[int]]], padding: int = 0) -> bytes:
    """A real safetensors file (zero weights); `padding` bytes of metadata make the header that much longer."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "padding": "x" * padding}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * ST_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def llama_tensors(layers: range) -> dict[str, tuple[str, list[int]]]:
    h, i, kv = 64, 128, 32
    out: dict[str, tuple[str, list[int]]] = {}
    for n in layers:
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": ("BF16", [h, h]), p + "self_attn.k_proj.weight": ("BF16", [kv, h]),
                    p + "self_attn.v_proj.weight": ("BF16", [kv, h]), p + "self_attn.o_proj.weight": ("BF16", [h, h]),
                    p + "mlp.gate_proj.weight": ("BF16", [i, h]), p + "mlp.up_proj.weight": ("BF16", [i, h]),
                    p + "mlp.down_proj.weight": ("BF16", [h, i]), p + "input_layernorm.weight": ("F32", [h]),
                    p + "post_attention_layernorm.weight": ("F32", [h])})
    return out


def single_repo() -> dict[str, bytes]:
    tensors = {"model.embed_tokens.weight": ("BF16", [1000, 64]), "lm_head.weight": ("BF16", [1000, 64]),
               "model.norm.weight": ("BF16", [64]), **llama_tensors(range(2))}
    return {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": safetensors(tensors),
            "README.md": b"# tiny\n"}


def sharded_repo() -> dict[str, bytes]:
    first = {"model.embed_tokens.weight": ("BF16", [1000, 64]), **llama_tensors(range(1))}
    second = {"lm_head.weight": ("BF16", [1000, 64]), "model.norm.weight": ("BF16", [64]), **llama_tensors(range(1, 2))}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # The first shard's header is longer than the first read: a second range request fetches the rest.
    files = {names[0]: safetensors(first, padding=150_000), names[1]: safetensors(second)}
    index = {"metadata": {"total_size": 1}, "weight_map": {**{t: names[0] for t in first}, **{t: names[1] for t in second}}}
    return {"config.json": json.dumps(CONFIG).encode(), "model.safetensors.index.json": json.dumps(index).encode(),
            **files}


def write(directory: Path, files: dict[str, bytes]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (directory / name).write_bytes(body)
    return str(directory)


def spec(source: str, backend: str = "vllm", **fields: Any) -> schemas.ModelSpec:
    return schemas.ModelSpec(source=source, backend=backend, **fields)


async def estimate(model: schemas.ModelSpec) -> est.MemoryEstimate:
    """In a thread, as the server runs it: the hub test server answers on this event loop."""
    return await asyncio.to_thread(est.estimate, model)


def same(hub_estimate: est.MemoryEstimate, local: est.MemoryEstimate) -> None:
    """Every number equal; the hub's notes are the local ones plus where the metadata came from."""
    a, b = asdict(hub_estimate), asdict(local)
    hub_notes, local_notes = a.pop("notes"), b.pop("notes")
    assert a == b
    assert [n for n in hub_notes if not n.startswith("metadata from ")] == list(local_notes)
    assert any(n.startswith("metadata from ") for n in hub_notes)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    hub.CACHE.clear()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub.CACHE, "retry_after", 30.0)
    yield
    hub.CACHE.clear()


@pytest.fixture
async def hub_server(tiny_model: Path, monkeypatch):
    server = await HubTestServer({"acme/tiny-llama": single_repo(), "acme/sharded": sharded_repo(),
                                  "acme/tiny-gguf": {"tiny.gguf": tiny_model.read_bytes(), "README.md": b"# tiny\n"},
                                  "acme/speech": {"model.bin": bytes(3000), "config.json": b"{}",
                                                  "vocabulary.txt": b"a\nb\n"},
                                  "acme/secret": single_repo()}, private={"acme/secret"}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
    try:
        yield server
    finally:
        await server.stop()


# --- the estimate equals the local one ----------------------------------------------------------


@pytest.mark.parametrize("repo, source", [
    ("acme/tiny-llama", "hf://acme/tiny-llama"),
    ("acme/tiny-llama", "acme/tiny-llama"),  # bare ORG/NAME is Hugging Face
    ("acme/tiny-llama", f"hf://acme/tiny-llama@{COMMIT}"),
    ("acme/sharded", "hf://acme/sharded"),
    ("acme/sharded", "ms://acme/sharded"),
])
async def test_hub_estimate_equals_the_local_one(hub_server: HubTestServer, tmp_path: Path, repo: str, source: str,
                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # no downloaded snapshot answers instead
    local = write(tmp_path / "local", hub_server.repos[repo])
    fields = {"max_model_len": 2048, "concurrency": 3}
    from_hub = await estimate(spec(source, **fields))
    same(from_hub, await estimate(spec(local, **fields)))
    assert from_hub.method == "safetensors" and from_hub.kv_cache > 0 and from_hub.tp_sizes == (1, 2, 4)
    # Headers only: the weights were never downloaded, only read in ranges far smaller than the files.
    assert not [d for d in hub_server.downloads if d.endswith(".safetensors")]
    for path, first, last in hub_server.ranges:
        assert path.endswith(".safetensors") and last - first < 200_000
    if repo == "acme/sharded":  # the long header of the first shard took a second range request
        assert sorted(p for p, first, _ in hub_server.ranges if first > 0) == ["model-00001-of-00002.safetensors"]


async def test_headers_refused_fall_back_to_file_sizes(hub_server: HubTestServer):
    hub_server.refuse_ranges = True
    sized = await estimate(spec("ms://acme/sharded", max_model_len=2048))
    files = hub_server.repos["acme/sharded"]
    assert sized.method == "hub_file_size"
    assert sized.weights == sum(len(b) for n, b in files.items() if n.endswith(".safetensors"))
    assert any("sizes stand for the weights" in n for n in sized.notes)


async def test_estimate_is_fetched_once_per_source_and_revision(hub_server: HubTestServer):
    first = await estimate(spec("hf://acme/tiny-llama"))
    listed, read = len(hub_server.listings), len(hub_server.ranges)
    assert (await estimate(spec("hf://acme/tiny-llama", concurrency=4))).weights == first.weights
    assert (len(hub_server.listings), len(hub_server.ranges)) == (listed, read)
    await estimate(spec(f"hf://acme/tiny-llama@{COMMIT}"))  # another revision: its own fetch
    assert len(hub_server.listings) == listed + 1


async def test_gguf_file_in_a_hub_repo(hub_server: HubTestServer, tiny_model: Path, monkeypatch):
    local = await estimate(spec(str(tiny_model), "llama.cpp", context_length=1024))
    assert local.method == "gguf"
    same(await estimate(spec("hf://acme/tiny-gguf/tiny.gguf", "llama.cpp", context_length=1024)), local)
    assert hub_server.downloads == [] and [p for p, _, _ in hub_server.ranges] == ["tiny.gguf"]

    # Metadata longer than the first read: the read grows until the header parses.
    hub.CACHE.clear()
    hub_server.ranges.clear()
    monkeypatch.setattr(hub, "_GGUF_FIRST_READ", 4096)
    same(await estimate(spec(f"hf://acme/tiny-gguf@{COMMIT}/tiny.gguf", "llama.cpp", context_length=1024)), local)
    assert len(hub_server.ranges) > 1 and hub_server.downloads == []


async def test_repository_without_a_layout_is_sized_by_its_files(hub_server: HubTestServer):
    speech = await estimate(spec("hf://acme/speech", "vox-box"))
    assert speech.method == "hub_file_size" and speech.weights == 3000 and speech.cpu_capable
    assert any("(bin)" in n for n in speech.notes)
    with pytest.raises(est.EstimateError, match="no config.json|lacks hidden_size"):
        await estimate(spec("hf://acme/speech"))  # vLLM needs a Hugging Face layout


# --- a hub that cannot answer ----------------------------------------------------------------


async def test_unreachable_hub_is_a_clear_metadata_error(monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", closed)
    with pytest.raises(est.MetadataUnavailable, match=f"cannot fetch the metadata of hf://acme/x@main: {closed}") as err:
        await estimate(spec("hf://acme/x"))
    assert err.value.reason == "metadata_unavailable"
    # The failure is remembered: the next estimate answers without asking the hub again.
    assert est.needs_fetch(spec("hf://acme/x")) is None and hub.CACHE.fetches == 1
    with pytest.raises(est.MetadataUnavailable):
        await estimate(spec("hf://acme/x"))
    assert hub.CACHE.fetches == 1
    # A llama.cpp file cannot be sized either: pending too, never an overhead-only claim.
    with pytest.raises(est.MetadataUnavailable, match="cannot be reached"):
        await estimate(spec("hf://acme/x/m.gguf", "llama.cpp"))


async def test_silent_hub_times_out(monkeypatch):
    """A hub that accepts connections and never answers: the request timeout ends the fetch."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("MAAS_HUB_METADATA_TIMEOUT", "1")
        with pytest.raises(est.MetadataUnavailable, match="cannot be reached"):
            await estimate(spec("hf://acme/tiny-llama"))
    finally:
        silent.close()


async def test_missing_repository_or_file(hub_server: HubTestServer):
    with pytest.raises(est.MetadataUnavailable, match="acme/absent@main was not found at"):
        await estimate(spec("hf://acme/absent"))
    with pytest.raises(est.MetadataUnavailable, match="no such revision"):
        await estimate(spec("hf://acme/tiny-llama@v9"))
    # llama.cpp: the worker's download reports a wrong source on the instance (it may hold a token we lack).
    missing = await estimate(spec("hf://acme/tiny-gguf/other.gguf", "llama.cpp"))
    assert missing.method == "unknown" and "has no file other.gguf" in missing.notes[0]


async def test_private_repository_needs_hf_token(hub_server: HubTestServer, monkeypatch):
    with pytest.raises(est.MetadataUnavailable, match=r"needs a token \(HF_TOKEN in the server's environment\)"):
        await estimate(spec("hf://acme/secret"))
    hub.CACHE.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert (await estimate(spec("hf://acme/secret"))).method == "safetensors"


# --- through the server: the scheduler, the dry run, a restart ---------------------------------------


async def start_server(tmp_path: Path, database: str) -> MaasServer:
    config = ServerConfig(data_dir=tmp_path / "data", port=free_port(), database_url=database, resync_interval=0.5)
    server = MaasServer(config)
    await server.start()
    return server


async def admin_of(server: MaasServer) -> MaasClient:
    password = server.admin_password_file.read_text().strip()
    async with MaasClient(server.url) as anonymous:
        token = (await anonymous.login("admin", password)).token
    return MaasClient(server.url, token)


async def instance_of(client: MaasClient, name: str):
    found = await client.list_instances(name)
    return found[0] if found else None


async def test_unreachable_hub_leaves_the_instance_pending_with_the_reason(server, admin: MaasClient, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    await add_worker(server, "gpu-a", 1)
    await admin.create_model({"name": "far", "source": "hf://acme/tiny-llama", "backend": "vllm"})

    async def reasoned() -> bool:
        instance = await instance_of(admin, "far")
        return instance is not None and bool(instance.schedule_reasons)

    await eventually(reasoned, message="the instance's reason")
    instance = await instance_of(admin, "far")
    assert instance.state == "pending"
    [reason] = instance.schedule_reasons
    assert reason.reason == "metadata_unavailable" and "cannot be reached" in reason.message
    result = await admin.evaluate_model({"name": "far2", "source": "hf://acme/tiny-llama", "backend": "vllm"})
    assert result.schedulable == 0 and "cannot fetch the metadata of hf://acme/tiny-llama@main" in result.message


async def test_hub_model_is_scheduled_and_its_metadata_survives_a_restart(hub_server: HubTestServer,
                                                                          tmp_path: Path):
    database = f"sqlite:///{tmp_path / 'maas.db'}"
    source = "hf://acme/sharded"
    local = await estimate(spec(write(tmp_path / "local", hub_server.repos["acme/sharded"]), max_model_len=2048))
    server = await start_server(tmp_path, database)
    try:
        await add_worker(server, "gpu-a", 1)
        async with await admin_of(server) as admin:
            await admin.create_model({"name": "tiny", "source": source, "backend": "vllm", "max_model_len": 2048})

            async def scheduled() -> bool:
                instance = await instance_of(admin, "tiny")
                return instance is not None and instance.state == "scheduled"

            await eventually(scheduled, message="the hub model to be scheduled")
            claim = (await instance_of(admin, "tiny")).claim
            assert claim.estimate.total_bytes == local.total() and claim.estimate.method == "safetensors"

            async def stored() -> bool:
                async with server.db.session() as s:
                    return await s.get(tables.Setting, hub.setting_key(f"{source}@main")) is not None

            await eventually(stored, message="the metadata in the settings table")
    finally:
        await server.stop()

    # A new server process: nothing in memory, and the hub is gone. The stored record answers.
    await hub_server.stop()
    hub.CACHE.clear()
    server = await start_server(tmp_path, database)
    try:
        async with await admin_of(server) as admin:
            evaluation = await admin.evaluate_model({"name": "more", "source": source, "backend": "vllm",
                                                     "max_model_len": 2048})
            assert evaluation.estimate is not None and evaluation.estimate.total_bytes == local.total()
            await admin.create_model({"name": "again", "source": source, "backend": "vllm", "max_model_len": 2048})

            async def placed_or_reasoned() -> bool:
                instance = await instance_of(admin, "again")
                return instance is not None and (instance.state == "scheduled" or bool(instance.schedule_reasons))

            await eventually(placed_or_reasoned, message="the second model to be placed")
            instance = await instance_of(admin, "again")
            # One GPU of 80 GB holds both tiny models: the only possible reason would be the metadata.
            assert instance.state == "scheduled", instance.schedule_reasons
            assert instance.claim.estimate.total_bytes == local.total()
        assert hub.CACHE.fetches == 0
    finally:
        await server.stop()


async def test_fetch_in_the_background_does_not_hold_other_models(server, admin: MaasClient, tiny_model: Path,
                                                                  monkeypatch):
    """A hub that never answers: a local model deployed after the hub one is still placed."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("MAAS_HUB_METADATA_TIMEOUT", "60")  # longer than the test waits: only the background holds it
        await add_worker(server, "gpu-a", 1)
        await admin.create_model({"name": "slow", "source": "hf://acme/tiny-llama", "backend": "vllm"})
        await admin.create_model({"name": "near", "source": str(tiny_model), "backend": "llama.cpp"})

        async def near_scheduled() -> bool:
            instance = await instance_of(admin, "near")
            return instance is not None and instance.state == "scheduled"

        await eventually(near_scheduled, message="the local model to be placed")
        slow = await instance_of(admin, "slow")
        assert slow.state == "pending" and slow.schedule_reasons == []  # still fetching: no verdict yet
    finally:
        silent.close()
