"""Placement on an in-memory snapshot: no I/O here.

A request (a spec and its memory estimate) is placed, in this order:

1. one GPU;
2. several GPUs of one worker (tensor parallel; vLLM/SGLang sizes must divide the
   attention heads, llama.cpp splits by layers);
3. llama.cpp with partial_offload: some layers on a GPU, the rest in host RAM;
4. llama.cpp on the CPU of workers without GPUs (or anywhere with cpu_only);
5. vLLM/SGLang/custom backends with distributed: several workers (pipeline parallel,
   tensor parallel inside each), fewest GPUs first, only when no single worker can hold it.

cpu_only (llama.cpp, vllm's CPU build, custom backends) goes straight to host RAM, on any
worker, GPUs or not; vllm without cpu_only is never put on a CPU by itself.

`gpu_selector` (manual placement) skips all of that and checks the named GPUs.

Scoring, with deterministic tie-breaks (worker id, then GPU index):

- spread (the default): the worker with the fewest replicas of this model, then the
  least loaded (claimed / total memory), then the lowest id. Replicas exist for
  availability, so they land on different workers first.
- binpack: the tightest GPU that fits (least free memory left), so whole GPUs and
  whole workers stay free for large models.

Inside the chosen worker GPUs are always best-fit (the fitting GPUs with the least free
memory), whatever the strategy: spreading inside one worker only fragments it.

When nothing fits, `explain` gives one structured reason per worker.

Team quotas (schemas.TeamQuota: GPUs, VRAM, host RAM, replicas) are checked first, before any
worker is looked at: a team already at a limit the instance needs gets one `quota_exceeded`
reason (need / used / limit). Otherwise the search skips the options that would take the team
over a limit (a wider tensor-parallel split, a CPU placement with too much RAM), and when only
such options exist the reason is again `quota_exceeded`, with the need of the option that fits.

Why one module of ~980 lines: it is one pure search (the options above, their scoring, the
quota checks and the why-not reasons share the same snapshot walk); the file-locality score
(locality.py) and preemption (preemption.py) live apart.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Any, Iterable

from server import schemas
from server.scheduler import locality
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


# --- team quotas -------------------------------------------------------------------------


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
    # Caches valid while the cluster's structure (workers, GPUs, labels, states) stays the same.
    _structure: tuple[int, int] | None = field(default=None, repr=False)
    _min_tp: dict[int, int | None] = field(default_factory=dict, repr=False)
    _max_gpus: int | None = field(default=None, repr=False)
    fkey: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        self.fkey = filter_key(self.spec)

    def bind(self, cluster: "Cluster") -> None:
        """Drop the per-worker caches when the cluster's structure changed since they were filled."""
        structure = (id(cluster), cluster.version)
        if self._structure != structure:
            self._structure = structure
            self._min_tp.clear()
            self._max_gpus = None

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
        self._gpus: list[tuple[int, int, int]] = []  # (free, worker id, GPU index)
        self._loads: list[tuple[float, int]] = []  # (load, worker id)
        self._entries: dict[int, tuple[dict[int, tuple[int, int, int]], tuple[float, int]]] = {}
        self._max_free: dict[int, int] = {}  # worker id -> free bytes of its roomiest GPU
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
        self._max_free = {}
        gpus: list[tuple[int, int, int]] = []
        loads: list[tuple[float, int]] = []
        for w in self.ordered():
            if w.schedulable:
                entry = self._entry(w)
                self._entries[w.id] = entry
                self._max_free[w.id] = max((g[0] for g in entry[0].values()), default=-1)
                gpus.extend(entry[0].values())
                loads.append(entry[1])
        gpus.sort()
        loads.sort()
        self._gpus, self._loads = gpus, loads
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
                del self._gpus[bisect_left(self._gpus, gpus[i])]
        del self._loads[bisect_left(self._loads, load)]

    def _reindex_gpus(self, w: WorkerSnapshot, indexes: Iterable[int]) -> None:
        gpus, _ = self._entries[w.id]
        for i in indexes:
            if i in gpus:
                gpus[i] = (w.gpu_free(i), w.id, i)
                insort(self._gpus, gpus[i])
        load = (w.load(), w.id)
        self._entries[w.id] = (gpus, load)
        insort(self._loads, load)
        self._max_free[w.id] = max((g[0] for g in gpus.values()), default=-1)

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


