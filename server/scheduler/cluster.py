"""The placement search's picture of the cluster: workers with their claims (`WorkerSnapshot`), the
`Cluster` that indexes them for best-fit and least-loaded search, a replica to place (`Request`), what
a claim counts against its team's quota (`Usage`, `Room`), and the worker and GPU filters. No I/O here:
server/scheduler/snapshot.py keeps it current from the bus; server/scheduler/placement.py searches it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Any, Iterable

from server import schemas
from server.scheduler.estimate import MemoryEstimate

GiB = 1024**3

# Which GPU vendors a backend can use (None: any, and the CPU).
BACKEND_GPU_VENDORS: dict[str, frozenset[str] | None] = {
    "llama.cpp": None,
    "vllm": frozenset({"nvidia", "amd", "simulated"}),
    "sglang": frozenset({"nvidia", "amd", "simulated"}),
}
CPU_BACKENDS = {"llama.cpp"}
MAX_PIPELINE_STAGES = 16


def reserved_ram(total: int) -> int:
    """Host RAM kept for the system and the agent: 10% of it, at most 2 GiB."""
    return min(total // 10, 2 * GiB)


def gib(value: int | float) -> str:
    return f"{value / GiB:.1f} GiB"


@dataclass(eq=False)
class WorkerSnapshot:
    id: int
    name: str
    address: str
    ready: bool
    cordoned: bool
    ram_total: int
    gpu_total: dict[int, int]  # index -> bytes
    ram_claimed: int = 0
    gpu_claimed: dict[int, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    gpu_names: dict[int, str] = field(default_factory=dict)
    gpu_vendors: dict[int, str] = field(default_factory=dict)
    reserved_ram_bytes: int | None = None  # None: reserved_ram(ram_total)
    reserved_vram_bytes: int = 0  # per GPU
    replicas: dict[Any, int] = field(default_factory=dict)  # model key -> instances with a part here

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.cordoned

    def ram_reserved(self) -> int:
        return reserved_ram(self.ram_total) if self.reserved_ram_bytes is None else self.reserved_ram_bytes

    def ram_free(self) -> int:
        return self.ram_total - self.ram_reserved() - self.ram_claimed

    def gpu_free(self, index: int) -> int:
        return self.gpu_total[index] - self.reserved_vram_bytes - self.gpu_claimed.get(index, 0)

    def take(self, claim: schemas.ResourceClaim, sign: int = 1) -> None:
        """Add (or with sign=-1 remove) this worker's own part of a claim."""
        self.ram_claimed += sign * claim.ram_bytes
        for index in claim.gpu_indexes:
            self.gpu_claimed[index] = self.gpu_claimed.get(index, 0) + sign * claim.vram_bytes_per_gpu

    def take_gpus(self, indexes: Iterable[int], per_gpu: int, sign: int = 1) -> None:
        for index in indexes:
            self.gpu_claimed[index] = self.gpu_claimed.get(index, 0) + sign * per_gpu

    def load(self) -> float:
        """Share of memory claimed: GPU memory on GPU workers, host RAM on the others."""
        if self.gpu_total:
            total = sum(self.gpu_total.values())
            return sum(self.gpu_claimed.get(i, 0) for i in self.gpu_total) / total if total else 1.0
        usable = self.ram_total - self.ram_reserved()
        return self.ram_claimed / usable if usable > 0 else 1.0

    def copy(self) -> "WorkerSnapshot":
        return WorkerSnapshot(
            id=self.id, name=self.name, address=self.address, ready=self.ready, cordoned=self.cordoned,
            ram_total=self.ram_total, gpu_total=dict(self.gpu_total), ram_claimed=self.ram_claimed,
            gpu_claimed=dict(self.gpu_claimed), labels=dict(self.labels), gpu_names=dict(self.gpu_names),
            gpu_vendors=dict(self.gpu_vendors), reserved_ram_bytes=self.reserved_ram_bytes,
            reserved_vram_bytes=self.reserved_vram_bytes, replicas=dict(self.replicas))


