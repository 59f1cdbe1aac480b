"""Claimed vs actual memory: what an instance's placement claims against what its processes use.

Agents send each instance's real use with their heartbeats (agent/usage.py: NVML per-process memory on
each GPU, host RSS of the process tree for CPU backends); this server keeps the latest report in memory
(`report`). Every CHECK_SECONDS `check` reads the claims of the reported instances (one query) and
judges each: `over` when use exceeds the claim by `over_ratio`, `under` when it stays below
`under_ratio` of the claim for `under_seconds`. A drift episode records one `MemoryDrift` event on the
instance (with a suggested `--memory`); the event comes again only after the instance was back within
the thresholds. Thresholds: MAAS_MEMORY_DRIFT_OVER (default 1.0), MAAS_MEMORY_DRIFT_UNDER (0.5),
MAAS_MEMORY_DRIFT_UNDER_SECONDS (600).

Per server, like the telemetry history: each server judges the reports its own heartbeats brought.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from server.db import tables
from server.events import record_event
from server.schemas import InstanceUsage
from server.schemas.telemetry import InstanceMemory

log = logging.getLogger(__name__)

CHECK_SECONDS = 15.0
STALE_SECONDS = 60.0  # a report older than this (instance gone, worker silent) is not judged
MIB = 1 << 20


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


@dataclass
class Thresholds:
    over_ratio: float = 1.0
    under_ratio: float = 0.5
    under_seconds: float = 600.0

    @classmethod
    def from_env(cls) -> "Thresholds":
        return cls(_env_float("MAAS_MEMORY_DRIFT_OVER", 1.0), _env_float("MAAS_MEMORY_DRIFT_UNDER", 0.5),
                   _env_float("MAAS_MEMORY_DRIFT_UNDER_SECONDS", 600.0))


def suggested_memory(used_bytes: int) -> str:
    """A --memory value: what it uses plus 20 %, rounded up to 64 MiB."""
    mib = max(64, math.ceil(used_bytes * 1.2 / MIB / 64) * 64)
    return f"{mib // 1024}GiB" if mib % 1024 == 0 else f"{mib}MiB"


def compare(claim: dict[str, Any] | None, usage: InstanceUsage, reported_at: float) -> InstanceMemory | None:
    """Claim against use; None when there is nothing to compare (no claim, or a GPU claim on a
    worker whose driver does not say what each process uses: simulated GPUs, no NVML)."""
    if not claim:
        return None
    if claim.get("device") == "gpu":
        if not usage.gpu_bytes:
            return None
        per_gpu = {i: [int(claim.get("vram_bytes_per_gpu") or 0), int(usage.gpu_bytes.get(i, 0))]
                   for i in claim.get("gpu_indexes") or []}
        claimed, used = sum(c for c, _ in per_gpu.values()), sum(u for _, u in per_gpu.values())
        return InstanceMemory(device="gpu", claimed_bytes=claimed, used_bytes=used, per_gpu=per_gpu,
                              ratio=used / claimed if claimed else None, reported_at=reported_at)
    claimed = int(claim.get("ram_bytes") or 0)
    return InstanceMemory(device="cpu", claimed_bytes=claimed, used_bytes=usage.ram_bytes,
                          ratio=usage.ram_bytes / claimed if claimed else None, reported_at=reported_at)


@dataclass
class _Judged:
    under_since: float | None = None
    reported: str | None = None  # the drift an event was recorded for (until it clears)
    memory: InstanceMemory | None = None


@dataclass
class MemoryDrift:
    thresholds: Thresholds = field(default_factory=Thresholds.from_env)
    clock: Any = time.time
    reports: dict[int, tuple[InstanceUsage, float]] = field(default_factory=dict)
    judged: dict[int, _Judged] = field(default_factory=dict)

    def report(self, usage: list[InstanceUsage]) -> None:
        now = self.clock()
        for u in usage:
            self.reports[u.instance_id] = (u, now)

    def judge(self, instance_id: int, claim: dict[str, Any] | None) -> tuple[InstanceMemory | None, str | None]:
        """The comparison, with `drift` set once a threshold holds; returns (memory, drift to record now)."""
        usage, at = self.reports[instance_id]
        memory = compare(claim, usage, at)
        state = self.judged.setdefault(instance_id, _Judged())
        if memory is None or memory.ratio is None:
            state.memory = memory
            return memory, None
        now = self.clock()
        drift = None
        if memory.ratio > self.thresholds.over_ratio:
            drift, state.under_since = "over", None
        elif memory.ratio < self.thresholds.under_ratio:
            state.under_since = state.under_since if state.under_since is not None else now
            if now - state.under_since >= self.thresholds.under_seconds:
                drift = "under"
        else:
            state.under_since = None
        memory.drift = drift
        if drift:
            memory.suggested_memory = suggested_memory(memory.used_bytes)
        state.memory = memory
        record = drift if drift and drift != state.reported else None
        state.reported = drift
        return memory, record

    def memory_of(self, instance_id: int) -> InstanceMemory | None:
        state = self.judged.get(instance_id)
        return state.memory if state else None

    async def check(self, db: Any) -> int:
        """Judge every fresh report; record a MemoryDrift event per new episode. Returns events recorded."""
        now = self.clock()
        for stale in [i for i, (_, at) in self.reports.items() if now - at > STALE_SECONDS]:
            del self.reports[stale]
            self.judged.pop(stale, None)
        if not self.reports:
            return 0
        recorded = 0
        async with db.session() as s:
            rows = (await s.execute(select(tables.ModelInstance).where(
                tables.ModelInstance.id.in_(list(self.reports))))).scalars().all()
            for instance in rows:
                memory, drift = self.judge(instance.id, instance.claim)
                if drift and memory is not None:
                    record_event(s, "instances", instance, "MemoryDrift", drift_message(memory), "memory-drift")
                    recorded += 1
            if recorded:
                await s.commit()
        return recorded

    async def run(self, db: Any, every: float = CHECK_SECONDS) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.check(db)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be away for a while; the next pass tries again
                log.warning("memory drift check failed: %s", exc)


def drift_message(memory: InstanceMemory) -> str:
    where = "on its GPUs (NVML)" if memory.device == "gpu" else "of host RAM (RSS)"
    percent = f"{memory.ratio * 100:.0f}%" if memory.ratio is not None else "?"
    if memory.drift == "over":
        verdict = "uses more than it claims: the scheduler may overcommit its worker"
    else:
        verdict = "stays far below its claim: capacity is held idle"
    return (f"uses {_mib(memory.used_bytes)} {where} of its {_mib(memory.claimed_bytes)} claim ({percent}); "
            f"{verdict}; deploy with --memory {memory.suggested_memory}")


def _mib(value: int) -> str:
    return f"{value / MIB:.0f} MiB"