# --- claims ------------------------------------------------------------------------------


def _utilization(request: Request, need: int, totals: list[int]) -> float | None:
    if request.spec.backend not in schemas.HF_BACKENDS:
        return None
    smallest = min(totals)
    # Rounded down: the backend then stays inside its claim.
    return max(0.0001, math.floor(need / smallest * 10_000) / 10_000) if smallest else None


def gpu_placement(request: Request, parts: list[tuple[WorkerSnapshot, list[int]]], need: int) -> Placement:
    main, main_gpus = parts[0]
    tp = len(main_gpus)
    totals = [w.gpu_total[i] for w, gpus in parts for i in gpus]
    claim = schemas.ResourceClaim(
        device="gpu", gpu_indexes=sorted(main_gpus), vram_bytes_per_gpu=need, tensor_parallel_size=tp,
        pipeline_parallel_size=len(parts),
        subordinate_workers=[schemas.SubordinateClaim(worker_id=w.id, worker_name=w.name, address=w.address,
                                                      gpu_indexes=sorted(gpus), vram_bytes_per_gpu=need)
                             for w, gpus in parts[1:]],
        gpu_memory_utilization=_utilization(request, need, totals), estimate=request.estimate_out())
    return Placement(main, claim)


def cpu_placement(request: Request, w: WorkerSnapshot, need: int) -> Placement:
    return Placement(w, schemas.ResourceClaim(device="cpu", ram_bytes=need, estimate=request.estimate_out()))


# --- placement steps ------------------------------------------------------------------------


def min_tensor_parallel(request: Request, w: WorkerSnapshot, usable: frozenset[int]) -> int | None:
    """The smallest tensor-parallel size whose per-GPU need fits this worker's usable GPUs when empty.

    A property of model and hardware, not of load: busy GPUs never make a model split wider.
    """
    cache = request._min_tp
    if w.id in cache:
        return cache[w.id]
    capacities = sorted((w.gpu_total[i] - w.reserved_vram_bytes for i in usable), reverse=True)
    found = None
    for k in request.estimate.tp_candidates(len(capacities)):
        if capacities[k - 1] >= request.estimate.per_gpu(k):
            found = k
            break
    cache[w.id] = found
    return found


def _best_fit(w: WorkerSnapshot, usable: frozenset[int], need: int, k: int) -> list[int] | None:
    """The k usable GPUs of `w` with room for `need` and the least free memory (ties: lower index)."""
    fitting = sorted((w.gpu_free(i), i) for i in usable if w.gpu_free(i) >= need)
    if len(fitting) < k:
        return None
    return [i for _, i in fitting[:k]]


def _binpack_gpus(request: Request, cluster: Cluster, need: int, k: int,
                  only: frozenset[int] | None = None) -> Placement | None:
    """Walk GPUs from the tightest fit up; the first worker with k usable fitting GPUs wins.

    That worker has the smallest k-th best-fitting GPU: the minimax best fit (among `only`, when given).
    """
    spec, gpus = request.spec, cluster._gpus
    seen: dict[int, list[int]] = {}
    for position in range(bisect_left(gpus, (need, -1, -1)), len(gpus)):
        _free, worker_id, index = gpus[position]
        if only is not None and worker_id not in only:
            continue
        w = cluster.workers[worker_id]
        usable = cluster.usable(spec, w, request.fkey)
        if not usable or index not in usable:
            continue
        if k > 1 and min_tensor_parallel(request, w, usable) != k:
            continue
        chosen = seen.setdefault(worker_id, [])
        chosen.append(index)
        if len(chosen) == k:
            return gpu_placement(request, [(w, chosen)], need)
    return None


