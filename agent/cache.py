"""The worker's model cache as a resource (issue 19): what is in it, pulls and removals asked through
`/v2/files`, a size limit with LRU eviction, and the inventory reported to the server.

Every download of a hub source goes through `FileCache.fetch` (an instance's launch and a pull alike),
so one source is fetched once at a time and each entry knows its size, revision, path and last use.
Local sources an instance used (or a pull named) are listed too, never deleted: only what lies under the
cache folder is removed or evicted. The inventory survives restarts in `<cache>/inventory.json`;
entries whose files are gone are dropped when it is read.

With each entry goes what the agent read of its files (`read_metadata`): config.json, the index's
metadata, the dtypes of each safetensors shard, a GGUF's shape. The server estimates memory from it
when it cannot read the model itself (an air-gapped hub, a path that exists on workers only).

The agent reports its whole inventory (`PUT /v2/agent/files`) when something changed, at most once a
`report_every` seconds, and watches its own `files` rows (`GET /v2/watch?kinds=files`): a `pending`
row is a pull to start, a `removing` row files to delete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable

import aiohttp

from agent.progress import ProgressCallback
from agent.server_api import ServerAPI
from agent.sources import ModelCache, SourceError
from server.ndjson import watch_messages
from server.schemas import AgentFileEntry, AgentFileInventory, file_key, parse_model_source

log = logging.getLogger(__name__)

MAX_LISTED_FILES = 2000
MAX_SHARDS = 500
MAX_JSON_BYTES = 1024 * 1024
METADATA_PER_REPORT = 256 * 1024  # bytes of readings per inventory report (a /v2 body is at most 1 MiB)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class Entry:
    source: str  # the file key
    state: str = "pulling"  # pulling | ready | error
    path: str = ""
    revision: str | None = None
    size_bytes: int = 0
    progress: float | None = None
    message: str = ""
    last_used_at: str | None = None  # ISO time
    metadata: dict[str, Any] | None = None
    cached: bool = True  # under the cache folder (removable); False: a local path, never deleted here
    metadata_sent: bool = False  # the server has it (sent once per reading and connection, not in every report)

    def wire(self, with_metadata: bool) -> AgentFileEntry:
        return AgentFileEntry(source=self.source, revision=self.revision, path=self.path, size_bytes=self.size_bytes,
                              state=self.state, progress=self.progress, message=self.message[:4000],
                              last_used_at=datetime.fromisoformat(self.last_used_at).timestamp()
                              if self.last_used_at else None,
                              metadata=self.metadata if with_metadata else None)


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class FileCache:
    models: ModelCache
    limit_bytes: int | None = None  # None: no limit
    in_use: Callable[[], set[str]] = set  # keys the running workloads use (never evicted)
    report_every: float = 1.0
    entries: dict[str, Entry] = field(default_factory=dict)
    _fetches: dict[str, asyncio.Task[str]] = field(default_factory=dict)
    _listeners: dict[str, list[ProgressCallback]] = field(default_factory=dict)  # per key: launches waiting
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def index_path(self) -> Path:
        return self.models.root / "inventory.json"

    # --- the inventory on disk -----------------------------------------------------------

    def load(self) -> None:
        """Entries kept by a previous run whose files are still there (a pull cut short is dropped)."""
        try:
            saved = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return
        for item in saved if isinstance(saved, list) else []:
            try:
                entry = Entry(**item)
            except TypeError:
                continue
            if entry.state == "ready" and entry.path and os.path.exists(entry.path):
                self.entries[entry.source] = entry
        self._changed.set()

    def _save(self) -> None:
        ready = [asdict(e) for e in self.entries.values() if e.state == "ready"]
        self.models.root.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(self.index_path)

    def changed(self) -> None:
        self._changed.set()

    def inventory(self) -> tuple[AgentFileInventory, list[Entry]]:
        """The report, and the entries whose reading goes with it: each reading once (the server keeps it),
        at most METADATA_PER_REPORT bytes of them per report (the rest go with the next)."""
        budget, carried, files = METADATA_PER_REPORT, [], []
        for entry in list(self.entries.values()):
            size = len(json.dumps(entry.metadata)) if entry.metadata and not entry.metadata_sent else 0
            send = 0 < size <= budget
            if send:
                budget -= size
                carried.append(entry)
            files.append(entry.wire(send))
        return AgentFileInventory(files=files), carried

    # --- fetching, pulling, removing ------------------------------------------------------

    async def fetch(self, source: str, on_progress: ProgressCallback | None = None) -> str:
        """The local path of a hub source, downloaded once however many ask at the same time."""
        key = file_key(source)
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.create_task(self._download(key, source), name=f"fetch {key}")
            self._fetches[key] = task
            task.add_done_callback(lambda _t: self._fetches.pop(key, None))
        if on_progress is None:
            return await asyncio.shield(task)
        listeners = self._listeners.setdefault(key, [])
        listeners.append(on_progress)
        try:
            return await asyncio.shield(task)
        finally:
            listeners.remove(on_progress)

    async def _download(self, key: str, source: str) -> str:
        entry = self.entries.get(key)
        if entry is None or entry.state != "ready" or not os.path.exists(entry.path):
            entry = self.entries[key] = Entry(source=key, state="pulling", progress=0.0,
                                              message=f"downloading into {self.models.root}")
            self.changed()

        async def progress(fraction: float) -> None:
            entry.progress = round(fraction, 4)
            self.changed()
            for listener in list(self._listeners.get(key, ())):
                await listener(fraction)

        try:
            path = await self.models.resolve(source, progress)
        except SourceError as exc:
            entry.state, entry.progress, entry.message = "error", None, str(exc)
            self.changed()
            raise
        except asyncio.CancelledError:
            self.entries.pop(key, None)
            self.changed()
            raise
        await self._settle(entry, path, cached=True)
        await asyncio.to_thread(self.evict, keep=key)
        return path

    async def _settle(self, entry: Entry, path: str, cached: bool) -> None:
        if entry.state == "ready" and entry.path == path:  # a launch from the cache: only its use is new
            entry.last_used_at = _now()
            await asyncio.to_thread(self._save)
            self.changed()
            return
        size, revision, metadata = await asyncio.to_thread(_describe, path)
        entry.state, entry.progress, entry.message = "ready", None, ""
        entry.path, entry.size_bytes, entry.revision, entry.metadata = path, size, revision, metadata
        entry.metadata_sent = False
        entry.cached = cached
        entry.last_used_at = _now()
        await asyncio.to_thread(self._save)
        self.changed()

    async def note_local(self, path: str) -> None:
        """A local source a launch (or a pull) found on this worker: listed, read, never deleted here."""
        key = file_key(path)
        entry = self.entries.get(key)
        if entry is not None and entry.state == "ready" and entry.path == path:
            entry.last_used_at = _now()
            self.changed()
            return
        entry = self.entries[key] = Entry(source=key, state="pulling", cached=False)
        await self._settle(entry, path, cached=False)

    async def pull(self, source: str, roots: list[str]) -> None:
        """A pull asked through /v2/files: a hub source is downloaded; a local path is checked and listed."""
        try:
            parsed = self.models.parse(source)
            if parsed.kind == "local":
                path = source
                if not any(os.path.abspath(path).startswith(os.path.abspath(r) + os.sep) for r in roots):
                    raise SourceError(f"{path} is not under a model root of this worker ({', '.join(roots)})")
                if not await asyncio.to_thread(os.path.exists, path):
                    raise SourceError(f"{path} does not exist on this worker")
                await self.note_local(path)
            else:
                await self.fetch(source)
        except SourceError as exc:
            key = file_key(source)
            entry = self.entries.setdefault(key, Entry(source=key))
            entry.state, entry.progress, entry.message = "error", None, str(exc)
            self.changed()

    async def remove(self, key: str) -> None:
        """Forget an entry; delete its files when they lie in the cache folder and nothing uses them."""
        entry = self.entries.get(key)
        if entry is None:
            self.changed()  # already gone: the report lets the server drop its row
            return
        if key in self.in_use():
            entry.message = "in use by an instance on this worker; not removed"
            self.changed()
            return
        task = self._fetches.get(key)
        if task is not None:
            task.cancel()
        await asyncio.to_thread(self._delete, entry)
        self.changed()

    def _delete(self, entry: Entry) -> None:
        self.entries.pop(entry.source, None)
        if entry.cached and entry.path:
            _delete_cached(Path(entry.path), self.models.root)
        # Entries that shared the files (a repository and one file of it) are gone with them.
        for other in list(self.entries.values()):
            if other.state == "ready" and not os.path.exists(other.path):
                self.entries.pop(other.source, None)
        self._save()
        log.info("removed %s from the model cache", entry.source)

    def evict(self, keep: str | None = None) -> list[str]:
        """Least recently used, unused cached entries go until the cache is within its limit."""
        if self.limit_bytes is None:
            return []
        evicted = []
        using = self.in_use()
        while True:
            cached = [e for e in self.entries.values() if e.cached and e.state == "ready"]
            total = sum(e.size_bytes for e in cached)
            if total <= self.limit_bytes:
                break
            candidates = sorted((e for e in cached if e.source != keep and e.source not in using),
                                key=lambda e: e.last_used_at or "")
            if not candidates:
                log.warning("model cache holds %d bytes, over its limit of %d, and every entry is in use",
                            total, self.limit_bytes)
                break
            victim = candidates[0]
            self._delete(victim)
            evicted.append(victim.source)
            log.info("evicted %s (%d bytes, last used %s): the cache is over %d bytes", victim.source,
                     victim.size_bytes, victim.last_used_at, self.limit_bytes)
        if evicted:
            self.changed()
        return evicted

    # --- talking to the server ------------------------------------------------------------

    async def run(self, api: ServerAPI, model_roots: list[str]) -> None:
        """Report changes and follow this worker's rows, for as long as the agent runs. `model_roots`: where
        local sources of a pull may lie besides the cache (AgentConfig.model_roots)."""
        self.changed()
        await asyncio.gather(self._report_loop(api), self._watch_loop(api, model_roots))

    async def _report_loop(self, api: ServerAPI) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            inventory, carried = self.inventory()
            try:
                status, refusal = await api.put_files(inventory.model_dump(mode="json"))
                if status >= 300:
                    log.info("file inventory report refused (%s): %s", status, refusal)
                    self._changed.set()  # sent again with the next change or after the pause
                else:
                    for entry in carried:
                        entry.metadata_sent = True
                    if any(e.metadata and not e.metadata_sent for e in self.entries.values()):
                        self._changed.set()  # readings that did not fit this report
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("file inventory report failed (%s); retrying", exc)
                self._changed.set()
            await asyncio.sleep(self.report_every)

    async def _watch_loop(self, api: ServerAPI, model_roots: list[str]) -> None:
        version: int | None = None
        working: dict[str, asyncio.Task[None]] = {}
        while True:
            try:
                async with api.watch("files", version) as response:
                    response.raise_for_status()
                    async for message in watch_messages(response.content.iter_any()):
                        version = message["version"]
                        rows = (message["items"].get("files", []) if message["type"] == "snapshot"
                                else [message["object"]] if message["type"] == "event"
                                and message["action"] != "deleted" else [])
                        if message["type"] == "snapshot":  # (re)connected: the server's rows may predate ours
                            for entry in self.entries.values():
                                entry.metadata_sent = False
                            self.changed()
                        for row in rows:
                            self._act(row, working, api.worker_id, model_roots)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                log.info("files watch ended (%s); reconnecting", str(exc) or type(exc).__name__)
                version = None
            await asyncio.sleep(1)

    def _act(self, row: dict[str, Any], working: dict[str, asyncio.Task[None]], worker_id: int | None,
             model_roots: list[str]) -> None:
        key, state = str(row.get("source") or ""), row.get("state")
        if row.get("worker_id") != worker_id or key in working:
            return
        if state == "pending":
            roots = [*model_roots, str(self.models.root)]
            work = self.pull(key, roots)
        elif state == "removing":
            work = self.remove(key)
        else:
            return
        task = working[key] = asyncio.create_task(work, name=f"files {state} {key}")
        task.add_done_callback(lambda _t: working.pop(key, None))


# --- what lies on disk ---------------------------------------------------------------------


def _files_under(path: Path) -> list[tuple[str, int]]:
    if path.is_file():
        return [(path.name, path.stat().st_size)]
    out = []
    for item in sorted(path.rglob("*")):
        if item.is_file() and ".cache" not in item.parts:
            out.append((item.relative_to(path).as_posix(), item.stat().st_size))  # a symlink: its blob's size
    return out


def _describe(path: str) -> tuple[int, str | None, dict[str, Any] | None]:
    """(bytes, revision, metadata) of a path in the cache or a local source."""
    target = Path(path)
    files = _files_under(target)
    parts = target.parts
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    try:
        metadata = read_metadata(target, files, revision)
    except Exception as exc:  # an unreadable file: listed without metadata, the estimate goes without it
        log.info("cannot read the metadata of %s: %s", path, exc)
        metadata = None
    return sum(size for _, size in files), revision, metadata


def read_metadata(target: Path, files: list[tuple[str, int]], revision: str | None) -> dict[str, Any]:
    """What the server's estimate reads of a model (server/scheduler/hub.py's record, raw): the listing,
    config.json, the index's metadata, bytes per dtype of each safetensors shard, a GGUF's shape."""
    record: dict[str, Any] = {"files": dict(files[:MAX_LISTED_FILES])}
    if revision:
        record["sha"] = revision
    if target.is_file():
        if target.suffix.lower() == ".gguf":
            record["gguf"] = gguf_shape(target)
        elif target.suffix == ".safetensors":
            record["shard_dtypes"] = {target.name: safetensors_dtypes(target)}
        return record
    config = target / "config.json"
    if config.is_file() and config.stat().st_size <= MAX_JSON_BYTES:
        record["config"] = json.loads(config.read_text())
    index = target / "model.safetensors.index.json"
    shards = sorted(name for name, _ in files if name.endswith(".safetensors") and "/" not in name)
    if index.is_file() and index.stat().st_size <= 64 * MAX_JSON_BYTES:
        parsed = json.loads(index.read_text())
        record["index"] = {"metadata": parsed.get("metadata") or {}}
        shards = sorted(set((parsed.get("weight_map") or {}).values())) or shards
    if shards and len(shards) <= MAX_SHARDS:
        record["shard_dtypes"] = {name: safetensors_dtypes(target / name) for name in shards}
    return record


def safetensors_dtypes(path: Path) -> dict[str, int]:
    """Bytes per dtype from a safetensors header (the tensors are not read)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if not 2 <= length <= 256 * 1024**2:
            raise ValueError(f"{path.name}: not a safetensors file")
        header = json.loads(handle.read(length))
    sizes: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        start, end = info.get("data_offsets", (0, 0))
        sizes[str(info.get("dtype"))] = sizes.get(str(info.get("dtype")), 0) + max(int(end) - int(start), 0)
    return sizes


