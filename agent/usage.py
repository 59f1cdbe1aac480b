"""What each instance's processes really use: host RSS of the process tree, and per GPU the memory
NVML attributes to those processes. Sent with heartbeats (server/memory_drift.py compares it with the
instance's claim).

The tree is the workload's main pid and all its descendants (a backend's launcher, its workers, a
container's processes: Docker's init pid is a host pid). NVML reports processes by host pid.
"""

from __future__ import annotations

from typing import Iterable

import psutil

from server.schemas import GPUDevice, InstanceUsage


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return []


def rss_of(processes: Iterable[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue  # it ended between the listing and the reading
    return total


def gpu_bytes_of(pids: set[int], gpus: Iterable[GPUDevice]) -> dict[int, int]:
    """GPU index -> bytes NVML attributes to `pids` (GPUs where none of them runs are left out)."""
    out: dict[int, int] = {}
    for gpu in gpus:
        used = [p.used_memory or 0 for p in gpu.processes if p.pid in pids]
        if used:
            out[gpu.index] = sum(used)
    return out


def instance_usage(instance_id: int, pid: int | None, gpus: list[GPUDevice]) -> InstanceUsage | None:
    """None when the instance has no live process here (starting in a container, already gone)."""
    if not pid:
        return None
    tree = process_tree(pid)
    if not tree:
        return None
    return InstanceUsage(instance_id=instance_id, ram_bytes=rss_of(tree),
                         gpu_bytes=gpu_bytes_of({p.pid for p in tree}, gpus))


def workloads_usage(workloads: Iterable, gpus: list[GPUDevice]) -> list[dict]:
    """The heartbeat's `usage`: every running workload's use, as wire dicts."""
    out = []
    for workload in workloads:
        if workload.state != "running" or workload.handle is None:
            continue
        try:
            pid = workload.handle.pid
        except Exception:  # a container that went away under us: no reading this time
            continue
        usage = instance_usage(workload.instance.id, pid, gpus)
        if usage is not None:
            out.append(usage.model_dump(mode="json"))
    return out