def _spread_gpus(request: Request, cluster: Cluster, need: int, k: int) -> Placement | None:
    """Least-loaded first; stop at the first worker without a replica of this model."""
    spec = request.spec
    best: tuple[int, WorkerSnapshot, list[int]] | None = None
    max_free = cluster._max_free
    for _load, worker_id in cluster._loads:
        if max_free[worker_id] < need:
            continue
        w = cluster.workers[worker_id]
        count = locality.spread_rank(request, w)
        if best is not None and count >= best[0]:
            continue
        usable = cluster.usable(spec, w, request.fkey)
        if not usable or len(usable) < k:
            continue
        if k > 1 and min_tensor_parallel(request, w, usable) != k:
            continue
        chosen = _best_fit(w, usable, need, k)
        if chosen is None:
            continue
        best = (count, w, chosen)
        if count == 0:
            break
    return gpu_placement(request, [(best[1], best[2])], need) if best else None


def _max_usable_gpus(request: Request, cluster: Cluster) -> int:
    if request._max_gpus is None:
        request._max_gpus = max((len(u) for w in cluster.ordered() if (u := cluster.usable(request.spec, w, request.fkey))),
                                default=0)
    return request._max_gpus


def _on_gpus(request: Request, cluster: Cluster) -> Placement | None:
    est = request.estimate
    binpack = request.spec.placement_strategy == "binpack"
    limit = _max_usable_gpus(request, cluster)
    for k in est.tp_candidates(limit):
        need = est.per_gpu(k)
        if not _affordable(request, gpus=k, vram_bytes=need * k):
            continue
        found = (binpack and request.holders and _binpack_gpus(request, cluster, need, k, request.holders)) or (
            _binpack_gpus(request, cluster, need, k) if binpack else _spread_gpus(request, cluster, need, k))
        if found is not None:
            return found
    return None


def _partial_offload(request: Request, cluster: Cluster) -> Placement | None:
    """llama.cpp: the GPU that holds the most layers, on a worker whose RAM takes the rest."""
    est, spec = request.estimate, request.spec
    best: tuple[tuple, Placement] | None = None
    for w in cluster.ordered():
        usable = cluster.usable(spec, w)
        if not usable:
            continue
        for index in sorted(usable):
            split = est.offload(w.gpu_free(index))
            if split is None:
                continue
            layers, vram, ram = split
            if ram > w.ram_free() or not _affordable(request, gpus=1, vram_bytes=vram, ram_bytes=ram):
                continue
            count = locality.spread_rank(request, w)
            key = (-layers, count, w.load(), w.id, index) if spec.placement_strategy == "spread" \
                else (-layers, count % 2, w.gpu_free(index), w.id, index)
            if best is None or key < best[0]:
                claim = schemas.ResourceClaim(device="gpu", gpu_indexes=[index], vram_bytes_per_gpu=vram,
                                              ram_bytes=ram, gpu_layers=layers, estimate=request.estimate_out())
                best = (key, Placement(w, claim))
    return best[1] if best else None


def _on_cpu(request: Request, cluster: Cluster, only_without_gpus: bool) -> Placement | None:
    spec, need = request.spec, request.estimate.total()
    if not _affordable(request, ram_bytes=need):
        return None
    best: tuple[tuple, WorkerSnapshot] | None = None
    for w in cluster.ordered():
        if only_without_gpus and w.gpu_total:
            continue
        if not w.schedulable or not selector_matches(spec, w):
            continue
        free = w.ram_free()
        if free < need:
            continue
        rank = locality.spread_rank(request, w)
        key: tuple = (rank % 2, free, w.id) if spec.placement_strategy == "binpack" else (rank, w.load(), w.id)
        if best is None or key < best[0]:
            best = (key, w)
    return cpu_placement(request, best[1], need) if best else None


