"""Worker liveness, judged by the leader from leases (server/liveness.py): a worker not heard of for
`worker_timeout` seconds -> not_ready, its instances unreachable.

Each tick reads the ready workers' last-seen times (flushed in batches by whichever server took their
heartbeats) and this server's own heartbeats, and renews the leases from them. The leases start at
this controller's first tick: a new leader, or a restarted server, gives every worker a full timeout.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from sqlalchemy import select

from server import schemas
from server.reconcile import ReconcileLoop
from server.db import tables
from server.events import record_event
from server.liveness import Leases, too_many_at_once

log = logging.getLogger(__name__)

S = schemas.InstanceState


class WorkerLivenessController(ReconcileLoop):
    name = "worker-liveness"
    kinds = ()  # time-driven only

    # A tick this much later than planned means this server was stalled (overloaded, paused): the
    # heartbeats it did not read meanwhile are not the workers' fault (Leases.excuse).
    STALL_SECONDS = 1.0

    def __init__(self, server, interval: float):
        super().__init__(server, interval)
        self.leases: Leases | None = None
        self._planned: float | None = None  # when the next tick should come
        self.excused = 0.0
        self.disruptions = 0  # ticks that found too many workers silent at once to believe it

    async def reconcile(self) -> None:
        now = time.monotonic()
        if self.leases is None:
            self.leases = Leases(taken_over_at=now)
        elif self._planned is not None and now - self._planned > self.STALL_SECONDS:
            self.leases.excuse(now - self._planned, now)
            self.excused += now - self._planned
        try:
            await self._judge(now)
        finally:
            self._planned = time.monotonic() + self.interval

    async def _judge(self, now: float) -> None:
        timeout = self.server.config.worker_timeout
        heard = self.server.heartbeats.heard if self.server.heartbeats else {}
        async with self.server.db.session() as s:
            rows = (await s.execute(select(tables.Worker.id, tables.Worker.last_heartbeat_at).where(
                tables.Worker.state == schemas.WorkerState.ready))).all()
        wall = datetime.now(UTC)
        for worker_id, seen in rows:
            self.leases.renew_from_store(worker_id, seen, now, wall)
            if (local := heard.get(worker_id)) is not None:
                self.leases.renew(worker_id, local)
        ready = [worker_id for worker_id, _ in rows]
        self.leases.forget(ready)
        expired = self.leases.expired(ready, timeout, time.monotonic())
        if too_many_at_once(len(expired), len(ready)):
            # As Kubernetes' node controller in a full disruption: most of the cluster falling silent in
            # the same tick says more about this server (overloaded, cut off) than about the workers.
            self.disruptions += 1
            log.warning("%d of %d ready workers unheard for %g s at once: not marking them not_ready (this "
                        "server is probably overloaded or cut off from them); they are judged again next tick",
                        len(expired), len(ready), timeout)
            return
        if expired:
            await self._mark_not_ready(expired, timeout)

    async def _mark_not_ready(self, worker_ids: list[int], timeout: float) -> None:
        async with self.server.db.session() as s:
            workers = (await s.execute(select(tables.Worker).where(
                tables.Worker.id.in_(worker_ids), tables.Worker.state == schemas.WorkerState.ready))).scalars().all()
            for worker in workers:
                worker.state = schemas.WorkerState.not_ready
                worker.state_message = f"no heartbeat for {timeout:g} s"
                record_event(s, "workers", worker, "NotReady", worker.state_message, self.name)
                instances = (await s.execute(select(tables.ModelInstance).where(
                    tables.ModelInstance.worker_id == worker.id,
                    tables.ModelInstance.state.in_([S.scheduled, S.downloading, S.starting, S.running, S.error])))).scalars()
                for instance in instances:
                    instance.state = S.unreachable
                    instance.state_message = f"worker {worker.name} stopped answering"
            await s.commit()
