"""Autoscaling: replicas from the gateway's load, scale to zero after idle, on the leader.

Load. Every server's gateway samples, ten times a second, the requests in flight per model (the
targets' `outstanding`), and knows the requests it holds during a cold start
(server/gateway/cold_start.py) and how many it has answered (its latency counters). `LoadMeter` keeps
these; a server that is not the leader writes them as one row of `gateway_loads` every
`autoscale_interval` (and at once when a request is held), only when they changed or every few
seconds to stay fresh. The leader's `Autoscaler` takes its own gateway's load from memory and adds
the rows of the other servers written in the last `FRESH_SECONDS`. A table and not the bus: the
load changes every second and is nobody's history, so it stays out of the change log and the watch;
a table works on every store, and a new leader finds the other servers' load there at once.

Decision (`decide`, pure). The load of a model is the mean number of its requests in flight over the
last interval (or over the last half second when that is higher, so a step up counts at once) plus
those held; `ceil(load / target_concurrency)` replicas are needed. More replicas
are asked for at once; fewer only when every need seen during the last `scale_down_delay` seconds was
lower (the stabilization window of Kubernetes' HPA), so a dip does not flap. With `min_replicas` 0 a
model that served recently keeps one replica; after `idle_timeout` seconds without a request it goes
to zero, and its claims are freed. A held request asks for a replica at once, whatever the window.

The decision writes `replicas` on the model (with `scale_reason`, `scaled_at` and an event
ScaledUp, ScaledDown or ScaledToZero); the model controller does the rest, and removes instances
through the normal drain: a terminating instance leaves the routing table at once and its agent
stops the backend once no request is in flight there (agent/drain.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update

from server import schemas
from server.db import tables
from server.db.tables import utcnow
from server.events import record_event
from server.reconcile import ReconcileLoop

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.1  # how often the gateway's in-flight counts are sampled
RECENT_SAMPLES = 5  # the last half second: a load step counts before the whole interval has seen it
FRESH_SECONDS = 10.0  # another server's load row counts while it is this recent
REFRESH_SECONDS = 5.0  # a server rewrites an unchanged load row this often (so it stays fresh)
FORGET_SECONDS = 3600.0  # rows of servers gone this long are deleted


# --- the decision (pure) --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_concurrency: int
    scale_down_delay: float
    idle_timeout: float

    @classmethod
    def of(cls, model: Any) -> "Policy":
        return cls(model.min_replicas or 0, model.max_replicas, model.target_concurrency, model.scale_down_delay,
                   model.idle_timeout)


@dataclass(frozen=True)
class Load:
    in_flight: float = 0.0  # mean requests in flight over the last interval, all servers
    held: int = 0  # requests held for a cold start now, all servers
    active: bool = False  # a request arrived, was in flight or held since the last decision


@dataclass
class Memory:
    """What the autoscaler remembers of a model between decisions."""

    last_active: float
    needs: deque[tuple[float, int]] = field(default_factory=deque)  # (when, replicas needed) in the window


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    event: str | None  # ScaledUp, ScaledDown, ScaledToZero; None when unchanged


def decide(policy: Policy, current: int, load: Load, memory: Memory, now: float) -> Decision:
    if load.active:
        memory.last_active = now
    demand = load.in_flight + load.held
    need = math.ceil(demand / policy.target_concurrency - 1e-9) if demand > 0 else 0
    if load.held:
        need = max(need, 1)  # a held request needs a replica now
    need = min(need, policy.max_replicas)
    memory.needs.append((now, need))
    while memory.needs and memory.needs[0][0] < now - policy.scale_down_delay:
        memory.needs.popleft()
    idle_for = now - memory.last_active
    floor = policy.min_replicas
    if floor == 0 and current > 0 and idle_for < policy.idle_timeout:
        floor = 1  # served recently: one replica stays until the model has been idle for idle_timeout
    wanted = max(need, floor)
    load_words = f"load {load.in_flight:.1f} in flight" + (f" + {load.held} held" if load.held else "")
    if wanted > current:
        desired = min(wanted, policy.max_replicas)
        return Decision(desired, f"{load_words}, target {policy.target_concurrency} per replica: "
                                 f"{current} -> {desired}", "ScaledUp")
    if wanted == current:
        return Decision(current, "", None)
    peak = max(n for _, n in memory.needs)  # the stabilization window: the most needed lately
    desired = max(wanted, min(peak, current), policy.min_replicas)
    if desired >= current:
        return Decision(current, "", None)
    if desired == 0:
        return Decision(0, f"no request for {idle_for:.0f} s (idle_timeout {policy.idle_timeout:g} s): "
                           f"{current} -> 0", "ScaledToZero")
    return Decision(desired, f"{load_words}, at most {peak} replicas needed in the last "
                             f"{policy.scale_down_delay:g} s: {current} -> {desired}", "ScaledDown")


# --- the load, on every server -------------------------------------------------------------------------------


class LoadMeter:
    """This server's gateway load per model: sampled in-flight counts, held requests, requests answered."""

    def __init__(self, server: Any, server_id: str):
        self.server = server
        self.server_id = server_id
        self._sums: dict[str, float] = {}
        self._samples = 0
        self._recent: deque[dict[str, int]] = deque(maxlen=RECENT_SAMPLES)
        self._written: tuple[dict[str, list[float]], float] | None = None

    def sample(self) -> None:
        now: dict[str, int] = {}
        for name, routes in self.server.routes.models.items():
            in_flight = sum(t.outstanding for t in routes.targets.values())
            if in_flight:
                self._sums[name] = self._sums.get(name, 0.0) + in_flight
                now[name] = in_flight
        self._recent.append(now)
        self._samples += 1

    def take(self) -> dict[str, list[float]]:
        """{model: [in flight, held now, requests answered so far]}; the sums restart. In flight is the mean since
        the last take, or of the last half second when that is higher (a step up counts at once)."""
        requests: dict[str, int] = {}
        for (name, _status), series in self.server.routes.stats.series.items():
            if name:
                requests[name] = requests.get(name, 0) + series.count
        held = self.server.cold_start.held
        samples = max(1, self._samples)
        recent = max(1, len(self._recent))
        loads = {name: [round(max(self._sums.get(name, 0.0) / samples,
                                  sum(s.get(name, 0) for s in self._recent) / recent), 3),
                        held.get(name, 0), requests.get(name, 0)]
                 for name in set(self._sums) | set(held) | set(requests)}
        self._sums, self._samples = {}, 0
        return loads

    async def run(self) -> None:
        """Sample; on a server that is not the leader, write the load row every interval (at once on a hold)."""
        interval = self.server.config.autoscale_interval
        cold_start = self.server.cold_start
        seen_holds = cold_start.holds_started
        due = time.monotonic() + interval
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            self.sample()
            now = time.monotonic()
            held_new = cold_start.holds_started != seen_holds
            if now < due and not held_new:
                continue
            seen_holds = cold_start.holds_started
            due = now + interval
            leadership = self.server.leadership
            if leadership is None or leadership.is_leader:
                continue  # the leader's autoscaler takes this server's load from memory
            try:
                await self._write(self.take(), now)
            except Exception:
                log.warning("cannot write this server's gateway load; retrying", exc_info=True)

    async def _write(self, loads: dict[str, list[float]], now: float) -> None:
        if self._written is not None:
            before, at = self._written
            if before == loads and now - at < REFRESH_SECONDS:
                return
        async with self.server.db.session() as s:
            table = tables.GatewayLoad.__table__
            done = await s.execute(update(table).where(table.c.server_id == self.server_id).values(
                loads=loads, updated_at=utcnow()))
            if done.rowcount == 0:
                s.add(tables.GatewayLoad(server_id=self.server_id, loads=loads, updated_at=utcnow()))
            await s.commit()
        self._written = (loads, now)