def _distributed(request: Request, cluster: Cluster) -> Placement | None:
    """Pipeline stages on several workers, tensor parallel inside each: fewest GPUs, then fewest workers."""
    est, spec = request.estimate, request.spec
    eligible = [(w, u) for w in cluster.ordered() if (u := cluster.usable(spec, w))]
    if len(eligible) < 2:
        return None
    limit = max(len(u) for _, u in eligible)
    options = sorted(((tp * pp, pp, tp) for tp in est.tp_candidates(limit)
                      for pp in range(2, min(len(eligible), MAX_PIPELINE_STAGES) + 1)))
    for _gpus, pp, tp in options:
        need = est.per_gpu(tp, pp)
        if not _affordable(request, gpus=tp * pp, vram_bytes=need * tp * pp):
            continue
        fits: list[tuple[tuple, WorkerSnapshot, list[int]]] = []
        for w, usable in eligible:
            if len(usable) < tp:
                continue
            chosen = _best_fit(w, usable, need, tp)
            if chosen is None:
                continue
            if spec.placement_strategy == "binpack":
                key: tuple = (max(w.gpu_free(i) for i in chosen), w.id)
            else:
                key = (locality.spread_rank(request, w), w.load(), w.id)
            fits.append((key, w, chosen))
        if len(fits) >= pp:
            fits.sort(key=lambda f: f[0])
            return gpu_placement(request, [(w, chosen) for _, w, chosen in fits[:pp]], need)
    return None


def _manual(request: Request, cluster: Cluster) -> Decision:
    spec, est = request.spec, request.estimate
    selection = spec.gpu_selector
    tp, pp = len(selection[0].gpu_indexes), len(selection)
    reasons: list[schemas.UnschedulableReason] = []
    if not est.allows_tp(tp):
        sizes = ", ".join(map(str, est.tp_sizes or ()))
        return [schemas.UnschedulableReason(
            reason="invalid_tensor_parallel_size", gpus_needed=tp,
            message=f"gpu_selector gives {tp} GPUs per worker; this model allows tensor-parallel sizes {sizes}"
                    f" ({est.heads} attention heads, {est.kv_heads} KV heads)")]
    need = est.per_gpu(tp, pp)
    parts: list[tuple[WorkerSnapshot, list[int]]] = []
    for item in selection:
        w = cluster.by_name(item.worker)
        if w is None:
            reasons.append(schemas.UnschedulableReason(worker=item.worker, reason="worker_not_found",
                                                       message=f"gpu_selector names worker {item.worker}, which is not registered"))
            continue
        problem = _worker_gate(spec, w)
        if problem is not None:
            reasons.append(problem)
            continue
        missing = [i for i in item.gpu_indexes if i not in w.gpu_total]
        if missing:
            reasons.append(schemas.UnschedulableReason(
                worker=w.name, reason="gpu_not_found", gpu=missing[0],
                message=f"no GPU {', '.join(map(str, missing))} here (GPUs: {', '.join(map(str, sorted(w.gpu_total))) or 'none'})"))
            continue
        refused = [i for i in item.gpu_indexes if not gpu_allowed(spec, w, i)]
        if refused:
            i = refused[0]
            reasons.append(schemas.UnschedulableReason(
                worker=w.name, reason="gpu_mismatch", gpu=i,
                message=f"GPU {i} ({w.gpu_names.get(i, '?')}, {w.gpu_vendors.get(i, '?')}) does not suit "
                        f"{_gpu_wish(spec)}"))
            continue
        short = [(w.gpu_free(i), i) for i in item.gpu_indexes if w.gpu_free(i) < need]
        if short:
            free, i = min(short)
            reasons.append(schemas.UnschedulableReason(
                worker=w.name, reason="insufficient_vram", gpu=i, need_bytes=need, free_bytes=free, gpus_needed=tp,
                gpus_fitting=tp - len(short),
                message=f"needs {gib(need)} on each of GPUs {item.gpu_indexes}; GPU {i} has {gib(free)} free"))
            continue
        parts.append((w, list(item.gpu_indexes)))
    if reasons:
        return reasons
    return gpu_placement(request, parts, need)


