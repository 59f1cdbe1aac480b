"""What a hub model's memory estimate needs, fetched without the weights.

For `hf://ORG/NAME[@REV][/FILE]`, a bare `ORG/NAME` and `ms://...` the scheduler has no local
files, so this module asks the hub for:

- the file listing with sizes (Hugging Face: the model-info API at the revision, which also
  pins the commit; ModelScope: its repo/files API),
- config.json and model.safetensors.index.json (small files, read whole but bounded),
- every safetensors shard's header: an HTTP range request of the first 100 kB, and one more
  when the header is longer (what huggingface_hub's get_safetensors_metadata does; done here
  so both hubs share it and the headers feed the same arithmetic as local files),
- a `/FILE.gguf`'s header: a range request of the first 8 MiB (more, up to 64 MiB, when the
  metadata is longer), parsed with the `gguf` package.

Every request has a timeout (MAAS_HUB_METADATA_TIMEOUT, default 10 s) and the whole fetch a
deadline; a reply is read only as far as needed, even from a server that ignores Range.
Endpoints and tokens are the hub libraries' own variables: HF_ENDPOINT / HF_TOKEN and
MODELSCOPE_ENDPOINT / MODELSCOPE_API_TOKEN, as on the agent.

Results are cached per (source, revision) in memory and written by the scheduler to the
settings table (`hub-metadata:<sha256 of the key>`), loaded again at start: a restart does
not refetch. A commit-pinned revision never changes; a branch or tag is refreshed after
`refresh_after` (the old record serves while the hub cannot be reached). A failure is
remembered for `retry_after` so an unreachable hub is not asked on every pass.

Blocking code: callers run it in a thread (the scheduler in the background, the API in
`asyncio.to_thread`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from server.schemas import SourceError, parse_model_source
from server.scheduler import hf

log = logging.getLogger(__name__)

SETTING_PREFIX = "hub-metadata:"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MS_DEFAULT_ENDPOINT = "https://www.modelscope.cn"
INDEX_FILE = "model.safetensors.index.json"
_ST_FIRST_READ = 100_000  # most safetensors headers fit: one request per shard
_GGUF_FIRST_READ = 8 * 1024**2
_GGUF_MAX_READ = 64 * 1024**2  # a GGUF whose metadata is longer is sized by the file alone
_JSON_MAX = 64 * 1024**2  # config.json and the index: kilobytes in practice
_SHARD_WORKERS = 8
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".npz", ".msgpack", ".h5")


def request_timeout() -> float:
    try:
        return max(0.5, float(os.environ.get("MAAS_HUB_METADATA_TIMEOUT") or 10.0))
    except ValueError:
        return 10.0


class HubError(Exception):
    """The hub did not give the metadata. `transient`: unreachable, slow or failing (worth a retry);
    otherwise the hub answered for certain (no such repository, revision or file; a token needed)."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class HubRef:
    kind: str  # huggingface | modelscope
    repo_id: str
    revision: str | None
    filename: str | None

    @property
    def hub(self) -> str:
        return "Hugging Face" if self.kind == "huggingface" else "ModelScope"

    @property
    def rev(self) -> str:
        return self.revision or ("main" if self.kind == "huggingface" else "master")

    @property
    def key(self) -> str:
        prefix = "hf" if self.kind == "huggingface" else "ms"
        return f"{prefix}://{self.repo_id}@{self.rev}" + (f"/{self.filename}" if self.filename else "")

    @property
    def pinned(self) -> bool:
        return bool(_COMMIT.match(self.rev))


def ref_of(source: str) -> HubRef | None:
    """The hub reference of a source; None for a local path (or a malformed one: the local path checks explain)."""
    try:
        parsed = parse_model_source(source)
    except SourceError:
        return None
    if parsed.kind == "local" or not parsed.repo_id:
        return None
    return HubRef(parsed.kind, parsed.repo_id, parsed.revision, parsed.filename)


def endpoint(kind: str) -> str:
    if kind == "huggingface":
        return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
    return (os.environ.get("MODELSCOPE_ENDPOINT") or MS_DEFAULT_ENDPOINT).rstrip("/")


# --- GGUF headers ---------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFShape:
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int = 0
    layer_bytes: int = 0  # tensors named blk.N.*


def gguf_shape_of(reader: Any) -> GGUFShape | None:
    """The numbers a llama.cpp estimate needs, from a GGUFReader (a whole file, or a header alone)."""
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        return None
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()

    def value(key: str, default: int) -> int:
        field_ = reader.get_field(f"{arch}.{key}")
        return int(field_.parts[field_.data[0]][0]) if field_ is not None else default

    n_head = value("attention.head_count", 1)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_vocab = value("vocab_size", len(tokens.data) if tokens is not None else 0)
    layer_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk."))
    return GGUFShape(value("block_count", 1), value("embedding_length", 0), n_head,
                     value("attention.head_count_kv", n_head), n_vocab, layer_bytes)


