"""Worker identity (issue 14, Workers): a taken name needs the worker's current token or an approval,
addresses are IP addresses or DNS names, the cluster token lives in the database only as a hash, and
the agent's own endpoint answers only the server's credential (or the Prometheus token)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from agent.agent import Agent, AgentConfig
from conftest import eventually, free_port
from maas_tui.cli.main import app
from maas_tui.client import MaasClient
from server.api.security import hash_secret
from server.app import CLUSTER_TOKEN, CLUSTER_TOKEN_SETTING, MaasServer
from server.config import ServerConfig
from server.db import tables

pytestmark = pytest.mark.timeout(90)


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def register(server: MaasServer, name: str, token: str | None = None, address: str = "127.0.0.1",
                   agent_port: int = 9) -> tuple[int, dict[str, Any]]:
    body = {"name": name, "address": address, "agent_port": agent_port} | ({"token": token} if token else {})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/agent/register", json=body, headers=bearer(server.cluster_token)) as r:
            return r.status, await r.json()


async def heartbeat(server: MaasServer, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/agent/heartbeat", json={}, headers=bearer(token)) as r:
            return r.status


async def reasons(admin: MaasClient, name: str) -> list[str]:
    return [e.reason for e in await admin.list_events(kind="workers", name=name)]


# --- re-registration -----------------------------------------------------------------------


async def test_a_taken_name_needs_the_workers_token_or_an_approval(server, admin: MaasClient):
    status, first = await register(server, "gpu-7")
    assert status == 201
    worker_id, token = first["worker"]["id"], first["token"]

    # Anyone else with the cluster token: held, not the identity.
    for presented in (None, "maasw_1_not-the-token", f"maasw_{worker_id}_forged"):
        status, body = await register(server, "gpu-7", token=presented, address="10.6.6.6", agent_port=4444)
        assert status == 409, body
        assert body["error"]["code"] == "approval_required"
        assert "maas worker approve gpu-7" in body["error"]["message"]
    assert await heartbeat(server, token) == 200  # the real worker keeps its token
    worker = await admin.get_worker("gpu-7")
    assert (worker.address, worker.agent_port) == ("127.0.0.1", 9)
    assert (await reasons(admin, "gpu-7")).count("RegistrationHeld") == 1  # a retrying agent is one request

    # With its current token the worker registers again at once (a restarted agent) and gets a new one.
    status, again = await register(server, "gpu-7", token=token)
    assert status == 201 and again["worker"]["id"] == worker_id
    assert await heartbeat(server, token) == 401 and await heartbeat(server, again["token"]) == 200

    # An operator approves: the held registration goes through at its next try, once.
    approval = await admin.approve_worker("gpu-7")
    assert approval.pending is not None and (approval.pending.address, approval.pending.agent_port) == ("10.6.6.6", 4444)
    status, taken = await register(server, "gpu-7", address="10.6.6.6", agent_port=4444)
    assert status == 201 and taken["worker"]["address"] == "10.6.6.6"
    assert await heartbeat(server, again["token"]) == 401  # the previous holder's token stops working
    status, body = await register(server, "gpu-7", address="10.6.6.7")
    assert status == 409, body  # the approval was used up
    assert {"RegistrationHeld", "RegistrationApproved", "TakeoverApproved"} <= set(await reasons(admin, "gpu-7"))

    status, body = await register(server, "never-seen")
    assert status == 201  # a free name needs nothing but the cluster token
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/workers/gpu-7/approve") as r:
            assert r.status == 401
        async with http.post(f"{server.url}/v2/workers/nobody/approve", headers=bearer(admin.token)) as r:
            assert r.status == 404


async def test_a_restarted_agent_keeps_its_name_and_another_host_waits_for_approval(
        server, admin: MaasClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def config(folder: str) -> AgentConfig:
        return AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / folder,
                           name="twin", address="127.0.0.1", heartbeat_interval=0.5)

    first = Agent(config("a"))
    await first.start()
    await asyncio.wait_for(first.registered.wait(), 10)
    saved = tmp_path / "a" / "worker.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and first.api.worker_token in saved.read_text()
    await first.stop()

    restarted = Agent(config("a"))  # the same host: its saved token keeps the name, no approval
    await restarted.start()
    impostor = None
    try:
        await asyncio.wait_for(restarted.registered.wait(), 10)
        assert restarted.worker_id == first.worker_id

        impostor = Agent(config("b"))  # another host under the same name
        await impostor.start()
        await eventually(lambda: _has(admin, "twin", "RegistrationHeld"), message="the registration held")
        assert not impostor.registered.is_set()
        await asyncio.sleep(1.5)  # heartbeats go on: the identity stayed where it was
        assert await heartbeat(server, restarted.api.worker_token) == 200

        # `maas worker approve twin` lets it through (the agent keeps retrying).
        monkeypatch.setenv("MAAS_CONFIG", str(tmp_path / "maas-config.json"))
        env = {"MAAS_SERVER": server.url, "MAAS_API_KEY": admin.token}
        result = await asyncio.to_thread(CliRunner().invoke, app, ["worker", "approve", "twin"], env=env)
        assert result.exit_code == 0, result.output
        assert "worker twin: approved" in result.output and "goes through at its next try" in result.output
        await asyncio.wait_for(impostor.registered.wait(), 20)
        assert impostor.worker_id == first.worker_id
        assert await heartbeat(server, restarted.api.worker_token) == 401
    finally:
        for agent in (restarted, impostor):
            if agent is not None:
                await agent.stop()


async def _has(admin: MaasClient, name: str, reason: str) -> bool:
    return reason in await reasons(admin, name)


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["x;rm -rf /", "$(id)", "10.0.0.1 --inject", "-rf", "a..b", "fe80::1%a;b", "1.2.3"])
async def test_worker_address_is_an_ip_address_or_a_dns_name(server, address: str):
    status, body = await register(server, "w-addr", address=address)
    assert status == 422, body
    assert "address" in str(body["error"]["details"]) and "neither an IP address nor a DNS name" in str(body) or \
        "IPv6 zone" in str(body)


@pytest.mark.parametrize("address", ["10.1.2.3", "::1", "gpu-3.lab.example.org", "localhost"])
async def test_worker_address_takes_ip_addresses_and_dns_names(server, address: str):
    status, body = await register(server, "w-ok", address=address)
    assert status == 201, body
    assert body["worker"]["address"] == address
    await register(server, "w-ok", token=body["token"])


def test_the_agent_command_refuses_a_bad_address(tmp_path: Path):
    result = CliRunner().invoke(app, ["agent", "--server-url", "http://127.0.0.1:1", "--token", "maasc_x",
                                      "--data-dir", str(tmp_path), "--address", "x;rm -rf /"])
    assert result.exit_code == 2 and "--address" in result.output and "neither an IP address" in result.output


# --- the cluster token -------------------------------------------------------------------------


async def _settings(server: MaasServer) -> dict[str, str]:
    async with server.db.session() as s:
        return {row.key: row.value for row in (await s.execute(select(tables.Setting))).scalars()}


async def _start(store_url: str, data_dir: Path, cluster_token: str | None = None) -> MaasServer:
    server = MaasServer(ServerConfig(data_dir=data_dir, port=free_port(), database_url=store_url,
                                     cluster_token=cluster_token))
    await server.start()
    return server


async def test_the_cluster_token_is_kept_as_a_hash_and_given_to_other_servers(store_url: str, tmp_path: Path):
    first = await _start(store_url, tmp_path / "a")
    token = first.cluster_token
    try:
        settings = await _settings(first)
        assert settings[CLUSTER_TOKEN_SETTING] == hash_secret(token)
        assert CLUSTER_TOKEN not in settings and not any(token in value for value in settings.values())
        assert first.token_file.read_text().strip() == token
        assert stat.S_IMODE(first.token_file.stat().st_mode) == 0o600
        # What earlier versions left: a plain copy in the settings table. The next start removes it.
        async with first.db.session() as s:
            s.add(tables.Setting(key=CLUSTER_TOKEN, value=token))
            await s.commit()
    finally:
        await first.stop()

    # Another server (SQLite takes one at a time: one after the other) with a data folder of its own.
    joining = await _start(store_url, tmp_path / "b")
    try:
        assert joining.cluster_token == token  # taken from the plain copy once, which is gone now
        assert CLUSTER_TOKEN not in await _settings(joining)
        assert stat.S_IMODE(joining.token_file.stat().st_mode) == 0o600
    finally:
        await joining.stop()

    unknowing = await _start(store_url, tmp_path / "c")  # nothing given: verifies by the hash, cannot print it
    try:
        assert unknowing.cluster_token is None and not unknowing.token_file.exists()
        async with aiohttp.ClientSession() as http:
            body = {"name": "via-c", "address": "127.0.0.1", "agent_port": 9}
            async with http.post(f"{unknowing.url}/v2/agent/register", json=body, headers=bearer(token)) as r:
                assert r.status == 201, await r.text()
            async with http.post(f"{unknowing.url}/v2/agent/register", json=body | {"name": "via-c2"},
                                 headers=bearer("maasc_guess")) as r:
                assert r.status == 401
    finally:
        await unknowing.stop()

    with pytest.raises(ValueError, match="not this cluster's token"):
        wrong = MaasServer(ServerConfig(data_dir=tmp_path / "d", port=free_port(), database_url=store_url,
                                        cluster_token="maasc_wrong"))
        try:
            await wrong.start()
        finally:
            await wrong.stop()
    given = await _start(store_url, tmp_path / "e", cluster_token=token)  # MAAS_CLUSTER_TOKEN
    try:
        assert given.cluster_token == token and given.token_file.read_text().strip() == token
    finally:
        await given.stop()


# --- the agent's own endpoint -------------------------------------------------------------------


async def test_the_agents_endpoint_needs_the_servers_credential(server, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MAAS_METRICS_TOKEN", "scrape-me-please")
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="guarded", address="127.0.0.1"))
    await agent.start()
    try:
        await asyncio.wait_for(agent.registered.wait(), 10)
        base = f"http://127.0.0.1:{agent.config.port}"
        async with aiohttp.ClientSession() as http:
            for path in ("/metrics", "/instances/1/logs"):
                for headers in ({}, bearer("wrong"), bearer(server.cluster_token), {"Authorization": agent.api.agent_secret}):
                    async with http.get(base + path, headers=headers) as r:
                        assert r.status == 401, (path, headers)
                        assert (await r.json())["error"]["code"] == "unauthorized"
            async with http.get(f"{base}/metrics", headers=bearer(agent.api.agent_secret)) as r:
                assert r.status == 200 and "maas_host_cpu_count" in await r.text()
            async with http.get(f"{base}/metrics", headers=bearer("scrape-me-please")) as r:  # Prometheus
                assert r.status == 200
            async with http.get(f"{base}/instances/1/logs", headers=bearer("scrape-me-please")) as r:
                assert r.status == 401  # the scrape token reads metrics, not logs
            async with http.get(f"{base}/instances/1/logs", headers=bearer(agent.api.agent_secret)) as r:
                assert r.status == 200
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
    finally:
        await agent.stop()