def plan(request: Request, cluster: Cluster) -> Decision:
    """Where one replica goes, or why it cannot go anywhere: its team's quota, else one reason per worker."""
    request.bind(cluster)
    if not cluster.workers:
        return [schemas.UnschedulableReason(reason="no_workers", message="no worker has registered")]
    over = quota_gate(request, cluster)
    if over:
        return over
    found = _search(request, cluster)
    if isinstance(found, Placement):
        cost = claim_cost(found.claim)
        if request.room is not None and not request.room.allows(cost.gpus, cost.vram_bytes, cost.ram_bytes):
            return quota_reasons(request.team, cluster, cost)  # a gpu_selector names exactly what it takes
        found.note = locality.note(request.holders, found.worker.id)
        return found
    if found is None and request.room is not None:
        # Nothing within the team's quota: would anything fit without it? Then the quota is the reason.
        room, request.room = request.room, None
        try:
            unlimited = _search(request, cluster)
        finally:
            request.room = room
        if isinstance(unlimited, Placement):
            return quota_reasons(request.team, cluster, claim_cost(unlimited.claim)) or unlimited
    return found if found is not None else locality.mark_holders(explain(request, cluster), request.holders, cluster)


def _search(request: Request, cluster: Cluster) -> Decision | None:
    """The placement steps in order; None when none fits (explain() then says why, per worker)."""
    spec, est = request.spec, request.estimate
    if spec.gpu_selector:
        return _manual(request, cluster)
    cpu_backend = spec.backend in CPU_BACKENDS and est.cpu_capable
    if spec.cpu_only:
        return _on_cpu(request, cluster, only_without_gpus=False)
    cluster.ensure_indexes()
    found = _on_gpus(request, cluster)
    if found is None and spec.partial_offload and cpu_backend:
        found = _partial_offload(request, cluster)
    if found is None and cpu_backend:
        found = _on_cpu(request, cluster, only_without_gpus=True)
    if found is None and spec.distributed:  # the spec's validator allows it for HF and custom backends only
        found = _distributed(request, cluster)
    return found


# --- team quotas: the filter before any worker is looked at ---------------------------------


def _affordable(request: Request, gpus: int = 0, vram_bytes: int = 0, ram_bytes: int = 0) -> bool:
    return request.room is None or request.room.allows(gpus, vram_bytes, ram_bytes)


def least_cost(request: Request) -> Usage:
    """The least any placement of this request claims: one replica, the GPUs of a gpu_selector (else
    one GPU unless it may run on a CPU), and the host RAM of a cpu_only model."""
    spec, est = request.spec, request.estimate
    if spec.gpu_selector:
        return Usage(gpus=len(spec.gpu_selector) * len(spec.gpu_selector[0].gpu_indexes), replicas=1)
    if spec.cpu_only:
        return Usage(ram_bytes=est.total(), replicas=1)
    on_cpu = spec.backend in CPU_BACKENDS and est.cpu_capable
    return Usage(gpus=0 if on_cpu else 1, replicas=1)


def quota_gate(request: Request, cluster: Cluster) -> list[schemas.UnschedulableReason]:
    """Sets `request.room` (what its team may still claim) and gives the quota_exceeded reasons when
    even the least this request could claim takes the team over a limit."""
    request.room = None
    team = request.team
    quota = cluster.quotas.get(team) if team is not None else None
    if quota is None:
        return []
    over = quota_reasons(team, cluster, least_cost(request))
    if over:
        return over
    used = cluster.used(team)  # type: ignore[arg-type]

    def left(limit: int | None, in_use: int) -> int | None:
        return None if limit is None else max(0, limit - in_use)

    request.room = Room(gpus=left(quota.gpus, used.gpus), vram_bytes=left(quota.vram_bytes, used.vram_bytes),
                        ram_bytes=left(quota.ram_bytes, used.ram_bytes))
    return []


