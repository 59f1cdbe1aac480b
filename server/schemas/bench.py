"""Benchmarks of a deployed model: the wire contract, the measurement and the rollout gate's grammar.

One place for all three because the CLI (`maas bench`, through the gateway with the caller's key) and the
server (the rollout gate, against one instance) measure the same way. Standard library and pydantic only:
the caller hands in `send`, which posts one streamed chat completion and yields the `data:` payloads of
its server-sent events as they arrive (aiohttp lives with the callers).

A request's time to first token (TTFT) runs from sending to the first content chunk; its inter-token
latencies (ITL) are the gaps between content chunks after that; tokens are content chunks (llama.cpp, vLLM
and SGLang stream one token per chunk). A level's tokens/s is all its output tokens over its wall time.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import Field, field_validator

from server.schemas import Schema

# The metrics a result holds per level and a gate may name; times in milliseconds.
METRICS: dict[str, str] = {
    "ttft_p50": "time to first token, median (ms)",
    "ttft_p95": "time to first token, 95th percentile (ms)",
    "itl_p50": "inter-token latency, median (ms)",
    "itl_p95": "inter-token latency, 95th percentile (ms)",
    "tokens_per_s": "output tokens per second over the level",
    "error_rate": "failed requests / requests (0..1)",
}
HIGHER_IS_BETTER = frozenset({"tokens_per_s"})
GATE_CONCURRENCY = 1  # the level a gate compares (the server's own gate bench runs only this one)


class BenchLevel(Schema):
    concurrency: int = Field(ge=1, le=1024)
    requests: int = Field(ge=0, le=100_000)
    errors: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    seconds: float = Field(default=0.0, ge=0)
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    itl_p50: float | None = None
    itl_p95: float | None = None
    tokens_per_s: float = 0.0
    error_rate: float = 0.0
    first_error: str = Field(default="", max_length=500)


class BenchResultCreate(Schema):
    prompt_tokens: int = Field(ge=1, le=1_000_000)
    max_tokens: int = Field(ge=1, le=1_000_000)
    levels: list[BenchLevel] = Field(min_length=1, max_length=64)
    generation: int | None = Field(default=None, ge=1, description="default: the model's current generation")


class BenchResultOut(Schema):
    id: int
    model: str
    generation: int
    source: Literal["cli", "gate"]
    instance: str | None = Field(default=None, description="the instance measured (the gate's own bench)")
    created_by: str
    created_at: datetime
    prompt_tokens: int
    max_tokens: int
    levels: list[BenchLevel]


class BenchGateSet(Schema):
    expression: str = Field(min_length=3, max_length=200, description='e.g. "ttft_p95 <= 1.1 * previous"')
    requests: int = Field(default=4, ge=1, le=64, description="requests of the gate's bench, per generation")
    max_tokens: int = Field(default=16, ge=1, le=1024)

    @field_validator("expression")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse_gate(value)  # a GateError (a ValueError): a 422 naming the grammar
        return value


class BenchGateOut(Schema):
    expression: str
    requests: int
    max_tokens: int
    decided_generation: int = Field(description="the newest generation the gate has judged (0: none yet)")


class BenchHistory(Schema):
    model: str
    generation: int
    gate: BenchGateOut | None = None
    results: list[BenchResultOut]


# --- the gate's grammar: METRIC OP NUMBER | METRIC OP [K *] previous ------------------------------

class GateError(ValueError):
    pass


_GATE = re.compile(r"^\s*(?P<metric>[a-z_0-9]+)\s*(?P<op><=|>=|<|>)\s*(?:(?P<k>\d+(?:\.\d+)?)\s*(?P<times>[*×x])\s*)?"
                   r"(?P<rhs>previous|\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    factor: float  # times `previous`, or the absolute bound
    relative: bool

    def bound(self, previous: BenchLevel | None) -> float | None:
        if not self.relative:
            return self.factor
        value = None if previous is None else getattr(previous, self.metric)
        return None if value is None else self.factor * value

    def judge(self, new: BenchLevel, previous: BenchLevel | None) -> tuple[bool | None, str]:
        """(passed, why): passed is None when there is nothing to compare with (no previous result)."""
        bound = self.bound(previous)
        value = getattr(new, self.metric)
        if bound is None:
            return None, f"{self.metric}: no previous measurement to compare with"
        if value is None:
            return False, f"{self.metric}: the new generation produced no measurement ({new.first_error or 'no tokens'})"
        ok = {"<=": value <= bound, "<": value < bound, ">=": value >= bound, ">": value > bound}[self.op]
        rhs = f"{self.factor:g} × previous {getattr(previous, self.metric):.4g}" if self.relative else f"{bound:g}"
        return ok, f"{self.metric} {value:.4g} {'' if ok else 'not '}{self.op} {rhs}"


def parse_gate(text: str) -> Gate:
    """A gate expression as data; no eval: only the grammar above."""
    match = _GATE.match(text)
    if match is None:
        raise GateError(f"bench gate {text!r}: write METRIC OP NUMBER or METRIC OP [K *] previous, "
                        "e.g. 'ttft_p95 <= 1.1 * previous'")
    metric = match["metric"]
    if metric not in METRICS:
        raise GateError(f"bench gate {text!r}: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    relative = match["rhs"] == "previous"
    if match["k"] is not None and not relative:
        raise GateError(f"bench gate {text!r}: K * only goes with previous")
    factor = float(match["k"]) if match["k"] is not None else (1.0 if relative else float(match["rhs"]))
    if not math.isfinite(factor) or factor > 1e9:
        raise GateError(f"bench gate {text!r}: the number is out of range")
    return Gate(metric, match["op"], factor, relative)


def level_of(levels: list[BenchLevel], concurrency: int = GATE_CONCURRENCY) -> BenchLevel | None:
    return next((level for level in levels if level.concurrency == concurrency), None)


# --- measuring ----------------------------------------------------------------------------------

Send = Callable[[dict[str, Any]], AsyncIterator[str]]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Sample:
    ttft: float | None = None  # seconds
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


def request_body(model: str, prompt_tokens: int, max_tokens: int, serial: int) -> dict[str, Any]:
    # Roughly one token per word; a serial number at the front keeps a prompt cache from answering at once.
    prompt = f"{serial} " + " ".join("word" for _ in range(max(0, prompt_tokens - 1)))
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0, "ignore_eos": True}


async def measure(send: Send, body: dict[str, Any]) -> Sample:
    sample = Sample()
    started = last = time.perf_counter()
    try:
        async for data in send(body):
            if data.strip() == "[DONE]":
                break
            message = json.loads(data)
            if isinstance(message, dict) and message.get("error"):
                raise RuntimeError(str(message["error"])[:300])
            content = any((choice.get("delta") or {}).get("content") for choice in message.get("choices") or ())
            if not content:
                continue
            now = time.perf_counter()
            if sample.ttft is None:
                sample.ttft = now - started
            else:
                sample.gaps.append(now - last)
            last = now
            sample.tokens += 1
        if sample.tokens == 0:
            sample.error = "no tokens in the answer"
    except Exception as exc:  # any failure of one request is that request's error, counted
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    return sample


def summarize(concurrency: int, samples: list[Sample], seconds: float) -> BenchLevel:
    good = [s for s in samples if not s.error]
    ttfts = [s.ttft * 1000 for s in good if s.ttft is not None]
    gaps = [g * 1000 for s in good for g in s.gaps]
    tokens = sum(s.tokens for s in good)
    errors = len(samples) - len(good)

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return BenchLevel(concurrency=concurrency, requests=len(samples), errors=errors, output_tokens=tokens,
                      seconds=round(seconds, 3), ttft_p50=rounded(percentile(ttfts, 50)),
                      ttft_p95=rounded(percentile(ttfts, 95)), itl_p50=rounded(percentile(gaps, 50)),
                      itl_p95=rounded(percentile(gaps, 95)),
                      tokens_per_s=round(tokens / seconds, 3) if seconds > 0 else 0.0,
                      error_rate=round(errors / len(samples), 4) if samples else 0.0,
                      first_error=next((s.error for s in samples if s.error), ""))


async def run_level(send: Send, model: str, concurrency: int, requests: int, prompt_tokens: int,
                    max_tokens: int) -> BenchLevel:
    """`requests` streamed completions, `concurrency` at a time."""
    serials = iter(range(requests))
    samples: list[Sample] = []

    async def client() -> None:
        for serial in serials:
            samples.append(await measure(send, request_body(model, prompt_tokens, max_tokens, serial)))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))
    return summarize(concurrency, samples, time.perf_counter() - started)


async def sweep(send: Send, model: str, concurrencies: list[int], requests: int, prompt_tokens: int,
                max_tokens: int) -> list[BenchLevel]:
    """One level per concurrency, in turn; `requests` per level (at least the concurrency)."""
    return [await run_level(send, model, c, max(requests, c), prompt_tokens, max_tokens) for c in concurrencies]
