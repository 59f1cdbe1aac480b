"""Property-based tests of placement and of the bus-fed snapshot (hypothesis).

- no GPU (and no host RAM) is ever over-committed, whatever is placed in whatever order;
- spread never puts a second replica of a model on a worker while another worker without
  one could take it;
- binpack always takes the tightest fitting GPU;
- the same snapshot gives the same decision (deterministic tie-breaks);
- a snapshot kept current from events equals one loaded fresh from the final rows.

(The third property of the issue, "a dry run writes nothing", runs against the real
server in test_scheduler_api.py.)
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server import schemas
from server.scheduler.estimate import MemoryEstimate, tensor_parallel_sizes
from server.scheduler.placement import Cluster, Placement, Request, WorkerSnapshot, plan
from server.scheduler.snapshot import ClusterState

GB = 1000**3
GiB = 1024**3
SIZES = [24 * GB, 40 * GB, 80 * GB]
PROFILE = settings(max_examples=100, deadline=None, derandomize=True, database=None)


@st.composite
def clusters(draw, min_workers: int = 1, max_workers: int = 6) -> list[WorkerSnapshot]:
    workers = []
    for n in range(draw(st.integers(min_workers, max_workers))):
        gpus = draw(st.integers(0, 8))
        size = draw(st.sampled_from(SIZES))
        workers.append(WorkerSnapshot(
            id=n + 1, name=f"w{n + 1}", address="x", ready=draw(st.booleans()) or n == 0,
            cordoned=draw(st.sampled_from([False, False, False, True])), ram_total=draw(st.sampled_from([16, 64, 256])) * GiB,
            gpu_total={i: size for i in range(gpus)}, labels={"zone": draw(st.sampled_from(["a", "b"]))},
            gpu_names={i: f"GPU-{size // GB}GB" for i in range(gpus)}, gpu_vendors={i: "nvidia" for i in range(gpus)},
            reserved_vram_bytes=draw(st.sampled_from([0, 0, 2 * GB]))))
    return workers


@st.composite
def requests(draw) -> Request:
    backend = draw(st.sampled_from(["vllm", "llama.cpp"]))
    fields: dict = {"source": "/m", "backend": backend,
                    "placement_strategy": draw(st.sampled_from(["spread", "binpack"]))}
    if draw(st.booleans()):
        fields["worker_selector"] = {"zone": draw(st.sampled_from(["a", "b"]))}
    if backend == "vllm":
        fields["distributed"] = draw(st.booleans())
    else:
        fields["cpu_only"] = draw(st.sampled_from([False, False, True]))
        fields["partial_offload"] = not fields["cpu_only"] and draw(st.booleans())
    spec = schemas.ModelSpec(**fields)
    weights = draw(st.integers(1, 400)) * GiB // 2
    heads = draw(st.sampled_from([16, 28, 32, 64]))
    memory = MemoryEstimate(
        method="test", weights=weights, kv_cache=draw(st.integers(0, 40)) * GiB, fixed_overhead=GiB,
        split_overhead=draw(st.integers(0, 2)) * GiB, comm_overhead=GiB // 4 if backend == "vllm" else 0,
        layers=32, layer_weights=weights * 9 // 10, heads=heads, kv_heads=8,
        tp_sizes=tensor_parallel_sizes(heads, 8) if backend == "vllm" else None, cpu_capable=backend == "llama.cpp")
    return Request(spec, memory, draw(st.integers(1, 3)))


def check_capacity(workers: list[WorkerSnapshot]) -> None:
    for w in workers:
        assert w.ram_claimed >= 0 and w.ram_free() >= 0, (w.name, w.ram_claimed)
        for index, total in w.gpu_total.items():
            claimed = w.gpu_claimed.get(index, 0)
            assert 0 <= claimed <= total - w.reserved_vram_bytes, (w.name, index, claimed, total)


def recount(workers: list[WorkerSnapshot], placements: list[tuple[Placement, object]]) -> dict:
    """GPU bytes per (worker, GPU) from the claims alone, independent of the snapshot's bookkeeping."""
    used: dict[tuple[int, int], int] = {}
    for placement, _ in placements:
        claim = placement.claim
        for i in claim.gpu_indexes:
            used[(placement.worker.id, i)] = used.get((placement.worker.id, i), 0) + claim.vram_bytes_per_gpu
        for sub in claim.subordinate_workers:
            for i in sub.gpu_indexes:
                used[(sub.worker_id, i)] = used.get((sub.worker_id, i), 0) + sub.vram_bytes_per_gpu
    return used


@PROFILE
@given(workers=clusters(), batch=st.lists(requests(), min_size=1, max_size=12), repeats=st.integers(1, 6))
def test_no_gpu_or_ram_is_ever_over_committed(workers, batch, repeats):
    cluster = Cluster(workers)
    placed: list[tuple[Placement, object]] = []
    for request in batch * repeats:
        result = plan(request, cluster)
        if isinstance(result, Placement):
            claim = result.claim
            assert result.worker.schedulable
            assert len(claim.gpu_indexes) == claim.tensor_parallel_size or claim.device == "cpu"
            assert len(claim.subordinate_workers) == claim.pipeline_parallel_size - 1
            cluster.commit(result, request.model_key)
            placed.append((result, request.model_key))
            check_capacity(workers)
        else:
            assert result and all(r.message for r in result)
    used = recount(workers, placed)
    for w in workers:
        for index in w.gpu_total:
            assert w.gpu_claimed.get(index, 0) == used.get((w.id, index), 0)
    # The incremental indexes agree with a rebuild.
    cluster.ensure_indexes()
    indexed, loads = list(cluster.free_gpus), list(cluster.loads)
    cluster.changed()
    cluster.ensure_indexes()
    assert (indexed, loads) == (cluster.free_gpus, cluster.loads)