# --- the decisions, on the leader ------------------------------------------------------------------------------


class Autoscaler(ReconcileLoop):
    """Decides each autoscaled model's replicas every `autoscale_interval`, and at once when a request is held."""

    name = "autoscaler"

    def __init__(self, server: Any, interval: float):
        super().__init__(server, interval)  # start/stop; _run below waits on held requests, not the bus
        self.memory: dict[int, Memory] = {}
        self.load: dict[str, Load] = {}  # the last load seen per model (describe pages, metrics)
        self._requests: dict[tuple[str, str], float] = {}  # (server, model) -> requests answered, last seen
        self._forgotten_at = 0.0

    async def _run(self) -> None:
        cold_start = self.server.cold_start
        seen = cold_start.holds_started
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("%s failed; retrying", self.name)
                await asyncio.sleep(1)
            seen = await cold_start.demand_after(seen, self.interval)

    async def _loads(self, s: Any) -> dict[str, list[tuple[str, list[float]]]]:
        """model -> [(server id, [in flight, held, requests])]: this server's from memory, others' fresh rows."""
        meter = self.server.load_meter
        by_model: dict[str, list[tuple[str, list[float]]]] = {}
        for name, values in meter.take().items():
            by_model.setdefault(name, []).append((meter.server_id, values))
        fresh = utcnow() - timedelta(seconds=FRESH_SECONDS)
        rows = (await s.execute(select(tables.GatewayLoad).where(tables.GatewayLoad.updated_at >= fresh,
                                                                 tables.GatewayLoad.server_id != meter.server_id))).scalars()
        for row in rows:
            for name, values in (row.loads or {}).items():
                if isinstance(values, list) and len(values) == 3:
                    by_model.setdefault(name, []).append((row.server_id, values))
        return by_model

    async def tick(self) -> None:
        now = time.monotonic()
        async with self.server.db.session() as s:
            models = (await s.execute(select(tables.Model).where(
                tables.Model.max_replicas.is_not(None), tables.Model.state == schemas.ModelState.active))).scalars().all()
            if models:
                by_model = await self._loads(s)
            else:  # nothing autoscaled: the sums restart all the same, no other server's row is read
                self.server.load_meter.take()
                by_model = {}
            changed = False
            for model in models:
                load = self._combine(model.name, by_model.get(model.name, []))
                self.load[model.name] = load
                memory = self.memory.setdefault(model.id, Memory(last_active=now))
                decision = decide(Policy.of(model), model.replicas, load, memory, now)
                if decision.event is None:
                    continue
                model.replicas = decision.replicas
                model.scale_reason = decision.reason
                model.scaled_at = utcnow()
                record_event(s, "models", model, decision.event, decision.reason, self.name)
                changed = True
            if now - self._forgotten_at > 60:
                self._forgotten_at = now
                await s.execute(delete(tables.GatewayLoad).where(
                    tables.GatewayLoad.updated_at < utcnow() - timedelta(seconds=FORGET_SECONDS)))
                changed = True
            if changed:
                await s.commit()
        known = {m.id for m in models}
        for model_id in [k for k in self.memory if k not in known]:
            del self.memory[model_id]

    def _combine(self, name: str, parts: list[tuple[str, list[float]]]) -> Load:
        in_flight, held, active = 0.0, 0, False
        for server_id, (mean, held_now, requests) in parts:
            in_flight += float(mean)
            held += int(held_now)
            before = self._requests.get((server_id, name))
            self._requests[(server_id, name)] = requests
            active = active or mean > 0 or held_now > 0 or (before is not None and requests != before)
        return Load(in_flight, held, active)
