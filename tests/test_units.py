"""Pure logic, no servers: placement, estimation, simulated GPUs, the bus, the routing table,
log tails, database URLs and secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.devices import DeviceSpecError, parse_simulated
from agent.logs import tail_lines
from server import schemas
from server.api import security
from server.bus import RING_SIZE, EventBus
from server.db.database import normalize_url
from server.gateway.routing_table import RoutingTable
from server.scheduler import estimate
from server.scheduler.placement import GiB, Placement, WorkerSnapshot, place, reserved_ram

MiB = 1024**2


# --- placement -----------------------------------------------------------------------


def spec(**overrides) -> schemas.ModelSpec:
    return schemas.ModelSpec(**({"source": "/models/m.gguf", "backend": "llama.cpp"} | overrides))


def worker(name: str = "w1", *, id: int = 1, gpus: dict[int, int] | None = None, ram: int = 64 * GiB,
           ready: bool = True, cordoned: bool = False) -> WorkerSnapshot:
    return WorkerSnapshot(id=id, name=name, address=f"10.0.0.{id}", ready=ready, cordoned=cordoned, ram_total=ram,
                          gpu_total=dict(gpus or {}))


def test_place_first_fit_on_a_gpu_with_room():
    w = worker(gpus={0: 8 * GiB, 1: 24 * GiB})
    w.gpu_claimed[0] = 6 * GiB  # GPU 0 has 2 GiB free
    result = place(4 * GiB, spec(), [w])
    assert isinstance(result, Placement)
    assert result.worker is w
    assert result.claim == schemas.ResourceClaim(device="gpu", gpu_indexes=[1], vram_bytes_per_gpu=4 * GiB, ram_bytes=0)


def test_place_first_gpu_when_several_fit():
    result = place(1 * GiB, spec(), [worker(gpus={0: 8 * GiB, 1: 8 * GiB})])
    assert isinstance(result, Placement)
    assert result.claim.gpu_indexes == [0]


def test_place_skips_a_full_worker_for_the_next():
    full = worker("full", id=1, gpus={0: 8 * GiB})
    full.gpu_claimed[0] = 8 * GiB
    roomy = worker("roomy", id=2, gpus={0: 16 * GiB})
    result = place(4 * GiB, spec(), [full, roomy])
    assert isinstance(result, Placement)
    assert result.worker is roomy
    assert result.claim.device == "gpu" and result.claim.gpu_indexes == [0]


def test_place_skips_not_ready_and_cordoned_workers():
    down = worker("down", id=1, gpus={0: 80 * GiB}, ready=False)
    fenced = worker("fenced", id=2, gpus={0: 80 * GiB}, cordoned=True)
    ok = worker("ok", id=3, gpus={0: 80 * GiB})
    result = place(1 * GiB, spec(), [down, fenced, ok])
    assert isinstance(result, Placement) and result.worker is ok

    reasons = place(1 * GiB, spec(), [down, fenced])
    assert isinstance(reasons, list)
    assert [(r.worker, r.reason) for r in reasons] == [("down", "not_ready"), ("fenced", "cordoned")]
    assert all(r.message for r in reasons)


def test_place_nothing_fits_explains_per_worker():
    a = worker("a", id=1, gpus={0: 8 * GiB, 1: 16 * GiB})
    a.gpu_claimed[1] = 4 * GiB  # best on a: GPU 1 with 12 GiB free
    b = worker("b", id=2, gpus={0: 24 * GiB})
    need = 40 * GiB
    reasons = place(need, spec(), [a, b])
    assert isinstance(reasons, list)
    assert all(isinstance(r, schemas.UnschedulableReason) for r in reasons)
    assert [(r.worker, r.reason, r.need_bytes, r.free_bytes, r.gpu) for r in reasons] == [
        ("a", "insufficient_vram", need, 12 * GiB, 1),
        ("b", "insufficient_vram", need, 24 * GiB, 0),
    ]
    assert all(r.message for r in reasons)


def test_place_without_workers_says_so():
    reasons = place(1, spec(), [])
    assert isinstance(reasons, list)
    assert [r.reason for r in reasons] == ["no_workers"]


def test_place_cpu_only_worker_serves_llamacpp_from_ram():
    w = worker(gpus={}, ram=32 * GiB)
    result = place(1 * GiB, spec(), [w])
    assert isinstance(result, Placement)
    assert result.claim == schemas.ResourceClaim(device="cpu", gpu_indexes=[], vram_bytes_per_gpu=0, ram_bytes=1 * GiB)


def test_place_cpu_only_worker_without_enough_ram():
    w = worker(gpus={}, ram=8 * GiB)
    need = 8 * GiB  # more than total minus the reserve
    reasons = place(need, spec(), [w])
    assert isinstance(reasons, list)
    assert [(r.reason, r.need_bytes, r.free_bytes) for r in reasons] == [
        ("insufficient_ram", need, 8 * GiB - reserved_ram(8 * GiB))]


def test_place_cpu_only_spec_ignores_gpus():
    w = worker(gpus={0: 80 * GiB, 1: 80 * GiB}, ram=64 * GiB)
    result = place(2 * GiB, spec(cpu_only=True), [w])
    assert isinstance(result, Placement)
    assert result.claim.device == "cpu"
    assert result.claim.gpu_indexes == [] and result.claim.vram_bytes_per_gpu == 0
    assert result.claim.ram_bytes == 2 * GiB


def test_place_cpu_only_spec_never_reports_vram():
    w = worker(gpus={0: 80 * GiB}, ram=4 * GiB)
    reasons = place(10 * GiB, spec(cpu_only=True), [w])
    assert isinstance(reasons, list)
    assert [r.reason for r in reasons] == ["insufficient_ram"]


def test_reserved_ram_is_ten_percent_capped_at_two_gib():
    assert reserved_ram(0) == 0
    assert reserved_ram(10 * GiB) == 1 * GiB
    assert reserved_ram(20 * GiB) == 2 * GiB
    assert reserved_ram(512 * GiB) == 2 * GiB
    assert worker(ram=10 * GiB).ram_free() == 9 * GiB
    assert worker(ram=512 * GiB).ram_free() == 510 * GiB


def test_take_accumulates_so_placements_never_overcommit_a_gpu():
    workers = [worker("a", id=1, gpus={0: 10 * GiB, 1: 7 * GiB}), worker("b", id=2, gpus={0: 5 * GiB})]
    need = 3 * GiB
    placed = 0
    for _ in range(100):
        result = place(need, spec(), workers)
        if not isinstance(result, Placement):
            break
        result.worker.take(result.claim)
        placed += 1
    else:
        pytest.fail("placement never ran out of room")
    # 10 GiB -> 3, 7 GiB -> 2, 5 GiB -> 1
    assert placed == 6
    for w in workers:
        for index, total in w.gpu_total.items():
            assert 0 <= w.gpu_claimed.get(index, 0) <= total
            assert w.gpu_free(index) < need
    assert all(r.reason == "insufficient_vram" for r in result)


def test_take_accumulates_host_ram():
    w = worker(gpus={}, ram=10 * GiB)  # 9 GiB usable
    result = place(5 * GiB, spec(), [w])
    assert isinstance(result, Placement)
    w.take(result.claim)
    assert w.ram_free() == 4 * GiB
    assert not isinstance(place(5 * GiB, spec(), [w]), Placement)


# --- estimate ------------------------------------------------------------------------


def test_estimate_grows_with_context_length(tiny_model: Path):
    small = estimate.estimate_bytes(spec(source=str(tiny_model), context_length=512))
    large = estimate.estimate_bytes(spec(source=str(tiny_model), context_length=8192))
    assert large > small


def test_estimate_at_least_the_file_size(tiny_model: Path):
    size = tiny_model.stat().st_size
    assert estimate.estimate_bytes(spec(source=str(tiny_model))) >= size
    assert estimate.estimate_bytes(spec(source=str(tiny_model), context_length=64)) >= size


def test_estimate_of_a_missing_file_is_the_overhead(tmp_path: Path):
    missing = spec(source=str(tmp_path / "nope.gguf"))
    assert estimate.estimate_bytes(missing) == estimate._COMPUTE_OVERHEAD
    assert estimate._COMPUTE_OVERHEAD > 0


def test_estimate_of_a_non_gguf_file_is_size_plus_overhead(tmp_path: Path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    assert estimate.estimate_bytes(spec(source=str(junk))) == 4096 + estimate._COMPUTE_OVERHEAD


# --- simulated GPUs ------------------------------------------------------------------


def test_parse_simulated_mixed_fleet():
    gpus = parse_simulated("4xH100-80GB,2xL4-24GB")
    assert [g.index for g in gpus] == [0, 1, 2, 3, 4, 5]
    assert all(g.simulated for g in gpus)
    assert all("(simulated)" in g.name for g in gpus)
    assert [g.memory_total for g in gpus] == [80 * 10**9] * 4 + [24 * 10**9] * 2
    assert all("H100" in g.name for g in gpus[:4]) and all("L4" in g.name for g in gpus[4:])
    assert len({g.uuid for g in gpus}) == 6


def test_parse_simulated_tolerates_spaces():
    assert len(parse_simulated(" 1xA10-24GB , 1xT4-16GB ")) == 2


@pytest.mark.parametrize("bad", ["4H100", "0xA-1GB", "4xH100", "4xH100-80", "x-1GB", "65xA-1GB", "1xA-0GB",
                                 "1xA-5000GB", "-1xA-1GB", "4xH100-80GB;2xL4-24GB"])
def test_parse_simulated_rejects_bad_specs(bad: str):
    with pytest.raises(DeviceSpecError):
        parse_simulated(bad)


def test_parse_simulated_empty_is_no_gpus():
    # GPUInventory never passes an empty string (it means "not simulated"); nothing to simulate is [].
    assert parse_simulated("") == []
    assert parse_simulated(",") == []


# --- event bus -----------------------------------------------------------------------


def test_bus_versions_increase():
    bus = EventBus()
    start = bus.version
    events = [bus.publish("models", "created", {"id": i}) for i in range(5)]
    versions = [e.version for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 5
    assert versions[0] > start
    assert bus.version == versions[-1]


def test_bus_since_replays_later_events():
    bus = EventBus()
    v0 = bus.version
    assert bus.since(v0) == []
    e1, e2, e3 = (bus.publish("models", "created", {"id": i}) for i in range(3))
    assert bus.since(v0) == [e1, e2, e3]
    assert bus.since(e1.version) == [e2, e3]
    assert bus.since(e3.version) == []


def test_bus_since_a_future_version_is_none():
    bus = EventBus()
    bus.publish("models", "created", {"id": 1})
    assert bus.since(bus.version + 100) is None


def test_bus_since_older_than_the_ring_is_none():
    bus = EventBus()
    v0 = bus.version
    events = [bus.publish("instances", "updated", {"id": 1}) for _ in range(RING_SIZE + 5)]
    assert bus.since(v0) is None
    oldest_held = events[5]
    assert bus.since(oldest_held.version - 2) is None
    # Just old enough: everything from the oldest held event on, without a gap.
    replay = bus.since(oldest_held.version - 1)
    assert replay is not None and len(replay) == RING_SIZE and replay[0] == oldest_held


def test_bus_since_with_an_empty_ring_and_an_older_version_is_none():
    bus = EventBus()
    assert bus.since(bus.version - 1) is None


async def test_bus_subscriber_gets_events_in_order():
    bus = EventBus()
    sub = bus.subscribe()
    e1 = bus.publish("models", "created", {"id": 1})
    e2 = bus.publish("workers", "updated", {"id": 2})
    assert await sub.get() == e1
    assert await sub.get() == e2
    sub.close()
    bus.publish("models", "deleted", {"id": 1})
    assert sub.queue.empty()


async def test_bus_kinds_filter():
    bus = EventBus()
    sub = bus.subscribe(["models", "workers"])
    bus.publish("instances", "created", {"id": 1})
    m = bus.publish("models", "created", {"id": 2})
    bus.publish("events", "created", {"id": 3})
    w = bus.publish("workers", "updated", {"id": 4})
    assert sub.queue.qsize() == 2
    assert [await sub.get(), await sub.get()] == [m, w]


async def test_bus_overflowing_subscriber_gets_none_and_is_dropped():
    bus = EventBus()
    slow = bus.subscribe(maxsize=3)
    fast = bus.subscribe()
    for i in range(5):
        bus.publish("models", "updated", {"id": i})
    assert slow.overflowed
    received = []
    while not slow.queue.empty():
        received.append(await slow.get())
    assert received[-1] is None
    assert all(e is not None for e in received[:-1])
    # Dropped: nothing more arrives.
    bus.publish("models", "updated", {"id": 99})
    assert slow.queue.empty()
    # The others are unaffected.
    assert fast.queue.qsize() == 6 and not fast.overflowed


# --- routing table -------------------------------------------------------------------


def inst(id: int, state: str = "running", model: str = "m", port: int | None = None,
         address: str | None = "127.0.0.1") -> dict:
    return {"id": id, "model_name": model, "state": state, "port": port if port is not None else 20000 + id,
            "address": address}


def test_routing_running_instance_becomes_a_target():
    table = RoutingTable()
    table.apply_model("created", {"name": "m", "created_at": "2024-01-02T03:04:05+00:00"})
    assert table.serving_models() == []
    assert "m" in table.models
    table.apply_instance("created", inst(1, state="starting"))
    assert table.serving_models() == []
    table.apply_instance("updated", inst(1))
    assert table.serving_models() == ["m"]
    [target] = table.models["m"].ordered()
    assert target.instance_id == 1 and target.base_url == "http://127.0.0.1:20001"
    assert table.created["m"] > 0


def test_routing_needs_an_address_and_port():
    table = RoutingTable()
    table.apply_model("created", {"name": "m"})
    table.apply_instance("updated", {"id": 1, "model_name": "m", "state": "running", "port": None, "address": "h"})
    table.apply_instance("updated", inst(2, address=None))
    assert table.serving_models() == []


@pytest.mark.parametrize("state", ["error", "terminating", "pending", "downloading", "starting"])
def test_routing_non_running_instance_is_removed(state: str):
    table = RoutingTable()
    table.apply_model("created", {"name": "m"})
    table.apply_instance("updated", inst(1))
    table.apply_instance("updated", inst(2))
    table.apply_instance("updated", inst(1, state=state))
    assert [t.instance_id for t in table.models["m"].ordered()] == [2]


@pytest.mark.parametrize("state", ["unreachable", "scheduled"])
def test_routing_keeps_a_target_whose_agent_is_away_or_readopting(state: str):
    """The data plane does not follow the agent's heartbeat: an unreachable instance's backend may still
    answer (the gateway probes it), and a known target is `scheduled` while its agent re-adopts it."""
    table = RoutingTable()
    table.apply_model("created", {"name": "m"})
    table.apply_instance("updated", inst(1))
    table.apply_instance("updated", inst(1, state=state))
    assert [t.instance_id for t in table.models["m"].ordered()] == [1]
    table.apply_instance("updated", inst(1, state="error"))
    assert table.models["m"].ordered() == []


def test_routing_deleted_instance_is_removed():
    table = RoutingTable()
    table.apply_model("created", {"name": "m"})
    table.apply_instance("updated", inst(1))
    table.apply_instance("deleted", inst(1))
    assert table.models["m"].ordered() == []
    assert table.serving_models() == []
    assert "m" in table.models  # the model still exists, with no running instance


def test_routing_deleted_model_is_gone():
    table = RoutingTable()
    table.apply_model("created", {"name": "m"})
    table.apply_instance("updated", inst(1))
    table.apply_instance("deleted", inst(1))
    table.apply_model("deleted", {"name": "m"})
    assert "m" not in table.models and "m" not in table.created


def test_routing_round_robin():
    table = RoutingTable()
    table.apply_model("created", {"name": "m"})
    for i in (1, 2, 3):
        table.apply_instance("updated", inst(i))
    routes = table.models["m"]
    orders = [[t.instance_id for t in routes.ordered()] for _ in range(4)]
    assert orders == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]
    firsts = [routes.ordered()[0].instance_id for _ in range(30)]
    assert {i: firsts.count(i) for i in (1, 2, 3)} == {1: 10, 2: 10, 3: 10}


def test_routing_serving_models_lists_only_models_with_targets():
    table = RoutingTable()
    for name in ("b", "a", "idle"):
        table.apply_model("created", {"name": name})
    table.apply_instance("updated", inst(1, model="b"))
    table.apply_instance("updated", inst(2, model="a"))
    table.apply_instance("updated", inst(3, model="idle", state="error"))
    assert table.serving_models() == ["a", "b"]


def test_routing_load_replaces_everything():
    table = RoutingTable()
    table.apply_model("created", {"name": "old"})
    table.apply_instance("updated", inst(1, model="old"))
    table.load([{"name": "new"}], [inst(5, model="new"), inst(6, model="new", state="pending")])
    assert "old" not in table.models
    assert table.serving_models() == ["new"]
    assert [t.instance_id for t in table.models["new"].ordered()] == [5]


# --- log tails -----------------------------------------------------------------------


@pytest.fixture
def big_log(tmp_path: Path) -> tuple[Path, list[bytes]]:
    lines = [f"line {i:06d} {'x' * (i % 97)}\n".encode() for i in range(5000)]
    path = tmp_path / "big.log"
    path.write_bytes(b"".join(lines))
    assert path.stat().st_size > 4 * 64 * 1024
    return path, lines


@pytest.mark.parametrize("count", [1, 10, 1234, 4999, 5000, 7000])
def test_tail_lines_of_a_big_file(big_log, count: int):
    path, lines = big_log
    assert tail_lines(path, count) == b"".join(lines[-count:])


def test_tail_lines_zero_and_all(big_log):
    path, lines = big_log
    assert tail_lines(path, 0) == b""
    assert tail_lines(path, -1) == b"".join(lines)


def test_tail_lines_without_a_final_newline(tmp_path: Path):
    path = tmp_path / "partial.log"
    path.write_bytes(b"a\nb\nc")
    assert tail_lines(path, 1) == b"c"
    assert tail_lines(path, 2) == b"b\nc"
    assert tail_lines(path, 5) == b"a\nb\nc"


def test_tail_lines_of_a_missing_or_empty_file(tmp_path: Path):
    assert tail_lines(tmp_path / "missing.log", 10) == b""
    assert tail_lines(tmp_path / "missing.log", -1) == b""
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert tail_lines(empty, 10) == b""


# --- database URLs -------------------------------------------------------------------


def test_normalize_postgresql_url():
    assert normalize_url("postgresql://maas:secret@db.example:5432/maas") == \
        "postgresql+asyncpg://maas:secret@db.example:5432/maas"
    assert normalize_url("postgresql+psycopg2://u:p@h/d").startswith("postgresql+asyncpg://")


def test_normalize_sqlite_url():
    assert normalize_url("sqlite:///x") == "sqlite+aiosqlite:///x"
    assert normalize_url("sqlite:////tmp/maas.db") == "sqlite+aiosqlite:////tmp/maas.db"


def test_normalize_keeps_the_password():
    assert "p%40ss" in normalize_url("postgresql://u:p%40ss@h/d")


@pytest.mark.parametrize("url", ["oracle://u:p@h/d", "mssql+pyodbc://h/d"])  # MySQL/MariaDB are stores now
def test_normalize_rejects_other_databases(url: str):
    with pytest.raises(ValueError):
        normalize_url(url)


# --- secrets -------------------------------------------------------------------------


def test_password_hash_round_trip():
    stored = security.hash_password("correct horse")
    assert stored.startswith("scrypt$")
    assert "correct horse" not in stored
    assert security.verify_password("correct horse", stored)
    assert not security.verify_password("wrong horse", stored)
    assert not security.verify_password("", stored)


def test_password_hashes_are_salted():
    assert security.hash_password("same") != security.hash_password("same")


@pytest.mark.parametrize("stored", ["", "plain", "md5$00$00", "scrypt$only-two"])
def test_verify_password_against_garbage_is_false(stored: str):
    assert security.verify_password("x", stored) is False


def test_token_prefixes():
    token, prefix = security.new_user_token()
    assert token.startswith(f"maas_{prefix}_")
    assert len(token) > len(prefix) + 30
    assert "_" not in prefix
    assert security.new_user_token()[0] != token
    assert security.new_worker_token(42).startswith("maasw_42_")
    assert security.new_cluster_token().startswith("maasc_")
    assert security.hash_secret(token) == security.hash_secret(token) != token


def test_tail_lines_counts_newlines_only(tmp_path: Path):
    path = tmp_path / "progress.log"
    path.write_bytes(b"start\nloading 1%\rloading 50%\rloading 100%\nready\n")
    assert tail_lines(path, 2) == b"loading 1%\rloading 50%\rloading 100%\nready\n"


# --- `downloading` counts as not ready everywhere `starting` does ------------------------------


def test_rollout_never_counts_a_downloading_instance_as_running():
    from server.controllers.rollout import InstanceView, plan

    # Surge 1, unavailable 0: the old instance stays while its replacement downloads.
    views = [InstanceView(1, "running", outdated=True), InstanceView(2, "downloading")]
    assert plan(1, views, max_surge=1, max_unavailable=0).remove == []
    views = [InstanceView(1, "running", outdated=True), InstanceView(2, "running")]
    assert plan(1, views, max_surge=1, max_unavailable=0).remove == [1]


def test_scale_down_drops_a_downloading_instance_before_a_starting_one():
    from server.controllers.rollout import InstanceView, plan

    views = [InstanceView(1, "running"), InstanceView(2, "starting"), InstanceView(3, "downloading")]
    assert plan(2, views).remove == [3]
    assert plan(1, views).remove == [3, 2]


def test_not_ready_states_include_downloading():
    assert schemas.NOT_READY_STATES == {"scheduled", "downloading", "starting"}
    assert schemas.InstanceState.downloading in schemas.AgentInstanceState.__members__.values()


def test_last_good_reads_are_bounded_and_least_recently_used_go_first():
    from server.api.stale_reads import LastGoodReads

    reads = LastGoodReads(max_entries=2, max_bytes=80)
    reads.remember(("a",), b"1" * 5, "application/json")
    reads.remember(("b",), b"2" * 5, "application/json")
    assert reads.recall(("a",)) is not None  # a is now the most recent
    reads.remember(("c",), b"3" * 5, "application/json")
    assert reads.recall(("b",)) is None and reads.recall(("a",))[1] == b"11111"
    reads.remember(("big",), b"x" * 11, "application/json")  # over an eighth of the byte budget: never kept
    assert reads.recall(("big",)) is None
    reads.remember(("a",), b"4" * 9, "application/json")  # replaced, not counted twice
    reads.remember(("d",), b"5" * 9, "application/json")
    assert reads.recall(("a",))[1] == b"4" * 9 and reads.recall(("c",)) is None


async def test_stale_reads_skip_the_log_and_watch_routes_only_not_paths_that_contain_logs():
    from types import SimpleNamespace

    import sqlalchemy.exc as sa
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from server.api.routing import PRINCIPAL_KEY
    from server.api.stale_reads import STALE_HEADER, LastGoodReads, stale_read_middleware

    down = False

    async def handler(request: web.Request) -> web.Response:
        if down:
            raise sa.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return web.json_response({"path": request.path})

    @web.middleware
    async def principal(request, handler):
        request[PRINCIPAL_KEY] = SimpleNamespace(kind="user", user_id=1, worker_id=None, api_key_id=None)
        return await handler(request)

    app = web.Application(middlewares=[principal, stale_read_middleware(LastGoodReads())])
    app.router.add_get("/v2/models/{name}", handler)
    app.router.add_get("/v2/instances/{ref}/logs", handler)
    async with TestClient(TestServer(app)) as client:
        for path in ("/v2/models/logs-summary", "/v2/instances/7/logs"):
            assert (await client.get(path)).status == 200
        down = True
        stale = await client.get("/v2/models/logs-summary")
        assert stale.status == 200 and STALE_HEADER in stale.headers
        assert (await stale.json()) == {"path": "/v2/models/logs-summary"}
        assert (await client.get("/v2/instances/7/logs")).status == 500  # never answered from memory
