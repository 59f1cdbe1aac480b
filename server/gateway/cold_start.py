"""Requests held while an autoscaled model starts a replica (scale from zero, or its first one).

The proxy calls `hold` where it would answer 503 `no_running_instance`. For an autoscaled model
(max_replicas set) the request waits, bounded per model (`max_held`; beyond it: 503 with
Retry-After at once), until the routing table gets a running target for the model, at most the
model's `cold_start_timeout` (then 503 with Retry-After). The wait is on an asyncio.Event the
routing table sets when the model gains a target (`serving`), not a poll, so a held request is
forwarded the moment its replica runs. A hold wakes (`demand_after`) this server's load report
and, on the leader, the autoscaler (server/controllers/autoscale.py): held requests count as load,
so a model at zero replicas is scaled to one at once. Streaming requests are held the same way
(nothing has been sent to the client yet).

A manual model (no max_replicas) keeps the plain 503: its replicas are fixed by hand, nothing
would start for the held request.
"""

from __future__ import annotations

import asyncio
import math

from server.api.errors import ApiError
from server.gateway.routing_table import ModelRoutes, RoutingTable, Target

OVER_BOUND_RETRY_AFTER = 5  # seconds: when the hold is full, a replica is on its way; come back soon


class ColdStart:
    def __init__(self, routes: RoutingTable, max_held: int = 64):
        self.routes = routes
        self.max_held = max_held
        self.held: dict[str, int] = {}  # model -> requests held on this server now
        self.holds_started = 0  # a counter the load report and the autoscaler compare (demand_after)
        self._demand = asyncio.Event()
        self._serving: dict[str, asyncio.Event] = {}
        routes.on_serving = self.serving

    async def demand_after(self, seen: int, timeout: float) -> int:
        """Wait up to `timeout` seconds for a hold to begin after the `seen`-th; the count now."""
        if self.holds_started == seen:
            event = self._demand
            try:
                async with asyncio.timeout(timeout):
                    await event.wait()
            except TimeoutError:
                pass
        return self.holds_started

    def serving(self, name: str) -> None:
        """The routing table got a target for `name`: wake what is held for it."""
        event = self._serving.pop(name, None)
        if event is not None:
            event.set()

    async def hold(self, name: str, routes: ModelRoutes) -> list[Target]:
        """The model's targets once it has one; ApiError 503 (with Retry-After) when it cannot wait or waited too long."""
        if not routes.autoscaled:
            raise ApiError(503, "no_running_instance", f"the model {name!r} has no running instance yet")
        timeout = routes.cold_start_timeout
        if self.held.get(name, 0) >= self.max_held:
            raise ApiError(503, "cold_start_busy", f"the model {name!r} is starting and already holds {self.max_held} "
                           f"requests; retry shortly", headers={"Retry-After": str(OVER_BOUND_RETRY_AFTER)})
        self.held[name] = self.held.get(name, 0) + 1
        self.holds_started += 1
        self._demand.set()  # wakes whoever waits on demand_after (a new Event for the next ones)
        self._demand = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                current = self.routes.models.get(name)
                if current is None:
                    raise ApiError(404, "model_not_found", f"the model {name!r} was deleted while it started")
                targets = current.ordered()
                if targets:
                    return targets
                event = self._serving.setdefault(name, asyncio.Event())
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(503, "cold_start_timeout", f"the model {name!r} did not start a replica within "
                                   f"{timeout:g} s (cold_start_timeout); retry later",
                                   headers={"Retry-After": str(max(1, math.ceil(min(timeout, 60))))})
                try:
                    async with asyncio.timeout(remaining):
                        await event.wait()
                except TimeoutError:
                    pass
        finally:
            left = self.held[name] - 1
            if left:
                self.held[name] = left
            else:
                del self.held[name]
