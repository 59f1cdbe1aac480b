"""Rollout progress: the one definition, used by the server (`GET /v2/models/{name}/rollout`, the
rollout controller's view of it) and by the TUI and CLI, which compute it from the instances they hold.

Pure: it works on anything with the attributes below (database rows or wire objects alike).
"""

from __future__ import annotations

from typing import Any, Iterable

from server.schemas import InstanceState, RolloutStatus


def rollout_status(model: Any, instances: Iterable[Any]) -> RolloutStatus:
    """`model` has name, generation, replicas, paused, rollout_message; each instance generation and state.

    updated: not-terminating instances of the newest generation; ready: those running; outdated: instances
    of older generations still present; complete: exactly `replicas` instances, all new and running.
    """
    instances = list(instances)
    active = [i for i in instances if i.state != InstanceState.terminating]
    updated = [i for i in active if i.generation == model.generation]
    ready = sum(1 for i in updated if i.state == InstanceState.running)
    outdated = sum(1 for i in instances if i.generation < model.generation)
    complete = ready == model.replicas and len(active) == model.replicas and not outdated
    return RolloutStatus(
        model=model.name, generation=model.generation, replicas=model.replicas, updated=len(updated), ready=ready,
        available=sum(1 for i in active if i.state == InstanceState.running), outdated=outdated,
        paused=model.paused, complete=complete, message=model.rollout_message or "")


def rollout_in_progress(status: RolloutStatus) -> bool:
    """Whether a rollout is under way to show: old instances remain, or it is paused or stalled (a plain
    scale-up or a crashed replica is not a rollout, though `complete` is false then too)."""
    return status.outdated > 0 or status.paused or bool(status.message)
