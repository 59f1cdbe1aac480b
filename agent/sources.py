"""Model sources on the agent: local paths as they are, Hugging Face and ModelScope repositories downloaded
with their own libraries into one shared cache under the agent's data folder, with progress.

`spec.source` forms are parsed by `server.schemas.parse_model_source` (hf://ORG/NAME[@REV][/FILE],
ms://ORG/NAME[@REV][/FILE], a bare ORG/NAME for Hugging Face, or a local path).

Downloads run in a daemon thread of their own: the hub libraries are blocking, and a download that
stalls must never hold the agent. Every network step is bounded: the repository listing by
`metadata_timeout`, each file by the library's own read timeout, and the whole download by
`stall_timeout` without a byte of progress. A bad source ends in `SourceError` with a message meant
for the operator (it becomes the instance's `error` message).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agent.progress import ProgressCallback, run_with_progress
from server.schemas import ModelSource, parse_model_source, SourceError as SourceFormError

log = logging.getLogger(__name__)

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MS_DEFAULT_ENDPOINT = "https://www.modelscope.cn"


def env_model_roots() -> list[str]:
    """MAAS_MODEL_ROOTS: folders (os.pathsep-separated) local model sources may lie in."""
    return [os.path.abspath(r) for r in os.environ.get("MAAS_MODEL_ROOTS", "").split(os.pathsep) if r.strip()]


class SourceError(RuntimeError):
    """The source cannot be used: the message says why, for the operator."""


@dataclass
class DownloadProgress:
    """Bytes of a download, shared between the download thread and the event loop."""

    total: int = 0  # 0 while unknown
    done: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count

    def grow(self, count: int) -> None:
        with self._lock:
            self.total += count

    def fraction(self) -> float | None:
        with self._lock:
            if self.total <= 0:
                return None
            return min(self.done / self.total, 1.0)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.done, self.total


@dataclass
class ModelCache:
    """Resolves a model source to a path on this host, downloading hub repositories into `root`."""

    root: Path
    hf_endpoint: str | None = None  # default: HF_ENDPOINT, else huggingface.co
    ms_endpoint: str | None = None  # default: MODELSCOPE_ENDPOINT, else modelscope.cn
    hf_token: str | None = None  # default: HF_TOKEN
    ms_token: str | None = None  # default: MODELSCOPE_API_TOKEN
    metadata_timeout: float = 30.0
    stall_timeout: float = 300.0
    report_every: float = 1.0  # seconds between progress reports (and at each whole percent at most)

    def hf_cache(self) -> Path:
        return self.root / "huggingface" / "hub"

    def ms_cache(self) -> Path:
        return self.root / "modelscope"

    def endpoint(self, kind: str) -> str:
        if kind == "huggingface":
            return (self.hf_endpoint or os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
        return (self.ms_endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or MS_DEFAULT_ENDPOINT).rstrip("/")

    @staticmethod
    def parse(source: str) -> ModelSource:
        try:
            return parse_model_source(source)
        except SourceFormError as exc:
            raise SourceError(str(exc)) from None

    async def resolve(self, source: str, on_progress: ProgressCallback | None = None) -> str:
        """The local path that serves `source`; downloads first when it is a hub repository."""
        parsed = self.parse(source)
        if parsed.kind == "local":
            path = parsed.path or source
            if not os.path.isabs(path):
                raise SourceError(f"model source {source!r} is neither an absolute path nor a hub repository "
                                  "(hf://ORG/NAME, ms://ORG/NAME or ORG/NAME)")
            if not await asyncio.to_thread(os.path.exists, path):
                raise SourceError(f"model source {path} does not exist on this worker")
            return path
        progress = DownloadProgress()
        fetch = _hf_fetch if parsed.kind == "huggingface" else _ms_fetch
        return await self._run(fetch, parsed, progress, on_progress)

    async def _run(self, fetch: Callable[..., str], parsed: ModelSource, progress: DownloadProgress,
                   on_progress: ProgressCallback | None) -> str:
        loop = asyncio.get_running_loop()
        where = f"{parsed.kind} {parsed.repo_id}"
        last_bytes, last_change = -1, loop.time()

        def stalled() -> None:
            nonlocal last_bytes, last_change
            done, total = progress.snapshot()
            if done != last_bytes:
                last_bytes, last_change = done, loop.time()
            elif loop.time() - last_change > self.stall_timeout + (self.metadata_timeout if total == 0 else 0):
                raise SourceError(f"download of {where} made no progress for {self.stall_timeout:g} s "
                                  f"({done} of {total or '?'} bytes); check the network to "
                                  f"{self.endpoint(parsed.kind)}")

        try:
            return await run_with_progress(lambda: fetch(self, parsed, progress), progress.fraction, on_progress,
                                           self.report_every, f"download-{parsed.repo_id}", stalled)
        except (SourceError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise SourceError(explain(exc, parsed, self.endpoint(parsed.kind))) from exc


def explain(exc: BaseException, parsed: ModelSource, endpoint: str) -> str:
    """One clear line for the operator from whatever the hub library raised."""
    name = type(exc).__name__
    what = f"{'Hugging Face' if parsed.kind == 'huggingface' else 'ModelScope'} repository {parsed.repo_id}"
    if parsed.revision:
        what += f"@{parsed.revision}"
    text = " ".join(str(exc).split())[:400]
    if isinstance(exc, SourceError):
        return str(exc)
    if name in ("RepositoryNotFoundError", "GatedRepoError") or "401" in text[:40]:
        token = "HF_TOKEN" if parsed.kind == "huggingface" else "MODELSCOPE_API_TOKEN"
        return (f"{what} was not found at {endpoint}, or it is private or gated and needs a token "
                f"({token} in the agent's environment)")
    if name == "RevisionNotFoundError":
        return f"{what}: no such revision at {endpoint}"
    if name in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
        return f"{what}: the file {parsed.filename} is not in the repository"
    lowered = text.lower()
    if (name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                 "LocalEntryNotFoundError", "ConnectionError", "TimeoutError")
            or "connect" in lowered or "timed out" in lowered or isinstance(exc, (OSError, TimeoutError))):
        return (f"cannot download {what}: {endpoint} cannot be reached from this worker ({name}: {text}) "
                "and the model cache holds no copy")
    return f"cannot download {what} from {endpoint}: {name}: {text}"


# --- Hugging Face -------------------------------------------------------------------------


def _hf_fetch(cache: ModelCache, parsed: ModelSource, progress: DownloadProgress) -> str:
    """Blocking: resolve the revision, size the download, fetch it into the cache with progress."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    endpoint = cache.endpoint("huggingface")
    token = cache.hf_token or os.environ.get("HF_TOKEN") or False  # False: never read a token file by surprise
    cache_dir = cache.hf_cache()
    cache_dir.mkdir(parents=True, exist_ok=True)
    revision = parsed.revision or "main"
    patterns = [parsed.filename] if parsed.filename else None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        # Our own call with a timeout: snapshot_download's listing has none, and the sizes give the total.
        info = api.model_info(parsed.repo_id, revision=revision, files_metadata=True, timeout=cache.metadata_timeout)
    except Exception as exc:
        if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise
        # The hub cannot be reached: a complete copy in the cache still serves.
        try:
            path = snapshot_download(parsed.repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                     allow_patterns=patterns)
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise exc from None
        log.info("%s: hub unreachable (%s); using the cached copy", parsed.repo_id, exc)
        return _in_snapshot(path, parsed)
    files = [s for s in (info.siblings or []) if parsed.filename is None or s.rfilename == parsed.filename]
    if parsed.filename and not files:
        raise SourceError(f"Hugging Face repository {parsed.repo_id}@{revision} has no file {parsed.filename}")
    snapshot = cache_dir / repo_folder_name(repo_id=parsed.repo_id, repo_type="model") / "snapshots" / str(info.sha)
    progress.grow(sum(s.size or 0 for s in files))
    progress.add(sum(s.size or 0 for s in files if (snapshot / s.rfilename).is_file()))  # already cached
    path = snapshot_download(parsed.repo_id, revision=info.sha, cache_dir=cache_dir, endpoint=endpoint, token=token,
                             allow_patterns=patterns, etag_timeout=cache.metadata_timeout, max_workers=4,
                             tqdm_class=_hf_progress_bar(progress))
    # A ref for the name asked, so an offline restart finds this snapshot again.
    ref = Path(path).parent.parent / "refs" / revision
    if revision != info.sha and not ref.is_file():
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(str(info.sha))
    return _in_snapshot(path, parsed)


