"""kill -9 of the database server in the middle of a deploy, on the embedded PostgreSQL and on
MariaDB: during the outage /healthz says so (200), the gateway serves what runs from memory,
writes are 503 database_unavailable and reads this server answered before come back marked stale; when it is back (the server restarts its embedded PostgreSQL itself;
MariaDB is restarted as its service manager would) the cluster converges with nothing lost and
nothing doubled."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
import psutil
import pytest

from agent.agent import Agent, AgentConfig
from conftest import HAVE_POSTGRES, MariaDBServer, eventually, free_port, mariadb_binaries
from maas_tui.client import MaasClient
from server.api.stale_reads import STALE_HEADER
from server.app import MaasServer
from server.config import ServerConfig

pytestmark = pytest.mark.timeout(240)


@dataclass
class Crashable:
    url: str | None  # None: the server's own embedded PostgreSQL
    kill: Callable[[], None]
    restore: Callable[[], None] | None  # None: the server brings it back itself
    cleanup: Callable[[], None]


@pytest.fixture(params=[
    pytest.param("postgres", marks=[pytest.mark.postgres,
                                    pytest.mark.skipif(not HAVE_POSTGRES, reason="no PostgreSQL binaries")]),
    pytest.param("mariadb", marks=[pytest.mark.mariadb,
                                   pytest.mark.skipif(mariadb_binaries() is None, reason="no MariaDB binaries")]),
])
async def crashable(request, traversable_tmp: Path) -> Any:
    base = traversable_tmp / f"outage-{request.param}-{time.monotonic_ns()}"
    base.mkdir()
    os.chmod(base, 0o711)
    holder: dict[str, Any] = {"base": base}
    if request.param == "postgres":
        def kill() -> None:
            pid = int((base / "data" / "postgres" / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)  # the postmaster only, as a crash; its backends follow it out

        yield holder, Crashable(url=None, kill=kill, restore=None, cleanup=lambda: None)
    else:
        mariadb = MariaDBServer(base / "mariadb")
        await asyncio.to_thread(mariadb.start)
        url = await mariadb.new_database("maas")
        try:
            yield holder, Crashable(url=url, kill=mariadb.kill, restore=mariadb.start, cleanup=mariadb.stop)
        finally:
            await asyncio.to_thread(mariadb.stop)


def _backends(model: Path) -> list[psutil.Process]:
    """The llama.cpp servers started for `model` (children of this test process), alive."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if "llamacpp_server" in cmdline and str(model) in cmdline and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


async def test_database_killed_mid_deploy_converges_without_loss_or_doubles(crashable, tiny_model: Path):
    holder, db = crashable
    base: Path = holder["base"]
    server = MaasServer(ServerConfig(data_dir=base / "data", port=free_port(), database_url=db.url,
                                     resync_interval=2.0))
    await server.start()
    agent = None
    try:
        agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=base / "agent",
                                  name="worker-1", address="127.0.0.1", heartbeat_interval=1.0, drain_seconds=1.0))
        await agent.start()
        async with asyncio.timeout(20):
            await agent.registered.wait()
        password = server.admin_password_file.read_text().strip()
        async with MaasClient(server.url) as anonymous:
            token = (await anonymous.login("admin", password)).token
        async with MaasClient(server.url, token) as admin, aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {token}"}
            key = (await admin.create_key("apps", scopes=["management", "inference"])).key
            await admin.create_model({"name": "served", "source": str(tiny_model), "backend": "llama.cpp",
                                      "replicas": 1})

            async def serving() -> bool:
                return [i.state for i in await admin.list_instances("served")] == ["running"]
            await eventually(serving, timeout=60, message="the first model to run")
            chat = {"model": "served", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json=chat) as resp:  # the key is verified once, then cached
                assert resp.status == 200, await resp.text()
            await admin.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp",
                                      "replicas": 2})

            async def created() -> bool:
                return len(await admin.list_instances("tiny")) == 2
            await eventually(created, message="the deploy's instances to exist")
            async with http.get(f"{server.url}/v2/models", headers=headers) as resp:
                assert resp.status == 200 and STALE_HEADER not in resp.headers
                models_before = await resp.read()
            listed_before = await admin.list_models()
            db.kill()  # mid-deploy: instances placed or starting, backends coming up

            # The outage: health answers and says so; what needs the database is a clear 503.
            async def health_says_down() -> bool:
                async with http.get(f"{server.url}/healthz") as resp:
                    assert resp.status == 200
                    body = await resp.json()
                return body["database"] == "unavailable" and body["status"] == "degraded"
            await eventually(health_says_down, timeout=10, message="/healthz to report the database down")
            if db.restore is not None:  # the server cannot restart an external database itself
                async with http.post(f"{server.url}/v2/models", headers=headers,
                                     json={"name": "during", "source": str(tiny_model), "backend": "llama.cpp"}) as resp:
                    assert resp.status == 503, await resp.text()
                    error = (await resp.json())["error"]
                    assert error["code"] == "database_unavailable" and "try again" in error["message"]
                # A read this server answered before comes back as it was then, marked stale...
                async with http.get(f"{server.url}/v2/models", headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                    assert int(resp.headers[STALE_HEADER]) >= 0 and await resp.read() == models_before
                assert await admin.list_models() == listed_before and admin.stale_seconds is not None
                # ...one it never answered (and any other caller's) is a clear 503.
                async with http.get(f"{server.url}/v2/workers", headers=headers) as resp:
                    assert resp.status == 503
                    assert (await resp.json())["error"]["code"] == "database_unavailable"
                async with http.get(f"{server.url}/v2/models", headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status in (401, 503) and STALE_HEADER not in resp.headers
                # The gateway answers from its in-memory routes and key cache.
                async with http.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                     json=chat) as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["choices"][0]["message"]["content"]
                await asyncio.to_thread(db.restore)

            async def healthy() -> bool:
                async with http.get(f"{server.url}/healthz") as resp:
                    return resp.status == 200 and (await resp.json())["database"] == "ok"
            await eventually(healthy, timeout=60, message="the database to be back")

            async def converged() -> bool:
                try:
                    items = await admin.list_instances()
                except Exception:  # a request that raced the reconnect: ask again
                    return False
                return len(items) == 3 and all(i.state == "running" for i in items) and len(_backends(tiny_model)) == 3
            await eventually(converged, timeout=120, interval=0.5, message="3 running instances after the outage")

            instances = await admin.list_instances()
            assert len({i.name for i in instances}) == 3, "no duplicate names"
            assert sorted(m.name for m in await admin.list_models()) == ["served", "tiny"]
            assert sorted(p.pid for p in _backends(tiny_model)) == sorted(i.pid for i in instances), \
                "every backend belongs to a listed instance: none doubled, none orphaned"
            # Writes work again, and the change feed publishes them.
            subscription = server.bus.subscribe(["models"])
            after = await admin.create_model({"name": "after", "source": str(tiny_model), "backend": "llama.cpp",
                                              "replicas": 0})
            async with asyncio.timeout(10):  # the feed may still carry the converged instances' model updates
                event = await subscription.get()
                while event is not None and event.object["name"] != after.name:
                    event = await subscription.get()
            assert event is not None and event.object["name"] == after.name
            subscription.close()
    finally:
        if agent is not None:
            await agent.stop()
        await server.stop()
        db.cleanup()
