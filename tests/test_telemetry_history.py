"""The telemetry history: bounded whatever is fed (property), buckets are means (sums for rates), the
finest tier that covers the asked span answers, gone objects are dropped; the drift judge's episodes;
the braille and top renderers."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from maas_tui.render.telemetry import braille, present
from server.memory_drift import MemoryDrift, Thresholds, compare, suggested_memory
from server.schemas import GPUDevice, InstanceUsage
from server.telemetry_history import GPU_FIELDS, Series, TelemetryHistory, Tier

MIB = 1 << 20


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def gpu(util: float, used: int, power: float | None = None) -> GPUDevice:
    return GPUDevice(index=0, name="H100", memory_total=80 << 30, memory_used=used, utilization=util,
                     power_watts=power)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 200_000), st.floats(0, 100)), min_size=1, max_size=400), st.booleans())
def test_series_memory_is_bounded_and_reads_stay_within_the_rings(samples, in_order):
    tiers = (Tier(5.0, 12), Tier(60.0, 10))
    series = Series(GPU_FIELDS, tiers)
    bound = sum(t.slots * (4 + 4 * len(GPU_FIELDS) + 2 * len(GPU_FIELDS)) for t in tiers)
    for moment, value in (sorted(samples) if in_order else samples):  # out of order: a clock stepping back
        series.add(moment, (value, None, None, None))
        assert series.nbytes() <= bound
    assert all(len(r.buckets) <= r.slots and len(set(r.buckets)) == len(r.buckets) for r in series.rings)
    last = max(m for m, _ in samples)
    for span in (30, 600, 10**6):
        step, columns = series.read(last - span, last)
        ring = next(r for r in series.rings if r.seconds == step)
        assert len(columns["t"]) <= ring.slots
        assert columns["t"] == sorted(columns["t"])
        assert all(v is None or 0 <= v <= 100.001 for v in columns["utilization"])
    if in_order:  # the newest bucket is always held, with the mean of its samples
        newest = int(last // 5)
        in_it = [v for m, v in samples if int(m // 5) == newest]
        step, columns = series.read(last - 1, last)
        assert columns["t"][-1] == newest * 5 and abs(columns["utilization"][-1] - sum(in_it) / len(in_it)) < 1e-3


def test_buckets_are_means_rates_are_sums_and_the_finest_tier_answers():
    clock = Clock(1_000_000.0)
    history = TelemetryHistory(clock=clock)
    for util, power in ((10, None), (30, 200.0)):  # two heartbeats in one 5 s bucket
        history.observe_worker(7, [gpu(util, 1 << 30, power)])
        clock.now += 1
    [(index, step, columns)] = history.gpu_history(7, clock.now - 3600)
    assert (index, step) == (0, 5.0)
    assert columns["utilization"] == [20.0] and columns["power_watts"] == [200.0]
    [(_, coarse_step, _)] = history.gpu_history(7, clock.now - 6 * 3600)
    assert coarse_step == 60.0  # beyond the fine ring's hour: the minute ring

    for _ in range(10):
        history.observe_request(42, 0.5, 7)
    history.observe_worker(7, [], [InstanceUsage(instance_id=42, ram_bytes=300 * MIB)])
    step, instance = history.instance_history(42, clock.now - 60)
    assert sum(instance["requests_per_s"]) * step == 10 and sum(instance["tokens_per_s"]) * step == 70
    assert instance["latency_s"] == [0.5] and instance["memory_used"] == [300 * MIB]
    history.observe_request(None, 0.1, None)  # nobody answered: nothing kept
    assert set(history.instances) == {42}

    clock.now += 25 * 3600
    history.prune(clock.now)
    assert history.gpus == {} and history.instances == {}


def test_drift_over_at_once_under_only_after_its_time_and_one_event_per_episode():
    clock = Clock()
    drift = MemoryDrift(Thresholds(over_ratio=1.0, under_ratio=0.5, under_seconds=600), clock)
    claim = {"device": "cpu", "ram_bytes": 1000 * MIB}
    drift.report([InstanceUsage(instance_id=1, ram_bytes=100 * MIB)])
    memory, record = drift.judge(1, claim)
    assert memory.ratio == 0.1 and memory.drift is None and record is None  # not yet 10 minutes
    clock.now += 601
    memory, record = drift.judge(1, claim)
    assert record == "under" and memory.suggested_memory == "128MiB"
    assert drift.judge(1, claim)[1] is None  # the same episode
    drift.report([InstanceUsage(instance_id=1, ram_bytes=1200 * MIB)])
    memory, record = drift.judge(1, claim)
    assert record == "over" and memory.suggested_memory == "1472MiB"
    drift.report([InstanceUsage(instance_id=1, ram_bytes=800 * MIB)])
    assert drift.judge(1, claim)[0].drift is None


def test_compare_per_gpu_and_without_nvml():
    claim = {"device": "gpu", "gpu_indexes": [0, 1], "vram_bytes_per_gpu": 10 << 30}
    memory = compare(claim, InstanceUsage(instance_id=1, gpu_bytes={0: 12 << 30, 1: 11 << 30}), 0.0)
    assert memory.per_gpu == {0: [10 << 30, 12 << 30], 1: [10 << 30, 11 << 30]} and memory.ratio == 1.15
    assert compare(claim, InstanceUsage(instance_id=1, ram_bytes=5), 0.0) is None  # no per-process GPU memory
    assert compare(None, InstanceUsage(instance_id=1), 0.0) is None
    assert suggested_memory(10 << 30) == "12GiB" and suggested_memory(1) == "64MiB"


def test_braille_fills_from_the_bottom_and_gaps_keep_the_last_value():
    assert present([None, 5, None, 7]) == [0.0, 5, 5, 7]
    full = braille([100, 100], width=1, height=2, high=100)
    assert full == ["⣿", "⣿"]
    half = braille([50, 0], width=1, height=2, high=100)
    assert half == ["⠀", "⡇"]  # the left column's four lowest dots
    assert braille([], width=3, height=1, high=1) == ["⠀⠀⠀"]


def test_top_frame_renders_workers_and_instances():
    from io import StringIO

    from rich.console import Console

    from maas_tui.render.telemetry import top_frame
    from server.schemas.telemetry import GPUHistory, InstanceHistory, InstanceMemory, TelemetryHistory

    worker = SimpleNamespace(id=1, name="gpu-1", state="ready", gpus=[gpu(50, 40 << 30, 300.0)],
                             host=SimpleNamespace(cpu_percent=5.0, memory_used=0, memory_total=0))
    instance = SimpleNamespace(id=9, name="llama-0", worker_name="gpu-1", state="running", download_progress=None)
    history = TelemetryHistory(server="s", step_seconds=5, gpus=[GPUHistory(
        worker_id=1, worker="gpu-1", gpu=0, t=[0, 5], utilization=[20, 80], memory_used=[1, 2], power_watts=[1, 2],
        temperature=[50, 60])], instances=[InstanceHistory(
        instance_id=9, instance="llama-0", model="llama", t=[0], requests_per_s=[1.5], tokens_per_s=[30],
        latency_s=[0.2], memory_used=[1], memory=InstanceMemory(device="gpu", claimed_bytes=10 << 30, used_bytes=20 << 30,
                                                                ratio=2, drift="over", reported_at=0))])
    out = StringIO()
    Console(file=out, width=120, color_system=None).print(top_frame([worker], [instance], history, width=120))
    text = out.getvalue()
    assert "gpu-1" in text and "80%" in text and "60°C" in text and "llama-0" in text and "1.50" in text
    assert "200ms" in text and "20.0/10.0 GiB" in text
