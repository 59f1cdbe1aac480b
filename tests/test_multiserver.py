"""Several servers over one PostgreSQL: every server hears every change (LISTEN/NOTIFY on the
change log), exactly one leads the scheduler and controllers, and another takes over."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import eventually, free_port
from maas_tui.client import MaasClient
from server.app import MaasServer
from server.config import ServerConfig
from server.db.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_pg_bin_dir

try:
    find_pg_bin_dir()
    HAVE_PG = True
except EmbeddedPostgresError:
    HAVE_PG = False

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180),
              pytest.mark.skipif(not HAVE_PG, reason="PostgreSQL server binaries not installed")]


@pytest.fixture
def postgres_url():
    base = Path(tempfile.mkdtemp(prefix="maas-multi-", dir="/tmp"))
    os.chmod(base, 0o711)
    pg = EmbeddedPostgres(base / "pg")
    try:
        yield pg.start(), base
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _server(url: str, base: Path, name: str) -> MaasServer:
    server = MaasServer(ServerConfig(data_dir=base / name, port=free_port(), database_url=url, resync_interval=2.0))
    await server.start()
    return server


async def test_two_servers_share_changes_and_hand_over_leadership(postgres_url, tiny_model: Path):
    from agent.agent import Agent, AgentConfig

    url, base = postgres_url
    first = await _server(url, base, "a")
    second = await _server(url, base, "b")
    agent = None
    try:
        await eventually(lambda: _true(first.leadership.is_leader), message="the first server to lead")
        await asyncio.sleep(2.5)  # one election round: the second must not lead as well
        assert not second.leadership.is_leader

        # Credentials written by the first server work on the second (same database).
        password = (base / "a" / "initial_admin_password").read_text().strip()
        async with MaasClient(second.url) as anonymous:
            token = (await anonymous.login("admin", password)).token
        agent = Agent(AgentConfig(server_url=second.url, token=second.cluster_token or "",
                                  data_dir=base / "agent", name="worker-1"))
        await agent.start()

        async with MaasClient(second.url, token) as via_second:
            # A deploy through the follower: the leader's controllers place it, the follower's
            # watch and gateway hear about it through NOTIFY.
            watch = via_second.watch(["instances"])
            assert (await anext(watch)).type == "snapshot"
            await via_second.create_model({"name": "shared", "source": str(tiny_model), "backend": "llama.cpp",
                                           "replicas": 1})
            event = await asyncio.wait_for(anext(watch), 10)
            while event.type != "event":
                event = await asyncio.wait_for(anext(watch), 10)
            assert event.object["model_name"] == "shared"
            await watch.aclose()

            await eventually(lambda: _serving(second, "shared"), message="the follower's gateway routing to it")
            await eventually(lambda: _serving(first, "shared"), message="the leader's gateway routing to it")

            # The leader goes away; the other server takes over and a new deploy completes.
            await first.stop()
            first = None
            await eventually(lambda: _true(second.leadership.is_leader), timeout=10, message="a new leader")
            await via_second.create_model({"name": "after", "source": str(tiny_model), "backend": "llama.cpp",
                                           "replicas": 1})

            async def running() -> bool:
                return [i.state for i in await via_second.list_instances("after")] == ["running"]
            await eventually(running, message="a deploy completed under the new leader")
            assert len(await via_second.list_instances()) == 2
    finally:
        if agent is not None:
            await agent.stop()
        for server in (first, second):
            if server is not None:
                await server.stop()


async def _true(value: bool) -> bool:
    return value


async def _serving(server: MaasServer, model: str) -> bool:
    return model in server.routes.serving_models()