_QUOTA_WORDS = {"gpus": "GPU", "vram_bytes": "GPU memory", "ram_bytes": "host RAM", "replicas": "replica"}


def quota_reasons(team: str | None, cluster: Cluster, need: Usage) -> list[schemas.UnschedulableReason]:
    """One quota_exceeded reason per limit that `need` on top of what the team holds goes over.
    A placement that adds nothing of a resource is never held back by that resource's limit."""
    quota = cluster.quotas.get(team) if team is not None else None
    if quota is None:
        return []
    used = cluster.used(team)  # type: ignore[arg-type]
    reasons = []
    for name in QUOTA_FIELDS:
        limit, wanted, held = getattr(quota, name), getattr(need, name), getattr(used, name)
        if limit is None or wanted <= 0 or held + wanted <= limit:
            continue
        show = gib if name.endswith("_bytes") else str
        reasons.append(schemas.UnschedulableReason(
            reason="quota_exceeded", team=team, quota=name, need=wanted, used=held, limit=limit,
            message=f"team {team}'s {_QUOTA_WORDS[name]} quota: this replica needs {show(wanted)}, "
                    f"its instances hold {show(held)} of {show(limit)}"))
    return reasons


# --- explanations -----------------------------------------------------------------------------


def _gpu_wish(spec: schemas.ModelSpec) -> str:
    wishes = []
    if spec.gpu_type:
        wishes.append(f"gpu_type={spec.gpu_type}")
    if spec.gpu_vendor:
        wishes.append(f"gpu_vendor={spec.gpu_vendor}")
    allowed = BACKEND_GPU_VENDORS.get(spec.backend)
    if allowed is not None:
        wishes.append(f"{spec.backend} (runs on {', '.join(sorted(allowed))} GPUs)")
    return " and ".join(wishes) or "this model"


def _gpu_inventory(w: WorkerSnapshot) -> str:
    names: dict[str, int] = {}
    for i in sorted(w.gpu_total):
        label = f"{w.gpu_names.get(i, 'GPU')} [{w.gpu_vendors.get(i, 'nvidia')}]"
        names[label] = names.get(label, 0) + 1
    return ", ".join(f"{n}x {label}" for label, n in names.items())


def _worker_gate(spec: schemas.ModelSpec, w: WorkerSnapshot) -> schemas.UnschedulableReason | None:
    if not w.ready:
        return schemas.UnschedulableReason(worker=w.name, reason="not_ready", message="worker is not ready")
    if w.cordoned:
        return schemas.UnschedulableReason(worker=w.name, reason="cordoned", message="worker is cordoned")
    if not selector_matches(spec, w):
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(spec.worker_selector.items()))
        has = ", ".join(f"{k}={w.labels[k]}" for k in sorted(spec.worker_selector) if k in w.labels) or "none of them"
        return schemas.UnschedulableReason(worker=w.name, reason="selector_mismatch",
                                           message=f"worker_selector wants {wanted}; this worker has {has}")
    return None


def _ram_reason(w: WorkerSnapshot, need: int, what: str = "host RAM") -> schemas.UnschedulableReason:
    free = w.ram_free()
    return schemas.UnschedulableReason(
        worker=w.name, reason="insufficient_ram", need_bytes=need, free_bytes=free,
        message=f"needs {gib(need)} of {what}, {gib(free)} free")


