"""Telemetry history in memory: per GPU and per instance, bounded, downsampled, never in the database.

Every series keeps two bounded rings (`Tier`s): fine buckets (5 s, one hour) and coarse ones (60 s,
24 hours). A sample is added to the bucket of its time in both rings (sum and count per field), so a
bucket's value is the mean of the samples in it and downsampling costs nothing at read time. A ring
grows as buckets are reached and then overwrites its oldest, so memory is bounded per series however
long the server runs: at most 2,160 slots of 26 bytes, about 55 KB per GPU and per instance (a day of
heartbeats); a series a few minutes old holds a few KB.

Fed by heartbeats (server/api/agent_api.py -> `observe_worker`) and the gateway (`observe_request`,
server/gateway/proxy.py). Each server keeps what it saw itself: with several servers behind a load
balancer a worker's history is on the server its heartbeats reach (agents keep one connection), and an
instance's request history is split across the servers that proxied its requests. GET /v2/telemetry
answers from the server asked, and says which one.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from typing import Any, Iterable

GPU_FIELDS = ("utilization", "memory_used", "power_watts", "temperature")
# requests and tokens are summed per bucket (a rate at read time), latency and memory are means.
INSTANCE_FIELDS = ("requests", "tokens", "latency_s", "memory_used")
_SUMMED = {"requests", "tokens"}


@dataclass(frozen=True)
class Tier:
    seconds: float
    slots: int


DEFAULT_TIERS = (Tier(5.0, 720), Tier(60.0, 1440))  # 1 hour at 5 s, 24 hours at 1 min


class Ring:
    """Up to `slots` buckets of `seconds`, each with a sum and a count per field, oldest overwritten first.

    Buckets are appended as time reaches them (a bucket without samples takes no slot), so a series
    costs memory only for what it has seen, up to the bound; a full ring overwrites its oldest bucket.
    Sums are float32 and bucket numbers int32 (unix time / 5 fits until 2310): 26 bytes per slot with
    four fields."""

    __slots__ = ("seconds", "slots", "fields", "buckets", "sums", "counts", "head", "last_bucket", "last_pos")

    def __init__(self, tier: Tier, fields: int):
        self.seconds = tier.seconds
        self.slots = tier.slots
        self.fields = fields
        self.buckets = array("i")
        self.sums = array("f")
        self.counts = array("H")
        self.head = 0  # the oldest slot once the ring is full
        self.last_bucket = -1
        self.last_pos = -1

    def _position(self, bucket: int) -> int | None:
        if bucket == self.last_bucket:
            return self.last_pos
        if bucket < self.last_bucket:  # a late sample (clock stepped back): its bucket if still held
            try:
                return self.buckets.index(bucket)
            except ValueError:
                return None
        n = self.fields
        if len(self.buckets) < self.slots:
            position = len(self.buckets)
            self.buckets.append(bucket)
            self.sums.extend(_ZEROS_F[:n])
            self.counts.extend(_ZEROS_H[:n])
        else:
            position = self.head
            self.head = (self.head + 1) % self.slots
            self.buckets[position] = bucket
            base = position * n
            self.sums[base:base + n] = _ZEROS_F[:n]
            self.counts[base:base + n] = _ZEROS_H[:n]
        self.last_bucket, self.last_pos = bucket, position
        return position

    def add(self, moment: float, values: tuple[float | None, ...]) -> None:
        position = self._position(int(moment // self.seconds))
        if position is None:
            return
        base = position * self.fields
        sums, counts = self.sums, self.counts
        for i, value in enumerate(values):
            if value is not None and value == value:  # not None, not NaN
                sums[base + i] += value
                if counts[base + i] < 65535:  # a mean over 65,535 samples is as good as one over more
                    counts[base + i] += 1

    def points(self, since: float, until: float) -> list[tuple[int, list[tuple[float, int]]]]:
        """(bucket, [(sum, count) per field]) for the buckets held between since and until, oldest first."""
        first, last = int(since // self.seconds), int(until // self.seconds)
        held = len(self.buckets)
        order = range(self.head, self.head + held) if held == self.slots else range(held)
        out = []
        n = self.fields
        for k in order:
            position = k % held
            bucket = self.buckets[position]
            if first <= bucket <= last:
                base = position * n
                out.append((bucket, [(self.sums[base + i], self.counts[base + i]) for i in range(n)]))
        out.sort(key=lambda point: point[0])  # late samples may have made a slot out of order
        return out

    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.buckets, self.sums, self.counts))


_ZEROS_F = array("f", [0.0] * 16)
_ZEROS_H = array("H", [0] * 16)


class Series:
    """One object's history: a ring per tier."""

    __slots__ = ("fields", "rings", "last_seen")

    def __init__(self, fields: tuple[str, ...], tiers: tuple[Tier, ...] = DEFAULT_TIERS):
        self.fields = fields
        self.rings = [Ring(t, len(fields)) for t in tiers]
        self.last_seen = 0.0

    def add(self, moment: float, values: tuple[float | None, ...]) -> None:
        for ring in self.rings:
            ring.add(moment, values)
        self.last_seen = max(self.last_seen, moment)

    def read(self, since: float, until: float, rates: frozenset[str] = frozenset()) -> tuple[float, dict[str, list]]:
        """The finest tier that still holds `since` (else the coarsest), columnar: t plus one list per
        field; a field in `rates` is its bucket sum per second, the others the mean of the bucket."""
        ring = next((r for r in self.rings if until - since <= r.seconds * r.slots), self.rings[-1])
        columns: dict[str, list] = {"t": [], **{f: [] for f in self.fields}}
        for bucket, cells in ring.points(since, until):
            columns["t"].append(bucket * ring.seconds)
            for name, (total, count) in zip(self.fields, cells):
                if name in rates:
                    columns[name].append(total / ring.seconds)
                else:
                    columns[name].append(total / count if count else None)
        return ring.seconds, columns

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.rings)