@PROFILE
@given(workers=clusters(min_workers=2), need=st.integers(1, 60), replicas=st.integers(2, 12),
       busy=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 7), st.integers(0, 80)), max_size=10))
def test_spread_never_doubles_up_while_another_worker_could_take_it(workers, need, replicas, busy):
    for worker_id, index, gb in busy:  # other models' claims
        w = next((w for w in workers if w.id == worker_id), None)
        if w is not None and index in w.gpu_total:
            w.gpu_claimed[index] = min(gb * GB, w.gpu_total[index] - w.reserved_vram_bytes)
    cluster = Cluster(workers)
    spec = schemas.ModelSpec(source="/m", backend="vllm", placement_strategy="spread")
    request = Request(spec, MemoryEstimate.fixed(need * GB, cpu_capable=False), "model")
    for _ in range(replicas):
        result = plan(request, cluster)
        if not isinstance(result, Placement):
            break
        if result.worker.replicas.get("model", 0) > 0:
            for other in workers:
                if other is result.worker or other.replicas.get("model", 0) or not other.schedulable:
                    continue
                assert all(other.gpu_free(i) < need * GB for i in other.gpu_total), (other.name, result.worker.name)
        cluster.commit(result, "model")


@PROFILE
@given(workers=clusters(), need=st.integers(1, 70), steps=st.integers(1, 20))
def test_binpack_takes_the_tightest_fitting_gpu(workers, need, steps):
    cluster = Cluster(workers)
    spec = schemas.ModelSpec(source="/m", backend="vllm", placement_strategy="binpack")
    request = Request(spec, MemoryEstimate.fixed(need * GB, cpu_capable=False), "model")
    for _ in range(steps):
        result = plan(request, cluster)
        if not isinstance(result, Placement):
            assert all(w.gpu_free(i) < need * GB for w in workers if w.schedulable for i in w.gpu_total)
            break
        chosen = (result.worker.gpu_free(result.claim.gpu_indexes[0]), result.worker.id, result.claim.gpu_indexes[0])
        candidates = [(w.gpu_free(i), w.id, i) for w in workers if w.schedulable for i in w.gpu_total
                      if w.gpu_free(i) >= need * GB]
        assert chosen == min(candidates)
        cluster.commit(result, "model")


@PROFILE
@given(workers=clusters(), request=requests())
def test_the_same_snapshot_gives_the_same_decision(workers, request):
    first = plan(request, Cluster(w.copy() for w in workers))
    second = plan(request, Cluster(w.copy() for w in reversed(workers)))
    if isinstance(first, Placement):
        assert isinstance(second, Placement)
        assert (first.worker.id, first.claim) == (second.worker.id, second.claim)
    else:
        assert [r.model_dump() for r in first] == [r.model_dump() for r in second]


def _worker(id: int) -> dict:
    return {"id": id, "name": f"w{id}", "address": "x", "state": "ready", "cordoned": False, "labels": {},
            "gpus": [{"index": i, "name": "H100", "vendor": "nvidia", "memory_total": 80 * GB} for i in range(4)],
            "host": {"memory_total": 64 * GiB}}


instance_versions = st.fixed_dictionaries({
    "id": st.integers(1, 8), "state": st.sampled_from([s.value for s in schemas.InstanceState]),
    "worker": st.sampled_from([None, 1, 2, 3]), "gpus": st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True),
    "gb": st.integers(1, 30), "sub": st.sampled_from([None, 1, 2, 3]), "deleted": st.booleans()})


@PROFILE
@given(changes=st.lists(instance_versions, max_size=40))
def test_snapshot_from_events_equals_a_fresh_load(changes):
    workers = [_worker(1), _worker(2), _worker(3)]
    live = ClusterState()
    live.load(workers, [])
    rows: dict[int, dict] = {}
    for change in changes:
        subs = [] if change["sub"] is None else [schemas.SubordinateClaim(
            worker_id=change["sub"], worker_name=f"w{change['sub']}", gpu_indexes=change["gpus"],
            vram_bytes_per_gpu=change["gb"] * GB)]
        claim = None if change["worker"] is None else schemas.ResourceClaim(
            device="gpu", gpu_indexes=change["gpus"], vram_bytes_per_gpu=change["gb"] * GB,
            subordinate_workers=subs).model_dump(mode="json")
        obj = {"id": change["id"], "name": f"i{change['id']}", "model_id": change["id"] % 3, "generation": 1,
               "state": change["state"], "worker_id": change["worker"], "claim": claim,
               "spec": {"source": "/m", "backend": "vllm"}, "schedule_reasons": []}
        if change["deleted"] and change["id"] in rows:
            live.apply("instances", "deleted", rows.pop(change["id"]))
        else:
            live.apply("instances", "updated" if change["id"] in rows else "created", obj)
            rows[change["id"]] = obj
    fresh = ClusterState()
    fresh.load(workers, list(rows.values()))
    for worker_id in (1, 2, 3):
        a, b = live.cluster.workers[worker_id], fresh.cluster.workers[worker_id]
        assert {i: v for i, v in a.gpu_claimed.items() if v} == {i: v for i, v in b.gpu_claimed.items() if v}
        assert a.replicas == b.replicas
    assert set(live.pending) == set(fresh.pending)