def _worker_reason(request: Request, cluster: Cluster, w: WorkerSnapshot) -> schemas.UnschedulableReason:
    spec, est = request.spec, request.estimate
    gate = _worker_gate(spec, w)
    if gate is not None:
        return gate
    cpu_backend = spec.backend in CPU_BACKENDS and est.cpu_capable
    if spec.cpu_only or (cpu_backend and not w.gpu_total):
        return _ram_reason(w, est.total())
    if not w.gpu_total:
        return schemas.UnschedulableReason(worker=w.name, reason="no_gpu",
                                           message=f"{spec.backend} needs a GPU and this worker has none")
    usable = cluster.usable(spec, w) or frozenset()
    if not usable:
        return schemas.UnschedulableReason(
            worker=w.name, reason="gpu_mismatch",
            message=f"no GPU here suits {_gpu_wish(spec)}; GPUs here: {_gpu_inventory(w)}")
    frees = sorted(((w.gpu_free(i), i) for i in usable), key=lambda f: (-f[0], f[1]))
    need1 = est.per_gpu(1)
    best_free, best_index = frees[0]
    if spec.partial_offload and cpu_backend:
        split = est.offload(best_free)
        if split is not None:
            layers, _vram, ram = split
            return _ram_reason(w, ram, what=f"host RAM for the {est.layers - layers} layers left off GPU {best_index}")
    k = min_tensor_parallel(request, w, usable)
    if k is not None and k > 1:
        need_k = est.per_gpu(k)
        fitting = sum(1 for f, _ in frees if f >= need_k)
        bottleneck_free, bottleneck = frees[k - 1]
        return schemas.UnschedulableReason(
            worker=w.name, reason="insufficient_vram", need_bytes=need_k, free_bytes=bottleneck_free, gpu=bottleneck,
            gpus_needed=k, gpus_fitting=fitting,
            message=f"needs {k} GPUs (tensor parallel) with {gib(need_k)} free each; {fitting} of {len(usable)} "
                    f"usable GPUs have that (the {k}th best: GPU {bottleneck}, {gib(bottleneck_free)} free)")
    if k is None:
        largest_gpu = max(w.gpu_total[i] - w.reserved_vram_bytes for i in usable)
        sizes = [n for n in est.tp_candidates(64) if n > 1]
        widest = max((n for n in sizes if n <= len(usable)), default=None)
        detail = f"; over {widest} GPUs {gib(est.per_gpu(widest))} each" if widest else ""
        if sizes:
            detail += f" (tensor-parallel sizes {', '.join(map(str, est.tp_candidates(64)))}; {len(usable)} usable GPUs here)"
        return schemas.UnschedulableReason(
            worker=w.name, reason="insufficient_vram", need_bytes=need1, free_bytes=best_free, gpu=best_index,
            message=f"too big for this worker even with its GPUs empty: needs {gib(need1)} on one GPU "
                    f"(largest here {gib(largest_gpu)}){detail}")
    return schemas.UnschedulableReason(
        worker=w.name, reason="insufficient_vram", need_bytes=need1, free_bytes=best_free, gpu=best_index,
        message=f"no GPU has {gib(need1)} free (best: GPU {best_index} with {gib(best_free)})")


def _distributed_reason(request: Request, cluster: Cluster) -> schemas.UnschedulableReason:
    """Why no set of workers takes it: the first split the hardware allows, and how many workers have room now."""
    est, spec = request.estimate, request.spec
    eligible = [(w, u) for w in cluster.ordered() if (u := cluster.usable(spec, w))]
    if len(eligible) < 2:
        return schemas.UnschedulableReason(
            reason="insufficient_vram_distributed",
            message=f"distributed needs at least 2 eligible workers; there are {len(eligible)}")
    limit = max(len(u) for _, u in eligible)
    options = sorted((tp * pp, pp, tp) for tp in est.tp_candidates(limit)
                     for pp in range(2, min(len(eligible), MAX_PIPELINE_STAGES) + 1))
    for _gpus, pp, tp in options:
        need = est.per_gpu(tp, pp)
        capable = [(w, u) for w, u in eligible if len(u) >= tp and
                   sorted((w.gpu_total[i] - w.reserved_vram_bytes for i in u), reverse=True)[tp - 1] >= need]
        if len(capable) < pp:
            continue
        ready = sum(1 for w, u in capable if _best_fit(w, u, need, tp) is not None)
        return schemas.UnschedulableReason(
            reason="insufficient_vram_distributed", need_bytes=need, gpus_needed=tp * pp, gpus_fitting=ready * tp,
            message=f"over {pp} workers x {tp} GPUs it needs {gib(need)} on each GPU: {len(capable)} workers could "
                    f"hold a stage, {ready} have that room free now")
    return schemas.UnschedulableReason(
        reason="insufficient_vram_distributed",
        message=f"no split over up to {min(len(eligible), MAX_PIPELINE_STAGES)} workers fits, even with every GPU empty")


