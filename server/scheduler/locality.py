"""Where model files already are: a placement score, and model metadata read by workers.

`FileIndex` follows the `files` rows (the scheduler's snapshot loads them and applies their bus
events): which workers hold each source `ready` in their cache, and what their agents read of the
files. Placement prefers holders among the workers that fit (a score, never a filter): with spread,
replicas still go to different workers first, then to a holder, then to the least loaded; with
binpack, the tightest fit among the holders wins before the tightest fit anywhere.

`REPORTED` keeps the metadata the agents read (config.json, safetensors dtypes per shard, the GGUF
header's shape) for `server/scheduler/estimate.py`: when the hub cannot be reached, or a local path
exists on the workers only, the estimate is made from a worker's copy.
"""

from __future__ import annotations

import threading
from typing import Any

from server.schemas import file_key
from server.schemas.files import key_or_none
from server.scheduler import hf


def spread_rank(request: Any, worker: Any) -> int:
    """The spread key's first term: replicas of this model on the worker, then (among equals) whether it
    lacks the model's files. 0: no replica and the files are there (or no worker has them)."""
    count = worker.replicas.get(request.model_key, 0) if request.model_key is not None else 0
    holders = request.holders
    return 2 * count + (1 if holders and worker.id not in holders else 0)


def note(holders: frozenset[int], worker_id: int) -> str:
    """A line for the claim's description when the files decided or could have."""
    if not holders:
        return ""
    return "model files already in its cache" if worker_id in holders else "model files not in its cache"


class ReportedMetadata:
    """File key -> (the record in hub.py's format, the worker that read it); thread-safe (estimates run in threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, dict[int, tuple[dict[str, Any], str]]] = {}

    def put(self, key: str, worker_id: int, worker_name: str, metadata: dict[str, Any] | None) -> None:
        with self._lock:
            held = self._records.setdefault(key, {})
            if metadata:
                held[worker_id] = (hub_record(metadata), worker_name)
            else:
                held.pop(worker_id, None)
            if not held:
                self._records.pop(key, None)

    def drop(self, key: str, worker_id: int) -> None:
        self.put(key, worker_id, "", None)

    def get(self, source: str) -> tuple[dict[str, Any], str] | None:
        key = key_or_none(source)
        with self._lock:
            held = self._records.get(key or "")
            return next(iter(held.values())) if held else None

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def take(self, other: "ReportedMetadata") -> None:
        """Hold exactly what `other` holds (one swap under the lock)."""
        with self._lock:
            self._records = other._records


REPORTED = ReportedMetadata()


def hub_record(metadata: dict[str, Any]) -> dict[str, Any]:
    """An agent's reading turned into hub.py's record: the per-shard dtypes become header sums here,
    with the scheduler's own rule of which dtypes are floating point."""
    record = {k: v for k, v in metadata.items() if k in ("sha", "files", "config", "index", "gguf")}
    shards = metadata.get("shard_dtypes")
    if isinstance(shards, dict):
        sums = {}
        for name, by_dtype in shards.items():
            if not isinstance(by_dtype, dict):
                continue
            sizes = {str(d): int(n) for d, n in by_dtype.items() if isinstance(n, int) and n >= 0}
            floats = {d for d in sizes if d in hf.FLOAT_ST}
            sums[str(name)] = [sum(sizes.values()), sum(sizes[d] for d in floats), sorted(floats)]
        record["shards"] = sums
    return record


class FileIndex:
    """The `files` rows the scheduler follows: ready holders per source key."""

    def __init__(self) -> None:
        self.ready: dict[str, set[int]] = {}
        self._rows: dict[int, tuple[str, int]] = {}  # row id -> (key, worker id) while ready

    def load(self, rows: list[dict[str, Any]]) -> None:
        self.ready.clear()
        self._rows.clear()
        fresh = ReportedMetadata()
        for obj in rows:
            self.apply("created", obj, fresh)
        REPORTED.take(fresh)  # the rows loaded are the truth now (swapped at once: estimates run meanwhile)

    def apply(self, action: str, obj: dict[str, Any], reported: "ReportedMetadata | None" = None) -> bool:
        """One row's change; True when the holders of a source changed."""
        reported = REPORTED if reported is None else reported
        row_id = int(obj["id"])
        before = self._rows.pop(row_id, None)
        if before is not None:
            self.ready.get(before[0], set()).discard(before[1])
            reported.drop(*before)
        if action != "deleted" and obj.get("state") == "ready":
            key, worker_id = str(obj.get("source") or ""), int(obj["worker_id"])
            self._rows[row_id] = (key, worker_id)
            self.ready.setdefault(key, set()).add(worker_id)
            reported.put(key, worker_id, str(obj.get("worker_name") or ""), obj.get("metadata"))
        after = self._rows.get(row_id)
        return before != after

    def holders(self, source: str) -> frozenset[int]:
        key = key_or_none(source)
        return frozenset(self.ready.get(key or "", ()))


def mark_holders(reasons: list[Any], holders: frozenset[int], cluster: Any) -> list[Any]:
    """Why-not reasons: say which of the workers that do not fit hold the files (they would be preferred)."""
    for reason in reasons:
        worker = cluster.by_name(reason.worker) if reason.worker and holders else None
        if worker is not None and worker.id in holders:
            reason.message += " (its cache holds the model's files)"
    return reasons


__all__ = ["FileIndex", "REPORTED", "file_key", "mark_holders", "note", "spread_rank"]
