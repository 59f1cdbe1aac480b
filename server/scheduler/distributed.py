"""Placement across workers (vLLM/SGLang/custom backends with distributed): pipeline stages on several
workers, tensor parallel inside each, fewest GPUs first; and why no set of workers takes a model."""

from __future__ import annotations

from server import schemas
from server.scheduler import locality
from server.scheduler.cluster import MAX_PIPELINE_STAGES, Cluster, Placement, Request, WorkerSnapshot, gib
from server.scheduler.gpus import best_fit, gpu_placement
from server.scheduler.quotas import affordable


def across_workers(request: Request, cluster: Cluster) -> Placement | None:
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
        if not affordable(request, gpus=tp * pp, vram_bytes=need * tp * pp):
            continue
        fits: list[tuple[tuple, WorkerSnapshot, list[int]]] = []
        for w, usable in eligible:
            if len(usable) < tp:
                continue
            chosen = best_fit(w, usable, need, tp)
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


def across_workers_reason(request: Request, cluster: Cluster) -> schemas.UnschedulableReason:
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
        ready = sum(1 for w, u in capable if best_fit(w, u, need, tp) is not None)
        return schemas.UnschedulableReason(
            reason="insufficient_vram_distributed", need_bytes=need, gpus_needed=tp * pp, gpus_fitting=ready * tp,
            message=f"over {pp} workers x {tp} GPUs it needs {gib(need)} on each GPU: {len(capable)} workers could "
                    f"hold a stage, {ready} have that room free now")
    return schemas.UnschedulableReason(
        reason="insufficient_vram_distributed",
        message=f"no split over up to {min(len(eligible), MAX_PIPELINE_STAGES)} workers fits, even with every GPU empty")
