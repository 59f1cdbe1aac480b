"""A heartbeat whose bytes repeat the worker's last validated one skips parsing and validation
(server/api/agent_api.py, server/liveness.py), and still does everything else a heartbeat does:
renews the lease and the last-seen time, brings a not_ready worker back, and a changed report is
applied. One real server (SQLite), real HTTP."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, AsyncIterator

import aiohttp
import pytest

from conftest import eventually
from maas_tui.client import MaasClient
from server.app import MaasServer


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def _report(utilization: float = 5.0, gpus: int = 1) -> bytes:
    devices = [{"index": i, "name": "H100 (simulated)", "memory_total": 80 << 30, "memory_used": 1 << 30,
                "utilization": utilization, "simulated": True} for i in range(gpus)]
    return json.dumps({"gpus": devices, "host": {"hostname": "beat", "cpu_count": 8}}).encode()


async def test_a_repeated_heartbeat_renews_liveness_and_a_changed_one_is_applied(
        server: MaasServer, admin: MaasClient, http: aiohttp.ClientSession):
    async with http.post(f"{server.url}/v2/agent/register", headers={"Authorization": f"Bearer {server.cluster_token}"},
                         json={"name": "beat", "address": "127.0.0.1", "agent_port": 9} | json.loads(_report())) as r:
        assert r.status == 201, await r.text()
        registered = await r.json()
    worker_id = registered["worker"]["id"]
    headers = {"Authorization": f"Bearer {registered['token']}", "Content-Type": "application/json"}

    async def beat(raw: bytes, status: int = 200) -> dict[str, Any]:
        async with http.post(f"{server.url}/v2/agent/heartbeat", data=raw, headers=headers) as response:
            assert response.status == status, await response.text()
            return await response.json()

    idle = _report()
    first = await beat(idle)
    validated = server.heartbeats.validated(worker_id, idle)
    assert validated is not None  # the next identical report takes the fast path
    heard = server.heartbeats.heard[worker_id]

    # The same bytes again: not validated again (the same model serves), yet the lease, the telemetry and
    # the answer's last-seen time move on, and the batched flush writes it to the row.
    second = await beat(idle)
    assert server.heartbeats.validated(worker_id, idle) is validated
    assert server.heartbeats.heard[worker_id] > heard
    assert datetime.fromisoformat(second["last_heartbeat_at"]) > datetime.fromisoformat(first["last_heartbeat_at"])
    assert server.telemetry.readings[worker_id]["last_heartbeat_at"] == second["last_heartbeat_at"]
    await server.heartbeats.flush()
    stored = (await admin.get_worker("beat")).last_heartbeat_at
    assert stored is not None and stored.isoformat() == second["last_heartbeat_at"]

    # The leader's judgement still holds: silent for the timeout -> not_ready; the same bytes bring it back.
    server.config.worker_timeout = 0.5
    await eventually(lambda: _state_is(admin, "not_ready"), timeout=20, message="the silent worker not_ready")
    server.config.worker_timeout = 15.0
    assert (await beat(idle))["state"] == "ready"
    assert (await admin.get_worker("beat")).state == "ready"

    # Changed reports are validated and applied: moving readings to the telemetry, new hardware to the row.
    await beat(_report(utilization=88.0))
    assert server.telemetry.readings[worker_id]["gpus"][0]["utilization"] == 88.0
    assert len((await beat(_report(gpus=2)))["gpus"]) == 2
    assert len((await admin.get_worker("beat")).gpus) == 2

    # Hostile bytes are validated whatever came before: a string for a number, a NUL character.
    await beat(_report().replace(b'"utilization": 5.0', b'"utilization": "5.0"'), status=422)
    await beat(_report().replace(b'"beat"', b'"be\\u0000at"'), status=400)
    assert len((await beat(_report(gpus=2)))["gpus"]) == 2


async def _state_is(admin: MaasClient, state: str) -> bool:
    return (await admin.get_worker("beat")).state == state
