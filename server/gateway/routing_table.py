"""Where each model name is served: kept current from the bus, never read per request."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from server.gateway.stats import GatewayStats
from server.gateway.upstream import UpstreamPool
from server.schemas import derive_categories


@dataclass
class Target:
    instance_id: int
    host: str
    port: int
    outstanding: int = 0  # requests in flight through this gateway

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class ModelRoutes:
    targets: dict[int, Target] = field(default_factory=dict)
    categories: frozenset[str] = frozenset({"llm"})  # what the model serves: gates the /v1 endpoints
    _turn: itertools.count = field(default_factory=itertools.count)

    def ordered(self) -> list[Target]:
        """Least outstanding requests first; ties rotate round-robin from request to request."""
        targets = list(self.targets.values())
        if len(targets) < 2:
            return targets
        start = next(self._turn) % len(targets)
        rotated = targets[start:] + targets[:start]
        return sorted(rotated, key=lambda t: t.outstanding)  # stable: the rotation breaks ties


class RoutingTable:
    def __init__(self) -> None:
        self.models: dict[str, ModelRoutes] = {}  # every model that exists, with its running targets
        self.created: dict[str, int] = {}
        self.stats = GatewayStats()  # latency by model and status: the gateway's own, lives with its table
        self.upstream = UpstreamPool()  # keep-alive connections to the targets (plain requests)

    def apply_model(self, action: str, model: dict[str, Any]) -> None:
        name = model["name"]
        if action == "deleted":
            routes = self.models.pop(name, None)
            for target in routes.targets.values() if routes is not None else ():
                self.upstream.forget(target.host, target.port)
            self.created.pop(name, None)
            self.stats.forget(name)
            return
        routes = self.models.setdefault(name, ModelRoutes())
        spec = model.get("spec") or {}
        routes.categories = frozenset(derive_categories(spec.get("backend", ""), spec.get("args") or (),
                                                        spec.get("categories")))
        self.created.setdefault(name, _epoch(model.get("created_at")))

    def apply_instance(self, action: str, instance: dict[str, Any]) -> None:
        serving = action != "deleted" and instance["state"] == "running" and instance.get("port") and instance.get("address")
        if serving:
            routes = self.models.setdefault(instance["model_name"], ModelRoutes())
            host, port = str(instance["address"]), int(instance["port"])
            current = routes.targets.get(instance["id"])
            if current is None or (current.host, current.port) != (host, port):
                if current is not None:  # moved: its old address's idle connections go
                    self.upstream.forget(current.host, current.port)
                routes.targets[instance["id"]] = Target(instance["id"], host, port)
        elif (routes := self.models.get(instance["model_name"])) is not None:
            gone = routes.targets.pop(instance["id"], None)
            if gone is not None:
                self.upstream.forget(gone.host, gone.port)

    def load(self, models: list[dict[str, Any]], instances: list[dict[str, Any]]) -> None:
        self.models.clear()
        self.created.clear()
        for model in models:
            self.apply_model("created", model)
        for instance in instances:
            self.apply_instance("created", instance)

    def serving_models(self) -> list[str]:
        return sorted(name for name, routes in self.models.items() if routes.targets)


def _epoch(value: Any) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(value)).timestamp())
    except (TypeError, ValueError):
        return 0
