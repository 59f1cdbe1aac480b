"""The Docker tier (`make test-docker`): the real agent runs llama.cpp in containers on a real Docker engine,
pulling its image from a real registry on loopback (tests/docker_tier.py says how engine, registry and image
are made here, and why nothing of it touches /var/run/docker.sock or the iptables rules).

One walk through a container's life on one server and one agent (each start costs seconds on two cores):
the pull reported as `downloading NN%` in `maas instance list`; chat through /v1, plain and streamed; logs
(tail, follow, the previous run) that are the container's own; kill -9 of the agent with the containers
serving on, adopted by label after the restart (no duplicate), the container of a model deleted meanwhile
and an orphan of an unknown instance removed; `docker rm -f` noticed and restarted with backoff; under
`--runtime auto`, the image present (Docker) and an image no registry has (the process runtime, natively);
delete leaves no container of the project. GPU device requests cannot run here (no GPU, no NVIDIA container
runtime): tests/test_agent_docker.py checks them as data.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest

import docker_tier
from conftest import free_port
from maas_tui.client import MaasClient

REASON = docker_tier.why_not()
pytestmark = [pytest.mark.docker, pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.timeout(420)]

MAAS = [sys.executable, "-m", "maas_tui"]
PROJECT_LABEL = "maas.managed=true"
WORKER = "docker-worker"
PORTS = "27700-27799"
PULL_RATE = 12_000_000  # bytes per second through the slow link: a pull of the ~60 MB image lasts ~5 s


@pytest.fixture(scope="module")
def engine():
    engine = docker_tier.PrivateEngine()
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def image(engine) -> str:
    """The llama.cpp image, pushed to the registry and gone from the engine: `host:port/maas/llamacpp:cpu`
    behind the slow link, so that the first deploy pulls it."""
    registry = docker_tier.LocalRegistry(engine.root)
    try:
        started = time.monotonic()
        registry.start()
        built = docker_tier.build_image(engine.client, "maas-test/llamacpp", "cpu", engine.root)
        engine.client.images.get(built).tag(f"{registry.address}/maas/llamacpp", "cpu")
        for line in engine.client.api.push(f"{registry.address}/maas/llamacpp", tag="cpu", stream=True, decode=True):
            assert "error" not in line, line
        for listed in engine.client.images.list():
            engine.client.images.remove(listed.id, force=True)
        print(f"\nimage built and pushed in {time.monotonic() - started:.1f} s")
        yield f"{registry.slow_link(PULL_RATE)}/maas/llamacpp:cpu"
    finally:
        registry.stop()


class Cluster:
    """A server (SQLite, restarts after 1 s) and the `maas` CLI as a user runs them; agents on the engine."""

    def __init__(self, base: Path, engine, image: str, model_root: Path):
        self.base, self.engine, self.image = base, engine, image
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MAAS_CONFIG": str(base / "cli.json"), "PYTHONUNBUFFERED": "1",
                    "MAAS_RESTART_BACKOFF": "1", "MAAS_MODEL_ROOTS": str(model_root), **engine.env(),
                    "MAAS_LLAMACPP_IMAGE": image}
        for name in ("MAAS_SERVER", "MAAS_API_KEY"):
            self.env.pop(name, None)
        self.processes: list[subprocess.Popen] = []
        self.agent: subprocess.Popen | None = None

    def spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.base / log, "ab") as out:
            process = subprocess.Popen(MAAS + args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.base / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    async def start(self) -> None:
        data = self.base / "server"
        server = self.spawn(["start", "--no-agent", "--data-dir", str(data), "--port", str(self.port),
                             "--database-url", f"sqlite:///{data}/maas.db"], "server.log")
        await until(lambda: _healthy(self.url), 60, "the server", lambda: self.log("server.log"), server)
        password = (data / "initial_admin_password").read_text().strip()
        self.token = (data / "token").read_text().strip()
        await self.maas("login", "--server", self.url, "--username", "admin", "--password", password)
        created = await self.maas("key", "create", "tier", "--scope", "management", "--scope", "inference", "-o", "json")
        self.key = json.loads(created)["key"]

    def start_agent(self, runtime: str) -> subprocess.Popen:
        # Ports of their own: other test runs on this machine start at 20000, and a container binds its
        # port a second after the agent chose it, long enough for another agent to take it meanwhile.
        self.agent = self.spawn(["agent", "--server-url", self.url, "--token", self.token, "--name", WORKER,
                                 "--runtime", runtime, "--drain-seconds", "0.2", "--port-range", PORTS,
                                 "--data-dir", str(self.base / "agent")], "agent.log")
        return self.agent

    async def maas(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(*MAAS, *args, env=self.env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, f"maas {' '.join(args)}:\n{out.decode()}\n{err.decode()}"
        return out.decode()

    def containers(self, instance_id: int | None = None) -> list:
        """The project's containers on the engine (of one instance)."""
        wanted = [PROJECT_LABEL] + ([f"maas.instance-id={instance_id}"] if instance_id is not None else [])
        return self.engine.client.containers.list(all=True, filters={"label": wanted})

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
        return response.status == 200


