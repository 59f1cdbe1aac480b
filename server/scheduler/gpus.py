"""Placement on the GPUs of one worker: one GPU, or several (tensor parallel; vLLM/SGLang sizes must
divide the attention heads, llama.cpp splits by layers), best-fit inside the worker, spread or binpack
across workers. Also builds the GPU claim that multi-worker and manual placements use too."""

from __future__ import annotations

import math
from bisect import bisect_left

from server import schemas
from server.scheduler import locality
from server.scheduler.cluster import Cluster, Placement, Request, WorkerSnapshot
from server.scheduler.quotas import affordable


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


def min_tensor_parallel(request: Request, w: WorkerSnapshot, usable: frozenset[int]) -> int | None:
    """The smallest tensor-parallel size whose per-GPU need fits this worker's usable GPUs when empty.

    A property of model and hardware, not of load: busy GPUs never make a model split wider.
    """
    cache = request.min_tp_cache
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


def best_fit(w: WorkerSnapshot, usable: frozenset[int], need: int, k: int) -> list[int] | None:
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
    spec, gpus = request.spec, cluster.free_gpus
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
    max_free = cluster.max_free
    for _load, worker_id in cluster.loads:
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
        chosen = best_fit(w, usable, need, k)
        if chosen is None:
            continue
        best = (count, w, chosen)
        if count == 0:
            break
    return gpu_placement(request, [(best[1], best[2])], need) if best else None


def _max_usable_gpus(request: Request, cluster: Cluster) -> int:
    if request.max_gpus_cache is None:
        request.max_gpus_cache = max(
            (len(u) for w in cluster.ordered() if (u := cluster.usable(request.spec, w, request.fkey))), default=0)
    return request.max_gpus_cache


def on_gpus(request: Request, cluster: Cluster) -> Placement | None:
    est = request.estimate
    binpack = request.spec.placement_strategy == "binpack"
    limit = _max_usable_gpus(request, cluster)
    for k in est.tp_candidates(limit):
        need = est.per_gpu(k)
        if not affordable(request, gpus=k, vram_bytes=need * k):
            continue
        found = (binpack and request.holders and _binpack_gpus(request, cluster, need, k, request.holders)) or (
            _binpack_gpus(request, cluster, need, k) if binpack else _spread_gpus(request, cluster, need, k))
        if found is not None:
            return found
    return None
