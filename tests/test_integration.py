"""The walking skeleton end to end, as a user runs it: separate server and agent processes,
the embedded PostgreSQL, the `maas` CLI, the official `openai` client, and a server restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest

from conftest import HAVE_POSTGRES, free_port

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.timeout(300)]

MAAS = [sys.executable, "-m", "maas_tui"]


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.data_dir = base / "server-data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MAAS_CONFIG": str(base / "cli.json"), "PYTHONUNBUFFERED": "1"}
        self.env.pop("MAAS_SERVER", None)
        self.env.pop("MAAS_API_KEY", None)
        self.server: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.base / log_name, "ab")
        return subprocess.Popen(MAAS + args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def start_server(self) -> None:
        self.server = self._spawn(["start", "--no-agent", "--data-dir", str(self.data_dir), "--port", str(self.port)],
                                  "server.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.server.poll() is None, self.log("server.log")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"server not healthy in 60 s:\n{self.log('server.log')}")

    def stop_server(self) -> None:
        self.server.send_signal(signal.SIGTERM)
        assert self.server.wait(30) == 0, self.log("server.log")

    def start_agent(self, name: str = "worker-a") -> subprocess.Popen:
        token = (self.data_dir / "token").read_text().strip()
        self.agents[name] = self._spawn(["agent", "--server-url", self.url, "--token", token, "--name", name,
                                         "--data-dir", str(self.base / f"agent-{name}")], f"{name}.log")
        return self.agents[name]

    def maas(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(MAAS + list(args), capture_output=True, text=True, env=self.env, timeout=120)
        if check:
            assert done.returncode == 0, f"maas {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def log(self, name: str) -> str:
        path = self.base / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        for process in (*self.agents.values(), self.server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _instances(cluster: Cluster) -> list[dict]:
    return json.loads(cluster.maas("instance", "list", "-o", "json").stdout)["items"]


def _wait_running(cluster: Cluster, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = _instances(cluster)
        if len(items) == count and all(i["state"] == "running" for i in items):
            return items
        time.sleep(0.2)
    raise AssertionError(f"not {count} running: {items}\n{cluster.log('worker-a.log')}")


@pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL server binaries not installed")
def test_walking_skeleton(traversable_tmp: Path, tiny_model: Path, tmp_path_factory):
    base = traversable_tmp / f"cluster-{os.getpid()}-{time.monotonic_ns()}"
    base.mkdir()
    os.chmod(base, 0o711)
    cluster = Cluster(base)
    try:
        cluster.start_server()
        assert (cluster.data_dir / "initial_admin_password").stat().st_mode & 0o777 == 0o600
        assert (cluster.data_dir / "token").stat().st_mode & 0o777 == 0o600
        cluster.start_agent()
        password = (cluster.data_dir / "initial_admin_password").read_text().strip()
        cluster.maas("login", "--server", cluster.url, "--username", "admin", "--password", password)

        # A wrong password is refused with a message, not a traceback.
        refused = cluster.maas("login", "--server", cluster.url, "--username", "admin", "--password", "nope", check=False)
        assert refused.returncode == 1 and "wrong username or password" in refused.stderr
        assert "Traceback" not in refused.stderr

        deadline = time.monotonic() + 30
        while "worker-a" not in cluster.maas("worker", "list").stdout:
            assert time.monotonic() < deadline, cluster.log("worker-a.log")
            time.sleep(0.2)

        started = time.monotonic()
        cluster.maas("model", "deploy", "tiny", "--source", str(tiny_model), "--backend", "llama.cpp",
                     "--replicas", "2", "--wait", "--timeout", "120")
        deploy_seconds = time.monotonic() - started
        print(f"\nmodel deploy -> 2 replicas running: {deploy_seconds:.2f} s (CLI process included)")
        first = _wait_running(cluster, 2)
        assert {i["worker_name"] for i in first} == {"worker-a"}
        backend_pids = [i["pid"] for i in first]
        assert all(psutil.pid_exists(pid) for pid in backend_pids)

        log = cluster.maas("instance", "logs", first[0]["name"], "--tail", "-1").stdout
        assert "llama.cpp server listening on" in log

        answer = cluster.maas("chat", "tiny", "hello", "--max-tokens", "8").stdout
        assert answer.strip()

        key = json.loads(cluster.maas("key", "create", "app", "-o", "json").stdout)["key"]
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=key, max_retries=0)
        plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert plain.choices[0].message.content
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, stream=True)
        assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) >= 2

        usage = json.loads(cluster.maas("usage", "--by", "key,model", "-o", "json").stdout)["items"]
        app_usage = [u for u in usage if u["api_key"] == "app"]
        assert app_usage and app_usage[0]["requests"] == 2 and app_usage[0]["completion_tokens"] > 0

        # Restart the server: everything it knew is still there and the cluster converges again.
        cluster.stop_server()
        cluster.start_server()
        models = json.loads(cluster.maas("model", "list", "-o", "json").stdout)["items"]
        assert [(m["name"], m["replicas"]) for m in models] == [("tiny", 2)]
        assert "Created" in cluster.maas("events", "--for", "tiny").stdout
        after = _wait_running(cluster, 2)
        assert sorted(i["id"] for i in after) == sorted(i["id"] for i in first)
        again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert again.choices[0].message.content  # the API key survived the restart

        cluster.maas("model", "delete", "tiny", "--wait")
        assert _instances(cluster) == []
        deadline = time.monotonic() + 15
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in backend_pids):
            assert time.monotonic() < deadline, "backend processes still running after the model was deleted"
            time.sleep(0.1)
    finally:
        cluster.close()
