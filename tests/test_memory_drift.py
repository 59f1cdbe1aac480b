"""Claimed vs actual memory, the telemetry history endpoint, `maas top --once` and `maas doctor`, on one
real server with a real agent (CPU worker, host RSS): a custom backend whose process holds 200 MB runs
under a 32 MiB claim, and the server sees it, records a MemoryDrift event with a suggested --memory,
shows it in describe and top; requests through the gateway show in its history."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import aiohttp
import pytest

from conftest import eventually
from maas_tui.client import ApiClientError, MaasClient
from maas_tui.render import instances as render_instances
from rich.console import Console

HOG = {
    "name": "hog",
    "description": "tests/memory_hog_backend.py: holds a known amount of RAM",
    "command": [sys.executable, str(Path(__file__).parent / "memory_hog_backend.py"), "--host", "{host}",
                "--port", "{port}", "--megabytes", "200"],
    "health_path": "/health",
    "metrics_path": None,
}
MIB = 1 << 20
MAAS = str(Path(sys.executable).parent / "maas")


def _cli(server_url: str, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAAS_SERVER": server_url, "MAAS_API_KEY": key, "COLUMNS": "160", "NO_COLOR": "1"}
    return subprocess.run([MAAS, *args], capture_output=True, text=True, timeout=90, env=env)


def _plain(renderable) -> str:
    console = Console(width=160, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(renderable)
    return console.export_text()


async def test_drift_history_top_and_doctor(server, admin: MaasClient, api_key: str, agent, tmp_path: Path):
    await admin.add_backend(HOG)
    source = tmp_path / "hog.bin"
    source.write_bytes(b"weights")
    await admin.create_model({"name": "hog", "source": str(source), "backend": "custom:hog", "replicas": 1,
                              "cpu_only": True, "memory_bytes": 32 * MIB})

    async def running() -> bool:
        items = await admin.list_instances("hog")
        return bool(items) and items[0].state == "running"
    await eventually(running, timeout=60, message="the hog backend running")
    instance = (await admin.list_instances("hog"))[0]
    claimed = instance.claim.ram_bytes

    # Traffic through the gateway lands in the instance's history (requests, completion tokens, latency).
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                                 json={"model": "hog", "messages": [{"role": "user", "content": "hi"}]}) as response:
                assert response.status == 200, await response.text()

    drift = server.telemetry.drift

    async def reported() -> bool:  # the agent's heartbeats (every second here) carry the RSS of its tree
        return instance.id in drift.reports and drift.reports[instance.id][0].ram_bytes > 200 * MIB
    await eventually(reported, timeout=30, message="the agent reporting the backend's real memory")
    assert await drift.check(server.db) == 1
    assert await drift.check(server.db) == 0  # one event per episode, not one per pass

    events = [e for e in await admin.list_events(name=instance.name) if e.reason == "MemoryDrift"]
    assert len(events) == 1, events
    assert "--memory" in events[0].message and "more than it claims" in events[0].message

    history = await admin.telemetry(instance=instance.name, since="15m")
    [mine] = history.instances
    assert mine.memory is not None and mine.memory.device == "cpu"
    assert mine.memory.claimed_bytes == claimed and mine.memory.used_bytes > 200 * MIB
    assert mine.memory.drift == "over" and mine.memory.ratio > 1
    suggested = mine.memory.suggested_memory
    assert suggested.endswith(("MiB", "GiB")) and int(suggested[:-3]) * (MIB if suggested.endswith("MiB") else 1024 * MIB) \
        >= mine.memory.used_bytes
    assert sum(v or 0 for v in mine.requests_per_s) * history.step_seconds == pytest.approx(3)
    assert sum(v or 0 for v in mine.tokens_per_s) * history.step_seconds == pytest.approx(21)
    assert any(v for v in mine.latency_s)
    assert any(v and v > 200 * MIB for v in mine.memory_used)

    page = _plain(render_instances.describe(instance, events=events, now=events[0].created_at, activity=mine))
    assert "over its claim: deploy with --memory " + suggested in page

    # Hostile and foreign queries: clear 4xx.
    for params in ({"since": "2d"}, {"since": "-5"}, {"since": "x" * 300}):
        with pytest.raises(ApiClientError) as refused:
            await admin.request("GET", "/v2/telemetry", params=params)
        assert refused.value.status == 400
    for ref in ("no-such-instance", "0" * 253, "0", str(2**70)):
        with pytest.raises(ApiClientError) as missing:
            await admin.telemetry(instance=ref)
        assert missing.value.status == 404, ref
    assert [i.instance for i in (await admin.telemetry(instance=str(instance.id))).instances] == [instance.name]
    cpu_worker = await admin.telemetry(worker="worker-1")
    assert cpu_worker.gpus == [] and [i.instance for i in cpu_worker.instances] == [instance.name]

    # maas top --once: one frame with the worker and the instance's memory against its claim.
    top = await asyncio.to_thread(_cli, server.url, api_key, "top", "--once")
    assert top.returncode == 0, top.stderr
    assert "worker-1" in top.stdout and instance.name in top.stdout and "MEM/CLAIM" in top.stdout

    # maas doctor: the agent's real findings on this machine, and a support bundle.
    bundle = tmp_path / "support"
    doctor = await asyncio.to_thread(_cli, server.url, api_key, "doctor", "--bundle", str(bundle))
    assert doctor.returncode in (0, 1), doctor.stderr
    print(doctor.stdout)
    assert "worker worker-1" in doctor.stdout
    for name in ("nvml", "docker", "service ports", "ray ports", "disk", "clock", "server", "peers", "python"):
        assert f" {name} " in doctor.stdout, (name, doctor.stdout)
    reports = json.loads((await asyncio.to_thread(_cli, server.url, api_key, "doctor", "worker-1", "-o", "json")).stdout)
    checks = {c["name"]: c for c in reports["items"][0]["checks"]}
    assert checks["clock"]["status"] == "ok" and checks["server"]["status"] == "ok"
    try:
        import pynvml  # noqa: F401
        pynvml.nvmlInit()
        has_nvml = True
    except Exception:
        has_nvml = False
    assert (checks["nvml"]["status"] == "ok") == has_nvml
    with tarfile.open(tmp_path / "support.tar.gz") as archive:
        names = set(archive.getnames())
        assert {"maas-support/versions.json", "maas-support/doctor.json", "maas-support/events.json",
                "maas-support/config.json", f"maas-support/logs/{instance.name}.log"} <= names
        config = json.loads(archive.extractfile("maas-support/config.json").read())
        assert config["token"] == "<redacted>"
        assert api_key not in b"".join(archive.extractfile(n).read() for n in names if n.endswith(".json")).decode()
