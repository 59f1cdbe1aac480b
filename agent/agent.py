"""The agent: registers, heartbeats, watches its instances and makes the running workloads match them.

It never touches the database: REST and the watch stream with its own worker token. This module is the
composition: the configuration, the parts and their wiring, start and stop, registration, heartbeats and
the instances watch. The parts: agent/server_api.py (every call on the server), agent/serving.py (the
serving lifecycle of instances), agent/http.py (the agent's own endpoint: logs, metrics, doctor),
agent/ray.py (multi-host placements), agent/cache.py (the model cache), agent/runtimes/ (process, Docker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent import backoff, usage
from agent.backends import image_overrides, python_overrides
from agent.cache import FileCache
from agent.devices import GPUInventory, host_info
from agent.http import AgentEndpoint
from agent.ports import DEFAULT_RANGE, PortAllocator, ephemeral_range, validate_port_range, validate_ray_port_range
from agent.ray import DEFAULT_RAY_RANGE, RayManager
from agent.runtimes import ProcessRuntime
from agent.runtimes.choice import RuntimeChooser
from agent.runtimes.docker import DockerRuntime, engine_problem
from agent.serving import Serving, Workload
from agent.server_api import ServerAPI, ServerRejected  # noqa: F401 (`maas agent` catches ServerRejected)
from agent.sources import ModelCache, env_model_roots
from server.ndjson import watch_messages
from server.schemas import InstanceOut

log = logging.getLogger(__name__)



@dataclass
class AgentConfig:
    server_url: str
    token: str
    data_dir: Path
    name: str = field(default_factory=socket.gethostname)
    address: str = "127.0.0.1"
    port: int = 0  # the agent's own HTTP endpoint (logs); 0 picks a free one
    simulate_gpus: str | None = None
    heartbeat_interval: float = 5.0
    health_timeout: float = 300.0
    # After an instance turns `terminating` the gateways stop routing to it; its process keeps running
    # at least this long (every gateway takes it out of routing meanwhile), then until its backend holds
    # no request, at most drain_max_seconds in all (agent/drain.py). A backend without an in-flight
    # metric is stopped after drain_seconds.
    drain_seconds: float = 5.0
    drain_max_seconds: float = 120.0
    port_range: tuple[int, int] = DEFAULT_RANGE
    # Ray nodes of multi-host placements take blocks of ports from here (agent/ray.py says why these).
    ray_port_range: tuple[int, int] = DEFAULT_RAY_RANGE
    labels: dict[str, str] = field(default_factory=dict)
    # Python interpreter per backend (MAAS_VLLM_PYTHON, MAAS_SGLANG_PYTHON, MAAS_LLAMACPP_PYTHON).
    backend_python: dict[str, str] = field(default_factory=python_overrides)
    # process, docker, or auto (per instance: docker when the backend's image for this host is on the
    # engine or pullable, else process where the backend runs natively; agent/runtimes/choice.py).
    # The CLI passes auto.
    runtime: str = "process"
    # backend -> image instead of the upstream one (MAAS_LLAMACPP_IMAGE, MAAS_VLLM_IMAGE, ...).
    backend_images: dict[str, str] = field(default_factory=image_overrides)
    docker_shm_size: str = "16g"
    model_cache: Path | None = None  # hub downloads (agent/sources.py); default <data_dir>/models
    # Folders local model sources may lie in, besides the model cache (a spec cannot name /etc/shadow).
    model_roots: list[str] = field(default_factory=env_model_roots)
    # A download that moves no byte for this long fails the instance (network gone, hub stuck).
    download_stall_timeout: float = 300.0
    # The model cache's size limit (bytes; None: none): least recently used files no instance uses go.
    cache_limit: int | None = None
    # The agent's /metrics answers the server's credential only, and this bearer token when given
    # (Prometheus). From MAAS_METRICS_TOKEN, never a flag (a command line is readable by every user).
    metrics_token: str | None = field(default_factory=lambda: os.environ.get("MAAS_METRICS_TOKEN") or None,
                                      repr=False)


class Agent:
    def __init__(self, config: AgentConfig, docker_client: Any = None):
        self.config = config
        self.gpus = GPUInventory(config.simulate_gpus)
        self.runtimes = make_runtimes(config, docker_client)
        # The runtime this agent mainly uses (Docker where an engine is used); each workload has its own.
        self.runtime = self.runtimes.docker or self.runtimes.processes
        # A clear PortRangeError now rather than workloads losing their ports to outgoing connections later.
        ephemeral = ephemeral_range()
        self.ports = PortAllocator(config.address, *validate_port_range(*config.port_range, ephemeral))
        validate_ray_port_range(*config.ray_port_range, config.port_range, ephemeral)
        self.models = ModelCache(model_cache_path(config), stall_timeout=config.download_stall_timeout)
        # agent/cache.py; it never evicts what a workload uses (asked of the serving loop when it evicts).
        self.files = FileCache(self.models, config.cache_limit, lambda: self.serving.files_in_use())
        self.files.load()
        self.logs_dir = config.data_dir / "logs"
        # Every call on the server, and the worker's identity (agent/server_api.py).
        self.api = ServerAPI(config.server_url, config.token, config.data_dir, config.name)
        self.ray = RayManager(self, config.ray_port_range)  # multi-host placements (agent/ray.py)
        # What this worker is to run and what runs, and the loop between them (agent/serving.py).
        self.serving = Serving(config, self.api, self.runtimes, self.ports, self.gpus, self.models, self.files,
                               self.ray)
        self.endpoint = AgentEndpoint(self)  # logs, metrics, doctor (agent/http.py)
        self.main_task: asyncio.Task[None] | None = None
        self.registered = self.api.registered

    @property
    def worker_id(self) -> int | None:
        return self.api.worker_id

    @property
    def desired(self) -> dict[int, InstanceOut]:
        """The instances this worker is to run, as the watch last said."""
        return self.serving.desired

    @property
    def workloads(self) -> dict[int, Workload]:
        """What runs here, by instance id."""
        return self.serving.workloads

    def log_path(self, instance_id: int) -> Path:
        return self.serving.log_path(instance_id)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        await self.ray.find_leftovers()
        await self.serving.find_leftovers()
        self.api.open()
        await self.endpoint.start()
        self.main_task = asyncio.create_task(self._main(), name="agent-main")

    async def stop(self) -> None:
        if self.main_task is not None:
            self.main_task.cancel()
            await asyncio.gather(self.main_task, return_exceptions=True)
        await self.serving.stop_all()
        await self.ray.close()
        await self.endpoint.close()
        await self.api.close()

    async def _main(self) -> None:
        await self._register_until_accepted()
        loops = [self._heartbeat_loop(), self._watch_loop(), self.serving.run(),
                 self.files.run(self.api, self.config.model_roots)]
        await asyncio.gather(*loops)

    # --- talking to the server ------------------------------------------------------

    async def _register_until_accepted(self) -> None:
        await self.api.register_until_accepted(self._describe)

    def _describe(self) -> dict[str, Any]:
        """What registration tells the server about this worker."""
        return {"name": self.config.name, "address": self.config.address, "agent_port": self.config.port,
                "labels": self.config.labels, "gpus": [g.model_dump(mode="json") for g in self.gpus.read()],
                "host": host_info().model_dump(mode="json")}

    async def _heartbeat_loop(self) -> None:
        wait = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(wait)
            wait = await self.heartbeat()

    async def heartbeat(self) -> float:
        """One heartbeat; returns the wait before the next (longer when the server is busy)."""
        interval = self.config.heartbeat_interval
        gpus = self.gpus.read()
        body = {"gpus": [g.model_dump(mode="json") for g in gpus], "host": host_info().model_dump(mode="json"),
                "usage": usage.workloads_usage(list(self.workloads.values()), gpus)}  # claimed vs actual
        try:
            status, headers = await self.api.heartbeat(body)
            if status in (401, 404):
                log.warning("the server no longer knows this worker; registering again")
                await self._register_until_accepted()
            elif status in backoff.BUSY:
                # The lease was renewed; what else the heartbeat carried goes with a later one.
                wait = backoff.delay(0, headers)
                log.info("server busy (%s); next heartbeat in %.1f s", status, min(wait, interval))
                return min(wait, interval)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("heartbeat failed: %s", exc)
        return interval

    async def _watch_loop(self) -> None:
        version: int | None = None
        delay = 0.5
        while True:
            try:
                async with self.api.watch("instances", version) as response:
                    if response.status == 401:
                        await self._register_until_accepted()
                        version = None
                        continue
                    response.raise_for_status()
                    async for message in watch_messages(response.content.iter_any()):
                        version = message["version"]
                        self.serving.apply_watch(message)
                        delay = 0.5  # backoff resets once a whole message came through
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                # Any broken stream (cut, garbled, a line too long) is a reconnect, never the agent's end.
                log.info("watch stream ended (%s); reconnecting", str(exc) or type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)

def make_runtimes(config: AgentConfig, docker_client: Any = None) -> RuntimeChooser:
    """--runtime process|docker|auto: the runtimes this agent may use, and the rule that picks one per
    instance. docker without an engine raises DockerException (the CLI says so); auto without one runs
    processes only. `docker_client`: a client to use instead of the engine DOCKER_HOST names."""
    if config.runtime not in ("auto", "docker", "process"):
        raise ValueError(f"runtime must be auto, docker or process, not {config.runtime!r}")
    processes = ProcessRuntime(config.data_dir / "run")
    if config.runtime == "process":
        return RuntimeChooser("process", processes, None, "the agent runs with --runtime process")
    problem = None if config.runtime == "docker" or docker_client is not None else engine_problem()
    docker = DockerRuntime(worker=config.name, client=docker_client, model_cache=model_cache_path(config),
                           shm_size=config.docker_shm_size) if problem is None else None
    return RuntimeChooser(config.runtime, processes, docker, problem or "")


def model_cache_path(config: AgentConfig) -> Path:
    """Where hub downloads go (agent/sources.py); containers mount it at the same path."""
    return config.model_cache or config.data_dir / "models"
