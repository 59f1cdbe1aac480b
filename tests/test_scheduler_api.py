"""The scheduler through the real server (SQLite, in-process): dry run, describe, the CLI, bad input.

Workers are rows with simulated GPUs (no agent runs), so instances stop at `scheduled`;
vLLM models come from the config-only fixtures in tests/fixtures/models.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from typer.testing import CliRunner

from conftest import eventually
from maas_tui.cli.main import app as cli_app
from maas_tui.client import ApiClientError, MaasClient
from server import schemas
from server.db import tables

GB = 1000**3
GiB = 1024**3
FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA_8B = str(FIXTURES / "llama-3.1-8b-instruct")
LLAMA_70B = str(FIXTURES / "llama-3.1-70b-instruct")
BGE_M3 = str(FIXTURES / "bge-m3")


async def add_worker(server, name: str, count: int, kind: str = "H100", size_gb: int = 80,
                     labels: dict[str, str] | None = None) -> None:
    server.config.worker_timeout = 3600  # no agent heartbeats these rows
    gpus = [schemas.GPUDevice(index=i, name=f"{kind}-{size_gb}GB (simulated)", vendor="simulated",
                              memory_total=size_gb * GB, simulated=True).model_dump(mode="json") for i in range(count)]
    async with server.db.session() as s:
        s.add(tables.Worker(name=name, address="127.0.0.1", agent_port=9, labels=labels or {}, state="ready", gpus=gpus,
                            host=schemas.HostInfo(memory_total=256 * GiB).model_dump(mode="json"),
                            last_heartbeat_at=datetime.now(UTC)))
        await s.commit()


async def written(server) -> tuple:
    """Everything a dry run must leave alone: row counts, newest ids, the bus version."""
    async with server.db.session() as s:
        counts = []
        for table in (tables.Model, tables.ModelInstance, tables.Event, tables.Worker, tables.ChangeLog):
            counts.append((await s.execute(select(func.count(), func.max(table.id)).select_from(table))).one())
    return tuple(tuple(c) for c in counts) + (server.bus.version,)


def vllm_body(name: str, source: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "source": source, "backend": "vllm", **fields}


def scheduler_of(server):
    from server.scheduler.service import Scheduler

    return next(loop for loop in server._loops if isinstance(loop, Scheduler))


# --- dry run --------------------------------------------------------------------------------


async def test_evaluate_says_where_each_replica_goes_and_writes_nothing(server, admin: MaasClient):
    await add_worker(server, "gpu-a", 2)
    await add_worker(server, "gpu-b", 2)
    before = await written(server)
    result = await admin.evaluate_model(vllm_body("llama", LLAMA_8B, replicas=3, max_model_len=8192))
    assert await written(server) == before
    assert result.schedulable == 3 and [r.scheduled for r in result.replicas] == [True, True, True]
    assert [r.worker for r in result.replicas] == ["gpu-a", "gpu-b", "gpu-a"]  # spread: another worker first
    claim = result.replicas[0].claim
    assert claim.device == "gpu" and claim.tensor_parallel_size == 1
    assert 0.2 < claim.gpu_memory_utilization < 0.3  # ~18.5 GiB of an 80 GB GPU, not 0.9
    assert result.estimate.weights_bytes == 16_060_522_496 and result.estimate.method == "index"
    assert "3 of 3 replicas fit" in result.message
    assert await admin.list_models() == []


async def test_evaluate_explains_per_worker_when_nothing_fits(server, admin: MaasClient):
    await add_worker(server, "l4-a", 4, "L4", 24)
    await add_worker(server, "l4-b", 4, "L4", 24)
    result = await admin.evaluate_model(vllm_body("big", LLAMA_70B, replicas=2, max_model_len=8192))
    assert result.schedulable == 0
    reasons = result.replicas[0].reasons
    assert [(r.worker, r.reason) for r in reasons] == [("l4-a", "insufficient_vram"), ("l4-b", "insufficient_vram")]
    assert all(r.need_bytes > r.free_bytes for r in reasons)
    spanning = await admin.evaluate_model(vllm_body("big", LLAMA_70B, replicas=1, max_model_len=8192,
                                                    distributed=True))
    claim = spanning.replicas[0].claim
    assert spanning.schedulable == 1 and (claim.tensor_parallel_size, claim.pipeline_parallel_size) == (4, 2)
    assert [s.worker_name for s in claim.subordinate_workers] == ["l4-b"]


async def test_evaluate_of_a_model_without_metadata_says_why(server, admin: MaasClient, tmp_path: Path):
    await add_worker(server, "gpu-a", 1)
    # A folder that is on the workers only: the server has no config.json to read. (A folder on the
    # server without one is refused at once: tests/test_spec_policy.py.)
    result = await admin.evaluate_model(vllm_body("nothing", str(tmp_path / "on-the-workers"), replicas=1))
    assert result.schedulable == 0 and result.replicas[0].reasons[0].reason == "estimate_failed"
    assert "config.json" in result.message


# --- the scheduler loop -------------------------------------------------------------------------


async def test_scheduler_places_from_its_bus_fed_snapshot(server, admin: MaasClient):
    await add_worker(server, "gpu-a", 2)
    await add_worker(server, "gpu-b", 2)
    await admin.create_model(vllm_body("emb", BGE_M3, replicas=3))
    await admin.create_model(vllm_body("llama", LLAMA_8B, replicas=2, max_model_len=8192,
                                       placement_strategy="binpack"))

    async def all_scheduled() -> bool:
        instances = await admin.list_instances()
        return len(instances) == 5 and all(i.state == "scheduled" for i in instances)

    await eventually(all_scheduled, timeout=15, message="5 instances scheduled")
    instances = await admin.list_instances()
    emb = [i for i in instances if i.model_name == "emb"]
    assert [i.worker_name for i in sorted(emb, key=lambda i: i.id)] == ["gpu-a", "gpu-b", "gpu-a"]  # spread
    llama = [i for i in instances if i.model_name == "llama"]
    assert all(i.claim.gpu_memory_utilization and i.claim.estimate for i in llama)
    # Allocation never over-commits a GPU.
    used: dict[tuple[str, int], int] = {}
    for i in instances:
        for g in i.claim.gpu_indexes:
            used[(i.worker_name, g)] = used.get((i.worker_name, g), 0) + i.claim.vram_bytes_per_gpu
    assert max(used.values()) <= 80 * GB
    assert all("GiB" in i.state_message or "MiB" in i.state_message for i in instances)
    scheduler = scheduler_of(server)
    assert scheduler.stats["resyncs"] == 1  # events kept it current: no reload per pass
    assert scheduler.stats["placed"] == 5


async def test_bulk_writes_log_what_the_session_hook_would(server, admin: MaasClient):
    """The scheduler writes in bulk statements; its change-log entries must equal to_wire() of the rows."""
    from server.db.database import to_wire

    await add_worker(server, "gpu-a", 2)
    await admin.create_model(vllm_body("emb", BGE_M3, replicas=2))
    await admin.create_model(vllm_body("huge", LLAMA_70B, replicas=1))  # 128k context: does not fit

    async def settled() -> bool:
        instances = await admin.list_instances()
        return (sum(i.state == "scheduled" for i in instances) == 2
                and any(i.schedule_reasons for i in instances if i.model_name == "huge"))

    await eventually(settled, timeout=15, message="2 scheduled, 1 unschedulable")
    async with server.db.session() as s:
        rows = {r.id: r for r in (await s.execute(select(tables.ModelInstance))).scalars()}
        events = {e.id: e for e in (await s.execute(select(tables.Event).where(tables.Event.actor == "scheduler"))).scalars()}
        log = (await s.execute(select(tables.ChangeLog).order_by(tables.ChangeLog.id))).scalars().all()
    def same_clock(wire: dict) -> dict:  # SQLite hands timestamps back without their zone
        return {k: v.removesuffix("Z") if k.endswith("_at") and isinstance(v, str) else v for k, v in wire.items()}

    latest = {}
    for entry in log:
        latest[(entry.kind, entry.object["id"])] = same_clock(entry.object)
    for instance_id, row in rows.items():
        assert latest[("instances", instance_id)] == same_clock(to_wire(row))
    assert {e.reason for e in events.values()} == {"Scheduled", "Unschedulable"}
    for event_id, event in events.items():
        assert latest[("events", event_id)] == same_clock(to_wire(event))
    # The bus delivered them too: the routing/watch side sees the scheduled state.
    assert {i.state for i in await admin.list_instances("emb")} == {"scheduled"}


async def test_pending_instances_are_placed_when_a_worker_arrives(server, admin: MaasClient):
    await admin.create_model(vllm_body("late", BGE_M3, replicas=1))

    async def waiting() -> bool:
        instances = await admin.list_instances("late")
        return bool(instances) and [r.reason for r in instances[0].schedule_reasons] == ["no_workers"]

    await eventually(waiting, timeout=15, message="a pending instance with reason no_workers")
    await add_worker(server, "gpu-new", 1)

    async def scheduled() -> bool:
        instances = await admin.list_instances("late")
        return bool(instances) and instances[0].state == "scheduled" and instances[0].worker_name == "gpu-new"

    await eventually(scheduled, timeout=15, message="the instance scheduled on the new worker")
    assert (await admin.list_instances("late"))[0].schedule_reasons == []


# --- describe, through the API and the CLI ---------------------------------------------------------


def run_cli(server, key: str, tmp_path: Path, *args: str):
    env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": key, "MAAS_CONFIG": str(tmp_path / "cli.json"),
           "COLUMNS": "250"}
    return CliRunner().invoke(cli_app, list(args), env=env)


async def test_reasons_are_shown_by_describe_and_the_cli(server, admin: MaasClient, api_key: str, tmp_path: Path):
    await add_worker(server, "l4-a", 4, "L4", 24)
    await add_worker(server, "l4-b", 4, "L4", 24, labels={"pool": "b"})
    await admin.create_model(vllm_body("big", LLAMA_70B, replicas=1, max_model_len=8192))

    async def unschedulable() -> bool:
        instances = await admin.list_instances("big")
        return bool(instances) and bool(instances[0].schedule_reasons)

    await eventually(unschedulable, timeout=15, message="reasons on the pending instance")
    description = await admin.describe_model("big")
    assert description.estimate.weights_bytes == 141_107_412_992
    [instance] = description.instances
    assert instance.state == "pending"
    assert {r.worker for r in instance.schedule_reasons} == {"l4-a", "l4-b"}
    assert "Unschedulable" in {e.reason for e in description.events}

    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "describe", "big")
    assert out.exit_code == 0, out.output
    assert "insufficient_vram" in out.output and "l4-a" in out.output and "l4-b" in out.output
    assert "131.4 GiB" in out.output  # the weights in the estimate line
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "instance", "describe", str(instance.id))
    assert out.exit_code == 0, out.output
    assert "Why it is not scheduled" in out.output and "insufficient_vram" in out.output
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "instance", "describe", instance.name, "-o", "json")
    assert json.loads(out.output)["instance"]["schedule_reasons"][0]["reason"] == "insufficient_vram"


async def test_cli_dry_run_prints_the_plan_and_deploys_nothing(server, admin: MaasClient, api_key: str, tmp_path: Path):
    await add_worker(server, "l4-a", 4, "L4", 24)
    await add_worker(server, "l4-b", 4, "L4", 24)
    before = await written(server)
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "deploy", "big", "--source", LLAMA_70B,
                                  "--backend", "vllm", "--max-model-len", "8192", "--distributed", "--dry-run")
    assert out.exit_code == 0, out.output
    assert "l4-a" in out.output and "tp=4, pp=2" in out.output and "l4-b" in out.output
    assert "nothing was written" in out.output
    out = await asyncio.to_thread(run_cli, server, api_key, tmp_path, "model", "deploy", "big", "--source", LLAMA_70B,
                                  "--backend", "vllm", "--replicas", "2", "--max-model-len", "8192", "--dry-run")
    assert out.exit_code == 1, out.output  # does not fit: the exit code says so
    assert "Why replica 0 cannot be placed" in out.output and "insufficient_vram" in out.output
    assert await written(server) == before


# --- bad input for the new fields -----------------------------------------------------------------


BAD_FIELDS = {
    "strategy": ({"placement_strategy": "tight"}, "placement_strategy"),
    "negative-gpu": ({"gpu_selector": [{"worker": "w", "gpu_indexes": [-1]}]}, "0 or more"),
    "repeated-gpu": ({"gpu_selector": [{"worker": "w", "gpu_indexes": [0, 0]}]}, "twice"),
    "no-gpus": ({"gpu_selector": [{"worker": "w", "gpu_indexes": []}]}, "gpu_indexes"),
    "two-workers-not-distributed": ({"gpu_selector": [{"worker": "a", "gpu_indexes": [0]},
                                                      {"worker": "b", "gpu_indexes": [0]}]}, "distributed"),
    "uneven-selection": ({"distributed": True, "gpu_selector": [{"worker": "a", "gpu_indexes": [0]},
                                                                {"worker": "b", "gpu_indexes": [0, 1]}]}, "same number"),
    "selector-not-text": ({"worker_selector": {"zone": 3}}, "worker_selector"),
    "selector-bad-key": ({"worker_selector": {"bad key": "x"}}, "label key"),
    "concurrency-zero": ({"concurrency": 0}, "concurrency"),
    "max-model-len-tiny": ({"max_model_len": 1}, "max_model_len"),
    "memory-zero": ({"memory_bytes": 0}, "memory_bytes"),
    "cpu-only-distributed-vllm": ({"cpu_only": True, "distributed": True}, "cpu_only"),
    "partial-offload-vllm": ({"partial_offload": True}, "llama.cpp"),
    "empty-gpu-type": ({"gpu_type": ""}, "gpu_type"),
}


@pytest.mark.parametrize("path", ["/v2/models", "/v2/models/evaluate"])
async def test_bad_scheduling_fields_are_refused_and_nothing_is_written(server, admin: MaasClient, path: str):
    before = await written(server)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin.token}"}) as http:
        for name, (fields, fragment) in BAD_FIELDS.items():
            body = vllm_body("bad", LLAMA_8B, **fields)
            async with http.post(server.url + path, json=body) as response:
                payload = await response.json()
                assert response.status == 422, (name, payload)
                assert fragment in payload["error"]["message"], (name, payload["error"]["message"])
        for fields, fragment in (({"max_model_len": 4096}, "context_length"), ({"distributed": True}, "distributed")):
            body = {"name": "bad", "source": "/models/x.gguf", "backend": "llama.cpp", **fields}
            async with http.post(server.url + path, json=body) as response:
                payload = await response.json()
                assert response.status == 422 and fragment in payload["error"]["message"], payload
    assert await written(server) == before


async def test_patch_refuses_bad_scheduling_fields(server, admin: MaasClient):
    await admin.create_model(vllm_body("m", BGE_M3, replicas=0))
    with pytest.raises(ApiClientError) as caught:
        await admin.update_model("m", {"placement_strategy": "tight"})
    assert caught.value.status == 422
    updated = await admin.update_model("m", {"placement_strategy": "binpack", "worker_selector": {"zone": "a"}})
    assert updated.spec.placement_strategy == "binpack" and updated.generation == 2


# --- property: a dry run writes nothing, whatever it is asked ----------------------------------------

SOURCES = [LLAMA_8B, LLAMA_70B, BGE_M3, str(FIXTURES / "mixtral-8x7b-instruct-v0.1"),
           str(FIXTURES / "qwen2.5-7b-instruct"), "/nonexistent/model"]
bodies = st.fixed_dictionaries(
    {"name": st.sampled_from(["m", "emb", "existing"]), "source": st.sampled_from(SOURCES),
     "backend": st.sampled_from(["vllm", "sglang", "llama.cpp"])},
    optional={"replicas": st.integers(-1, 6), "max_model_len": st.sampled_from([None, 1, 2048, 8192, 131072]),
              "concurrency": st.integers(0, 8), "placement_strategy": st.sampled_from(["spread", "binpack", "x"]),
              "gpu_type": st.sampled_from(["H100", "L4", "nothing"]),
              "worker_selector": st.dictionaries(st.sampled_from(["zone", "pool"]), st.sampled_from(["a", "b"]),
                                                 max_size=2),
              "distributed": st.booleans(),
              "gpu_selector": st.lists(st.fixed_dictionaries({
                  "worker": st.sampled_from(["gpu-a", "l4-b", "ghost"]),
                  "gpu_indexes": st.lists(st.integers(-1, 9), min_size=1, max_size=4, unique=True)}), max_size=2),
              "memory_bytes": st.sampled_from([1, 20 * GiB, 2000 * GiB])})


async def test_property_dry_run_writes_nothing(server, admin: MaasClient):
    await add_worker(server, "gpu-a", 2, labels={"zone": "a"})
    await add_worker(server, "l4-b", 4, "L4", 24, labels={"zone": "b"})
    await admin.create_model(vllm_body("existing", BGE_M3, replicas=1))

    async def settled() -> bool:
        instances = await admin.list_instances("existing")
        return bool(instances) and instances[0].state == "scheduled"

    await eventually(settled, timeout=15, message="the existing model scheduled")
    loop = asyncio.get_running_loop()
    statuses: set[int] = set()

    async def check(body: dict[str, Any]) -> None:
        before = await written(server)
        try:
            result = await admin.evaluate_model(body)
            statuses.add(200)
            assert result.schedulable <= max(body.get("replicas", 1), 0)
        except ApiClientError as exc:
            assert 400 <= exc.status < 500, exc.message  # a 5xx is a bug
            statuses.add(exc.status)
        assert await written(server) == before

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    @given(body=bodies)
    def property_holds(body: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(check(body), loop).result(timeout=30)

    await asyncio.to_thread(property_holds)
    assert 200 in statuses and 422 in statuses  # both sides were exercised
