"""Priorities and preemption: which running instances to stop so that a more important one fits.

A pending instance that cannot be placed may take the place of instances of strictly lower priority
classes (server config `priority_classes`, highest first). The maths (`choose_victims`) is pure, over
an oracle `fits(victims)` that says whether the instance could be placed once those victims are gone,
as Kubernetes' scheduler does it: per worker, start from every instance that may go (lowest class
first, never taking a model below its `min_replicas` unless configured), and when the instance fits
without them all, give back (reprieve) as many as possible, the most important first. What is left
is the fewest that are needed: none of them can be spared (a property test checks it). Among
workers, the set whose most important victim is the least important wins, then the smallest set.

`PreemptionPass` runs this during one scheduler pass over a copy of the cluster in which instances
already terminating are gone (`future`): an instance that fits there only waits for them (no new
victims), and each decision takes its room in that copy, so two pending instances never count on the
same victims. The victims are drained like any removed instance (terminating: out of the routing
table at once, stopped after the agent's drain time); their replacements wait as pending with the
reason `preempted_by`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from server import schemas
from server.scheduler.placement import Cluster, Placement, Request, Usage, plan

PREEMPTED_BY = "preempted_by"  # the reason on a preempted model's replacement instance
PREEMPTING = "preempting"  # the reason on an instance waiting for its victims to stop


@dataclass(frozen=True)
class Candidate:
    id: int
    model: Any  # the model's key (its id)
    rank: int  # priority: higher is more important


def choose_victims(candidates: Iterable[Candidate], rank: int, fits: Callable[[frozenset[int]], bool],
                   allowance: dict[Any, int]) -> list[Candidate] | None:
    """The victims among `candidates` (on one worker) that let an instance of priority `rank` fit, or None.

    Only candidates of a strictly lower rank; at most `allowance[model]` of each model (its instances
    above its floor). The result fits, and no victim in it can be given back without it not fitting."""
    left = dict(allowance)
    chosen: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.rank, -c.id)):  # lowest first, newest first
        if candidate.rank >= rank or left.get(candidate.model, 0) <= 0:
            continue
        left[candidate.model] -= 1
        chosen.append(candidate)
    if not chosen or not fits(frozenset(c.id for c in chosen)):
        return None
    # Reprieve: the most important (then the oldest) first, each one kept when the rest still make room.
    for candidate in sorted(chosen, key=lambda c: (-c.rank, c.id)):
        trial = [c for c in chosen if c is not candidate]
        if fits(frozenset(c.id for c in trial)):
            chosen = trial
    return chosen


def better(a: list[Candidate], b: list[Candidate] | None) -> bool:
    """Whether victim set `a` is preferable to `b`: a less important top victim, then fewer, then less rank."""
    if b is None:
        return True
    key = lambda s: (max(c.rank for c in s), len(s), sum(c.rank for c in s))  # noqa: E731
    return key(a) < key(b)


def keep_preempted_by(previous: list[Any], reasons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A preempted model's replacement keeps saying why it waits (`preempted_by` first) among fresh reasons."""
    kept = [r for r in previous or [] if isinstance(r, dict) and r.get("reason") == PREEMPTED_BY]
    return kept[:1] + [r for r in reasons if r.get("reason") != PREEMPTED_BY]


# --- one scheduler pass ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPolicy:
    name: str
    rank: int
    priority: str
    min_replicas: int  # 0 for a manual model


@dataclass
class Victim:
    record: Any  # InstanceRecord
    by_model: str
    by_priority: str


