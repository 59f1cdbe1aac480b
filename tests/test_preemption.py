"""Priorities and preemption: the selection maths (properties) and the scheduler on simulated GPUs.

The server-level test runs the real server on SQLite with a worker row of simulated GPUs (no agent,
so instances stop at `scheduled`); where an agent would report a drained instance stopped, the test
deletes its row, as the server does on that report.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from server.db import tables
from server.scheduler.preemption import Candidate, choose_victims
from test_scheduler_api import GB, LLAMA_8B, add_worker, run_cli, written

# --- the maths ---------------------------------------------------------------------------------------------

candidates_st = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(1, 40)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(candidates_st, st.integers(1, 5), st.integers(0, 30), st.integers(1, 100), st.integers(0, 3))
def test_preemption_never_evicts_more_than_needed(raw, rank, free, need, floor):
    """Additive capacity: the victims are strictly lower, within each model's allowance, make room, and none of
    them could be spared; when the lower classes alone make room, nothing of a higher class is taken."""
    candidates = [Candidate(id=n, model=model, rank=r) for n, (r, model, _size) in enumerate(raw)]
    size = {n: s for n, (_r, _m, s) in enumerate(raw)}
    per_model: dict[int, int] = {}
    for c in candidates:
        per_model[c.model] = per_model.get(c.model, 0) + 1
    allowance = {m: max(0, count - floor) for m, count in per_model.items()}

    def fits(ids: frozenset[int]) -> bool:
        return free + sum(size[i] for i in ids) >= need

    assume(not fits(frozenset()))  # asked only for an instance that does not fit as things are
    victims = choose_victims(candidates, rank, fits, allowance)
    eligible = [c for c in candidates if c.rank < rank]
    if victims is None:
        if floor == 0:  # nothing binds: even every lower instance together is not enough
            assert not fits(frozenset(c.id for c in eligible))
        return
    ids = frozenset(v.id for v in victims)
    assert victims and all(v.rank < rank for v in victims)
    assert fits(ids)
    assert all(not fits(ids - {v.id}) for v in victims), "a victim could have been spared"
    for model, count in allowance.items():
        assert sum(1 for v in victims if v.model == model) <= count
    if floor == 0:
        lowest_enough = min(p for p in range(0, rank) if fits(frozenset(c.id for c in eligible if c.rank <= p))
                            or p == rank - 1)
        assert max(v.rank for v in victims) <= lowest_enough


def test_equal_priority_is_never_preempted_and_lowest_goes_first():
    candidates = [Candidate(1, "a", rank=2), Candidate(2, "b", rank=1), Candidate(3, "c", rank=3)]
    one_is_enough = lambda ids: len(ids) >= 1  # noqa: E731
    assert [v.id for v in choose_victims(candidates, 3, one_is_enough, {"a": 1, "b": 1, "c": 1})] == [2]
    assert choose_victims([Candidate(3, "c", rank=3)], 3, one_is_enough, {"c": 1}) is None  # equal: never
    assert choose_victims(candidates, 3, one_is_enough, {"a": 1, "b": 0, "c": 1})[0].id == 1  # b at its floor


# --- the scheduler on simulated GPUs --------------------------------------------------------------------------


def _body(name: str, priority: str, **fields) -> dict:
    # memory_bytes: one replica per 80 GB GPU, whatever the estimate says.
    return {"name": name, "source": LLAMA_8B, "backend": "vllm", "memory_bytes": 60 * GB, "priority": priority,
            **fields}


async def _instances(server, model: str) -> list[tables.ModelInstance]:
    async with server.db.session() as s:
        return list((await s.execute(select(tables.ModelInstance).where(
            tables.ModelInstance.model_name == model).order_by(tables.ModelInstance.id))).scalars())


async def _agent_stops_terminating(server) -> None:
    """What the agent's 'terminated' report does: the drained instance's row goes, and its claim with it."""
    async with server.db.session() as s:
        for row in (await s.execute(select(tables.ModelInstance).where(
                tables.ModelInstance.state == "terminating"))).scalars():
            await s.delete(row)
        await s.commit()


async def test_critical_displaces_low_but_never_an_equal(server, admin: MaasClient, api_key: str, tmp_path: Path):
    await add_worker(server, "gpu-1", 1)
    await admin.create_model(_body("batch", "low"))
    await eventually(lambda: _states_are(server, "batch", ["scheduled"]), timeout=15, message="batch placed")

    # The dry run says what would be preempted, and writes nothing.
    before = await written(server)
    plan = await admin.evaluate_model(_body("prod", "critical"))
    assert plan.schedulable == 0 and "1 more by preempting" in plan.message
    assert plan.replicas[0].reasons[0].reason == "preempting"
    assert "would preempt batch-" in plan.replicas[0].reasons[0].message and "(low)" in plan.replicas[0].reasons[0].message
    assert await written(server) == before

    await admin.create_model(_body("prod", "critical"))

    async def batch_preempted() -> bool:
        return any(i.state == "terminating" for i in await _instances(server, "batch"))

    await eventually(batch_preempted, timeout=15, message="batch's instance preempted")
    victim = next(i for i in await _instances(server, "batch") if i.state == "terminating")
    assert victim.state_message == "preempted_by prod (priority critical)"
    prod = (await _instances(server, "prod"))[0]
    assert prod.state == "pending" and prod.schedule_reasons[0]["reason"] == "preempting"
    events = {(e.object_name, e.reason) for e in await admin.list_events(kind="instances", limit=200)}
    assert (victim.name, "Preempted") in events

    # While the victim drains, the model controller replaces it; the replacement waits, saying why.
    await eventually(lambda: _states_are(server, "batch", ["terminating", "pending"]), timeout=15,
                     message="batch's replacement created")
    await _agent_stops_terminating(server)
    await eventually(lambda: _states_are(server, "prod", ["scheduled"]), timeout=15, message="prod placed")

    async def replacement_says_why() -> bool:
        rows = await _instances(server, "batch")
        return (len(rows) == 1 and rows[0].state == "pending" and bool(rows[0].schedule_reasons)
                and rows[0].schedule_reasons[0]["reason"] == "preempted_by")

    await eventually(replacement_says_why, timeout=15, message="batch's replacement pending with preempted_by")
    replacement = (await _instances(server, "batch"))[0]
    assert "prod" in replacement.schedule_reasons[0]["message"]

    # An equal priority waits: prod keeps its GPU.
    await admin.create_model(_body("peer", "critical"))

    async def peer_unschedulable() -> bool:
        rows = await _instances(server, "peer")
        return len(rows) == 1 and bool(rows[0].schedule_reasons)

    await eventually(peer_unschedulable, timeout=15, message="peer pending with reasons")
    peer = (await _instances(server, "peer"))[0]
    assert all(r["reason"] != "preempting" for r in peer.schedule_reasons)
    assert await _states_are(server, "prod", ["scheduled"])
    async with server.db.session() as s:
        preempted = await s.scalar(select(func.count()).select_from(tables.Event).where(tables.Event.reason == "Preempted"))
    assert preempted == 1
    # The CLI: autoscale, and the columns and describe lines for it.
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "autoscale", "batch", "--min", "0",
                                  "--max", "2", "--target-concurrency", "4", "--idle-timeout", "600")
    assert out.exit_code == 0 and "0-2 replicas, 4 in flight per replica" in out.output, out.output
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "list", "-o", "wide")
    assert "auto 0-2 @4" in out.output and "low" in out.output and "manual" in out.output, out.output
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "describe", "batch")
    assert "Autoscaling" in out.output and "to zero after 10 min idle" in out.output and "Priority" in out.output
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "get", "batch", "-o", "yaml")
    assert "max_replicas: 2" in out.output and "priority: low" in out.output, out.output
    (tmp_path / "batch.yaml").write_text(out.output)  # the document applies back unchanged
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "apply", "-f", str(tmp_path / "batch.yaml"))
    assert out.exit_code == 0 and "model/batch unchanged" in out.output, out.output
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "autoscale", "batch", "--off")
    assert out.exit_code == 0 and "manual" in out.output, out.output
    assert (await admin.get_model("batch")).max_replicas is None
    await admin.update_model("batch", {"max_replicas": 2})
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "scale", "batch", "1")
    assert out.exit_code == 0 and "autoscaling of batch is off now" in out.output, out.output
    assert (await admin.get_model("batch")).max_replicas is None
    with pytest.raises(ApiClientError) as unknown:  # classes come from the server config
        await admin.create_model(_body("odd", "urgent"))
    assert unknown.value.status == 400 and "critical, high, normal, low" in unknown.value.message


async def _states_are(server, model: str, states: list[str]) -> bool:
    return [i.state for i in await _instances(server, model)] == states



def test_the_fewest_victims_on_real_placement_and_the_least_important_worker():
    """Placement maths on simulated H100s: the pass takes one big low instance rather than two small ones, prefers
    the worker whose victims are less important, and a second pending instance does not count on the same victims."""
    from types import SimpleNamespace

    from server.scheduler.estimate import MemoryEstimate
    from server.scheduler.placement import Request
    from server.scheduler.preemption import ModelPolicy, PreemptionPass
    from server.scheduler.snapshot import ClusterState
    from server.schemas import ModelSpec

    def worker(id: int) -> dict:
        return {"id": id, "name": f"gpu-{id}", "address": "127.0.0.1", "state": "ready", "cordoned": False,
                "labels": {}, "host": {"memory_total": 512 * GB},
                "gpus": [{"index": 0, "name": "H100 (simulated)", "vendor": "simulated", "memory_total": 80 * GB}]}

    def instance(id: int, model_id: int, worker_id: int | None, gb: int, state: str = "running") -> dict:
        claim = {"device": "gpu", "gpu_indexes": [0], "vram_bytes_per_gpu": gb * GB} if worker_id else None
        return {"id": id, "name": f"i-{id}", "model_id": model_id, "generation": 1, "state": state,
                "worker_id": worker_id, "claim": claim, "schedule_reasons": [],
                "spec": {"source": "/m.gguf", "backend": "llama.cpp"}}

    state = ClusterState()
    # gpu-1: two small low instances (30 + 30 GB); gpu-2: one big low (70 GB); gpu-3: one normal (70 GB).
    state.load([worker(1), worker(2), worker(3)],
               [instance(1, 10, 1, 30), instance(2, 11, 1, 30), instance(3, 12, 2, 70), instance(4, 20, 3, 70),
                instance(5, 30, None, 0, "pending"), instance(6, 30, None, 0, "pending")])
    policies = {10: ModelPolicy("small-a", 1, "low", 0), 11: ModelPolicy("small-b", 1, "low", 0),
                12: ModelPolicy("big", 1, "low", 0), 20: ModelPolicy("normal", 2, "normal", 0),
                30: ModelPolicy("prod", 4, "critical", 0)}
    spec = ModelSpec(source="/m.gguf", backend="llama.cpp", memory_bytes=60 * GB)
    request = Request(spec, MemoryEstimate.fixed(60 * GB, cpu_capable=False), 30)
    preemption = PreemptionPass(state, policies)
    first = preemption.place(state.instances[5], request)
    assert [v.record.id for v in preemption.victims] == [3]  # one victim, not the two on gpu-1
    assert first[0].reason == "preempting" and "i-3 (low)" in first[0].message
    second = preemption.place(state.instances[6], request)
    # gpu-1's two low ones rather than gpu-3's one normal: the least important classes go first.
    assert sorted(v.record.id for v in preemption.victims) == [1, 2, 3] and second[0].worker == "gpu-1"
    # Floors: with small-a kept at 1 replica gpu-1 cannot make room, so the normal one on gpu-3 goes.
    floored = PreemptionPass(state, {**policies, 10: ModelPolicy("small-a", 1, "low", 1)})
    floored.place(state.instances[5], request)
    assert floored.place(state.instances[6], request)[0].worker == "gpu-3"
    assert sorted(v.record.id for v in floored.victims) == [3, 4]
    # Nothing of an equal or higher class: a normal instance finds no victim among normal and critical ones.
    normal = Request(spec, MemoryEstimate.fixed(60 * GB, cpu_capable=False), 20)
    only_peers = PreemptionPass(state, {k: (p if p.rank >= 2 else ModelPolicy(p.name, 2, "normal", 0))
                                        for k, p in policies.items()})
    assert only_peers.place(SimpleNamespace(model_id=20, team=None), normal) is None