class TelemetryHistory:
    """Every GPU's and instance's series on this server; objects gone for a day are dropped."""

    def __init__(self, tiers: tuple[Tier, ...] = DEFAULT_TIERS, clock=time.time):
        self.tiers = tiers
        self.clock = clock
        self.gpus: dict[tuple[int, int], Series] = {}  # (worker id, GPU index)
        self.instances: dict[int, Series] = {}
        self.instance_names: dict[int, tuple[str, str]] = {}  # id -> (instance, model), from the gateway
        self.keep_seconds = max(t.seconds * t.slots for t in tiers)
        self._last_prune = clock()

    def observe_worker(self, worker_id: int, gpus: Iterable[Any], usage: Iterable[Any] = ()) -> None:
        """A heartbeat: each GPU's reading (GPUDevice), and each instance's memory (InstanceUsage)."""
        now = self.clock()
        for g in gpus:
            series = self.gpus.get((worker_id, g.index))
            if series is None:
                series = self.gpus[(worker_id, g.index)] = Series(GPU_FIELDS, self.tiers)
            series.add(now, (g.utilization, g.memory_used, g.power_watts, g.temperature))
        for u in usage:
            used = sum(u.gpu_bytes.values()) if u.gpu_bytes else u.ram_bytes
            self._instance(u.instance_id).add(now, (None, None, None, used))
        if now - self._last_prune > 600:
            self.prune(now)

    def observe_request(self, instance_id: int | None, seconds: float, tokens: int | None,
                        instance: str = "", model: str = "") -> None:
        """One gateway exchange answered by `instance_id` (None: no instance answered; not kept)."""
        if instance_id is None:
            return
        if instance:
            self.instance_names[instance_id] = (instance, model)
        self._instance(instance_id).add(self.clock(), (1.0, float(tokens) if tokens else 0.0, seconds, None))

    def _instance(self, instance_id: int) -> Series:
        series = self.instances.get(instance_id)
        if series is None:
            series = self.instances[instance_id] = Series(INSTANCE_FIELDS, self.tiers)
        return series

    def prune(self, now: float) -> None:
        """Objects not heard of for the whole history (deleted workers and instances) go."""
        self._last_prune = now
        for table in (self.gpus, self.instances):
            for key in [k for k, s in table.items() if now - s.last_seen > self.keep_seconds]:
                del table[key]
                if table is self.instances:
                    self.instance_names.pop(key, None)

    def gpu_history(self, worker_id: int, since: float) -> list[tuple[int, float, dict[str, list]]]:
        now = self.clock()
        return [(index, *series.read(since, now)) for (w, index), series in sorted(self.gpus.items()) if w == worker_id]

    def instance_history(self, instance_id: int, since: float) -> tuple[float, dict[str, list]] | None:
        series = self.instances.get(instance_id)
        if series is None:
            return None
        step, columns = series.read(since, self.clock(), rates=frozenset(_SUMMED))
        # requests -> requests/s, tokens -> tokens/s; latency is only a mean where requests came
        return step, {"t": columns["t"], "requests_per_s": columns["requests"], "tokens_per_s": columns["tokens"],
                      "latency_s": columns["latency_s"], "memory_used": columns["memory_used"]}

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in (*self.gpus.values(), *self.instances.values()))
