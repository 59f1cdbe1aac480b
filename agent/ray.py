"""Ray for multi-host placements: a head on the main worker, a Ray worker node on each subordinate.

The main agent starts the head before the backend (vLLM runs with `--distributed-executor-backend ray`
and RAY_ADDRESS), publishes its address through the server (`PUT /v2/agent/instances/{id}/ray`) and
waits until every subordinate's node has joined. A subordinate agent sees the instance in its watch
(its worker is in claim.subordinate_workers), reads the head's address from the server and runs
`ray start --address=HEAD`. It never reports the instance's state: only the main worker does. When
it cannot join it records an event on the instance (`RayJoinFailed`), so `maas events` and the
main agent's error ("1 of 2 Ray nodes") say why.

Ports: every node takes a block of BLOCK ports from the agent's Ray range, each one named explicitly
(Ray otherwise picks some at random from the kernel's ephemeral range, and its default worker ports
10002-19999 and client port 10001 are fixed). The default range 30000-32767 (`maas agent
--ray-port-range`) lies above the service ports (20000-29999) and below the ephemeral range
(32768-60999). Node IP = the worker's advertised address: Ray rewrites 127.0.0.1 to the host's
external address, so loopback cannot host two nodes.

Each node is one `ray start --block` process in its own process group (the process runtime), so a
stop ends that node's raylet, GCS and workers and nothing else; `ray stop` would end every Ray
process on the host, other instances' nodes included.

The `ray` CLI comes from the backend's own environment: the driver (vLLM, or a custom backend's
command, which gets the head as {ray_address} and RAY_ADDRESS) and the cluster must run the same
Ray and Python. A custom backend's nodes use the agent's own Python (MaaS-Base depends on ray).

After an agent restart its nodes are still running (pidfiles name their instance, run and ports).
Once the first snapshot is in, a head is adopted with the backend it serves (the same run), a worker
node while its worker is still a subordinate of that run; every other left-over node is stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from agent.backends import BackendError, has_module
from agent.ports import DEFAULT_RAY_RANGE, RAY_BLOCK, bindable, ephemeral_range
from agent.runtimes.process import ProcessRuntime
from server.schemas import InstanceOut

if TYPE_CHECKING:
    from agent.agent import Agent

log = logging.getLogger(__name__)

BLOCK = RAY_BLOCK  # ports per node: FIXED named ones, then the node's worker processes
FIXED = 8
_RUNNABLE = {"scheduled", "downloading", "starting", "running"}

# Run with the Ray environment's Python on the head's host: how many nodes are alive (a driver
# connects once, then polls the GCS; it prints the nodes' addresses when enough have joined or time is up).
_WAIT_FOR_NODES = """
import json, sys, time
import ray
address, ip, want, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ray.init(address=address, _node_ip_address=ip, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + seconds
while True:
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(alive))
"""


def is_multi_host(instance: InstanceOut) -> bool:
    return bool(instance.claim and instance.claim.subordinate_workers)


def subordinate_of(instance: InstanceOut, worker_id: int | None) -> bool:
    return bool(instance.claim) and any(s.worker_id == worker_id for s in instance.claim.subordinate_workers)


@dataclass(frozen=True)
class RayPorts:
    base: int

    def args(self, head: bool, client: bool = True) -> list[str]:
        """`client`: the environment has Ray Client's dependency (grpc). A minimal Ray refuses the client
        port flag outright, and without it starts no client server (so takes no port 10001 either)."""
        b = self.base
        named = [f"--node-manager-port={b + 1}", f"--object-manager-port={b + 2}",
                 f"--dashboard-agent-listen-port={b + 3}", f"--dashboard-agent-grpc-port={b + 4}",
                 f"--metrics-export-port={b + 5}", f"--runtime-env-agent-port={b + 6}",
                 f"--min-worker-port={b + FIXED}", f"--max-worker-port={b + BLOCK - 1}"]
        if head:
            named = [f"--port={b}", *([f"--ray-client-server-port={b + 7}"] if client else []), *named]
        return named

    @property
    def gcs(self) -> int:
        return self.base


class RayPortBlocks:
    """Blocks of BLOCK ports from the Ray range, checked free before use, never handed out twice while held."""

    def __init__(self, host: str, low: int = DEFAULT_RAY_RANGE[0], high: int = DEFAULT_RAY_RANGE[1]):
        if high - low + 1 < BLOCK:
            raise ValueError(f"the Ray port range {low}-{high} is smaller than one node's {BLOCK} ports")
        self.host, self.low, self.high = host, low, high
        self.in_use: set[int] = set()

    def allocate(self) -> RayPorts:
        ephemeral = ephemeral_range()
        if ephemeral and self.low <= ephemeral[1] and ephemeral[0] <= self.high:
            # Outgoing connections take those ports at any time: a node could lose one between check and bind.
            raise RuntimeError(f"the Ray port range {self.low}-{self.high} overlaps this host's ephemeral range "
                               f"{ephemeral[0]}-{ephemeral[1]}; give the agent a Ray range outside it")
        for base in range(self.low, self.high - BLOCK + 2, BLOCK):
            if base in self.in_use or not all(bindable(self.host, p) for p in range(base, base + BLOCK)):
                continue
            self.in_use.add(base)
            return RayPorts(base)
        raise RuntimeError(f"no free block of {BLOCK} Ray ports in {self.low}-{self.high} on {self.host}")

    def release(self, ports: RayPorts | None) -> None:
        if ports is not None:
            self.in_use.discard(ports.base)


def ray_cli(python: str) -> str:
    """The `ray` script of the environment `python` belongs to (the backend's own environment)."""
    candidate = Path(os.path.abspath(python)).parent / "ray"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise BackendError(f"multi-host needs Ray next to {python}: {candidate} does not exist "
                       "(install ray in that environment)")


@dataclass
class RayNode:
    instance_id: int
    restart_count: int
    ports: RayPorts | None  # None until a worker node's block is taken
    temp_dir: Path
    handle: Any = None
    head_address: str = ""
    task: asyncio.Task[None] | None = None
    stopping: bool = False


class RayManager:
    """The Ray nodes this agent runs: heads of its multi-host instances, workers of others' instances."""

    def __init__(self, agent: "Agent", port_range: tuple[int, int] = DEFAULT_RAY_RANGE):
        self.agent = agent
        self.ports = RayPortBlocks(agent.config.address, *port_range)
        self.runtime = ProcessRuntime(agent.config.data_dir / "run-ray", stop_grace=15.0)
        self.heads: dict[int, RayNode] = {}
        self.members: dict[int, InstanceOut] = {}  # instances where this worker is a subordinate
        self.workers: dict[int, RayNode] = {}
        self.leftovers: dict[str, dict[str, Any]] = {}  # pidfile records of a previous agent's nodes
        self._stopping: dict[int | str, asyncio.Task[None]] = {}  # nodes being stopped (left-over or not wanted)
        # Short: Ray's unix socket paths under it must stay within 107 characters.
        digest = hashlib.sha1(str(agent.config.data_dir.resolve()).encode()).hexdigest()[:8]
        self._temp_root = Path("/tmp/maas-ray") / digest

    # --- lifecycle --------------------------------------------------------------------

    async def find_leftovers(self) -> None:
        """Nodes a previous agent left running; settled once the first snapshot says what is wanted."""
        self.leftovers = dict(await asyncio.to_thread(self.runtime.leftovers))

    def settle_leftovers(self, adopted: dict[int, int]) -> None:
        """Adopt each left-over node still wanted, as it runs; stop the others.

        `adopted`: instance id -> restart_count of the backends this agent adopted. A head stays with
        the run of its adopted backend (the driver is connected to it); a worker node stays while this
        worker is a subordinate of the same run. A node for the same instance started later waits for
        a stopped one to be gone (same temp folder, perhaps the same ports)."""
        leftovers, self.leftovers = self.leftovers, {}
        for key, record in leftovers.items():
            try:
                instance_id, restart_count = int(record["instance_id"]), int(record["restart_count"])
                base, head = int(record["ports_base"]), bool(record["head"])
            except (KeyError, TypeError, ValueError):  # not a record this agent wrote: nothing to match it by
                self._stopping[key] = asyncio.create_task(asyncio.to_thread(self.runtime.stop_leftover, key, record))
                continue
            member = self.members.get(instance_id)
            if head:
                wanted = adopted.get(instance_id) == restart_count and instance_id not in self.heads
            else:
                wanted = (member is not None and member.state in _RUNNABLE and member.restart_count == restart_count
                          and instance_id not in self.workers)
            if not wanted:
                log.info("stopping Ray node %s left by a previous agent: no longer wanted", key)
                self._stopping[instance_id] = asyncio.create_task(
                    asyncio.to_thread(self.runtime.stop_leftover, key, record))
                continue
            node = RayNode(instance_id, restart_count, RayPorts(base), self._temp_dir(instance_id),
                           handle=self.runtime.adopt(key, record), head_address=str(record.get("head_address", "")))
            self.ports.in_use.add(base)
            if head:
                self.heads[instance_id] = node
            else:
                self.workers[instance_id] = node
                node.task = asyncio.create_task(self._watch_worker(member, node), name=f"ray-worker-{instance_id}")
            log.info("adopted the Ray %s node of instance %s (pid %s) left running by a previous agent",
                     "head" if head else "worker", instance_id, node.handle.pid)

    async def close(self) -> None:
        nodes = [*self.heads.values(), *self.workers.values()]
        await asyncio.gather(*(self._stop_node(n) for n in nodes), *self._stopping.values(), return_exceptions=True)
        self._stopping.clear()
        self.heads.clear()
        self.workers.clear()

    # --- the head (main worker) ---------------------------------------------------------

    async def start_head(self, instance: InstanceOut, python: str, report: Any) -> dict[str, str]:
        """Start the head, publish it, wait for every subordinate's node. Returns the backend's environment.

        `report(message)` tells the server the instance is starting (the wait can take a while).
        """
        claim = instance.claim
        address = self.agent.config.address
        await self.stop_head(instance.id)  # a restart: the old head goes first
        node = RayNode(instance.id, instance.restart_count, self.ports.allocate(), self._temp_dir(instance.id))
        self.heads[instance.id] = node  # before it starts: a stop (the instance deleted meanwhile) finds it
        await self._start_node(instance, python, head_address=None, node=node,
                               gpus=claim.gpu_indexes if claim.device == "gpu" else [])
        node.head_address = f"{address}:{node.ports.gcs}"
        await self._publish_head(instance, node.head_address)
        names = ", ".join(s.worker_name for s in claim.subordinate_workers)
        want = 1 + len(claim.subordinate_workers)
        await report(f"Ray head at {node.head_address}; waiting for {names} to join")
        alive = await self._wait_for_nodes(python, node, want)
        if len(alive) < want:
            raise BackendError(f"the Ray cluster has {len(alive)} of {want} nodes ({', '.join(alive) or 'none'}) "
                               f"after {self.agent.config.health_timeout:g} s; `maas events` shows why a "
                               f"subordinate ({names}) did not join")
        log.info("Ray cluster of instance %s ready: %s", instance.name, ", ".join(alive))
        # vLLM's ray.init() reads RAY_ADDRESS; VLLM_HOST_IP keeps its own address off loopback guesses.
        return {"RAY_ADDRESS": node.head_address, "VLLM_HOST_IP": address, "RAY_USAGE_STATS_ENABLED": "0"}

    async def stop_head(self, instance_id: int) -> None:
        node = self.heads.pop(instance_id, None)
        if node is not None:
            await self._stop_node(node)

    async def _publish_head(self, instance: InstanceOut, head_address: str) -> None:
        await self.agent.api.publish_ray_head(instance.id, instance.restart_count, head_address)

    async def _wait_for_nodes(self, python: str, node: RayNode, want: int) -> list[str]:
        seconds = self.agent.config.health_timeout
        process = await asyncio.create_subprocess_exec(
            python, "-c", _WAIT_FOR_NODES, node.head_address, self.agent.config.address, str(want), str(seconds),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **_ray_env({})},
            start_new_session=True)
        try:
            async with asyncio.timeout(seconds + 60):
                out, err = await process.communicate()
        finally:
            if process.returncode is None:
                _kill_group(process.pid)
                await process.wait()
        if process.returncode != 0:
            raise BackendError(f"cannot reach the Ray head {node.head_address}: {err.decode(errors='replace')[-800:]}")
        return json.loads(out.decode().strip().splitlines()[-1])

    # --- workers (subordinate) --------------------------------------------------------------

    def reconcile(self, python_for: Any) -> None:
        """Join the Ray cluster of each instance this worker is a subordinate of; leave the others."""
        for instance_id, instance in list(self.members.items()):
            node = self.workers.get(instance_id)
            wanted = instance.state in _RUNNABLE
            if node is not None and (not wanted or instance.restart_count > node.restart_count):
                self._stop_in_background(self.workers.pop(instance_id))
                node = None
            if node is None and wanted:
                self._spawn_worker(instance, python_for(instance))
        for instance_id in [i for i in self.workers if i not in self.members]:
            self._stop_in_background(self.workers.pop(instance_id))

    def _stop_in_background(self, node: RayNode) -> None:
        """Stop `node` without holding the reconcile. Kept with the left-over stops: a later node of the same
        instance waits for it in _start_node (the same temp folder, which the stop removes at its end), and
        close() waits for it."""
        before = self._stopping.get(node.instance_id)

        async def stop() -> None:
            await asyncio.gather(*([before] if before is not None else []), self._stop_node(node))

        self._stopping[node.instance_id] = asyncio.create_task(stop(), name=f"ray-stop-{node.instance_id}")

    def _spawn_worker(self, instance: InstanceOut, python: str) -> None:
        node = RayNode(instance.id, instance.restart_count, None, self._temp_dir(instance.id))
        self.workers[instance.id] = node
        node.task = asyncio.create_task(self._run_worker(instance, python, node), name=f"ray-worker-{instance.id}")

    async def _run_worker(self, instance: InstanceOut, python: str, node: RayNode) -> None:
        """Join, or record why not: once per run, as the node stays in `workers` until the next run."""
        try:
            node.ports = self.ports.allocate()
            head = await self._head_address(instance, node)
            mine = next(s for s in instance.claim.subordinate_workers if s.worker_id == self.agent.api.worker_id)
            await self._start_node(instance, python, head_address=head, node=node,
                                   gpus=mine.gpu_indexes if instance.claim.device == "gpu" else [])
        except (BackendError, OSError, RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
            if not node.stopping:
                log.warning("instance %s: cannot join its Ray cluster: %s", instance.name, exc)
                await self._event(instance.id, "RayJoinFailed", f"{self.agent.config.name}: {exc}")
            return
        log.info("instance %s: Ray worker node joined %s (pid %s)", instance.name, head, node.handle.pid)
        await self._watch_worker(instance, node)

    async def _watch_worker(self, instance: InstanceOut, node: RayNode) -> None:
        code = await self.runtime.wait(node.handle)
        if not node.stopping:
            tail = _tail(self._log_path(instance.id))
            how = "unknown" if code is None else code  # an adopted node is not our child: no exit status
            await self._event(instance.id, "RayWorkerExited",
                              f"{self.agent.config.name}: the Ray worker node exited (code {how}); log tail:\n{tail}")

    async def _head_address(self, instance: InstanceOut, node: RayNode) -> str:
        """The head's address for this run of the instance, once the main agent has published it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.agent.config.health_timeout
        while not node.stopping:
            status, body = await self.agent.api.ray_head(instance.id)
            if status == 200:
                if body.get("restart_count") == instance.restart_count:
                    return body["head_address"]
            elif status not in (404, 409):
                raise BackendError(f"the server answered {status}: {body}")
            if loop.time() > deadline:
                raise TimeoutError(f"the main worker published no Ray head in {self.agent.config.health_timeout:g} s")
            await asyncio.sleep(0.5)
        raise BackendError("stopped")

    async def _event(self, instance_id: int, reason: str, message: str) -> None:
        await self.agent.api.event(instance_id, reason, message, keep_end=True)  # the end: a log tail

    # --- nodes ---------------------------------------------------------------------------

    def _temp_dir(self, instance_id: int) -> Path:
        return self._temp_root / str(instance_id)

    def _log_path(self, instance_id: int) -> Path:
        return self.agent.logs_dir / f"{instance_id}.ray.log"

    async def _start_node(self, instance: InstanceOut, python: str, head_address: str | None,
                          gpus: list[int], node: RayNode | None = None) -> RayNode:
        ray = ray_cli(python)
        stopping = self._stopping.pop(instance.id, None)
        if stopping is not None:
            await stopping  # an earlier node of this instance (or a previous agent's): its folder and ports first
        client = head_address is None and await asyncio.to_thread(has_module, python, "grpc")
        if node is None:
            node = RayNode(instance.id, instance.restart_count, self.ports.allocate(), self._temp_dir(instance.id))
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        address = self.agent.config.address
        command = [ray, "start", "--block", f"--node-ip-address={address}", f"--temp-dir={node.temp_dir}",
                   "--disable-usage-stats", *node.ports.args(head=head_address is None, client=client)]
        if head_address is None:
            command += ["--head", "--include-dashboard=false"]
        else:
            command += [f"--address={head_address}"]
        env: dict[str, str] = {}
        if not self.agent.config.simulate_gpus:
            # Ray counts the GPUs it sees: only the claimed ones.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        else:
            command += ["--num-gpus=0"]  # simulated GPUs are nothing Ray could hand out
        key = f"ray-{instance.id}"
        try:
            node.handle = await self.runtime.spawn(key, command, _ray_env(env), self._log_path(instance.id),
                                                   meta=node_record(instance, node.ports, head_address or
                                                                    f"{address}:{node.ports.gcs}", head_address is None))
        except OSError:
            self.ports.release(node.ports)
            await self._remove_temp_dir(node)
            raise
        # `ray start --block` exits at once when the node cannot come up (a port taken, the head unreachable).
        exited = asyncio.create_task(self.runtime.wait(node.handle))
        ready = asyncio.create_task(self._node_listening(node, head_address is None))
        seconds = self.agent.config.health_timeout
        try:
            async with asyncio.timeout(seconds):
                done, _pending = await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:  # neither: a node that hangs on its way up
            done = set()
            await self.runtime.stop(node.handle)
        finally:  # also when cancelled: the probe would poll the ports for ever
            ready.cancel()
            exited.cancel()
        if exited in done or not done:
            self.ports.release(node.ports)
            await self._remove_temp_dir(node)  # no stop will come for a node that never ran
            why = f"exited with code {exited.result()}" if done else f"was not listening after {seconds:g} s"
            raise BackendError(f"`ray start` {why}: {_tail(self._log_path(instance.id))}")
        return node

    async def _node_listening(self, node: RayNode, head: bool) -> None:
        """Until the node's raylet (and on the head, the GCS) accepts connections."""
        ports = [node.ports.gcs, node.ports.base + 1] if head else [node.ports.base + 1]
        for port in ports:
            while True:
                try:
                    _reader, writer = await asyncio.open_connection(self.agent.config.address, port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.2)

    async def _stop_node(self, node: RayNode) -> None:
        node.stopping = True
        if node.handle is not None:
            await self.runtime.stop(node.handle)
        if node.task is not None and node.task is not asyncio.current_task():
            node.task.cancel()
            await asyncio.gather(node.task, return_exceptions=True)
        self.ports.release(node.ports)
        await self._remove_temp_dir(node)

    async def _remove_temp_dir(self, node: RayNode) -> None:
        await asyncio.to_thread(shutil.rmtree, node.temp_dir, True)
        try:
            node.temp_dir.parent.rmdir()  # this agent's folder, once its last node is gone
        except OSError:
            pass


def node_record(instance: InstanceOut, ports: RayPorts, head_address: str, head: bool) -> dict[str, Any]:
    """What a node's pidfile keeps, so that an agent after a restart can tell whether to adopt it."""
    return {"instance_id": instance.id, "restart_count": instance.restart_count, "ports_base": ports.base,
            "head": head, "head_address": head_address}


def _ray_env(extra: dict[str, str]) -> dict[str, str]:
    # No drain on SIGTERM (Ray waits up to 30 s by default for Serve replicas): the backend has
    # already stopped when its nodes are stopped, so there is nothing left to drain.
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **extra}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