@dataclass
class Placement:
    worker: WorkerSnapshot
    claim: schemas.ResourceClaim
    note: str = ""  # why this worker besides fitting (server/scheduler/locality.py: the model's files)


# --- what a claim counts against its team's quota ------------------------------------------


QUOTA_FIELDS = ("gpus", "vram_bytes", "ram_bytes", "replicas")


@dataclass
class Usage:
    """What a team's claims add up to, in the units of schemas.TeamQuota."""

    gpus: int = 0
    vram_bytes: int = 0
    ram_bytes: int = 0
    replicas: int = 0

    def add(self, other: "Usage", sign: int = 1) -> None:
        self.gpus += sign * other.gpus
        self.vram_bytes += sign * other.vram_bytes
        self.ram_bytes += sign * other.ram_bytes
        self.replicas += sign * other.replicas

    def to_out(self) -> schemas.TeamUsage:
        return schemas.TeamUsage(gpus=self.gpus, vram_bytes=self.vram_bytes, ram_bytes=self.ram_bytes,
                                 replicas=self.replicas)


def claim_cost(claim: schemas.ResourceClaim) -> Usage:
    """What one instance's claim counts against its team: every GPU it claims (on every worker), the
    GPU memory and host RAM of the claim, and one replica."""
    gpus = len(claim.gpu_indexes)
    vram = claim.vram_bytes_per_gpu * gpus
    for sub in claim.subordinate_workers:
        gpus += len(sub.gpu_indexes)
        vram += sub.vram_bytes_per_gpu * len(sub.gpu_indexes)
    return Usage(gpus=gpus, vram_bytes=vram, ram_bytes=claim.ram_bytes, replicas=1)


@dataclass(frozen=True)
class Room:
    """What a team may still claim (None: no limit), for the one replica being placed."""

    gpus: int | None = None
    vram_bytes: int | None = None
    ram_bytes: int | None = None

    def allows(self, gpus: int = 0, vram_bytes: int = 0, ram_bytes: int = 0) -> bool:
        return ((self.gpus is None or gpus <= self.gpus) and (self.vram_bytes is None or vram_bytes <= self.vram_bytes)
                and (self.ram_bytes is None or ram_bytes <= self.ram_bytes))


@dataclass
class Request:
    spec: schemas.ModelSpec
    estimate: MemoryEstimate
    model_key: Any = None
    describe_estimate: bool = True  # put the estimate into claims
    team: str | None = None  # whose quota the placement counts against
    room: Room | None = field(default=None, repr=False)  # set by plan(): what the team may still claim
    holders: frozenset[int] = frozenset()  # workers whose cache holds the model's files (preferred)
    _estimate_out: schemas.MemoryEstimateOut | None = field(default=None, repr=False)
    # Caches valid while the cluster's structure (workers, GPUs, labels, states) stays the same; the GPU
    # search (gpus.py) reads and fills the per-worker ones.
    _structure: tuple[int, int] | None = field(default=None, repr=False)
    min_tp_cache: dict[int, int | None] = field(default_factory=dict, init=False, repr=False)
    max_gpus_cache: int | None = field(default=None, init=False, repr=False)
    fkey: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        self.fkey = filter_key(self.spec)

    def bind(self, cluster: "Cluster") -> None:
        """Drop the per-worker caches when the cluster's structure changed since they were filled."""
        structure = (id(cluster), cluster.version)
        if self._structure != structure:
            self._structure = structure
            self.min_tp_cache.clear()
            self.max_gpus_cache = None

    def estimate_out(self) -> schemas.MemoryEstimateOut | None:
        if not self.describe_estimate:
            return None
        if self._estimate_out is None:
            self._estimate_out = self.estimate.to_out()
        return self._estimate_out


Decision = Placement | list[schemas.UnschedulableReason]


# --- the cluster: workers plus indexes kept current as claims change ---------------------


