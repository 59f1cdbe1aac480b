"""How long a terminating instance keeps serving: until its backend holds no request, within bounds.

A terminating instance leaves every gateway's routing table at once; its backend keeps running so that
the requests already in flight finish. The agent waits `drain_seconds` first (the time every gateway
needs to take the instance out of routing, and for a request admitted just before to reach the backend),
then reads the backend's own in-flight count from its metrics endpoint every `POLL_SECONDS` and stops it
once that is zero, or at `drain_max_seconds` at most. The count is the sum of the backend's samples that
its metrics map (server/schemas/backend_traits.py, or a custom backend's definition) names
`requests_running` or `requests_waiting` (llama.cpp `llamacpp:requests_processing` and
`llamacpp:requests_deferred`, vLLM `vllm:num_requests_running` and `vllm:num_requests_waiting`, SGLang
`sglang:num_running_reqs` and `sglang:num_queue_reqs`). A backend without such a metric, or one whose
scrape fails, is stopped after `drain_seconds` alone, as before.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from agent.metrics import unify

IN_FLIGHT = ("requests_running", "requests_waiting")  # unified names (server.schemas.UNIFIED_INSTANCE_METRICS)
POLL_SECONDS = 0.5


def counts_in_flight(mapping: dict[str, str] | None) -> bool:
    """Whether a backend's metrics map names a count of the requests it holds."""
    return bool(mapping) and any(unified in IN_FLIGHT for unified in mapping.values())


def in_flight(text: str | None, mapping: dict[str, str]) -> float | None:
    """The requests a backend holds (running + waiting) by its exposition text; None when unknown: no
    answer, not Prometheus text, or none of the in-flight samples in it."""
    if text is None:
        return None
    values = unify(text, mapping)
    known = [values[name] for name in IN_FLIGHT if name in values]
    return sum(known) if known else None


@dataclass
class Drained:
    seconds: float
    why: str  # idle, maximum, unknown (no metric or a failed scrape), exited
    in_flight: float = 0.0  # what the backend still held when the maximum was hit

    def describe(self) -> str:
        took = f"{self.seconds:.1f} s"
        return {"idle": f"drained in {took}: no request in flight",
                "maximum": f"drain stopped at its maximum ({took}) with {self.in_flight:g} request(s) in flight",
                "exited": f"drain ended after {took}: the backend exited",
                }.get(self.why, f"drained for the fixed {took}: the backend's in-flight count is unknown")


async def drain(minimum: float, maximum: float, probe: Callable[[], Awaitable[float | None]] | None,
                exited: Callable[[], bool], poll: float = POLL_SECONDS) -> Drained:
    """Wait `minimum`, then until `probe` (the backend's in-flight count, None: unknown) says zero, at
    most `maximum` seconds in all. Without a probe, or once it answers None, the minimum is all."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    maximum = max(maximum, minimum)
    if minimum > 0:
        await asyncio.sleep(minimum)
    while True:
        if exited():
            return Drained(loop.time() - start, "exited")
        count = await probe() if probe is not None else None
        elapsed = loop.time() - start
        if count is None:
            return Drained(elapsed, "unknown")
        if count <= 0:
            return Drained(elapsed, "idle")
        if elapsed >= maximum:
            return Drained(elapsed, "maximum", count)
        await asyncio.sleep(min(poll, maximum - elapsed))
