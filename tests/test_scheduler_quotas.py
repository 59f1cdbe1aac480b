"""Team quotas in the placement core (server/scheduler/quotas.py, placement.py) and the bus-fed snapshot.

- the quota filter: a team at a limit gets one `quota_exceeded` reason (need / used / limit) before any
  worker is looked at; a placement that needs more than the team has left (a wider split, host RAM)
  is skipped for one that fits, else the reason names what the fitting option needs;
- other teams, and instances without a team, are not limited by it;
- property: no team ever goes over any of its limits, whatever the cluster, the quotas and the
  sequence of placements and removals; every quota_exceeded reason is true, and the quota really is
  what stood in the way;
- the snapshot counts each team's claims from instance events and follows quota events.
"""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from server import schemas
from server.scheduler.estimate import MemoryEstimate
from server.scheduler.placement import (QUOTA_FIELDS, Cluster, Placement, Request, Usage, WorkerSnapshot, claim_cost,
                                        evaluate, least_cost, plan, quota_reasons)
from server.scheduler.snapshot import ClusterState

GB = 1000**3
GiB = 1024**3
PROFILE = settings(max_examples=100, deadline=None, derandomize=True, database=None)


def gpu_worker(id: int, gpus: int = 4, size: int = 80 * GB, ram: int = 256 * GiB) -> WorkerSnapshot:
    return WorkerSnapshot(id=id, name=f"w{id}", address="x", ready=True, cordoned=False, ram_total=ram,
                          gpu_total={i: size for i in range(gpus)}, gpu_names={i: "H100" for i in range(gpus)},
                          gpu_vendors={i: "nvidia" for i in range(gpus)})


def vllm(need: int, team: str | None = "red", **fields) -> Request:
    spec = schemas.ModelSpec(source="/m", backend="vllm", **fields)
    return Request(spec, MemoryEstimate.fixed(need, cpu_capable=False), "m", team=team)


def place(cluster: Cluster, request: Request) -> Placement:
    result = plan(request, cluster)
    assert isinstance(result, Placement), result
    cluster.commit(result, request.model_key, request.team)
    return result


# --- the filter ----------------------------------------------------------------------------------


def test_a_team_at_its_gpu_quota_gets_quota_exceeded_with_need_used_and_limit():
    cluster = Cluster([gpu_worker(1), gpu_worker(2)])
    cluster.set_quota("red", schemas.TeamQuota(gpus=2))
    request = vllm(20 * GB)
    place(cluster, request)
    place(cluster, request)
    result = plan(request, cluster)
    assert isinstance(result, list)
    [reason] = result
    assert (reason.reason, reason.team, reason.quota, reason.need, reason.used, reason.limit, reason.worker) == (
        "quota_exceeded", "red", "gpus", 1, 2, 2, None)
    assert "team red" in reason.message and "2 of 2" in reason.message
    # The rest of the cluster is free: other teams and instances without a team still place.
    assert isinstance(plan(vllm(20 * GB, team="blue"), cluster), Placement)
    assert isinstance(plan(vllm(20 * GB, team=None), cluster), Placement)
    # Raising the quota lets it through; so does giving a claim back.
    cluster.set_quota("red", schemas.TeamQuota(gpus=3))
    third = place(cluster, request)
    assert cluster.used("red") == Usage(gpus=3, vram_bytes=60 * GB, replicas=3)
    cluster.set_quota("red", schemas.TeamQuota(gpus=3))
    assert isinstance(plan(request, cluster), list)
    cluster.apply(third.claim, third.worker.id, "m", -1, team="red")
    assert isinstance(plan(request, cluster), Placement)