def gguf_shape(path: Path) -> dict[str, int] | None:
    """The numbers a llama.cpp estimate needs from a GGUF header (the fields of server/scheduler/hub.py's GGUFShape)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        return None
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()

    def value(key: str, default: int) -> int:
        found = reader.get_field(f"{arch}.{key}")
        return int(found.parts[found.data[0]][0]) if found is not None else default

    n_head = value("attention.head_count", 1)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return {"n_layers": value("block_count", 1), "n_embd": value("embedding_length", 0), "n_head": n_head,
            "n_head_kv": value("attention.head_count_kv", n_head),
            "n_vocab": value("vocab_size", len(tokens.data) if tokens is not None else 0),
            "layer_bytes": sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk."))}


def _delete_cached(path: Path, root: Path) -> None:
    """Delete a cached snapshot (or one file of it) and the blobs no other snapshot links to."""
    root = root.resolve()
    if not str(path.absolute()).startswith(str(root) + os.sep):
        return  # never outside the cache folder
    parts = path.parts
    if "snapshots" not in parts:  # ModelScope and the like: the folder or file itself
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return
    repo = Path(*parts[:parts.index("snapshots")])
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    snapshots = repo / "snapshots"
    linked = {os.path.realpath(p) for p in snapshots.rglob("*") if p.is_symlink()} if snapshots.exists() else set()
    for blob in (repo / "blobs").glob("*") if (repo / "blobs").exists() else ():
        if os.path.realpath(blob) not in linked:
            blob.unlink(missing_ok=True)
    if not linked:
        shutil.rmtree(repo, ignore_errors=True)


def parse_limit(text: str | None) -> int | None:
    """--cache-limit 50G -> bytes (None: no limit)."""
    from server.schemas import parse_size

    if not text:
        return None
    size = parse_size(text)
    if size is None or size <= 0:
        raise ValueError(f"{text!r} is not a size (write e.g. 50G, 500GiB, 1T)")
    return size


__all__ = ["Entry", "FileCache", "parse_limit", "parse_model_source", "read_metadata"]