def _in_snapshot(path: str, parsed: ModelSource) -> str:
    target = Path(path) / parsed.filename if parsed.filename else Path(path)
    if not target.exists():
        raise SourceError(f"{parsed.repo_id}: {parsed.filename or 'the snapshot'} is missing after the download")
    return str(target)


def _hf_progress_bar(progress: DownloadProgress) -> type:
    """A tqdm class for snapshot_download: the bytes bar written to disk feeds `progress`; nothing is drawn."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Bar(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # "huggingface_hub.snapshot_download" is the aggregated bytes bar (per file: resumed bytes as
            # `initial`, then each chunk); the transfer bar counts network bytes and the file-count bar files.
            self._counts = kwargs.get("name") == "huggingface_hub.snapshot_download"
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts and n:
                progress.add(int(n))
            return super().update(n)

    return Bar


# --- ModelScope ---------------------------------------------------------------------------


def _ms_fetch(cache: ModelCache, parsed: ModelSource, progress: DownloadProgress) -> str:
    """Blocking: ModelScope's snapshot_download with a progress callback per file."""
    from modelscope.hub.callback import ProgressCallback as MsCallback
    from modelscope.hub.snapshot_download import snapshot_download

    class Callback(MsCallback):  # type: ignore[misc, valid-type]
        # The total grows as each file starts: ModelScope announces sizes per file.
        def __init__(self, filename: str, file_size: int):
            super().__init__(filename, file_size)
            progress.grow(max(int(file_size or 0), 0))

        def update(self, size: int) -> None:
            progress.add(int(size))

    cache_dir = cache.ms_cache()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = snapshot_download(parsed.repo_id, revision=parsed.revision, cache_dir=str(cache_dir),
                             allow_patterns=[parsed.filename] if parsed.filename else None,
                             endpoint=cache.endpoint("modelscope"),
                             token=cache.ms_token or os.environ.get("MODELSCOPE_API_TOKEN"),
                             progress_callbacks=[Callback])
    return _in_snapshot(path, parsed)
