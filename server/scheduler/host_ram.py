"""Placements in host RAM: llama.cpp (or any cpu_only model) on a worker's CPU, and llama.cpp's partial
offload (the layers one GPU holds, the rest in the same worker's RAM)."""

from __future__ import annotations

from server import schemas
from server.scheduler import locality
from server.scheduler.cluster import Cluster, Placement, Request, WorkerSnapshot, selector_matches
from server.scheduler.quotas import affordable


def cpu_placement(request: Request, w: WorkerSnapshot, need: int) -> Placement:
    return Placement(w, schemas.ResourceClaim(device="cpu", ram_bytes=need, estimate=request.estimate_out()))


def partially_offloaded(request: Request, cluster: Cluster) -> Placement | None:
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
            if ram > w.ram_free() or not affordable(request, gpus=1, vram_bytes=vram, ram_bytes=ram):
                continue
            count = locality.spread_rank(request, w)
            key = (-layers, count, w.load(), w.id, index) if spec.placement_strategy == "spread" \
                else (-layers, count % 2, w.gpu_free(index), w.id, index)
            if best is None or key < best[0]:
                claim = schemas.ResourceClaim(device="gpu", gpu_indexes=[index], vram_bytes_per_gpu=vram,
                                              ram_bytes=ram, gpu_layers=layers, estimate=request.estimate_out())
                best = (key, Placement(w, claim))
    return best[1] if best else None


def on_cpu(request: Request, cluster: Cluster, only_without_gpus: bool) -> Placement | None:
    spec, need = request.spec, request.estimate.total()
    if not affordable(request, ram_bytes=need):
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
