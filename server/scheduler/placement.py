"""Placement on an in-memory snapshot: no I/O here.

v0 is first-fit: one GPU with room for the claim, else host RAM when the backend can
run on CPU. Reasons are collected per worker so `describe` can say why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server import schemas

GiB = 1024**3


def reserved_ram(total: int) -> int:
    """Host RAM kept for the system and the agent: 10% of it, at most 2 GiB."""
    return min(total // 10, 2 * GiB)


@dataclass
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

    def ram_free(self) -> int:
        return self.ram_total - reserved_ram(self.ram_total) - self.ram_claimed

    def gpu_free(self, index: int) -> int:
        return self.gpu_total[index] - self.gpu_claimed.get(index, 0)

    def take(self, claim: schemas.ResourceClaim) -> None:
        self.ram_claimed += claim.ram_bytes
        for index in claim.gpu_indexes:
            self.gpu_claimed[index] = self.gpu_claimed.get(index, 0) + claim.vram_bytes_per_gpu


@dataclass
class Placement:
    worker: WorkerSnapshot
    claim: schemas.ResourceClaim


CPU_BACKENDS = {"llama.cpp"}


def place(need_bytes: int, spec: schemas.ModelSpec,
          workers: list[WorkerSnapshot]) -> Placement | list[schemas.UnschedulableReason]:
    reasons: list[schemas.UnschedulableReason] = []
    if not workers:
        return [schemas.UnschedulableReason(reason="no_workers", message="no worker has registered")]
    for worker in workers:
        if not worker.ready:
            reasons.append(schemas.UnschedulableReason(worker=worker.name, reason="not_ready", message="worker is not ready"))
            continue
        if worker.cordoned:
            reasons.append(schemas.UnschedulableReason(worker=worker.name, reason="cordoned", message="worker is cordoned"))
            continue
        if not spec.cpu_only:
            best_free, best_index = -1, None
            for index in sorted(worker.gpu_total):
                free = worker.gpu_free(index)
                if free >= need_bytes:
                    claim = schemas.ResourceClaim(device="gpu", gpu_indexes=[index], vram_bytes_per_gpu=need_bytes)
                    return Placement(worker, claim)
                if free > best_free:
                    best_free, best_index = free, index
            if best_index is not None:
                reasons.append(schemas.UnschedulableReason(
                    worker=worker.name, reason="insufficient_vram", gpu=best_index, need_bytes=need_bytes,
                    free_bytes=best_free, message=f"no GPU has {need_bytes} bytes free (best: GPU {best_index} with {best_free})"))
        if spec.backend in CPU_BACKENDS and (spec.cpu_only or not worker.gpu_total):
            free = worker.ram_free()
            if free >= need_bytes:
                return Placement(worker, schemas.ResourceClaim(device="cpu", ram_bytes=need_bytes))
            reasons.append(schemas.UnschedulableReason(
                worker=worker.name, reason="insufficient_ram", need_bytes=need_bytes, free_bytes=free,
                message=f"needs {need_bytes} bytes of host RAM, {free} free"))
        elif spec.backend not in CPU_BACKENDS and not worker.gpu_total:
            reasons.append(schemas.UnschedulableReason(worker=worker.name, reason="no_gpu",
                                                       message=f"{spec.backend} needs a GPU and this worker has none"))
    return reasons
