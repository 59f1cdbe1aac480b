"""A scheduler claim, rendered two ways everywhere: a table cell and the full sentence for describe."""

from __future__ import annotations

from server import schemas

from maas_tui.render.format import gb, human_bytes, iec_bytes


def claim_cell(claim: schemas.ResourceClaim | None) -> str:
    """The PLACEMENT column: `gpu0,1 12.3G` (VRAM per GPU) or `cpu 1.2G` (RAM), `-` when unplaced."""
    if claim is None:
        return "-"
    if claim.device == "gpu":
        return f"gpu{','.join(map(str, claim.gpu_indexes))} {gb(claim.vram_bytes_per_gpu, 1)}G"
    return f"cpu {human_bytes(claim.ram_bytes)}"


def claim_text(claim: schemas.ResourceClaim | None) -> str:
    """The whole claim in words: GPUs and VRAM each, parallelism, other workers, layers, RAM."""
    if claim is None:
        return "-"
    if claim.device == "cpu":
        return f"CPU, {iec_bytes(claim.ram_bytes)} RAM"
    text = f"GPU {','.join(map(str, claim.gpu_indexes))} x {iec_bytes(claim.vram_bytes_per_gpu)}"
    if claim.tensor_parallel_size > 1 or claim.pipeline_parallel_size > 1:
        text += f" (tp={claim.tensor_parallel_size}, pp={claim.pipeline_parallel_size})"
    for sub in claim.subordinate_workers:
        text += f" + {sub.worker_name} GPU {','.join(map(str, sub.gpu_indexes))}"
    if claim.gpu_layers is not None:
        text += f", {claim.gpu_layers} layers on GPU, {iec_bytes(claim.ram_bytes)} in RAM"
    if claim.gpu_memory_utilization is not None:
        text += f", util {claim.gpu_memory_utilization:g}"
    return text
