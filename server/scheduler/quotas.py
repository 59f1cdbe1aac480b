"""Team quotas in the placement search: the filter before any worker is looked at (`quota_gate`), what
the team may still claim while options are searched (`affordable`), and the quota_exceeded reasons."""

from __future__ import annotations

from server import schemas
from server.scheduler.cluster import CPU_BACKENDS, QUOTA_FIELDS, Cluster, Request, Room, Usage, gib


def affordable(request: Request, gpus: int = 0, vram_bytes: int = 0, ram_bytes: int = 0) -> bool:
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