def explain(request: Request, cluster: Cluster) -> list[schemas.UnschedulableReason]:
    reasons = [_worker_reason(request, cluster, w) for w in cluster.ordered()]
    spec = request.spec
    if spec.distributed:
        reasons.append(_distributed_reason(request, cluster))
    return reasons


_RESOURCE_REASONS = ("insufficient_vram", "insufficient_ram", "gpu_not_found", "invalid_tensor_parallel_size")


def summarize(reasons: list[schemas.UnschedulableReason], limit: int = 24) -> list[schemas.UnschedulableReason]:
    """Keep every reason on small clusters; on large ones the closest workers plus one line per kind."""
    if len(reasons) <= limit:
        return reasons
    general = [r for r in reasons if r.worker is None]
    per_worker = [r for r in reasons if r.worker is not None]

    def closeness(r: schemas.UnschedulableReason) -> tuple:
        resource = r.reason in _RESOURCE_REASONS
        gap = (r.need_bytes or 0) - (r.free_bytes or 0)
        return (not resource, gap, r.worker or "")

    per_worker.sort(key=closeness)
    kept, rest = per_worker[:limit], per_worker[limit:]
    counts: dict[str, int] = {}
    for r in rest:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    lines = [schemas.UnschedulableReason(reason=code, count=n, message=f"{n} more workers: {code.replace('_', ' ')}")
             for code, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return general + kept + lines


def failure_message(reasons: list[schemas.UnschedulableReason]) -> str:
    """One line for state_message: every reason when few, else counts per kind and the closest worker."""
    if len(reasons) <= 3:
        return "; ".join(f"{r.worker or 'cluster'}: {r.message}" for r in reasons)
    counts: dict[str, int] = {}
    for r in reasons:
        counts[r.reason] = counts.get(r.reason, 0) + (r.count or 1)
    summary = ", ".join(f"{n} {code.replace('_', ' ')}" for code, n in sorted(counts.items(), key=lambda i: -i[1]))
    first = next((r for r in reasons if r.worker and r.reason in _RESOURCE_REASONS), None)
    return summary + (f"; closest: {first.worker}: {first.message}" if first else "")


# --- the v0 entry point -------------------------------------------------------------------------


def place(need_bytes: int, spec: schemas.ModelSpec, workers: list[WorkerSnapshot]) -> Decision:
    """Place a fixed, unsplittable need (kept for callers that have a byte count, not an estimate)."""
    request = Request(spec, MemoryEstimate.fixed(need_bytes, cpu_capable=spec.backend in CPU_BACKENDS),
                      describe_estimate=False)
    return plan(request, Cluster(workers))


def evaluate(request: Request, cluster: Cluster, replicas: int) -> list[schemas.ReplicaPlacement]:
    """Place `replicas` replicas one after the other on `cluster` (a copy: its claims change)."""
    out: list[schemas.ReplicaPlacement] = []
    for n in range(replicas):
        result = plan(request, cluster)
        if isinstance(result, Placement):
            cluster.commit(result, request.model_key, request.team)
            out.append(schemas.ReplicaPlacement(replica=n, scheduled=True, worker=result.worker.name,
                                                claim=result.claim))
            continue
        reasons = summarize(result)
        # Capacity only shrinks from here: every later replica fails the same way.
        out.extend(schemas.ReplicaPlacement(replica=m, scheduled=False, reasons=reasons) for m in range(n, replicas))
        break
    return out