def test_every_limit_is_checked_and_each_one_over_is_named():
    cluster = Cluster([gpu_worker(1)])
    cluster.set_quota("red", schemas.TeamQuota(gpus=10, vram_bytes=50 * GB, replicas=2))
    request = vllm(30 * GB)
    place(cluster, request)
    reasons = plan(request, cluster)
    assert [(r.quota, r.need, r.used, r.limit) for r in reasons] == [("vram_bytes", 30 * GB, 30 * GB, 50 * GB)]
    cluster.set_quota("red", schemas.TeamQuota(vram_bytes=100 * GB, replicas=1))
    reasons = plan(request, cluster)
    assert [(r.quota, r.need, r.used, r.limit) for r in reasons] == [("replicas", 1, 1, 1)]
    cluster.set_quota("red", schemas.TeamQuota(vram_bytes=40 * GB, replicas=1))
    assert {r.quota for r in plan(request, cluster)} == {"replicas"}  # the gate: the least it could need
    cluster.set_quota("red", schemas.TeamQuota())  # all None: unlimited
    assert "red" not in cluster.quotas and isinstance(plan(request, cluster), Placement)


def test_a_split_wider_than_the_gpus_left_is_refused_with_what_it_needs():
    # 100 GB does not fit one 80 GB GPU: tensor parallel over 2. The team has 1 GPU left.
    cluster = Cluster([gpu_worker(1)])
    cluster.set_quota("red", schemas.TeamQuota(gpus=1))
    spec = schemas.ModelSpec(source="/m", backend="vllm")
    memory = MemoryEstimate(method="test", weights=100 * GB, kv_cache=0, fixed_overhead=0, layers=32,
                            layer_weights=90 * GB, heads=32, kv_heads=8, tp_sizes=(1, 2, 4, 8))
    request = Request(spec, memory, "m", team="red")
    [reason] = plan(request, cluster)
    assert (reason.reason, reason.quota, reason.need, reason.used, reason.limit) == ("quota_exceeded", "gpus", 2, 0, 1)
    cluster.set_quota("red", schemas.TeamQuota(gpus=2))
    assert claim_cost(place(cluster, request).claim).gpus == 2


def test_a_gpu_selector_over_the_quota_is_refused():
    cluster = Cluster([gpu_worker(1)])
    cluster.set_quota("red", schemas.TeamQuota(gpus=1))
    request = vllm(10 * GB, gpu_selector=[{"worker": "w1", "gpu_indexes": [0, 1]}])
    [reason] = plan(request, cluster)
    assert (reason.quota, reason.need, reason.limit) == ("gpus", 2, 1)
    cluster.set_quota("red", schemas.TeamQuota(gpus=1, vram_bytes=5 * GB))
    request = vllm(10 * GB, gpu_selector=[{"worker": "w1", "gpu_indexes": [0]}])
    [reason] = plan(request, cluster)
    assert (reason.quota, reason.need, reason.limit) == ("vram_bytes", 10 * GB, 5 * GB)


def test_llama_cpp_without_gpus_left_in_its_quota_goes_to_a_cpu_worker():
    cpu = WorkerSnapshot(id=2, name="cpu", address="x", ready=True, cordoned=False, ram_total=64 * GiB, gpu_total={})
    cluster = Cluster([gpu_worker(1), cpu])
    cluster.set_quota("red", schemas.TeamQuota(gpus=0))
    spec = schemas.ModelSpec(source="/m.gguf", backend="llama.cpp")
    request = Request(spec, MemoryEstimate.fixed(4 * GiB, cpu_capable=True), "m", team="red")
    found = place(cluster, request)
    assert found.worker.name == "cpu" and found.claim.device == "cpu"
    cluster.set_quota("red", schemas.TeamQuota(gpus=0, ram_bytes=6 * GiB))
    [reason] = plan(request, cluster)  # the GPU worker would take it, the quota does not let it
    assert (reason.quota, reason.need) == ("gpus", 1)


def test_a_team_already_over_a_lowered_limit_still_places_what_needs_none_of_it():
    cpu = WorkerSnapshot(id=2, name="cpu", address="x", ready=True, cordoned=False, ram_total=64 * GiB, gpu_total={})
    cluster = Cluster([gpu_worker(1), cpu])
    place(cluster, vllm(20 * GB))
    place(cluster, vllm(20 * GB))
    cluster.set_quota("red", schemas.TeamQuota(gpus=1))  # lowered below what it holds: nothing is evicted
    assert [r.quota for r in plan(vllm(20 * GB), cluster)] == ["gpus"]
    spec = schemas.ModelSpec(source="/m.gguf", backend="llama.cpp", cpu_only=True)
    cpu_request = Request(spec, MemoryEstimate.fixed(4 * GiB, cpu_capable=True), "c", team="red")
    assert place(cluster, cpu_request).worker.name == "cpu"


