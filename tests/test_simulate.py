"""`maas simulate` against a real server: 200 simulated workers speaking the agent protocol over
real HTTP, a deploy placed and reported running on them, telemetry frames reaching a watcher of
workers, and a worker that really stops heartbeating going not_ready with its instances replaced."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from agent.simulate import SIMULATED_LABEL, SimulateConfig, SimulatedCluster
from maas_tui.client import MaasClient
from server.app import MaasServer
from tests.conftest import eventually

WORKERS = 200


async def test_two_hundred_simulated_workers_run_a_deploy_and_survive_a_real_loss(server: MaasServer, admin: MaasClient,
                                                                                 tiny_model: Path):
    server.config.worker_timeout = 4.0
    server.config.reschedule_after = 1.0
    cluster = SimulatedCluster(SimulateConfig(server_url=server.url, token=server.cluster_token or "", workers=WORKERS,
                                              gpus="2xH100-80GB", heartbeat_interval=1.0, register_rate=400))
    await cluster.start()
    try:
        await asyncio.wait_for(cluster.ready.wait(), 60)
        workers = await admin.list_workers()
        assert len(workers) == WORKERS
        assert all(w.labels.get(SIMULATED_LABEL) == "true" and w.gpus and all(g.simulated for g in w.gpus)
                   for w in workers)

        # A watcher of workers gets live utilisation as coalesced telemetry frames, not worker events.
        frames: list[dict] = []
        worker_events: list[tuple[str, str]] = []  # (worker, its state)

        async def watch() -> None:
            async for message in admin.watch(["workers"]):
                if message.kind == "telemetry":
                    frames.append(message.object)
                elif message.kind == "workers":
                    worker_events.append((message.object.get("name"), message.object.get("state")))

        watcher = asyncio.create_task(watch())
        await eventually(lambda: _async(len(frames) >= 3), timeout=10, message="three telemetry frames")
        assert frames[0]["full"] and len(frames[0]["workers"]) == WORKERS
        assert not frames[1]["full"] and 0 < len(frames[1]["workers"]) <= WORKERS
        reading = next(iter(frames[1]["workers"].values()))
        assert len(reading["gpus"]) == 2 and all(0 <= g["utilization"] <= 100 for g in reading["gpus"])
        # Heartbeats are no change: a worker event comes only with a move of state (on a loaded machine a
        # worker can miss its 4 s lease and come back), never for a worker that stayed ready.
        moved = {name for name, state in worker_events if state != "ready"}
        assert all(name in moved for name, _ in worker_events), worker_events

        await admin.create_model({"name": "sim", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 40})

        async def all_running() -> bool:
            instances = await admin.list_instances("sim")
            return len(instances) == 40 and all(i.state == "running" for i in instances)

        await eventually(all_running, timeout=60, message="40 replicas running on simulated workers")
        assert all(w.state == "ready" for w in await admin.list_workers())

        # Really stop one worker holding a replica: not_ready within the timeout, its replica replaced.
        instances = await admin.list_instances("sim")
        doomed_name = instances[0].worker_name
        doomed = next(w for w in cluster.workers if w.name == doomed_name)
        await doomed.stop()

        async def replaced() -> bool:
            worker = next(w for w in await admin.list_workers() if w.name == doomed_name)
            now = await admin.list_instances("sim")
            return (worker.state == "not_ready" and len(now) == 40 and all(i.state == "running" for i in now)
                    and doomed_name not in {i.worker_name for i in now})

        await eventually(replaced, timeout=45, message="the stopped worker not_ready and its replica replaced")
        not_ready = [w.name for w in await admin.list_workers() if w.state != "ready"]
        assert not_ready == [doomed_name]
        assert sum(cluster.stats.errors.values()) == 0, cluster.stats.errors
        watcher.cancel()
    finally:
        await cluster.stop()


async def _async(value: bool) -> bool:
    return value


def test_simulate_command_refuses_a_bad_gpu_spec():
    done = subprocess.run([sys.executable, "-m", "maas_tui", "simulate", "--server", "http://127.0.0.1:9",
                           "--token", "x", "--gpus", "eight-H100"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "COUNTxNAME-MEMGB" in done.stdout + done.stderr