async def until(check, timeout: float, what: str, detail=lambda: "", process: subprocess.Popen | None = None):
    """Wait for `check()` (a function or coroutine function) to be truthy; returns its value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
            if last:
                return last
        except (OSError, ValueError, KeyError, IndexError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})\n{detail()}")


async def test_llamacpp_in_containers_through_a_real_engine(engine, image: str, tiny_model: Path, traversable_tmp: Path):
    base = traversable_tmp / f"docker-tier-{os.getpid()}"
    base.mkdir()
    cluster = Cluster(base, engine, image, tiny_model.parent)
    started = time.monotonic()
    try:
        await cluster.start()
        async with MaasClient(cluster.url, cluster.key) as api:
            await walk(cluster, api, engine, image, tiny_model)
    finally:
        cluster.close()
        leftover = [c.name for c in engine.client.containers.list(all=True, filters={"label": PROJECT_LABEL})]
        for container in engine.client.containers.list(all=True, filters={"label": PROJECT_LABEL}):
            container.remove(force=True)
        print(f"\nDocker tier walk: {time.monotonic() - started:.1f} s")
    assert leftover == [], "containers left after the test"


async def walk(cluster: Cluster, api: MaasClient, engine, image: str, tiny_model: Path) -> None:
    agent_log = lambda: cluster.log("agent.log")  # noqa: E731
    cluster.start_agent("docker")
    await until(lambda: _worker_ready(api), 30, "the agent to register", agent_log, cluster.agent)

    # --- the first deploy pulls the image: `downloading NN%` in `maas instance list` ---------------------
    with pytest.raises(Exception):
        engine.client.images.get(image)  # the pull must happen
    await api.create_model({"name": "tiny", "source": str(tiny_model), "backend": "llama.cpp"})
    percentages = []
    while not percentages:
        [inst] = await until(lambda: api.list_instances("tiny"), 10, "the instance")
        assert inst.state in ("pending", "scheduled", "downloading"), (inst.state, inst.state_message, agent_log())
        listed = await cluster.maas("instance", "list")
        percentages = [int(p) for p in re.findall(r"downloading\s+(\d+)%", listed) if 0 < int(p) < 100]
    assert "pulling image " + image in (await api.get_instance(inst.name)).state_message
    inst = await until(lambda: _running(api, "tiny"), 60, "tiny to run", agent_log)
    assert "container maas-tiny-" in "".join(e.message for e in await api.list_events(name=inst.name))
    [container] = cluster.containers(inst.id)
    assert container.status == "running" and container.image.tags == [image]
    assert container.labels["maas.worker"] == WORKER and container.labels["maas.port"] == str(inst.port)
    reasons = {e.reason: e.message for e in await api.list_events(name=inst.name)}
    assert reasons["RuntimeChosen"] == "docker: this agent runs with --runtime docker"

    # --- chat through /v1, plain and streamed -------------------------------------------------------
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=cluster.key, max_retries=0)
    plain = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8)
    assert plain.choices[0].message.content
    pieces = [chunk.choices[0].delta.content async for chunk in await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True)
        if chunk.choices and chunk.choices[0].delta.content]
    assert pieces

    # --- logs: the container's own output, tailed and followed -------------------------------------
    from_engine = container.logs().decode(errors="replace")
    tail = await cluster.maas("instance", "logs", inst.name, "--tail", "-1")
    listening = f"llama.cpp server listening on http://127.0.0.1:{inst.port}"
    assert listening in from_engine and listening in tail
    assert [line for line in from_engine.splitlines() if "init: model loaded" in line][0] in tail
    follower = await asyncio.create_subprocess_exec(*MAAS, "instance", "logs", inst.name, "--follow", "--tail", "1",
                                                    env=cluster.env, stdout=subprocess.PIPE)
    try:
        assert await asyncio.wait_for(follower.stdout.read(4096), 30)  # the last line: the follow is under way
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "again"}],
                                             max_tokens=4)
        followed = b""
        while b"processing task" not in followed:  # llama.cpp's line about the request, as it is written
            chunk = await asyncio.wait_for(follower.stdout.read(4096), 30)
            assert chunk, f"the follow ended: {followed!r}"
            followed += chunk
    finally:
        follower.kill()
        await follower.wait()

    # --- a second model; then kill -9 of the agent: containers keep serving ---------------------------
    await api.create_model({"name": "tiny-b", "source": str(tiny_model), "backend": "llama.cpp"})
    inst_b = await until(lambda: _running(api, "tiny-b"), 60, "tiny-b to run", agent_log)
    [container_b] = cluster.containers(inst_b.id)
    cluster.agent.kill()  # SIGKILL to the agent alone: its containers are the engine's children
    cluster.agent.wait(10)
    again = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "still?"}],
                                                 max_tokens=4)
    assert again.choices[0].message.content is not None
    await api.delete_model("tiny-b")  # deleted while no agent runs: its container stays until one comes back
    orphan = engine.client.containers.run(
        image, entrypoint=["/opt/python/bin/python3", "-c", "import time; time.sleep(600)"], detach=True,
        name="maas-ghost-999999", network_mode="host",
        labels={"maas.managed": "true", "maas.worker": WORKER, "maas.instance-id": "999999", "maas.generation": "1",
                "maas.restart-count": "0", "maas.port": "1"})
    assert {c.id for c in cluster.containers()} == {container.id, container_b.id, orphan.id}

    # --- the agent comes back (`--runtime auto` now): adopts by label, removes what nobody wants -----------
    cluster.start_agent("auto")
    adopted = await until(lambda: _running(api, "tiny", "adopted after an agent restart"), 40,
                          "tiny to be adopted", agent_log)
    assert adopted.restart_count == 0 and adopted.pid == inst.pid
    await until(lambda: not cluster.containers(inst_b.id), 30, "tiny-b's container to go",
                agent_log)
    await until(lambda: not [c for c in cluster.containers() if c.id == orphan.id], 30, "the orphan to go", agent_log)
    assert [c.id for c in cluster.containers()] == [container.id]  # adopted: the same container, no duplicate
    await until(lambda: _gone(api, "tiny-b"), 30, "tiny-b's instance to go", agent_log)  # reported terminated
    follow_after = await cluster.maas("instance", "logs", inst.name, "--tail", "-1")
    assert follow_after.count(listening) == 1  # the adopted follower did not copy the log again

    # --- docker rm -f under the agent: noticed, restarted after the backoff in a new container -------------
    container.remove(force=True)
    restarted = await until(lambda: _running(api, "tiny", restarts=1, errors_fail=False), 60, "tiny to restart",
                            agent_log)
    events = [(e.reason, e.message) for e in await api.list_events(name=inst.name)]
    reasons = [reason for reason, _ in events]
    assert "Error" in reasons and reasons.index("Error") < reasons.index("Restarting"), events
    [restarting] = [message for reason, message in events if reason == "Restarting"]
    assert restarting.startswith("attempt 1 after 1 s backoff; last error: container exited (exit code 137)"), events
    [replacement] = cluster.containers(inst.id)
    assert replacement.id != container.id and replacement.labels["maas.restart-count"] == "1"
    chosen = [m for r, m in events if r == "RuntimeChosen"]
    assert chosen == ["docker: this agent runs with --runtime docker",  # the first launch, then auto's choice:
                      f"docker: image {image} is on this worker's Docker engine"]
    previous = await cluster.maas("instance", "logs", inst.name, "--previous", "--tail", "-1")
    assert listening in previous  # the run before the restart: the first container's output
    current = await cluster.maas("instance", "logs", inst.name, "--tail", "-1")
    assert f"llama.cpp server listening on http://127.0.0.1:{restarted.port}" in current

    # --- auto with an image no registry has: the process runtime, natively ---------------------------
    await api.create_model({"name": "tiny-native", "source": str(tiny_model), "backend": "llama.cpp",
                            "backend_version": "not-pushed"})
    native = await until(lambda: _running(api, "tiny-native"), 60, "tiny-native to run", agent_log)
    [chosen] = [e.message for e in await api.list_events(name=native.name) if e.reason == "RuntimeChosen"]
    missing = image.replace(":cpu", ":not-pushed")
    assert chosen.startswith(f"process: image {missing} is not on this worker's engine and cannot be pulled (")
    assert "manifest unknown" in chosen and chosen.endswith("; llama.cpp runs natively here")
    assert psutil.Process(native.pid).is_running() and not cluster.containers(native.id)

    # --- delete: no container of the project is left -------------------------------------------------
    await api.delete_model("tiny")
    await api.delete_model("tiny-native")
    await until(lambda: _gone(api), 40, "the instances to stop", agent_log)
    assert cluster.containers() == []
    cluster.agent.send_signal(signal.SIGTERM)
    assert cluster.agent.wait(30) == 0, agent_log()


async def _worker_ready(api: MaasClient) -> bool:
    return any(w.name == WORKER and w.state == "ready" for w in await api.list_workers())


async def _running(api: MaasClient, model: str, message: str = "", restarts: int = 0, errors_fail: bool = True):
    found = await api.list_instances(model)
    for inst in found:
        if inst.state == "error" and errors_fail:
            raise AssertionError(f"{inst.name}: {inst.state_message}")
        if inst.state == "running" and message in inst.state_message and inst.restart_count == restarts:
            return inst
    return None


async def _gone(api: MaasClient, model: str | None = None) -> bool:
    return not [i for i in await api.list_instances() if model in (None, i.model_name)]
