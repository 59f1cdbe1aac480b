"""The gateway's own view of backend health (server/gateway/routing_table.py): targets stay while their
backend answers whatever the agent's heartbeat says; failures take them out, probes bring them back."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from conftest import free_port
from server.gateway.routing_table import EJECT_AFTER, RoutingTable, probe


@pytest.fixture
async def backend_port():
    """A real HTTP server answering /health, as llama.cpp does."""
    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def _instance(instance_id: int, port: int, state: str = "running") -> dict:
    return {"id": instance_id, "model_name": "m", "state": state, "address": "127.0.0.1", "port": port}


async def test_probe_answers_only_for_a_live_http_server(backend_port: int):
    assert await probe("127.0.0.1", backend_port)
    assert not await probe("127.0.0.1", free_port())  # nothing listens there


async def test_an_unreachable_instance_stays_routed_while_its_backend_answers(backend_port: int):
    dead_port = free_port()
    table = RoutingTable()
    table.apply_model("created", {"name": "m", "spec": {"backend": "llama.cpp"}})
    table.apply_instance("updated", _instance(1, backend_port))
    table.apply_instance("updated", _instance(2, dead_port))
    assert table.backend_answers(1, within=5) is None  # a running target is not probed

    # The worker stops heartbeating: both instances turn unreachable and stay targets, now probed.
    table.apply_instance("updated", _instance(1, backend_port, "unreachable"))
    table.apply_instance("updated", _instance(2, dead_port, "unreachable"))
    assert {t.instance_id for t in table.models["m"].targets.values()} == {1, 2}
    prober = asyncio.create_task(table.probe_loop(interval=0.05))
    try:
        for _ in range(100):
            if table.backend_answers(2, within=5) is False and table.backend_answers(1, within=5):
                break
            await asyncio.sleep(0.05)
    finally:
        prober.cancel()
    assert table.backend_answers(1, within=5) is True
    assert table.backend_answers(2, within=5) is False
    assert [t.instance_id for t in table.models["m"].ordered()] == [1]  # the dead one is out
    assert table.serving_models() == ["m"]

    # The agent is back: `scheduled` until it adopts the backend keeps the target; `running` again after.
    table.apply_instance("updated", _instance(1, backend_port, "scheduled"))
    assert 1 in table.models["m"].targets
    table.apply_instance("updated", _instance(1, backend_port, "running"))
    assert not table.models["m"].targets[1].worker_away
    # A new instance that is only scheduled is no target; a deleted one goes.
    table.apply_instance("created", _instance(3, backend_port, "scheduled"))
    table.apply_instance("deleted", _instance(2, dead_port, "unreachable"))
    assert set(table.models["m"].targets) == {1}


async def test_failures_in_a_row_take_a_target_out_and_a_probe_brings_it_back(backend_port: int):
    table = RoutingTable()
    table.apply_instance("updated", _instance(1, backend_port))
    table.apply_instance("updated", _instance(2, backend_port))
    one = table.models["m"].targets[1]
    for _ in range(EJECT_AFTER - 1):
        table.failed(one)
    table.answered(one)  # an answer in between: the count starts over
    for _ in range(EJECT_AFTER - 1):
        table.failed(one)
    assert one.healthy
    table.failed(one)
    assert not one.healthy
    assert [t.instance_id for t in table.models["m"].ordered()] == [2]
    two = table.models["m"].targets[2]
    for _ in range(EJECT_AFTER):
        table.failed(two)
    assert {t.instance_id for t in table.models["m"].ordered()} == {1, 2}  # none healthy: all, not an outage

    prober = asyncio.create_task(table.probe_loop(interval=0.05))
    try:
        for _ in range(100):
            if one.healthy and two.healthy:
                break
            await asyncio.sleep(0.05)
    finally:
        prober.cancel()
    assert one.healthy and two.healthy and one.failures == 0


async def test_a_reload_keeps_what_was_learnt(backend_port: int):
    table = RoutingTable()
    table.apply_instance("updated", _instance(1, backend_port, "unreachable"))
    assert not table.models["m"].targets[1].healthy  # first seen unreachable: out until a probe answers
    await table._probe(table.models["m"].targets[1])
    assert table.models["m"].targets[1].healthy
    table.load([{"name": "m", "spec": {"backend": "llama.cpp"}}], [_instance(1, backend_port, "unreachable")])
    assert table.models["m"].targets[1].healthy and table.backend_answers(1, within=5)