class PreemptionPass:
    """Preemption decisions for one scheduler pass over `state` (server/scheduler/snapshot.py ClusterState)."""

    def __init__(self, state: Any, policies: dict[Any, ModelPolicy], below_min: bool = False, dry_run: bool = False):
        self.state = state
        self.dry_run = dry_run  # wording: "would preempt" (POST /v2/models/evaluate)
        self.policies = policies
        self.below_min = below_min
        self.victims: list[Victim] = []
        self._future: Cluster | None = None
        self._taken: set[int] = set()
        self._holders: list[Any] | None = None  # instances holding claims, not terminating (made once per pass)
        self._lowest = 0  # the least important rank among them

    def policy(self, model_id: int) -> ModelPolicy | None:
        return self.policies.get(model_id)

    def rank(self, model_id: int) -> int:
        policy = self.policies.get(model_id)
        return policy.rank if policy is not None else 0

    def _holding(self) -> list[Any]:
        return [r for r in self.state.instances.values() if r.holds()]

    def _running_holders(self) -> list[Any]:
        if self._holders is None:
            self._holders = [r for r in self._holding() if r.state != schemas.InstanceState.terminating
                             and r.claim is not None]
            self._lowest = min((self.rank(r.model_id) for r in self._holders), default=0)
        return self._holders

    def future(self) -> Cluster:
        """The cluster once every terminating instance has stopped (made once per pass)."""
        if self._future is None:
            self._future = self.state.cluster.copy()
            for record in self._holding():
                if record.state == schemas.InstanceState.terminating:
                    self._release(record, -1)
        return self._future

    def _release(self, record: Any, sign: int, cluster: Cluster | None = None) -> None:
        if record.claim is not None:
            (cluster or self._future).apply(record.claim, record.worker_id, record.model_id, sign, team=record.team)

    def place(self, record: Any, request: Request) -> list[schemas.UnschedulableReason] | None:
        """For a pending instance that does not fit now: the reasons it waits when it will fit once terminating
        instances stop, or once the victims chosen now stop (noted in `victims`); None when preemption cannot help."""
        rank = self.rank(record.model_id)
        holders = self._running_holders()
        if rank <= self._lowest and self._future is None:
            return None  # nothing less important runs (the common case: one class), and nothing is being freed
        lower = [r for r in holders if r.id not in self._taken and self.rank(r.model_id) < rank]
        future = self.future() if lower or self._future is not None else None
        if future is None:
            return None
        result = plan(request, future)
        if isinstance(result, Placement):  # room is being freed already: wait for it, take nobody else's place
            future.commit(result, record.model_id, record.team)
            return [schemas.UnschedulableReason(reason=PREEMPTING, worker=result.worker.name, message=(
                f"waiting for terminating instances to stop on {result.worker.name}"))]
        if not lower:
            return None
        by_id = {r.id: r for r in lower}
        allowance = self._allowance()
        best: list[Candidate] | None = None
        by_worker: dict[int, list[Candidate]] = {}
        for r in lower:
            by_worker.setdefault(r.worker_id, []).append(Candidate(r.id, r.model_id, self.rank(r.model_id)))

        for worker_id in sorted(by_worker):
            worker = future.workers.get(worker_id)
            if worker is None or not worker.schedulable:
                continue
            alone = _alone(future, worker)  # what-ifs on this worker only: a plan over one worker, not the cluster

            def fits(ids: frozenset[int], alone: Cluster = alone) -> bool:
                for i in ids:
                    self._release(by_id[i], -1, alone)
                try:
                    return isinstance(plan(request, alone), Placement)
                finally:
                    for i in ids:
                        self._release(by_id[i], 1, alone)

            chosen = choose_victims(by_worker[worker_id], rank, fits, allowance)
            if chosen is not None and better(chosen, best):
                best = chosen
        if best is None:
            return None
        for candidate in best:
            self._release(by_id[candidate.id], -1)
        result = plan(request, future)
        if not isinstance(result, Placement):  # fits() said so on a copy of that worker: should not happen
            for candidate in best:
                self._release(by_id[candidate.id], 1)
            return None
        self._taken.update(c.id for c in best)
        future.commit(result, record.model_id, record.team)
        preemptor = self.policies.get(record.model_id)
        by_model = preemptor.name if preemptor else str(record.model_id)
        by_priority = preemptor.priority if preemptor else "?"
        names = []
        for candidate in best:
            victim = by_id[candidate.id]
            self.victims.append(Victim(victim, by_model, by_priority))
            policy = self.policies.get(victim.model_id)
            names.append(f"{victim.name} ({policy.priority if policy else '?'})")
        if self.dry_run:
            message = f"would preempt {', '.join(names)} on {result.worker.name}"
        else:
            message = f"preempting {', '.join(names)} on {result.worker.name}; placed when they have stopped"
        return [schemas.UnschedulableReason(reason=PREEMPTING, worker=result.worker.name, message=message)]

    def _allowance(self) -> dict[Any, int]:
        """Per model: how many of its placed instances may still go (those above its min_replicas)."""
        active: dict[int, int] = {}
        for r in self.state.instances.values():
            if r.holds() and r.state != schemas.InstanceState.terminating and r.id not in self._taken:
                active[r.model_id] = active.get(r.model_id, 0) + 1
        out: dict[Any, int] = {}
        for model_id, count in active.items():
            policy = self.policies.get(model_id)
            floor = 0 if self.below_min or policy is None else policy.min_replicas
            out[model_id] = max(0, count - floor)
        return out


def _alone(cluster: Cluster, worker: Any) -> Cluster:
    """A cluster of a copy of one worker, with the teams' quotas and usage (a multi-worker claim's other parts
    are outside it and stay as they are)."""
    alone = Cluster([worker.copy()])
    alone.quotas = dict(cluster.quotas)
    alone.usage = {team: Usage(**vars(used)) for team, used in cluster.usage.items()}
    return alone