class Cluster:
    """Workers and their claims, with sorted indexes for fast best-fit and least-loaded search.

    Indexes cover schedulable workers only and are rebuilt lazily after structural
    changes (a worker added, removed, cordoned...); claims update them in place.
    """

    def __init__(self, workers: Iterable[WorkerSnapshot] = ()):
        self.workers: dict[int, WorkerSnapshot] = {}
        self.quotas: dict[str, schemas.TeamQuota] = {}  # teams without an entry have no limits
        self.usage: dict[str, Usage] = {}  # team -> what its instances that hold a claim claim
        self._names: dict[str, int] = {}
        self._ordered: list[WorkerSnapshot] | None = None
        self._indexed = False
        # The indexes the GPU search (gpus.py) walks; changed only here (ensure_indexes, apply).
        self.free_gpus: list[tuple[int, int, int]] = []  # (free, worker id, GPU index)
        self.loads: list[tuple[float, int]] = []  # (load, worker id)
        self._entries: dict[int, tuple[dict[int, tuple[int, int, int]], tuple[float, int]]] = {}
        self.max_free: dict[int, int] = {}  # worker id -> free bytes of its roomiest GPU
        self._usable: dict[tuple[Any, int], frozenset[int] | None] = {}
        self.version = 0  # bumped by every structural change
        for w in workers:
            self.put(w)

    # structure
    def put(self, worker: WorkerSnapshot) -> None:
        old = self.workers.get(worker.id)
        if old is not None and old.name != worker.name:
            self._names.pop(old.name, None)
        self.workers[worker.id] = worker
        self._names[worker.name] = worker.id
        self.changed()

    def remove(self, worker_id: int) -> WorkerSnapshot | None:
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            self._names.pop(worker.name, None)
            self.changed()
        return worker

    def changed(self) -> None:
        """Something other than claims changed (state, labels, GPUs): drop indexes and filter caches."""
        self._ordered = None
        self._indexed = False
        self._usable.clear()
        self.version += 1

    def by_name(self, name: str) -> WorkerSnapshot | None:
        worker_id = self._names.get(name)
        return self.workers.get(worker_id) if worker_id is not None else None

    def ordered(self) -> list[WorkerSnapshot]:
        if self._ordered is None:
            self._ordered = sorted(self.workers.values(), key=lambda w: w.id)
        return self._ordered

    def copy(self) -> "Cluster":
        cluster = Cluster(w.copy() for w in self.ordered())
        cluster.quotas = dict(self.quotas)
        cluster.usage = {team: Usage(**vars(u)) for team, u in self.usage.items()}
        return cluster

    # team quotas
    def set_quota(self, team: str, quota: schemas.TeamQuota | None) -> bool:
        """A team's limits (None or all None: unlimited); True when they changed."""
        if quota is not None and all(getattr(quota, f) is None for f in QUOTA_FIELDS):
            quota = None
        if self.quotas.get(team) == quota:
            return False
        if quota is None:
            self.quotas.pop(team, None)
        else:
            self.quotas[team] = quota
        return True

    def used(self, team: str) -> Usage:
        return self.usage.get(team) or Usage()

    # indexes
    def ensure_indexes(self) -> None:
        if self._indexed:
            return
        self._entries = {}
        self.max_free = {}
        gpus: list[tuple[int, int, int]] = []
        loads: list[tuple[float, int]] = []
        for w in self.ordered():
            if w.schedulable:
                entry = self._entry(w)
                self._entries[w.id] = entry
                self.max_free[w.id] = max((g[0] for g in entry[0].values()), default=-1)
                gpus.extend(entry[0].values())
                loads.append(entry[1])
        gpus.sort()
        loads.sort()
        self.free_gpus, self.loads = gpus, loads
        self._indexed = True

    @staticmethod
    def _entry(w: WorkerSnapshot) -> tuple[dict[int, tuple[int, int, int]], tuple[float, int]]:
        return {i: (w.gpu_free(i), w.id, i) for i in w.gpu_total}, (w.load(), w.id)

    def apply(self, claim: schemas.ResourceClaim, worker_id: int | None, model_key: Any = None, sign: int = 1,
              team: str | None = None) -> None:
        """Add (sign=1) or remove (sign=-1) a claim: the main worker's part and every subordinate's,
        and with `team` the claim's count against that team's quota."""
        if team is not None:
            usage = self.usage.get(team)
            if usage is None:
                usage = self.usage[team] = Usage()
            usage.add(claim_cost(claim), sign)
            if usage == Usage():
                del self.usage[team]
        parts: list[tuple[WorkerSnapshot, Any]] = []
        main = self.workers.get(worker_id) if worker_id is not None else None
        if main is not None:
            parts.append((main, None))
        for sub in claim.subordinate_workers:
            worker = self.workers.get(sub.worker_id)
            if worker is not None:
                parts.append((worker, sub))
        for worker, sub in parts:
            indexes = claim.gpu_indexes if sub is None else sub.gpu_indexes
            indexed = self._indexed and worker.id in self._entries
            if indexed:
                self._unindex_gpus(worker, indexes)
            if sub is None:
                worker.take(claim, sign)
            else:
                worker.take_gpus(sub.gpu_indexes, sub.vram_bytes_per_gpu, sign)
            if model_key is not None:
                count = worker.replicas.get(model_key, 0) + sign
                if count > 0:
                    worker.replicas[model_key] = count
                else:
                    worker.replicas.pop(model_key, None)
            if indexed:
                self._reindex_gpus(worker, indexes)

    def _unindex_gpus(self, w: WorkerSnapshot, indexes: Iterable[int]) -> None:
        """Take out the entries a claim on these GPUs changes (theirs and the worker's load)."""
        gpus, load = self._entries[w.id]
        for i in indexes:
            if i in gpus:
                del self.free_gpus[bisect_left(self.free_gpus, gpus[i])]
        del self.loads[bisect_left(self.loads, load)]

    def _reindex_gpus(self, w: WorkerSnapshot, indexes: Iterable[int]) -> None:
        gpus, _ = self._entries[w.id]
        for i in indexes:
            if i in gpus:
                gpus[i] = (w.gpu_free(i), w.id, i)
                insort(self.free_gpus, gpus[i])
        load = (w.load(), w.id)
        self._entries[w.id] = (gpus, load)
        insort(self.loads, load)
        self.max_free[w.id] = max((g[0] for g in gpus.values()), default=-1)

    def commit(self, placement: Placement, model_key: Any = None, team: str | None = None) -> None:
        self.apply(placement.claim, placement.worker.id, model_key, team=team)

    # filters (cached per filter key and worker until the next structural change)
    def usable(self, spec: schemas.ModelSpec, w: WorkerSnapshot, fkey: tuple | None = None) -> frozenset[int] | None:
        """GPU indexes of `w` this spec may use; None when the worker itself is filtered out."""
        key = (filter_key(spec) if fkey is None else fkey, w.id)
        try:
            return self._usable[key]
        except KeyError:
            pass
        result: frozenset[int] | None
        if not w.schedulable or not selector_matches(spec, w):
            result = None
        else:
            result = frozenset(i for i in w.gpu_total if gpu_allowed(spec, w, i))
        self._usable[key] = result
        return result


def filter_key(spec: schemas.ModelSpec) -> tuple:
    return (spec.backend, spec.gpu_vendor, spec.gpu_type,
            tuple(sorted(spec.worker_selector.items())) if spec.worker_selector else ())


def selector_matches(spec: schemas.ModelSpec, w: WorkerSnapshot) -> bool:
    return all(w.labels.get(k) == v for k, v in spec.worker_selector.items())


def gpu_allowed(spec: schemas.ModelSpec, w: WorkerSnapshot, index: int) -> bool:
    vendor = w.gpu_vendors.get(index, "nvidia").lower()
    allowed = BACKEND_GPU_VENDORS.get(spec.backend)
    if allowed is not None and vendor not in allowed:
        return False
    if spec.gpu_vendor and vendor != spec.gpu_vendor.lower():
        return False
    if spec.gpu_type and spec.gpu_type.lower() not in w.gpu_names.get(index, "").lower():
        return False
    return True
