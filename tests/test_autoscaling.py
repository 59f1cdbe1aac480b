"""Autoscaling and scale to zero on a real server with a real agent and real llama.cpp backends.

One model goes through the whole cycle on one started server (short windows and timeouts): load
raises it from 1 to 3 replicas, a lighter load through the scale-down loses no request, idle takes it
to zero (claims freed, still listed by /v1/models), then the first requests after zero are held and
served through the official `openai` client, plain and streamed, while one beyond the bound gets 503
with Retry-After at once. The decision arithmetic is checked on its own, without a server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest

from conftest import eventually
from maas_tui.client import MaasClient
from server.app import MaasServer
from server.controllers.autoscale import Load, Memory, Policy, decide

pytestmark = pytest.mark.timeout(240)
PROMPT = [{"role": "user", "content": "hello there"}]


def test_decision_scales_up_at_once_down_after_the_window_and_to_zero_after_idle():
    policy = Policy(min_replicas=0, max_replicas=4, target_concurrency=2, scale_down_delay=10, idle_timeout=30)
    memory = Memory(last_active=0.0)
    up = decide(policy, 1, Load(in_flight=5.2, active=True), memory, now=1.0)
    assert (up.replicas, up.event) == (3, "ScaledUp") and "5.2 in flight" in up.reason
    assert decide(policy, 3, Load(in_flight=50, active=True), memory, now=2.0).replicas == 4  # capped at max
    # The load drops: nothing moves until every need in the last 10 s was lower.
    assert decide(policy, 4, Load(in_flight=1, active=True), memory, now=5.0).event is None
    down = decide(policy, 4, Load(in_flight=1, active=True), memory, now=12.5)
    assert (down.replicas, down.event) == (1, "ScaledDown")
    # Idle: one replica stays until idle_timeout has passed since the last request, then zero.
    assert decide(policy, 1, Load(), memory, now=30.0).event is None
    zero = decide(policy, 1, Load(), memory, now=43.0)
    assert (zero.replicas, zero.event) == (0, "ScaledToZero")
    assert decide(policy, 0, Load(), memory, now=100.0).event is None  # stays at zero
    held = decide(policy, 0, Load(held=1, active=True), memory, now=101.0)  # a held request: one replica at once
    assert (held.replicas, held.event) == (1, "ScaledUp")
    floor = Policy(min_replicas=2, max_replicas=4, target_concurrency=2, scale_down_delay=0, idle_timeout=1)
    assert decide(floor, 3, Load(), Memory(last_active=0.0), now=99.0).replicas == 2  # never below min


async def _states(admin: MaasClient, name: str) -> list[str]:
    return sorted(i.state for i in await admin.list_instances(name))


async def test_load_scales_up_idle_scales_to_zero_and_held_requests_are_served(
        server: MaasServer, admin: MaasClient, api_key: str, agent, tiny_model: Path):
    name = "elastic"
    created = await admin.create_model({
        "name": name, "source": str(tiny_model), "backend": "llama.cpp", "replicas": 1, "min_replicas": 1,
        "max_replicas": 3, "target_concurrency": 2, "scale_down_delay": 2, "idle_timeout": 3,
        "cold_start_timeout": 60})
    assert (created.min_replicas, created.max_replicas, created.replicas) == (1, 3, 1)
    await eventually(lambda: _all_running(admin, name, 1), message="one running replica")

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)
    failures: list[str] = []
    served = 0
    stop = asyncio.Event()

    async def user() -> None:
        nonlocal served
        while not stop.is_set():
            try:
                await client.chat.completions.create(model=name, messages=PROMPT, max_tokens=48)
                served += 1
            except openai.APIError as exc:  # every failure counts; none is expected
                failures.append(repr(exc))

    # Load step: 8 clients against a target of 2 in flight per replica -> the maximum, 3.
    users = [asyncio.create_task(user()) for _ in range(8)]
    await eventually(lambda: _all_running(admin, name, 3), timeout=60, message="3 running replicas under load")
    # Lighter load (2 clients: one replica's worth) through the scale-down: no request may fail.
    stop.set()
    await asyncio.gather(*users)
    stop.clear()
    users = [asyncio.create_task(user()) for _ in range(2)]
    await eventually(lambda: _all_running(admin, name, 1), timeout=60, message="back to 1 replica under light load")
    stop.set()
    await asyncio.gather(*users)
    assert not failures, failures[:3]
    assert served > 0

    # Scale to zero: min 0, and nothing calls it for idle_timeout.
    await admin.update_model(name, {"min_replicas": 0})
    await eventually(lambda: _no_instances(admin, name), timeout=60, message="zero instances after idle")
    model = await admin.get_model(name)
    assert model.replicas == 0 and "idle_timeout" in model.scale_reason
    listed = await client.models.list()
    assert [(m.id, m.model_extra.get("state")) for m in listed.data if m.id == name] == [(name, "scaled_to_zero")]
    reasons = {e.reason for e in await admin.list_events(kind="models")}
    assert {"ScaledUp", "ScaledDown", "ScaledToZero"} <= reasons, reasons

    # The first requests after zero are held while one replica starts; one beyond the bound gets 503 at once.
    # The worker is cordoned meanwhile, so the replica waits for the checks (a tiny model starts in a blink).
    server.cold_start.max_held = 2
    await admin.worker_action(agent.config.name, "cordon")
    # Held longer than cold_start_timeout: 503 with Retry-After.
    await admin.update_model(name, {"cold_start_timeout": 1})
    await eventually(lambda: _timeout_is(server, name, 1), timeout=10, message="the gateway sees the new timeout")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                             json={"model": name, "messages": PROMPT, "max_tokens": 2}) as late:
            assert late.status == 503 and int(late.headers["Retry-After"]) >= 1
            assert (await late.json())["error"]["code"] == "cold_start_timeout"
    await admin.update_model(name, {"cold_start_timeout": 60})
    await eventually(lambda: _timeout_is(server, name, 60), timeout=10, message="the gateway sees the new timeout")
    plain = asyncio.create_task(client.chat.completions.create(model=name, messages=PROMPT, max_tokens=4))

    async def streamed() -> int:
        stream = await client.chat.completions.create(model=name, messages=PROMPT, max_tokens=4, stream=True)
        return len([chunk async for chunk in stream if chunk.choices])

    stream_task = asyncio.create_task(streamed())
    await eventually(lambda: _held(server, name, 2), timeout=10, message="two requests held")
    await eventually(lambda: _desired(admin, name, 1), timeout=10, message="the held requests ask for a replica")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/metrics") as scraped:
            metrics = await scraped.text()
        assert f'maas_gateway_held_requests{{model="{name}"}} 2.0' in metrics
        assert f'maas_model_replicas_desired{{model="{name}"}} 1.0' in metrics  # the held requests asked for one
        async with http.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                             json={"model": name, "messages": PROMPT, "max_tokens": 2}) as refused:
            assert refused.status == 503
            assert int(refused.headers["Retry-After"]) >= 1
            assert (await refused.json())["error"]["code"] == "cold_start_busy"
    await admin.worker_action(agent.config.name, "uncordon")
    reply = await plain
    assert reply.usage.completion_tokens == 4
    assert await stream_task >= 4  # a chunk per token (and the final one)
    assert (await admin.get_model(name)).replicas == 1
    await client.close()


async def _all_running(admin: MaasClient, name: str, count: int) -> bool:
    states = await _states(admin, name)
    return states == ["running"] * count and (await admin.get_model(name)).replicas == count


async def _no_instances(admin: MaasClient, name: str) -> bool:
    return not await admin.list_instances(name)


async def _held(server: MaasServer, name: str, count: int) -> bool:
    return server.cold_start.held.get(name, 0) == count


async def _desired(admin: MaasClient, name: str, count: int) -> bool:
    return (await admin.get_model(name)).replicas == count


async def _timeout_is(server: MaasServer, name: str, seconds: float) -> bool:
    return server.routes.models[name].cold_start_timeout == seconds


async def test_the_leader_adds_the_load_other_servers_write(server: MaasServer, admin: MaasClient, tiny_model: Path):
    """Another server's gateway writes its load as a row of gateway_loads; the leader's autoscaler adds it (a held
    request there starts a replica here), and ignores a row too old to be a live server's."""
    from datetime import timedelta

    from sqlalchemy import delete

    from server.db import tables
    from server.db.tables import utcnow

    await admin.create_model({"name": "remote", "source": str(tiny_model), "backend": "llama.cpp", "replicas": 0,
                              "min_replicas": 0, "max_replicas": 4, "target_concurrency": 2})

    async def other_server(loads: dict, age: float = 0.0) -> None:
        async with server.db.session() as s:
            await s.execute(delete(tables.GatewayLoad))
            s.add(tables.GatewayLoad(server_id="other", loads=loads, updated_at=utcnow() - timedelta(seconds=age)))
            await s.commit()

    await other_server({"remote": [0.0, 3, 0]}, age=60)  # stale: a server gone a minute ago
    await asyncio.sleep(2.5)  # two decisions of the autoscaler
    assert (await admin.get_model("remote")).replicas == 0
    await other_server({"remote": [0.0, 1, 0]})  # fresh: one request held there
    await eventually(lambda: _desired(admin, "remote", 1), timeout=10, message="a replica for the remote hold")
    await other_server({"remote": [6.5, 0, 7]})  # 6.5 in flight at 2 per replica: 4
    await eventually(lambda: _desired(admin, "remote", 4), timeout=10, message="4 replicas for the remote load")
    assert "6.5 in flight" in (await admin.get_model("remote")).scale_reason
