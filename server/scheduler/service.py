"""The scheduler loop: pending instances -> a snapshot of claims -> placement -> claims written."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import select

from server import schemas
from server.controllers.loop import ReconcileLoop
from server.db import tables
from server.events import record_event
from server.scheduler.estimate import estimate_bytes
from server.scheduler.placement import Placement, WorkerSnapshot, place

log = logging.getLogger(__name__)
S = schemas.InstanceState

# Instances whose claims still hold resources.
_CLAIMING = [S.scheduled, S.starting, S.running, S.error, S.unreachable, S.terminating]


def build_snapshot(workers: list[tables.Worker], claiming: list[tables.ModelInstance]) -> list[WorkerSnapshot]:
    snapshots = {
        w.id: WorkerSnapshot(
            id=w.id, name=w.name, address=w.address, ready=w.state == schemas.WorkerState.ready, cordoned=w.cordoned,
            ram_total=int(w.host.get("memory_total", 0)),
            gpu_total={int(g["index"]): int(g["memory_total"]) for g in w.gpus})
        for w in workers
    }
    for instance in claiming:
        snapshot = snapshots.get(instance.worker_id) if instance.worker_id is not None else None
        if snapshot is not None and instance.claim:
            snapshot.take(schemas.ResourceClaim.model_validate(instance.claim))
    return sorted(snapshots.values(), key=lambda w: w.id)


class Scheduler(ReconcileLoop):
    name = "scheduler"
    kinds = ("instances", "workers")

    async def reconcile(self) -> None:
        async with self.server.db.session() as s:
            pending = (await s.execute(select(tables.ModelInstance).where(
                tables.ModelInstance.state == S.pending).order_by(tables.ModelInstance.id))).scalars().all()
            if not pending:
                return
            workers = (await s.execute(select(tables.Worker))).scalars().all()
            claiming = (await s.execute(select(tables.ModelInstance).where(
                tables.ModelInstance.state.in_(_CLAIMING)))).scalars().all()
            snapshot = build_snapshot(list(workers), list(claiming))
            for instance in pending:
                spec = schemas.ModelSpec.model_validate(instance.spec)
                need = await asyncio.to_thread(estimate_bytes, spec)
                result = place(need, spec, snapshot)
                if isinstance(result, Placement):
                    result.worker.take(result.claim)
                    instance.state = S.scheduled
                    instance.worker_id = result.worker.id
                    instance.worker_name = result.worker.name
                    instance.address = result.worker.address
                    instance.claim = result.claim.model_dump(mode="json")
                    instance.schedule_reasons = []
                    where = f"GPU {result.claim.gpu_indexes}" if result.claim.device == "gpu" else "CPU"
                    instance.state_message = f"{result.worker.name} ({where}, {need / 2**20:.0f} MiB)"
                    record_event(s, "instances", instance, "Scheduled", instance.state_message, self.name)
                else:
                    reasons = [r.model_dump(mode="json") for r in result]
                    message = "; ".join(f"{r.worker or 'cluster'}: {r.message}" for r in result)
                    if instance.schedule_reasons != reasons:
                        instance.schedule_reasons = reasons
                        instance.state_message = f"unschedulable: {message}"
                        record_event(s, "instances", instance, "Unschedulable", message, self.name)
            await s.commit()