class _Truncated(Exception):
    pass


def gguf_shape_from_head(head: bytes) -> GGUFShape | None:
    """Parse the first bytes of a GGUF file. None: not a GGUF; _Truncated: the metadata goes on further."""
    if head[:4] != b"GGUF":
        return None
    import numpy as np
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class HeaderReader(GGUFReader):  # type: ignore[misc]
        # The tensors' data is not there: keep their names and sizes only.
        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            tensors = []
            for field in fields:
                _len, name_data, _n_dims, dims, raw_dtype, _offset = field.parts
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_dtype[0])]
                n_bytes = int(np.prod(dims)) * type_size // block
                tensors.append(type("T", (), {"name": str(bytes(name_data), "utf-8"), "n_bytes": n_bytes}))
            self.tensors = tensors

    with tempfile.NamedTemporaryFile(suffix=".gguf") as handle:
        handle.write(head)
        handle.flush()
        try:
            reader = HeaderReader(handle.name)
        except (IndexError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise _Truncated(str(exc)) from None
        return gguf_shape_of(reader)


# --- talking to the hubs ----------------------------------------------------------------


class _Client:
    """One hub: a listing with sizes and the commit, and bounded reads of a file's bytes."""

    def __init__(self, ref: HubRef, timeout: float):
        from huggingface_hub.utils import build_hf_headers, get_session

        self.ref = ref
        self.timeout = timeout
        self.endpoint = endpoint(ref.kind)
        self.session = get_session()  # huggingface_hub's shared HTTP client: proxies, redirects, retries off
        if ref.kind == "huggingface":
            self.token: str | bool = os.environ.get("HF_TOKEN") or False  # False: never a token file by surprise
            self.headers = build_hf_headers(token=self.token)
        else:
            self.token = os.environ.get("MODELSCOPE_API_TOKEN") or False
            self.headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def listing(self) -> tuple[str, dict[str, int]]:
        ref = self.ref
        if ref.kind == "huggingface":
            from huggingface_hub import HfApi

            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                ref.repo_id, revision=ref.rev, files_metadata=True, timeout=self.timeout)
            return str(info.sha or ref.rev), {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        url = f"{self.endpoint}/api/v1/models/{ref.repo_id}/repo/files"
        response = self.session.get(url, params={"Revision": ref.rev, "Recursive": "True"}, headers=self.headers,
                                    timeout=self.timeout)
        self._check(response)
        body = response.json()
        if not isinstance(body, dict) or body.get("Code", 200) != 200 or not isinstance(body.get("Data"), dict):
            raise HubError(f"ModelScope repository {ref.repo_id}@{ref.rev} at {self.endpoint}: "
                           f"{(body or {}).get('Message') or 'no file listing'}", transient=False)
        files = {str(f["Path"]): int(f.get("Size") or 0) for f in body["Data"].get("Files") or []
                 if isinstance(f, dict) and f.get("Type", "blob") == "blob" and f.get("Path")}
        return ref.rev, files  # ModelScope's listing names no commit: the revision stands for it

    def _url(self, name: str, sha: str) -> tuple[str, dict[str, str]]:
        if self.ref.kind == "huggingface":
            from huggingface_hub import hf_hub_url

            return hf_hub_url(self.ref.repo_id, name, revision=sha, endpoint=self.endpoint), {}
        return (f"{self.endpoint}/api/v1/models/{self.ref.repo_id}/repo",
                {"Revision": sha, "FilePath": name})

    def read(self, name: str, sha: str, start: int = 0, length: int | None = None) -> bytes:
        """Bytes [start, start+length) of a file (the whole file, bounded, without `length`)."""
        url, params = self._url(name, sha)
        headers = dict(self.headers)
        limit = _JSON_MAX if length is None else length
        if length is not None:
            headers["Range"] = f"bytes={start}-{start + length - 1}"
        with self.session.stream("GET", url, params=params, headers=headers, timeout=self.timeout) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            skip = start if response.status_code == 200 else 0  # Range ignored: the body starts at 0
            return _take(response.iter_bytes(), skip, limit)

    def _check(self, response: Any) -> None:
        if response.status_code < 400:
            return
        if self.ref.kind == "huggingface":
            from huggingface_hub.utils import hf_raise_for_status

            hf_raise_for_status(response)
        response.raise_for_status()


def _take(chunks: Iterator[bytes], skip: int, limit: int) -> bytes:
    out = bytearray()
    for chunk in chunks:
        if skip:
            cut = min(skip, len(chunk))
            chunk, skip = chunk[cut:], skip - cut
        out += chunk
        if len(out) >= limit:
            break  # leaving the stream closes the connection: the rest is never read
    return bytes(out[:limit])


def _explain(exc: BaseException, ref: HubRef, where: str) -> HubError:
    """One line for the operator from whatever the HTTP client or hub library raised."""
    if isinstance(exc, HubError):
        return exc
    name = type(exc).__name__
    text = " ".join(str(exc).split())[:300]
    what = f"{ref.hub} repository {ref.repo_id}@{ref.rev}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    token = "HF_TOKEN" if ref.kind == "huggingface" else "MODELSCOPE_API_TOKEN"
    if name in ("RepositoryNotFoundError", "GatedRepoError") or status in (401, 403):
        return HubError(f"{what} was not found at {where}, or it is private or gated and needs a token "
                        f"({token} in the server's environment)", transient=False)
    if name == "RevisionNotFoundError":
        return HubError(f"{what}: no such revision at {where}", transient=False)
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError") or status == 404:
        return HubError(f"{what}: not found at {where} ({name}: {text})", transient=False)
    if isinstance(exc, hf.HFError):
        return HubError(f"{what}: {exc}", transient=False)
    if status is not None and 400 <= status < 500 and status not in (408, 429):  # a refusal, not an outage
        return HubError(f"{what}: {where} refused ({name}: {text})", transient=False)
    return HubError(f"{where} cannot be reached or failed for {what} ({name}: {text})", transient=True)


def _json(client: _Client, name: str, sha: str) -> dict[str, Any]:
    try:
        value = json.loads(client.read(name, sha))
    except ValueError as exc:
        raise hf.HFError(f"{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise hf.HFError(f"{name} is not a JSON object")
    return value


def _shard_sums(client: _Client, name: str, sha: str) -> list[Any]:
    head = client.read(name, sha, 0, _ST_FIRST_READ)
    length = hf.safetensors_header_length(head, name)
    raw = head[8:8 + length]
    if len(raw) < length:
        raw += client.read(name, sha, 8 + len(raw), length - len(raw))
    total, floats, dtypes = hf.header_sums(hf.parse_safetensors_header(raw, name), name)
    return [total, floats, sorted(dtypes)]


def _gguf_head(client: _Client, name: str, sha: str, size: int) -> dict[str, int] | None:
    want = min(size, _GGUF_FIRST_READ) if size else _GGUF_FIRST_READ
    while True:
        head = client.read(name, sha, 0, want)
        try:
            shape = gguf_shape_from_head(head)
            return asdict(shape) if shape else None
        except _Truncated:
            if len(head) < want or want >= min(size or _GGUF_MAX_READ, _GGUF_MAX_READ):
                return None  # not readable within bounds: the file size stands for the weights
            want = min(want * 4, size or _GGUF_MAX_READ, _GGUF_MAX_READ)


def fetch(ref: HubRef, timeout: float | None = None) -> dict[str, Any]:
    """Blocking: the metadata record of `ref` (JSON-able). Raises HubError."""
    timeout = timeout or request_timeout()
    client = _Client(ref, timeout)
    deadline = time.monotonic() + 6 * timeout  # per request `timeout`; the whole fetch is bounded too

    def in_time() -> None:
        if time.monotonic() > deadline:
            raise HubError(f"{client.endpoint} took longer than {6 * timeout:g} s for the metadata of "
                           f"{ref.repo_id}@{ref.rev}", transient=True)

    try:
        sha, files = client.listing()
        record: dict[str, Any] = {"sha": sha, "files": files}
        if ref.filename:
            if ref.filename not in files:
                raise HubError(f"{ref.hub} repository {ref.repo_id}@{ref.rev} has no file {ref.filename}",
                               transient=False)
            if ref.filename.lower().endswith(".gguf"):
                in_time()
                record["gguf"] = _gguf_head(client, ref.filename, sha, files[ref.filename])
            return record
        if "config.json" not in files:
            return record  # no Hugging Face layout: sizes only (vox-box and the like)
        in_time()
        record["config"] = _json(client, "config.json", sha)
        shards = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
        if INDEX_FILE in files:
            in_time()
            index = _json(client, INDEX_FILE, sha)
            # The weight map can list thousands of tensors: only its shard names and metadata are kept.
            record["index"] = {"metadata": index.get("metadata") or {}}
            shards = hf.index_shards(index)
        if shards and all(s in files for s in shards):
            def one(name: str) -> list[Any]:
                in_time()
                return _shard_sums(client, name, sha)

            try:
                with ThreadPoolExecutor(min(_SHARD_WORKERS, len(shards)), thread_name_prefix="hub-headers") as pool:
                    record["shards"] = dict(zip(shards, pool.map(one, shards)))
            except Exception as exc:
                error = _explain(exc, ref, client.endpoint)
                if error.transient:
                    raise error from exc
                # The hub lists the shards but does not serve their headers (no range reads, say):
                # their sizes stand in for the weights, and the estimate says so.
                record["headers_refused"] = str(error)
        return record
    except Exception as exc:
        raise _explain(exc, ref, client.endpoint) from exc


# --- the cache ----------------------------------------------------------------------------------


class MetadataCache:
    """Records per hub reference, shared by the scheduler loop and the API (thread-safe)."""

    retry_after = 30.0  # seconds a failure answers for its reference before the hub is asked again
    refresh_after = 86400.0  # a branch or tag is re-resolved after this; a commit never

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}  # key -> {"key", "fetched_at", "record"}
        self._failures: dict[str, tuple[float, HubError]] = {}
        self._fetching: dict[str, threading.Lock] = {}
        self._unsaved: set[str] = set()
        self.fetches = 0  # hub round trips started (tests check that a cached record is not refetched)

    def _fresh(self, ref: HubRef, entry: dict[str, Any] | None) -> bool:
        return entry is not None and (ref.pinned or time.time() - entry["fetched_at"] < self.refresh_after)

    def needs_fetch(self, ref: HubRef) -> bool:
        """True when `get` would go to the hub (nothing fresh cached, no recent failure)."""
        with self._lock:
            if self._fresh(ref, self._entries.get(ref.key)):
                return False
            failure = self._failures.get(ref.key)
            return failure is None or time.monotonic() - failure[0] >= self.retry_after

    def get(self, ref: HubRef) -> dict[str, Any]:
        """The record of `ref`, fetched when needed (blocking, bounded). Raises HubError."""
        with self._lock:
            key_lock = self._fetching.setdefault(ref.key, threading.Lock())
        with key_lock:  # one fetch per reference: the others wait for it and use its answer
            with self._lock:
                entry = self._entries.get(ref.key)
                if self._fresh(ref, entry):
                    return entry["record"]  # type: ignore[index]
                failure = self._failures.get(ref.key)
                if failure is not None and time.monotonic() - failure[0] < self.retry_after:
                    if entry is not None:
                        return entry["record"]
                    raise failure[1]
                self.fetches += 1
            try:
                record = fetch(ref)
            except HubError as exc:
                with self._lock:
                    self._failures[ref.key] = (time.monotonic(), exc)
                if entry is not None:
                    log.warning("%s: keeping the metadata fetched before (%s)", ref.key, exc)
                    return entry["record"]
                raise
            with self._lock:
                self._entries[ref.key] = {"key": ref.key, "fetched_at": time.time(), "record": record}
                self._failures.pop(ref.key, None)
                self._unsaved.add(ref.key)
            return record

    def take_unsaved(self) -> list[tuple[str, str]]:
        """(settings key, JSON value) of records not written yet; they count as written from now."""
        with self._lock:
            keys, self._unsaved = self._unsaved, set()
            return [(setting_key(k), json.dumps(self._entries[k], separators=(",", ":"))) for k in keys
                    if k in self._entries]

    def mark_unsaved(self, setting_keys: list[str]) -> None:
        """A write failed: these go out with the next one."""
        wanted = set(setting_keys)
        with self._lock:
            self._unsaved |= {k for k in self._entries if setting_key(k) in wanted}

    def load(self, values: list[str]) -> int:
        """Records written before (settings values); a newer one in memory wins. Returns how many were taken."""
        taken = 0
        with self._lock:
            for value in values:
                try:
                    entry = json.loads(value)
                    key, fetched_at, record = entry["key"], float(entry["fetched_at"]), entry["record"]
                except (ValueError, KeyError, TypeError):
                    continue  # an unreadable record is fetched again
                if not isinstance(record, dict):
                    continue
                current = self._entries.get(key)
                if current is None or current["fetched_at"] < fetched_at:
                    self._entries[key] = {"key": key, "fetched_at": fetched_at, "record": record}
                    taken += 1
        return taken

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._failures.clear()
            self._unsaved.clear()
            self.fetches = 0


def setting_key(key: str) -> str:
    return SETTING_PREFIX + hashlib.sha256(key.encode()).hexdigest()  # settings keys are at most 100 characters


CACHE = MetadataCache()

