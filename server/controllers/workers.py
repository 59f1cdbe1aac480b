"""Worker liveness: no heartbeat for `worker_timeout` seconds -> not_ready, its instances unreachable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from server import schemas
from server.controllers.loop import ReconcileLoop
from server.db import tables
from server.events import record_event

S = schemas.InstanceState


class WorkerLivenessController(ReconcileLoop):
    name = "worker-liveness"
    kinds = ()  # time-driven only

    async def reconcile(self) -> None:
        deadline = datetime.now(UTC) - timedelta(seconds=self.server.config.worker_timeout)
        async with self.server.db.session() as s:
            workers = (await s.execute(select(tables.Worker).where(
                tables.Worker.state == schemas.WorkerState.ready))).scalars().all()
            for worker in workers:
                seen = worker.last_heartbeat_at
                if seen is not None and seen.tzinfo is None:
                    seen = seen.replace(tzinfo=UTC)
                if seen is not None and seen >= deadline:
                    continue
                worker.state = schemas.WorkerState.not_ready
                worker.state_message = f"no heartbeat for {self.server.config.worker_timeout:g} s"
                record_event(s, "workers", worker, "NotReady", worker.state_message, self.name)
                instances = (await s.execute(select(tables.ModelInstance).where(
                    tables.ModelInstance.worker_id == worker.id,
                    tables.ModelInstance.state.in_([S.scheduled, S.downloading, S.starting, S.running, S.error])))).scalars()
                for instance in instances:
                    instance.state = S.unreachable
                    instance.state_message = f"worker {worker.name} stopped answering"
            await s.commit()
