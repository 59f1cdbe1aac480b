"""Crashes with real processes and default timings: an agent killed with SIGKILL, and the
server killed with SIGKILL in the middle of a rollout."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import HAVE_POSTGRES
from test_integration import Cluster, _instances, _wait_running

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.timeout(300),
              pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")]


def _cluster(traversable_tmp: Path, label: str) -> Cluster:
    base = traversable_tmp / f"{label}-{os.getpid()}-{time.monotonic_ns()}"
    base.mkdir()
    os.chmod(base, 0o711)
    return Cluster(base)


def _login(cluster: Cluster) -> None:
    password = (cluster.data_dir / "initial_admin_password").read_text().strip()
    cluster.maas("login", "--server", cluster.url, "--username", "admin", "--password", password)


def _wait_workers(cluster: Cluster, names: set[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        workers = json.loads(cluster.maas("worker", "list", "-o", "json").stdout)["items"]
        if {w["name"] for w in workers if w["state"] == "ready"} >= names:
            return
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)


def _kill_orphans(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_killed_agent_is_replaced_on_the_other_worker(traversable_tmp: Path, tiny_model: Path):
    cluster = _cluster(traversable_tmp, "agent-kill")
    orphans: list[int] = []
    try:
        cluster.start_server()
        _login(cluster)
        doomed = cluster.start_agent("worker-a")
        cluster.start_agent("worker-b")
        _wait_workers(cluster, {"worker-a", "worker-b"})
        cluster.maas("model", "deploy", "tiny", "--source", str(tiny_model), "--backend", "llama.cpp",
                     "--replicas", "2", "--wait", "--timeout", "120")
        placed = {i["worker_name"]: i for i in _wait_running(cluster, 2)}
        assert set(placed) == {"worker-a", "worker-b"}  # spread: one replica per worker
        orphans.append(placed["worker-a"]["pid"])  # its backend outlives the agent (its own session)

        # The agent and its backend both die: the backend is really gone, so the instance is replaced
        # (a dead agent alone leaves its backend serving: test_agent_kill_under_load_fails_almost_nothing).
        doomed.send_signal(signal.SIGKILL)
        os.killpg(placed["worker-a"]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 90
        while True:
            items = _instances(cluster)
            if [(i["worker_name"], i["state"]) for i in items] == [("worker-b", "running")] * 2:
                break
            assert time.monotonic() < deadline, f"no replacement: {items}"
            time.sleep(0.2)
        recovery = time.monotonic() - killed_at
        print(f"\nagent and backend killed -> replacement running on the other worker: {recovery:.1f} s "
              "(default timeouts)")
        assert recovery <= 45
        assert "Rescheduled" in cluster.maas("events", "--limit", "200").stdout
    finally:
        cluster.close()
        _kill_orphans(orphans)


def test_server_killed_mid_rollout_converges_after_restart(traversable_tmp: Path, tiny_model: Path):
    cluster = _cluster(traversable_tmp, "server-kill")
    try:
        cluster.start_server()
        _login(cluster)
        cluster.start_agent("worker-a")
        _wait_workers(cluster, {"worker-a"})
        cluster.maas("model", "deploy", "tiny", "--source", str(tiny_model), "--backend", "llama.cpp",
                     "--replicas", "4", "--wait", "--timeout", "120")
        _wait_running(cluster, 4)
        cluster.maas("model", "deploy", "other", "--source", str(tiny_model), "--backend", "llama.cpp",
                     "--replicas", "0")  # something else the restarted server must still know
        # Start a rollout and kill the server as soon as it is under way.
        cluster.maas("model", "rollout", "restart", "tiny")
        deadline = time.monotonic() + 30
        while not any(i["generation"] == 2 for i in _instances(cluster)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.server.send_signal(signal.SIGKILL)
        cluster.server.wait(10)

        cluster.start_server()  # the same data folder: the embedded PostgreSQL is reused
        deadline = time.monotonic() + 120
        while True:
            items = _instances(cluster)
            if sorted((i["generation"], i["state"]) for i in items) == [(2, "running")] * 4:
                break
            assert time.monotonic() < deadline, f"rollout did not converge: {items}"
            time.sleep(0.2)
        status = json.loads(cluster.maas("model", "rollout", "status", "tiny", "-o", "json").stdout)
        assert status["complete"] and status["ready"] == 4 and status["outdated"] == 0
        names = {m["name"] for m in json.loads(cluster.maas("model", "list", "-o", "json").stdout)["items"]}
        assert names == {"tiny", "other"}
        running_backends = [p for p in psutil.process_iter(["cmdline"])
                            if "agent.backends.llamacpp_server" in " ".join(p.info["cmdline"] or [])
                            and str(tiny_model) in " ".join(p.info["cmdline"] or [])
                            and p.status() != psutil.STATUS_ZOMBIE]
        assert len(running_backends) == 4, "no instance lost, none doubled"
    finally:
        cluster.close()


def test_agent_kill_under_load_fails_almost_nothing(traversable_tmp: Path, tiny_model: Path):
    """kill -9 of the agent process under 32 clients through /v1: its backends keep serving (the gateway
    probes them while the worker is silent), nothing is replaced, and the restarted agent adopts them.
    Short timeouts so the worker goes not_ready and past reschedule_after inside the load window."""
    import asyncio

    import aiohttp

    cluster = _cluster(traversable_tmp, "agent-kill-load")
    cluster.env.update(MAAS_WORKER_TIMEOUT="2", MAAS_RESCHEDULE_AFTER="2")
    try:
        cluster.start_server()
        _login(cluster)
        agent = cluster.start_agent("worker-a")
        _wait_workers(cluster, {"worker-a"})
        cluster.maas("model", "deploy", "tiny", "--source", str(tiny_model), "--backend", "llama.cpp",
                     "--replicas", "2", "--wait", "--timeout", "120")
        before = {i["id"]: i["pid"] for i in _wait_running(cluster, 2)}
        key = json.loads(cluster.maas("key", "create", "load", "-o", "json").stdout)["key"]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        outcomes: list[int] = []
        failures: list[str] = []
        seen_states: set[str] = set()

        async def client(http: aiohttp.ClientSession, stop_at: float) -> None:
            while time.monotonic() < stop_at:
                try:
                    async with http.post(f"{cluster.url}/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {key}"}) as response:
                        await response.read()
                        outcomes.append(response.status)
                        if response.status != 200:
                            failures.append(f"{response.status}: {(await response.text())[:200]}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes.append(0)
                    failures.append(repr(exc))

        async def load() -> None:
            nonlocal agent
            start = time.monotonic()
            stop_at = start + 15
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                clients = [asyncio.create_task(client(http, stop_at)) for _ in range(32)]
                await asyncio.sleep(2)
                agent.send_signal(signal.SIGKILL)  # a real kill -9 of the agent process
                await asyncio.to_thread(agent.wait, 10)
                # Long enough for not_ready (2 s) and past reschedule_after (2 s): the old rules replaced here.
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    seen_states.update(i["state"] for i in await asyncio.to_thread(_instances, cluster))
                    await asyncio.sleep(0.5)
                agent = cluster.start_agent("worker-a")  # the restarted agent adopts the backends
                await asyncio.gather(*clients)

        asyncio.run(load())
        total, failed = len(outcomes), sum(1 for status in outcomes if status != 200)
        rate = failed / total if total else 1.0
        print(f"\nkill -9 of the agent under 32 clients: {total} requests in 15 s, {failed} failed "
              f"({rate * 100:.3f}%); instance states seen meanwhile: {sorted(seen_states)}")
        assert "unreachable" in seen_states, "the worker never went silent: the test proved nothing"
        assert total >= 200
        routing_log = [line for line in cluster.log("server.log").splitlines() if "routing" in line]
        assert rate <= 0.001, (failures[:5], routing_log[-10:])

        after = {i["id"]: i["pid"] for i in _wait_running(cluster, 2, timeout=30)}
        assert after == before, "the backends were replaced instead of adopted"
        assert "Rescheduled" not in cluster.maas("events", "--limit", "200").stdout
    finally:
        cluster.close()
        _kill_orphans(list(before.values()) if "before" in locals() else [])
