"""Model sources: local paths, and Hugging Face repositories downloaded by the real huggingface_hub client
from a TEST SERVER on 127.0.0.1 that speaks the Hub protocol (this machine cannot reach huggingface.co).

`HubTestServer` implements just what `snapshot_download` uses: the model info API at a revision
(`/api/models/ORG/NAME/revision/REV`, with `blobs=true` sizes), the tree listing
(`/api/models/ORG/NAME/tree/REV`) and file downloads (`/ORG/NAME/resolve/REV/FILE`, GET and HEAD with the
X-Repo-Commit, ETag and Content-Length headers the client checks), with the Hub's error headers
(X-Error-Code: RepoNotFound / RevisionNotFound / EntryNotFound). One file can be held back behind a gate
so a test sees a download half done.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web

from agent.sources import ModelCache, SourceError
from conftest import eventually, free_port
from server.schemas import SourceError as SourceFormError, parse_model_source

pytestmark = pytest.mark.timeout(120)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubTestServer:
    """A test server: a tiny Hugging Face Hub on 127.0.0.1 (see the module docstring)."""

    def __init__(self, repos: dict[str, dict[str, bytes]], private: set[str] = frozenset()):
        self.repos = repos
        self.private = set(private)
        self.gated_file: str | None = None  # this file's body waits for `gate`
        self.gate = asyncio.Event()
        self.downloads: list[str] = []  # GETs of file bodies, in order
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "HubTestServer":
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self.info)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self.tree)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self.resolve)  # HEAD too
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        self.gate.set()
        if self.runner:
            await self.runner.cleanup()

    def _repo(self, request: web.Request) -> tuple[str, dict[str, bytes]]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo in self.private and "Authorization" not in request.headers:
            raise web.HTTPUnauthorized(headers={"X-Error-Message": "Invalid username or password."})
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if request.match_info["revision"] not in ("main", COMMIT):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        return repo, self.repos[repo]

    @staticmethod
    def _oid(body: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()  # git's blob id, as the Hub gives it

    async def info(self, request: web.Request) -> web.Response:
        repo, files = self._repo(request)
        siblings = [{"rfilename": name, "size": len(body), "blobId": self._oid(body)} for name, body in files.items()]
        return web.json_response({"id": repo, "sha": COMMIT, "siblings": siblings, "private": repo in self.private})

    async def tree(self, request: web.Request) -> web.Response:
        _repo, files = self._repo(request)
        return web.json_response([{"type": "file", "path": name, "size": len(body), "oid": self._oid(body)}
                                  for name, body in files.items()])

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        _repo, files = self._repo(request)
        path = request.match_info["path"]
        if path not in files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        body = files[path]
        start = 0
        if request.headers.get("Range", "").startswith("bytes="):  # a resumed download
            start = int(request.headers["Range"][6:].split("-")[0])
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self._oid(body)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        self.downloads.append(path)
        response = web.StreamResponse(status=206 if start else 200, headers=headers)
        response.content_length = len(body) - start
        await response.prepare(request)
        if path == self.gated_file:
            await self.gate.wait()
        await response.write(body[start:])
        await response.write_eof()
        return response


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
