"""Why a replica fits nowhere: one structured reason per worker (`explain`), the summary kept on large
clusters (`summarize`) and the one line of an instance's state_message (`failure_message`)."""

from __future__ import annotations

from server import schemas
from server.scheduler.cluster import (BACKEND_GPU_VENDORS, CPU_BACKENDS, Cluster, Request, WorkerSnapshot, gib,
                                      selector_matches)
from server.scheduler.distributed import across_workers_reason
from server.scheduler.gpus import min_tensor_parallel


def gpu_wish(spec: schemas.ModelSpec) -> str:
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


def worker_gate(spec: schemas.ModelSpec, w: WorkerSnapshot) -> schemas.UnschedulableReason | None:
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
    gate = worker_gate(spec, w)
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
            message=f"no GPU here suits {gpu_wish(spec)}; GPUs here: {_gpu_inventory(w)}")
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


def explain(request: Request, cluster: Cluster) -> list[schemas.UnschedulableReason]:
    reasons = [_worker_reason(request, cluster, w) for w in cluster.ordered()]
    spec = request.spec
    if spec.distributed:
        reasons.append(across_workers_reason(request, cluster))
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
