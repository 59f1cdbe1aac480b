"""The model controller: keeps `replicas` instances per model, rolls generations over,
restarts failed instances with backoff, replaces those of lost workers, tears down
deleted models.

It reconciles the models that changed: a model's own change or one of its instances' queues that
model (server/reconcile.py KeyedReconcileLoop); a worker change queues everything only when the
worker's state or draining flag moved (heartbeats are no events at all: server/liveness.py). A
backoff or grace period queues the model again when it ends. A full pass every resync interval is
the safety net.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from typing import Any, Iterable

from sqlalchemy import select

from server import schemas
from server.reconcile import ALL, KeyedReconcileLoop
from server.controllers.rollout import InstanceView, gate_pending, plan
from server.db import tables
from server.events import record_event
from server.scheduler.preemption import PREEMPTED_BY

S = schemas.InstanceState


CREATE_BATCH = 50  # new replicas per transaction (see ModelController._reconcile)
_PROBE_FRESH = 5.0  # seconds a gateway probe's answer counts as "the backend is alive"


def _removable_now(instance: tables.ModelInstance, worker_ready: bool) -> bool:
    """An instance nobody runs can be dropped without asking an agent."""
    return instance.worker_id is None or instance.state == S.pending or not worker_ready


def _age(moment: datetime, now: datetime) -> float:
    return (now - (moment if moment.tzinfo else moment.replace(tzinfo=UTC))).total_seconds()


class ModelController(KeyedReconcileLoop):
    name = "model-controller"
    kinds = ("models", "instances", "workers")

    def __init__(self, server: Any, interval: float):
        super().__init__(server, interval)
        self._workers: dict[int, tuple[str, bool]] = {}  # what of a worker matters here: state, draining
        self._creations: list[tuple[tables.ModelInstance, str]] = []  # replicas this pass adds, with their event

    def keys_of(self, event: Any) -> Iterable[int] | object:
        obj = event.object
        if event.kind == "models":
            return (obj["id"],)
        if event.kind == "instances":
            return (obj["model_id"],) if obj.get("model_id") is not None else ()
        # workers: only a move of state or draining changes what this controller does
        if event.action == "deleted":
            self._workers.pop(obj["id"], None)
            return ALL
        seen = (obj.get("state"), bool(obj.get("draining")))
        before = self._workers.get(obj["id"])
        self._workers[obj["id"]] = seen
        return () if before == seen or (before is None and seen == ("ready", False)) else ALL

    async def reconcile(self) -> None:
        await self._reconcile(None)

    async def reconcile_keys(self, keys: set[int]) -> None:
        await self._reconcile(keys)

    async def _reconcile(self, model_ids: set[int] | None) -> None:
        """Reconcile these models (None: all of them)."""
        now = datetime.now(UTC)
        self._now = asyncio.get_running_loop().time()
        self._creations = []
        async with self.server.db.session() as s:
            model_query, instance_query = select(tables.Model), select(tables.ModelInstance)
            if model_ids is not None:
                model_query = model_query.where(tables.Model.id.in_(model_ids))
                instance_query = instance_query.where(tables.ModelInstance.model_id.in_(model_ids))
            models = (await s.execute(model_query)).scalars().all()
            instances = (await s.execute(instance_query)).scalars().all()
            ready_workers = set((await s.execute(select(tables.Worker.id).where(
                tables.Worker.state == schemas.WorkerState.ready))).scalars())
            draining = set((await s.execute(select(tables.Worker.id).where(tables.Worker.draining))).scalars())
            if model_ids is None:
                self._workers = {w: ("ready", w in draining) for w in ready_workers}
            by_model: dict[int, list[tables.ModelInstance]] = {}
            for instance in instances:
                by_model.setdefault(instance.model_id, []).append(instance)
            for model in models:
                own = by_model.get(model.id, [])
                if model.state == schemas.ModelState.deleting:
                    await self._tear_down(s, model, own, ready_workers)
                    continue
                own = [i for i in own if not await self._heal(s, i, ready_workers, now)]
                self._keep_replicas(s, model, own, draining)
            for instance in instances:
                if instance.state == S.terminating and _removable_now(instance, instance.worker_id in ready_workers):
                    await s.delete(instance)
            # New replicas go in transactions of CREATE_BATCH: a deploy of 500 in one transaction reached
            # the watchers (the TUI) half a second after its first row was written, in batches each is out
            # in tens of ms, and the scheduler starts placing the first ones meanwhile. The first batch
            # commits with the rest of the pass; a failure leaves the later ones to the next pass.
            creations, self._creations = self._creations, []
            for start in range(0, max(1, len(creations)), CREATE_BATCH):
                for instance, event_message in creations[start:start + CREATE_BATCH]:
                    s.add(instance)
                    record_event(s, "instances", instance, "Created", event_message, self.name)
                await s.commit()

    def _wake_in(self, model_id: int, seconds: float) -> None:
        self.queue.add_after(model_id, seconds, self._now)

    async def _heal(self, s, instance: tables.ModelInstance, ready_workers: set[int], now: datetime) -> bool:
        """Restart a failed instance after its backoff, or replace it; True when it was removed."""
        config = self.server.config
        if instance.state == S.unreachable:
            waited = _age(instance.updated_at, now)
            if waited < config.reschedule_after:
                self._wake_in(instance.model_id, config.reschedule_after - waited)
                return False
            # A silent agent is not a dead backend: while the gateway's probes get answers, the instance
            # serves on and a restarted agent adopts it (server/gateway/routing_table.py).
            if (waited < config.replace_serving_after
                    and self.server.routes.backend_answers(instance.id, within=_PROBE_FRESH) is not False):
                if self.server.routes.backend_answers(instance.id, within=_PROBE_FRESH):
                    self._wake_in(instance.model_id, min(config.reschedule_after, config.replace_serving_after - waited))
                    return False
                if waited < config.reschedule_after + _PROBE_FRESH:  # not probed yet: give the probes a moment
                    self._wake_in(instance.model_id, _PROBE_FRESH)
                    return False
            why = ("its backend does not answer" if waited < config.replace_serving_after
                   else "its backend still answers, but the worker has been gone too long")
            record_event(s, "instances", instance, "Rescheduled",
                         f"worker {instance.worker_name} unreachable for {waited:.0f} s and {why}; replacing the instance",
                         self.name)
            await s.delete(instance)
            return True
        if instance.state != S.error or instance.worker_id not in ready_workers:
            return False
        backoff = min(config.restart_backoff * 2 ** instance.restart_count, config.restart_backoff_max)
        waited = _age(instance.updated_at, now)
        if waited < backoff:
            self._wake_in(instance.model_id, backoff - waited)
            return False
        if instance.restart_count >= config.max_restarts:
            record_event(s, "instances", instance, "Replaced",
                         f"failed {instance.restart_count + 1} times on {instance.worker_name}; a new instance replaces it",
                         self.name)
            await s.delete(instance)
            return True
        instance.restart_count += 1
        instance.state = S.scheduled
        last_error = instance.state_message.splitlines()[0] if instance.state_message else "error"
        instance.state_message = f"restart {instance.restart_count} after: {last_error}"
        record_event(s, "instances", instance, "Restarting",
                     f"attempt {instance.restart_count} after {backoff:g} s backoff; last error: {last_error}", self.name)
        return False

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

    def _keep_replicas(self, s, model: tables.Model, own: list[tables.ModelInstance], draining: set[int]) -> None:
        # Outdated: an older generation, or on a draining worker. Both move with the rollout rules.
        views = [InstanceView(i.id, i.state, outdated=i.generation < model.generation or i.worker_id in draining)
                 for i in own]
        decision = plan(model.replicas, views, model.max_surge, model.max_unavailable, model.paused,
                        hold_new=gate_pending(model.bench_gate, model.bench_gate_generation, model.generation))
        self._note_stall(s, model, own)
        # A replacement for a preempted instance says so while it waits (server/scheduler/preemption.py).
        preempted = [i.state_message for i in own if i.state == S.terminating
                     and (i.state_message or "").startswith(PREEMPTED_BY)]
        for n in range(decision.create):
            instance = tables.ModelInstance(
                name=f"{model.name}-{secrets.token_hex(3)}", model_id=model.id, model_name=model.name,
                team=model.team, generation=model.generation, spec=model.spec, state=S.pending)
            if n < len(preempted):
                instance.state_message = preempted[n]
                instance.schedule_reasons = [{"reason": PREEMPTED_BY, "message": preempted[n].replace("_", " ", 1)}]
            # Added to the session by _reconcile, in batches.
            self._creations.append((instance, f"replica of {model.name} (generation {model.generation})"))
        by_id = {i.id: i for i in own}
        for instance_id in decision.remove:
            instance = by_id[instance_id]
            if instance.generation < model.generation:
                reason, instance.state_message = "Replaced", f"replaced by generation {model.generation}"
            elif instance.worker_id in draining:
                reason, instance.state_message = "Drained", f"moved off draining worker {instance.worker_name}"
            else:
                reason, instance.state_message = "ScaledDown", f"scaled down to {model.replicas}"
            instance.state = S.terminating
            record_event(s, "instances", instance, reason, instance.state_message, self.name)

    def _note_stall(self, s, model: tables.Model, own: list[tables.ModelInstance]) -> None:
        """A rollout whose new instances keep failing stops progressing by itself (old instances
        stay, since they are removed only as new ones run); say why on the model."""
        failing = [i for i in own if i.generation == model.generation and i.state == S.error and i.restart_count >= 1]
        outdated = any(i.generation < model.generation for i in own)
        message = ""
        if failing and outdated:
            first = failing[0]
            why = first.state_message.splitlines()[0] if first.state_message else "error"
            message = (f"rollout to generation {model.generation} stalled: {first.name} keeps failing ({why}); "
                       f"older instances keep serving; 'maas model rollout undo {model.name}' goes back")
        if message != model.rollout_message and not (model.paused and model.rollout_message):  # a pause keeps its reason
            model.rollout_message = message
            if message:
                record_event(s, "models", model, "RolloutStalled", message, self.name)
