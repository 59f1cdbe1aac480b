"""Several servers over one PostgreSQL: every server hears every change (LISTEN/NOTIFY on the
change log), exactly one leads the scheduler and controllers, and another takes over."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import HAVE_POSTGRES, eventually, free_port
from maas_tui.client import MaasClient
from server.app import MaasServer
from server.config import ServerConfig
from server.db.embedded import EmbeddedPostgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180),
              pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")]


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


async def _server(url: str, base: Path, name: str, cluster_token: str | None = None) -> MaasServer:
    server = MaasServer(ServerConfig(data_dir=base / name, port=free_port(), database_url=url, resync_interval=2.0,
                                     cluster_token=cluster_token))
    await server.start()
    return server


async def test_two_servers_share_changes_and_hand_over_leadership(postgres_url, tiny_model: Path):
    from agent.agent import Agent, AgentConfig

    url, base = postgres_url
    first = await _server(url, base, "a")
    # The database keeps only the cluster token's hash: a server joining is given the token.
    second = await _server(url, base, "b", cluster_token=first.cluster_token)
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


def test_kill_9_of_the_leader_process_hands_over(postgres_url, tiny_model: Path):
    """Two `maas start --no-agent` processes over one PostgreSQL; SIGKILL the leader."""
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    url, base = postgres_url
    plain_url = url.replace("postgresql+asyncpg://", "postgresql://")
    env = {**os.environ, "MAAS_CONFIG": str(base / "cli.json"), "PYTHONUNBUFFERED": "1"}
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    agent = None

    def health(port: int) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def wait_for(check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := check():
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def maas(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "maas_tui", *args], capture_output=True, text=True, env=env,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        for name in ("a", "b"):
            port = free_port()
            log = open(base / f"server-{name}.log", "wb")
            # The database keeps only the cluster token's hash: the second server is given the token.
            given = {"MAAS_CLUSTER_TOKEN": (base / "data-a" / "token").read_text().strip()} if name == "b" else {}
            process = subprocess.Popen([sys.executable, "-m", "maas_tui", "start", "--no-agent", "--database-url",
                                        plain_url, "--data-dir", str(base / f"data-{name}"), "--port", str(port)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env | given, start_new_session=True)
            servers[name] = (process, port)
            wait_for(lambda: health(port), 60, f"server {name}")
        leader = wait_for(lambda: next((n for n, (_, p) in servers.items() if (health(p) or {}).get("leader")), None),
                          15, "a leader")
        follower = "b" if leader == "a" else "a"
        follower_port = servers[follower][1]
        follower_url = f"http://127.0.0.1:{follower_port}"
        password = (base / "data-a" / "initial_admin_password").read_text().strip()
        maas("login", "--server", follower_url, "--username", "admin", "--password", password)
        token = (base / "data-a" / "token").read_text().strip()
        assert (base / "data-b" / "token").read_text().strip() == token  # one cluster token for the cluster
        agent = subprocess.Popen([sys.executable, "-m", "maas_tui", "agent", "--server-url", follower_url, "--token",
                                  token, "--name", "worker-1", "--data-dir", str(base / "agent")],
                                 stdout=open(base / "agent.log", "wb"), stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)

        servers[leader][0].send_signal(signal.SIGKILL)
        servers[leader][0].wait(10)
        killed_at = time.monotonic()
        wait_for(lambda: (health(follower_port) or {}).get("leader"), 10, "the other server to take over")
        print(f"\nleader killed -> new leader after {time.monotonic() - killed_at:.1f} s")
        maas("model", "deploy", "after-kill", "--source", str(tiny_model), "--backend", "llama.cpp", "--replicas", "1",
             "--wait", "--timeout", "60")
        instances = json.loads(maas("instance", "list", "-o", "json"))["items"]
        assert [(i["model_name"], i["state"]) for i in instances] == [("after-kill", "running")]
        # The new leader gave the worker a full timeout from its takeover: never marked not_ready.
        workers = json.loads(maas("worker", "list", "-o", "json"))["items"]
        assert [(w["name"], w["state"]) for w in workers] == [("worker-1", "ready")]
        assert "NotReady" not in maas("events", "--limit", "500")
    finally:
        for process in [agent] + [p for p, _ in servers.values()]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
