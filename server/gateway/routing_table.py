"""Where each model name is served: kept current from the bus, never read per request.

The data plane does not depend on the agents: a target stays as long as its backend answers.
An instance whose worker stopped heartbeating (`unreachable`) keeps its target, and the gateway
probes its backend itself (`probe_loop`: `GET /health`, any answer below 500 counts); passive
counting takes a target out after `EJECT_AFTER` failed exchanges in a row, and the probes bring it
back. The model controller asks `backend_answers` before it replaces an unreachable instance.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Callable

from server.gateway.stats import GatewayStats
from server.gateway.upstream import UpstreamPool
from server.schemas import derive_categories
from server.schemas.backend_traits import served_apis


log = logging.getLogger(__name__)

SERVING_STATES = ("running", "unreachable")  # unreachable: the worker is silent, its backend may still serve
EJECT_AFTER = 3  # failed exchanges in a row that take a target out until a probe answers
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0
PROBE_PATH = "/health"


@dataclass
class Target:
    instance_id: int
    host: str
    port: int
    outstanding: int = 0  # requests in flight through this gateway
    healthy: bool = True  # taken out (False) by failures or failed probes, back in by a probe that answers
    worker_away: bool = False  # the instance is unreachable: its backend is probed, not trusted on the agent's word
    failures: int = 0  # failed exchanges in a row
    answered_at: float | None = None  # monotonic time of the last answer: a probe's, or a request's
    probe_failed_at: float | None = None  # ... and of the last one that did not

    @property
    def needs_probe(self) -> bool:
        return self.worker_away or not self.healthy

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class ModelRoutes:
    targets: dict[int, Target] = field(default_factory=dict)
    apis: frozenset[str] = frozenset()  # the optional endpoints its backend serves (backend_traits.OPTIONAL_APIS)
    categories: frozenset[str] = frozenset({"llm"})  # what the model serves: gates the /v1 endpoints
    team: str | None = None  # who may call it (server/services/access.py)
    autoscaled: bool = False  # max_replicas set: a request finding no target is held (server/gateway/cold_start.py)
    cold_start_timeout: float = 120.0
    _turn: itertools.count = field(default_factory=itertools.count)

    def ordered(self) -> list[Target]:
        """Healthy targets, least outstanding requests first; ties rotate round-robin from request to
        request. When none is healthy, all of them (a wrong ejection must not become an outage)."""
        targets = [t for t in self.targets.values() if t.healthy] or list(self.targets.values())
        if len(targets) < 2:
            return targets
        start = next(self._turn) % len(targets)
        rotated = targets[start:] + targets[:start]
        return sorted(rotated, key=lambda t: t.outstanding)  # stable: the rotation breaks ties


@dataclass(frozen=True)
class Alias:
    """A model route (server/services/routes.py): the name clients call, weighted between target models,
    then fallbacks. Which models it tries, in order, is drawn per request (`candidates`)."""

    name: str
    team: str | None
    models: tuple[str, ...]  # the targets
    cumulative: tuple[int, ...]  # running sums of their weights: a draw is one bisect
    fallbacks: tuple[str, ...]

    @classmethod
    def of(cls, row: dict[str, Any]) -> "Alias":
        targets = [(str(t["model"]), int(t["weight"])) for t in row.get("targets") or () if int(t["weight"]) > 0]
        return cls(row["name"], row.get("team"), tuple(m for m, _ in targets),
                   tuple(itertools.accumulate(w for _, w in targets)), tuple(row.get("fallbacks") or ()))

    def candidates(self, rng: random.Random) -> tuple[str, ...]:
        """The models to try: one target drawn by weight, the other targets, then the fallbacks."""
        if len(self.models) < 2:
            return self.models + self.fallbacks
        chosen = bisect_right(self.cumulative, rng.random() * self.cumulative[-1])
        return (self.models[chosen],) + self.models[:chosen] + self.models[chosen + 1:] + self.fallbacks


class RoutingTable:
    def __init__(self, seed: int | None = None) -> None:
        self.aliases: dict[str, Alias] = {}  # model routes by name (their names are no model's)
        self.rng = random.Random(seed)  # draws the route targets: seeded, a test can check the weights
        self.models: dict[str, ModelRoutes] = {}  # every model that exists, with its running targets
        self.created: dict[str, int] = {}
        self.stats = GatewayStats()  # latency by model and status: the gateway's own, lives with its table
        self.upstream = UpstreamPool()  # keep-alive connections to the targets (plain requests)
        self._targets: dict[int, Target] = {}  # by instance id, across models
        self.on_serving: Callable[[str], None] | None = None  # a model gained a target (wakes held requests)

    def apply_model(self, action: str, model: dict[str, Any]) -> None:
        name = model["name"]
        if action == "deleted":
            routes = self.models.pop(name, None)
            for target in routes.targets.values() if routes is not None else ():
                self._targets.pop(target.instance_id, None)
                self.upstream.forget(target.host, target.port)
            self.created.pop(name, None)
            self.stats.forget(name)
            return
        routes = self.models.setdefault(name, ModelRoutes())
        spec = model.get("spec") or {}
        routes.apis = served_apis(spec.get("backend", ""))
        routes.categories = frozenset(derive_categories(spec.get("backend", ""), spec.get("args") or (),
                                                        spec.get("categories")))
        routes.team = model.get("team")
        routes.autoscaled = model.get("max_replicas") is not None
        routes.cold_start_timeout = float(model.get("cold_start_timeout") or 120.0)
        self.created.setdefault(name, _epoch(model.get("created_at")))

    def apply_instance(self, action: str, instance: dict[str, Any]) -> None:
        state = instance["state"]
        # A target whose worker came back is `scheduled` until its agent has adopted the backend again
        # (server/api/agent_api.py _recover_unreachable): it stays, on the probes' word, meanwhile.
        serving = (action != "deleted" and instance.get("port") and instance.get("address")
                   and (state in SERVING_STATES or (state == "scheduled" and instance["id"] in self._targets)))
        if serving:
            routes = self.models.setdefault(instance["model_name"], ModelRoutes())
            host, port = str(instance["address"]), int(instance["port"])
            away = state != "running"
            current = routes.targets.get(instance["id"])
            if current is None or (current.host, current.port) != (host, port):
                if current is not None:  # moved: its old address's idle connections go
                    self.upstream.forget(current.host, current.port)
                # One first seen already unreachable (a server that just started) waits for a probe.
                current = routes.targets[instance["id"]] = Target(instance["id"], host, port, healthy=not away)
                self._targets[instance["id"]] = current
                if self.on_serving is not None:
                    self.on_serving(instance["model_name"])
            current.worker_away = away
        elif (routes := self.models.get(instance["model_name"])) is not None:
            gone = routes.targets.pop(instance["id"], None)
            if gone is not None:
                self._targets.pop(instance["id"], None)
                self.upstream.forget(gone.host, gone.port)

    def apply_route(self, action: str, row: dict[str, Any]) -> None:
        if action == "deleted":
            self.aliases.pop(row["name"], None)
        else:
            self.aliases[row["name"]] = Alias.of(row)

    def serving_aliases(self) -> list[Alias]:
        """Routes with a model that serves now (or that a request would start), by name."""
        serving = set(self.serving_models())
        return [self.aliases[name] for name in sorted(self.aliases)
                if any(m in serving for m in self.aliases[name].models + self.aliases[name].fallbacks)]

    def load(self, models: list[dict[str, Any]], instances: list[dict[str, Any]],
             routes: list[dict[str, Any]] | None = None) -> None:
        self.aliases = {row["name"]: Alias.of(row) for row in routes or ()}
        previous = self._targets
        self.models.clear()
        self.created.clear()
        self._targets = {}
        for model in models:
            self.apply_model("created", model)
        for instance in instances:
            self.apply_instance("created", instance)
        for instance_id, target in self._targets.items():  # a reload keeps what was learnt of each backend
            if (old := previous.get(instance_id)) is not None and (old.host, old.port) == (target.host, target.port):
                target.healthy, target.failures = old.healthy, old.failures
                target.answered_at, target.probe_failed_at = old.answered_at, old.probe_failed_at

    # --- health: passive (the exchanges) and active (the probes) ---------------------------

    def failed(self, target: Target) -> None:
        """An exchange with the target failed before it answered (refused, reset, 502/503, timeout)."""
        target.failures += 1
        if target.failures >= EJECT_AFTER and target.healthy:
            target.healthy = False
            log.warning("instance %s (%s:%s) taken out of routing after %d failures in a row; probing it",
                        target.instance_id, target.host, target.port, target.failures)

    def answered(self, target: Target) -> None:
        """An exchange got its answer: the backend is alive, whatever its probe (queued behind the load) says."""
        target.failures = 0
        target.answered_at = time.monotonic()

    def backend_answers(self, instance_id: int, within: float) -> bool | None:
        """Whether this gateway finds the instance's backend answering: True when a probe or a request got
        an answer in the last `within` seconds, False when not, None when it has not been probed here."""
        target = self._targets.get(instance_id)
        if target is None or (target.answered_at is None and target.probe_failed_at is None):
            return None
        return target.answered_at is not None and time.monotonic() - target.answered_at <= within

    async def probe_loop(self, interval: float = PROBE_INTERVAL) -> None:
        """Probe the targets that need it (worker away, or taken out) every `interval` seconds."""
        while True:
            due = [t for t in self._targets.values() if t.needs_probe]
            if due:
                await asyncio.gather(*(self._probe(t) for t in due))
            await asyncio.sleep(interval)

    async def _probe(self, target: Target) -> None:
        if await probe(target.host, target.port):
            target.answered_at = time.monotonic()
            if not target.healthy:
                log.info("instance %s (%s:%s) answers again; back in routing", target.instance_id, target.host,
                         target.port)
            target.healthy, target.failures = True, 0
        else:
            target.probe_failed_at = now = time.monotonic()
            if target.answered_at is not None and now - target.answered_at < PROBE_TIMEOUT + PROBE_INTERVAL:
                return  # requests got answers meanwhile: a busy backend, not a dead one
            if target.healthy:
                log.warning("instance %s (%s:%s) does not answer its probe; taken out of routing",
                            target.instance_id, target.host, target.port)
            target.healthy = False

    def serving_models(self) -> list[str]:
        """Models a client may call now: those with a target, and autoscaled ones (a request starts a replica)."""
        return sorted(name for name, routes in self.models.items() if routes.targets or routes.autoscaled)

    def state_of(self, name: str) -> str:
        """`running`, or `scaled_to_zero` for an autoscaled model without a running replica (it starts on request)."""
        routes = self.models.get(name)
        return "running" if routes is not None and routes.targets else "scaled_to_zero"


async def probe(host: str, port: int, path: str = PROBE_PATH, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether an HTTP server answers on host:port: any status below 500 (a 404 is a server that runs;
    a 503 is llama.cpp or vLLM still loading, or failing)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            status_line = await reader.readline()
        parts = status_line.split()
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() and int(parts[1]) < 500
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


def _epoch(value: Any) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(value)).timestamp())
    except (TypeError, ValueError):
        return 0