def test_the_dry_run_counts_its_own_replicas_against_the_quota():
    cluster = Cluster([gpu_worker(1), gpu_worker(2)])
    cluster.set_quota("red", schemas.TeamQuota(replicas=3))
    out = evaluate(vllm(20 * GB), cluster.copy(), 5)
    assert [p.scheduled for p in out] == [True, True, True, False, False]
    assert out[3].reasons[0].reason == "quota_exceeded" and out[3].reasons[0].used == 3
    assert cluster.usage == {}  # evaluate works on a copy


# --- the snapshot ----------------------------------------------------------------------------


def _instance(id: int, team: str | None, state: str = "running", gpus: list[int] = [0], worker: int | None = 1) -> dict:
    claim = schemas.ResourceClaim(device="gpu", gpu_indexes=gpus, vram_bytes_per_gpu=10 * GB).model_dump(mode="json")
    return {"id": id, "name": f"i{id}", "model_id": 1, "generation": 1, "state": state, "worker_id": worker,
            "claim": claim, "spec": {"source": "/m", "backend": "vllm"}, "schedule_reasons": [], "team": team}


def _worker_wire(id: int) -> dict:
    return {"id": id, "name": f"w{id}", "address": "x", "state": "ready", "cordoned": False, "labels": {},
            "gpus": [{"index": i, "name": "H100", "vendor": "nvidia", "memory_total": 80 * GB} for i in range(4)],
            "host": {"memory_total": 64 * GiB}}


def test_the_snapshot_counts_team_claims_and_follows_quota_events():
    state = ClusterState()
    state.load([_worker_wire(1)], [_instance(1, "red", gpus=[0, 1]), _instance(2, "red", state="pending", worker=None),
                                   _instance(3, "blue")],
               [{"name": "red", "quota": {"gpus": 2}}, {"name": "blue", "quota": {}}])
    assert state.cluster.quotas == {"red": schemas.TeamQuota(gpus=2)}
    assert state.cluster.used("red") == Usage(gpus=2, vram_bytes=20 * GB, replicas=1)
    assert state.apply("teams", "updated", {"name": "red", "quota": {"gpus": 4}}) is True
    assert state.apply("teams", "updated", {"name": "red", "quota": {"gpus": 4}}) is False
    assert state.cluster.quotas["red"].gpus == 4
    # An instance that moves to another team moves its claim with it; one that stops holding gives it back.
    state.apply("instances", "updated", _instance(3, "red"))
    assert state.cluster.used("red").gpus == 3 and state.cluster.used("blue") == Usage()
    state.apply("instances", "updated", _instance(1, "red", state="failed"))
    assert state.cluster.used("red") == Usage(gpus=1, vram_bytes=10 * GB, replicas=1)
    state.apply("instances", "deleted", _instance(3, "red"))
    assert state.cluster.usage == {}
    assert state.apply("teams", "updated", {"name": "red", "quota": {"gpus": "many"}}) is True  # unreadable: no limit
    assert state.cluster.quotas == {}


# --- the property --------------------------------------------------------------------------------

TEAMS = ["red", "blue", "green"]
quotas = st.fixed_dictionaries({field: st.one_of(st.none(), st.integers(0, 12) if field in ("gpus", "replicas")
                                                 else st.integers(0, 12).map(lambda n: n * 20 * GB))
                                for field in QUOTA_FIELDS})


