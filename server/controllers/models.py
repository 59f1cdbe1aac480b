"""The model controller: keeps `replicas` instances per model, tears down deleted models."""

from __future__ import annotations

import secrets

from sqlalchemy import select

from server import schemas
from server.controllers.loop import ReconcileLoop
from server.db import tables
from server.events import record_event

S = schemas.InstanceState

# Which instances go first when scaling down: the least useful first.
_SCALE_DOWN_ORDER = [S.pending, S.error, S.unreachable, S.scheduled, S.starting, S.running]


def _removable_now(instance: tables.ModelInstance, worker_ready: bool) -> bool:
    """An instance nobody runs can be dropped without asking an agent."""
    return instance.worker_id is None or instance.state == S.pending or not worker_ready


class ModelController(ReconcileLoop):
    name = "model-controller"
    kinds = ("models", "instances", "workers")

    async def reconcile(self) -> None:
        async with self.server.db.session() as s:
            models = (await s.execute(select(tables.Model))).scalars().all()
            instances = (await s.execute(select(tables.ModelInstance))).scalars().all()
            ready_workers = set((await s.execute(select(tables.Worker.id).where(
                tables.Worker.state == schemas.WorkerState.ready))).scalars())
            by_model: dict[int, list[tables.ModelInstance]] = {}
            for instance in instances:
                by_model.setdefault(instance.model_id, []).append(instance)
            for model in models:
                own = by_model.get(model.id, [])
                if model.state == schemas.ModelState.deleting:
                    await self._tear_down(s, model, own, ready_workers)
                else:
                    self._keep_replicas(s, model, own)
            for instance in instances:
                if instance.state == S.terminating and _removable_now(instance, instance.worker_id in ready_workers):
                    await s.delete(instance)
            await s.commit()

    async def _tear_down(self, s, model: tables.Model, own: list[tables.ModelInstance], ready_workers: set[int]) -> None:
        remaining = 0
        for instance in own:
            if _removable_now(instance, instance.worker_id in ready_workers):
                await s.delete(instance)
                continue
            remaining += 1
            if instance.state != S.terminating:
                instance.state = S.terminating
                instance.state_message = "model deleted"
        if remaining == 0:
            await s.flush()  # instances first: there is no ORM relationship to order the deletes
            await s.delete(model)
            record_event(s, "models", model, "Deleted", "all instances stopped", "model-controller")

    def _keep_replicas(self, s, model: tables.Model, own: list[tables.ModelInstance]) -> None:
        active = [i for i in own if i.state != S.terminating]
        missing = model.replicas - len(active)
        for _ in range(missing):
            instance = tables.ModelInstance(
                name=f"{model.name}-{secrets.token_hex(3)}", model_id=model.id, model_name=model.name,
                generation=model.generation, spec=model.spec, state=S.pending)
            s.add(instance)
            record_event(s, "instances", instance, "Created", f"replica of {model.name} (generation {model.generation})",
                         "model-controller")
        if missing < 0:
            rank = {state: n for n, state in enumerate(_SCALE_DOWN_ORDER)}
            victims = sorted(active, key=lambda i: (rank.get(S(i.state), 0), -i.id))[: -missing]
            for instance in victims:
                instance.state = S.terminating
                instance.state_message = f"scaled down to {model.replicas}"
                record_event(s, "instances", instance, "ScaledDown", instance.state_message, "model-controller")
