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

This module is the search itself (`plan`: the steps in the order above, manual placement) and its
entry points. Each kind of placement is a module of its own: gpus.py (one worker's GPUs), host_ram.py
(CPU, partial offload), distributed.py (several workers); with cluster.py (the snapshot it walks:
workers, claims, requests, filters), quotas.py (team quotas), reasons.py (why not), locality.py (the
file-locality score) and preemption.py. The names callers use are importable from here.
"""

from __future__ import annotations

from server import schemas
from server.scheduler import locality
from server.scheduler.cluster import (CPU_BACKENDS, Cluster, Decision, Placement, Request, WorkerSnapshot, claim_cost,
                                      gib, gpu_allowed)
from server.scheduler.distributed import across_workers
from server.scheduler.estimate import MemoryEstimate
from server.scheduler.gpus import gpu_placement, on_gpus
from server.scheduler.host_ram import on_cpu, partially_offloaded
from server.scheduler.quotas import quota_gate, quota_reasons
from server.scheduler.reasons import explain, gpu_wish, summarize, worker_gate

# Importable from here as before the split (service.py, snapshot.py, preemption.py, the API and the tests).
from server.scheduler.cluster import (BACKEND_GPU_VENDORS, GiB, MAX_PIPELINE_STAGES, QUOTA_FIELDS, Room,  # noqa: F401
                                      Usage, filter_key, reserved_ram, selector_matches)
from server.scheduler.gpus import min_tensor_parallel  # noqa: F401
from server.scheduler.host_ram import cpu_placement  # noqa: F401
from server.scheduler.quotas import least_cost  # noqa: F401
from server.scheduler.reasons import failure_message  # noqa: F401

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
        problem = worker_gate(spec, w)
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
                        f"{gpu_wish(spec)}"))
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
        return on_cpu(request, cluster, only_without_gpus=False)
    cluster.ensure_indexes()
    found = on_gpus(request, cluster)
    if found is None and spec.partial_offload and cpu_backend:
        found = partially_offloaded(request, cluster)
    if found is None and cpu_backend:
        found = on_cpu(request, cluster, only_without_gpus=True)
    if found is None and spec.distributed:  # the spec's validator allows it for HF and custom backends only
        found = across_workers(request, cluster)
    return found


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
