"""Priority classes for the scheduler: each model's rank and floor, and the writes of a preemption.

Ranks come from the server config (`priority_classes`, highest first); a class no longer configured
ranks below all of them. The scheduler loads the models' policies with its snapshot and follows
them from the bus (kind `models`); the selection itself is server/scheduler/preemption.py.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from server import schemas
from server.config import DEFAULT_PRIORITY_CLASSES, priority_ranks
from server.db import tables
from server.events import record_event
from server.scheduler.preemption import ModelPolicy, Victim


def ranks_of(config: Any) -> dict[str, int]:
    """Class -> rank from the server config (a scheduler without one, as in bench/scheduler.py: the defaults)."""
    return priority_ranks(getattr(config, "priority_classes", None) or DEFAULT_PRIORITY_CLASSES)


def below_min(config: Any) -> bool:
    """Whether preemption may take a model below its min_replicas (MAAS_PREEMPT_BELOW_MIN_REPLICAS)."""
    return bool(getattr(config, "preempt_below_min_replicas", 0))


def policy_of(name: str, priority: str | None, min_replicas: int | None, max_replicas: int | None,
              ranks: dict[str, int]) -> ModelPolicy:
    priority = priority or "normal"
    floor = (min_replicas or 0) if max_replicas is not None else 0  # a manual model has no floor
    return ModelPolicy(name=name, rank=ranks.get(priority, 0), priority=priority, min_replicas=floor)


async def load_policies(session: Any, config: Any) -> dict[int, ModelPolicy]:
    ranks = ranks_of(config)
    rows = await session.execute(select(tables.Model.id, tables.Model.name, tables.Model.priority,
                                        tables.Model.min_replicas, tables.Model.max_replicas))
    return {r[0]: policy_of(r[1], r[2], r[3], r[4], ranks) for r in rows}


def apply_policy(policies: dict[int, ModelPolicy], action: str, obj: dict[str, Any], config: Any) -> bool:
    """A model's change from the bus; True when its rank or floor moved (a pass may now preempt)."""
    model_id = int(obj["id"])
    if action == "deleted":
        return policies.pop(model_id, None) is not None
    policy = policy_of(str(obj.get("name")), obj.get("priority"), obj.get("min_replicas"), obj.get("max_replicas"),
                       ranks_of(config))
    if policies.get(model_id) == policy:
        return False
    policies[model_id] = policy
    return True


async def write_preemptions(db: Any, victims: list[Victim], actor: str) -> None:
    """Drain the victims: terminating (out of routing at once, stopped after the agent's drain time), with why."""
    if not victims:
        return
    async with db.session() as s:
        for victim in victims:
            row = await s.get(tables.ModelInstance, victim.record.id)
            if row is None or row.state == schemas.InstanceState.terminating:
                continue
            row.state = schemas.InstanceState.terminating
            row.state_message = f"preempted_by {victim.by_model} (priority {victim.by_priority})"
            record_event(s, "instances", row, "Preempted", f"stopped for {victim.by_model} (priority "
                         f"{victim.by_priority}); drained before it stops", actor)
        await s.commit()


def dry_run_preemption(placements: list[schemas.ReplicaPlacement], state: Any, policies: dict[Any, ModelPolicy],
                       request: Any, name: str, priority: str, config: Any) -> int:
    """POST /v2/models/evaluate: for each replica that does not fit, what it would preempt (its reasons, first).
    How many would fit that way."""
    from types import SimpleNamespace

    from server.scheduler.preemption import PreemptionPass

    policies = {**policies, request.model_key: policy_of(name, priority, None, None, ranks_of(config))}
    preemption = PreemptionPass(state, policies, below_min(config), dry_run=True)
    record = SimpleNamespace(model_id=request.model_key, team=request.team)
    would = 0
    for n, placement in enumerate(placements):
        if not placement.scheduled and (reasons := preemption.place(record, request)) is not None:
            placements[n] = placement.model_copy(update={"reasons": reasons + placement.reasons})
            would += 1
    return would