@st.composite
def workers(draw) -> list[WorkerSnapshot]:
    out = []
    for n in range(draw(st.integers(1, 5))):
        gpus = draw(st.integers(0, 8))
        out.append(WorkerSnapshot(
            id=n + 1, name=f"w{n + 1}", address="x", ready=True, cordoned=draw(st.sampled_from([False, False, True])),
            ram_total=draw(st.sampled_from([16, 64, 256])) * GiB,
            gpu_total={i: draw(st.sampled_from([24 * GB, 80 * GB])) for i in range(gpus)},
            gpu_names={i: "GPU" for i in range(gpus)}, gpu_vendors={i: "nvidia" for i in range(gpus)}))
    return out


@st.composite
def asks(draw) -> Request:
    backend = draw(st.sampled_from(["vllm", "llama.cpp"]))
    fields: dict = {"source": "/m", "backend": backend, "placement_strategy": draw(st.sampled_from(["spread", "binpack"]))}
    if backend == "vllm":
        fields["distributed"] = draw(st.booleans())
    else:
        fields["cpu_only"] = draw(st.sampled_from([False, False, True]))
        fields["partial_offload"] = not fields["cpu_only"] and draw(st.booleans())
    weights = draw(st.integers(1, 200)) * GiB // 2
    memory = MemoryEstimate(method="test", weights=weights, kv_cache=draw(st.integers(0, 20)) * GiB,
                            fixed_overhead=GiB, layers=32, layer_weights=weights * 9 // 10, heads=32, kv_heads=8,
                            tp_sizes=(1, 2, 4, 8) if backend == "vllm" else None, cpu_capable=backend == "llama.cpp")
    return Request(schemas.ModelSpec(**fields), memory, draw(st.integers(1, 3)),
                   team=draw(st.sampled_from(TEAMS + [None])))


def _within(used: Usage, quota: schemas.TeamQuota) -> bool:
    return all(getattr(quota, f) is None or getattr(used, f) <= getattr(quota, f) for f in QUOTA_FIELDS)


@PROFILE
@given(cluster_workers=workers(), limits=st.lists(quotas, min_size=3, max_size=3),
       steps=st.lists(st.tuples(asks(), st.integers(0, 4)), min_size=1, max_size=20))
def test_no_team_ever_exceeds_its_quota(cluster_workers, limits, steps):
    cluster = Cluster(cluster_workers)
    for team, quota in zip(TEAMS, limits):
        cluster.set_quota(team, schemas.TeamQuota(**quota))
    held: list[tuple[Placement, Request]] = []
    for request, release in steps:
        if release == 0 and held:  # now and then an instance goes away and gives its claim back
            gone, owner = held.pop(len(held) // 2)
            cluster.apply(gone.claim, gone.worker.id, owner.model_key, -1, team=owner.team)
        before = Usage(**vars(cluster.used(request.team))) if request.team else None
        result = plan(request, cluster)
        if isinstance(result, Placement):
            cluster.commit(result, request.model_key, request.team)
            held.append((result, request))
            event("placed")
        else:
            over = [r for r in result if r.reason == "quota_exceeded"]
            event("quota_exceeded" if over else "no room")
            if over:
                assert over == result and request.team is not None  # the quota alone is the answer
                quota = cluster.quotas[request.team]
                for r in over:  # each reason is true of the snapshot
                    assert r.team == request.team and r.limit == getattr(quota, r.quota)
                    assert r.used == getattr(before, r.quota) and r.need > 0 and r.used + r.need > r.limit
                # ... and the quota really stood in the way: without it, it would be placed, unless even the
                # least it could claim is over (the filter that runs before any worker is looked at).
                unlimited = Request(request.spec, request.estimate, request.model_key, team=None)
                gate = quota_reasons(request.team, cluster, least_cost(request))
                assert gate == over or isinstance(plan(unlimited, cluster), Placement)
        # Every team within every limit, and its usage exactly the sum of its placements' claims.
        for team in TEAMS:
            assert _within(cluster.used(team), cluster.quotas.get(team) or schemas.TeamQuota()), team
            expected = Usage()
            for placement, owner in held:
                if owner.team == team:
                    expected.add(claim_cost(placement.claim))
            assert cluster.used(team) == expected
