"""Model sources: local paths, and Hugging Face repositories downloaded by the real huggingface_hub client
from a TEST SERVER on 127.0.0.1 that speaks the Hub protocol (this machine cannot reach huggingface.co):
`HubTestServer` in tests/hub_test_server.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from agent.sources import ModelCache, SourceError
from conftest import eventually, free_port
from hub_test_server import HubTestServer  # test_agent_sources imports it from here too
from server.schemas import SourceError as SourceFormError, parse_model_source

pytestmark = pytest.mark.timeout(120)


def tiny_repo() -> dict[str, bytes]:
    return {"config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode(),
            "tokenizer.json": b'{"version": "1.0"}',
            "model-00001-of-00002.safetensors": bytes(range(256)) * 4096,  # 1 MiB each
            "model-00002-of-00002.safetensors": bytes(reversed(range(256))) * 4096}


@pytest.fixture
async def hub():
    server = await HubTestServer({"acme/tiny": tiny_repo(), "acme/secret": tiny_repo()}, private={"acme/secret"}).start()
    try:
        yield server
    finally:
        await server.stop()


def cache_for(tmp_path: Path, endpoint: str, **kwargs) -> ModelCache:
    return ModelCache(root=tmp_path / "models", hf_endpoint=endpoint, report_every=0.05, **kwargs)


# --- the source forms ---------------------------------------------------------------------


@pytest.mark.parametrize("source, kind, repo, revision, filename", [
    ("Qwen/Qwen2.5-0.5B-Instruct", "huggingface", "Qwen/Qwen2.5-0.5B-Instruct", None, None),
    ("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf", "huggingface",
     "Qwen/Qwen2.5-0.5B-Instruct-GGUF", None, "qwen2.5-0.5b-instruct-q4_k_m.gguf"),
    ("hf://acme/tiny@v1.0", "huggingface", "acme/tiny", "v1.0", None),
    ("ms://qwen/Qwen2.5-0.5B-Instruct", "modelscope", "qwen/Qwen2.5-0.5B-Instruct", None, None),
    ("/models/tiny.gguf", "local", None, None, None),
    ("models/sub/tiny.gguf", "local", None, None, None),  # three parts: a relative path, not a repository
    ("models/tiny.gguf", "local", None, None, None),  # a file name: a relative path, not a repository
])
def test_source_forms(source: str, kind: str, repo, revision, filename):
    parsed = parse_model_source(source)
    assert (parsed.kind, parsed.repo_id, parsed.revision, parsed.filename) == (kind, repo, revision, filename)


@pytest.mark.parametrize("bad", ["hf://", "hf://just-a-name", "ms://a/b/../../etc/passwd", "hf://a/b@"])
def test_malformed_hub_sources_are_refused(bad: str):
    with pytest.raises(SourceFormError, match="write"):
        parse_model_source(bad)


# --- downloads through the real huggingface_hub client -----------------------------------


async def test_download_reports_progress_and_fills_the_shared_cache(hub: HubTestServer, tmp_path: Path):
    hub.gated_file = "model-00002-of-00002.safetensors"
    cache = cache_for(tmp_path, hub.url)
    reports: list[float] = []

    async def on_progress(fraction: float) -> None:
        reports.append(fraction)

    task = asyncio.create_task(cache.resolve("hf://acme/tiny", on_progress))
    # One of two weight files arrived, the other is held back: the report says about half.
    await eventually(lambda: _true(any(0.3 < r < 0.9 for r in reports)), timeout=30,
                     message="a progress report while the download is half done")
    assert not task.done()
    hub.gate.set()
    path = Path(await task)
    assert reports[-1] == 1.0 and reports == sorted(reports)
    assert path.is_relative_to(tmp_path / "models" / "huggingface" / "hub")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (path / name).read_bytes() == tiny_repo()[name]
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 64
    assert sorted(hub.downloads) == sorted(tiny_repo())

    # A second deploy of the same repository: from the cache, no file fetched again.
    hub.downloads.clear()
    again: list[float] = []

    async def note(fraction: float) -> None:
        again.append(fraction)

    assert Path(await cache.resolve("acme/tiny", note)) == path
    assert hub.downloads == [] and again == [1.0]


async def test_one_file_of_a_repository(hub: HubTestServer, tmp_path: Path):
    path = Path(await cache_for(tmp_path, hub.url).resolve("hf://acme/tiny@main/config.json"))
    assert path.name == "config.json" and path.is_file()
    assert hub.downloads == ["config.json"]


async def test_cached_copy_serves_when_the_hub_is_gone(hub: HubTestServer, tmp_path: Path):
    first = await cache_for(tmp_path, hub.url).resolve("hf://acme/tiny")
    await hub.stop()
    assert await cache_for(tmp_path, hub.url).resolve("hf://acme/tiny") == first


@pytest.mark.parametrize("source, message", [
    ("hf://acme/missing", "acme/missing was not found at"),
    ("hf://acme/secret", "private or gated and needs a token (HF_TOKEN"),
    ("hf://acme/tiny@nope", "no such revision"),
    ("hf://acme/tiny/weights.gguf", "has no file weights.gguf"),
])
async def test_wrong_sources_fail_with_a_clear_message(hub: HubTestServer, tmp_path: Path, source: str, message: str,
                                                       monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SourceError, match=message.replace("(", r"\(")):
        await cache_for(tmp_path, hub.url).resolve(source)
    assert hub.downloads == []


async def test_unreachable_hub_fails_without_a_hang(tmp_path: Path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SourceError, match="cannot be reached from this worker"):
        await cache_for(tmp_path, closed).resolve("Qwen/Qwen2.5-0.5B-Instruct")


async def test_silent_hub_times_out(tmp_path: Path):
    """A hub that accepts connections and never answers: the listing's timeout ends it."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        cache = cache_for(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", metadata_timeout=1.0)
        with pytest.raises(SourceError, match="cannot be reached|no progress"):
            await cache.resolve("hf://acme/tiny")
    finally:
        silent.close()


async def test_a_timeout_the_hub_library_raises_ends_the_download_at_once(tmp_path: Path, monkeypatch):
    """Its TimeoutError is the download's failure, explained, not taken for a download still under way."""
    def timing_out(cache, parsed, progress):
        raise TimeoutError("read timed out")

    monkeypatch.setattr("agent.sources._hf_fetch", timing_out)
    cache = cache_for(tmp_path, "http://127.0.0.1:9", stall_timeout=60.0)
    async with asyncio.timeout(10):
        with pytest.raises(SourceError, match="cannot be reached from this worker .TimeoutError: read timed out"):
            await cache.resolve("hf://acme/tiny")


async def test_unreachable_modelscope_fails_with_a_clear_message(tmp_path: Path):
    cache = ModelCache(root=tmp_path / "models", ms_endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SourceError, match="ModelScope repository qwen/Qwen2.5-0.5B-Instruct"):
        await cache.resolve("ms://qwen/Qwen2.5-0.5B-Instruct")


async def test_local_paths(tmp_path: Path):
    cache = cache_for(tmp_path, "http://127.0.0.1:9")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert await cache.resolve(str(model)) == str(model)
    with pytest.raises(SourceError, match="does not exist on this worker"):
        await cache.resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(SourceError, match="neither an absolute path"):
        await cache.resolve("some/relative/path")


async def _true(value: bool) -> bool:
    return value
