"""Replica and rollout arithmetic: which instances to create and which to remove. Pure.

An instance is outdated when it belongs to an older generation of its model (or sits
on a draining worker). Outdated instances are replaced a few at a time: at most
`max_surge` instances above `replicas`, never fewer than `replicas - max_unavailable`
running ones, so a rollout with surge 1 and unavailable 0 keeps full capacity.

A model with a bench gate holds its rollout after the new generation's first replica until the gate has
judged it (`hold_new`, see `gate_pending`): one new instance, no running old one removed. The gate
(server/controllers/bench_gate.py) then lets the rollout go on or pauses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUNNING = "running"
TERMINATING = "terminating"
# Which instances go first when there are too many: the least useful first.
_REMOVAL_ORDER = ["pending", "error", "unreachable", "scheduled", "downloading", "starting", "running"]


@dataclass(frozen=True)
class InstanceView:
    id: int
    state: str
    outdated: bool = False


@dataclass
class Plan:
    create: int = 0
    remove: list[int] = field(default_factory=list)


def _least_useful_first(instances: list[InstanceView]) -> list[InstanceView]:
    rank = {state: n for n, state in enumerate(_REMOVAL_ORDER)}
    return sorted(instances, key=lambda i: (rank.get(i.state, 0), -i.id))


def gate_pending(gate: dict | None, judged_generation: int, generation: int) -> bool:
    """Whether a bench gate still has to judge `generation` (the rollout holds until it has)."""
    return bool(gate) and judged_generation < generation


def plan(replicas: int, instances: list[InstanceView], max_surge: int = 1, max_unavailable: int = 0,
         paused: bool = False, hold_new: bool = False) -> Plan:
    if max_surge < 0 or max_unavailable < 0 or (max_surge == 0 and max_unavailable == 0):
        raise ValueError("max_surge and max_unavailable must be >= 0 and not both 0")
    active = [i for i in instances if i.state != TERMINATING]
    current = [i for i in active if not i.outdated]
    outdated = [i for i in active if i.outdated]
    result = Plan()
    if outdated and paused:  # a paused rollout freezes the model as it is
        return result
    if not outdated:
        if len(current) < replicas:
            result.create = replicas - len(current)
        elif len(current) > replicas:
            result.remove = [i.id for i in _least_useful_first(current)[: len(current) - replicas]]
        return result

    # Rolling: grow the new generation within the surge...
    result.create = max(0, min(replicas - len(current), replicas + max_surge - len(active)))
    if hold_new:  # the bench gate judges one new instance before there are more
        result.create = min(result.create, max(0, 1 - len(current)))
    # ...drop outdated instances that serve nothing at once, and running ones while enough others run.
    result.remove = [i.id for i in outdated if i.state != RUNNING]
    if hold_new and any(i.state == RUNNING for i in current):
        return result  # the first new replica runs: the old ones stay until the gate has judged it
    spare = sum(1 for i in active if i.state == RUNNING) - (replicas - max_unavailable)
    for instance in sorted((i for i in outdated if i.state == RUNNING), key=lambda i: i.id):
        if spare <= 0:
            break
        result.remove.append(instance.id)
        spare -= 1
    if len(current) > replicas:  # scaled down during the rollout
        result.remove += [i.id for i in _least_useful_first(current)[: len(current) - replicas]]
    return result
