"""The serving lifecycle of this worker's instances: launch (runtime choice, model download, Ray head,
start), health probe, state reports, restarts when the server asks, drain and stop, and adoption of what
a previous agent left running.

`Serving` holds what is wanted (`desired`, fed by the agent's instances watch through `apply_watch`) and
what runs (`workloads`), and its `run()` loop makes the second match the first. It talks to the server
only through agent/server_api.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from agent.backends import GPU_KINDS, BackendError, LaunchContext, LaunchSpec, build_launch, custom_name
from agent.cache import FileCache
from agent.devices import GPUInventory
from agent.drain import counts_in_flight, drain, in_flight
from agent.logs import tail_text
from agent.metrics import scrape
from agent.ports import PortAllocator
from agent.ray import RayManager, is_multi_host, subordinate_of
from agent.runtimes.choice import RuntimeChooser
from agent.runtimes.base import Runtime, StartRequest
from agent.runtimes.process import AdoptedHandle
from agent.server_api import ServerAPI
from agent.sources import ModelCache, SourceError
from server.schemas import InstanceOut
from server.schemas.backend_traits import BACKEND_TRAITS, source_problem
from server.schemas.files import key_or_none

if TYPE_CHECKING:
    from agent.agent import AgentConfig

log = logging.getLogger(__name__)

try:
    from docker.errors import DockerException as DockerError
except ImportError:  # pragma: no cover - docker is a dependency
    class DockerError(Exception):  # type: ignore[no-redef]
        pass

_RUNNABLE = {"scheduled", "downloading", "starting", "running", "unreachable"}


@dataclass
class Workload:
    instance: InstanceOut
    handle: Any = None  # ProcessHandle or ContainerHandle
    runtime: Runtime | None = None  # what runs it (chosen per instance: agent/runtimes/choice.py)
    port: int | None = None
    task: asyncio.Task[None] | None = None
    exited: bool = False
    stopping: bool = False
    state: str | None = None  # what this agent last told the server
    message: str = ""
    resyncing: bool = False
    launch: LaunchSpec | None = None


class Serving:
    def __init__(self, config: "AgentConfig", api: ServerAPI, runtimes: RuntimeChooser, ports: PortAllocator,
                 gpus: GPUInventory, models: ModelCache, files: FileCache, ray: RayManager):
        self.config, self.api, self.runtimes, self.ports = config, api, runtimes, ports
        self.gpus, self.models, self.files, self.ray = gpus, models, files, ray
        self.logs_dir = config.data_dir / "logs"
        self.desired: dict[int, InstanceOut] = {}
        self.workloads: dict[int, Workload] = {}
        self._wake = asyncio.Event()
        self._terminating: set[int] = set()
        # What a previous agent left running: (instance id, runtime, record: a pidfile's, a container's labels).
        self._leftovers: list[tuple[str, Runtime, dict[str, Any]]] = []
        self._snapshot_seen = False

    async def find_leftovers(self) -> None:
        """What a previous agent left running; adopted (or stopped) once the first snapshot says what is wanted."""
        self._leftovers = [(key, runtime, record) for runtime in (self.runtimes.processes, self.runtimes.docker)
                           if runtime is not None for key, record in await asyncio.to_thread(runtime.leftovers)]

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop_workload(w) for w in list(self.workloads.values())), return_exceptions=True)

    def apply_watch(self, message: dict[str, Any]) -> None:
        """A message of the instances watch: what this worker is to run (and where it is a Ray subordinate)."""
        if message["type"] == "snapshot":
            items = [InstanceOut.model_validate(i) for i in message["items"]["instances"]]
            self.desired = {i.id: i for i in items if i.worker_id == self.api.worker_id}
            # Where this worker is a subordinate it runs a Ray worker node, never the instance itself.
            self.ray.members = {i.id: i for i in items if self._subordinate(i)}
            self._snapshot_seen = True
        elif message["type"] == "event":
            instance = InstanceOut.model_validate(message["object"])
            deleted = message["action"] == "deleted"
            if deleted or instance.worker_id != self.api.worker_id:
                self.desired.pop(instance.id, None)
            else:
                self.desired[instance.id] = instance
            if not deleted and self._subordinate(instance):
                self.ray.members[instance.id] = instance
            else:
                self.ray.members.pop(instance.id, None)
        else:
            return
        self._wake.set()

    # --- making actual match desired ------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconcile failed")
            try:
                async with asyncio.timeout(5):  # not wait_for, which can swallow a cancellation on 3.11
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _reconcile(self) -> None:
        if self._leftovers and self._snapshot_seen:
            self.settle_leftovers()
        if self.ray.leftovers and self._snapshot_seen:
            # After the backends: a left-over head stays only with the backend adopted above.
            self.ray.settle_leftovers({i: w.instance.restart_count for i, w in self.workloads.items()
                                       if isinstance(w.handle, AdoptedHandle)})
        for instance_id, instance in list(self.desired.items()):
            workload = self.workloads.get(instance_id)
            if instance.state == "terminating":
                if instance_id not in self._terminating:
                    self._spawn_terminate(instance_id, workload, report=True)
                continue
            if instance.state not in _RUNNABLE:
                continue
            # A failed workload runs again only when the server asks, by raising restart_count;
            # a stale `scheduled` from the watch must not relaunch it.
            restart_asked = workload is not None and instance.restart_count > workload.instance.restart_count
            if workload is None or (workload.exited and restart_asked):
                self._launch(instance)
            elif restart_asked and instance_id not in self._terminating:
                self._spawn_restart(instance, workload)
            elif workload.state and workload.state != instance.state and not workload.resyncing:
                # The server missed a report, restarted, or marked the worker unreachable
                # meanwhile: tell it again what actually runs here.
                workload.resyncing = True
                asyncio.create_task(self._resync(workload))
        for instance_id, workload in list(self.workloads.items()):
            if instance_id not in self.desired and instance_id not in self._terminating:
                self._spawn_terminate(instance_id, workload, report=False)
        self.ray.reconcile(self._ray_python)

    def _spawn_restart(self, instance: InstanceOut, workload: Workload) -> None:
        """An operator asked for a restart of a running workload: stop it, then start it afresh."""
        self._terminating.add(instance.id)

        async def restart() -> None:
            try:
                await self.stop_workload(workload)
                if self.workloads.get(instance.id) is workload:
                    self._launch(self.desired.get(instance.id, instance))
            finally:
                self._terminating.discard(instance.id)

        asyncio.create_task(restart())

    def _spawn_terminate(self, instance_id: int, workload: Workload | None, report: bool) -> None:
        self._terminating.add(instance_id)
        task = asyncio.create_task(self._terminate(instance_id, workload, report))
        task.add_done_callback(lambda _t: self._terminating.discard(instance_id))

    async def _resync(self, workload: Workload) -> None:
        try:
            await self.api.report(workload.instance.id, workload.state, workload.message,
                               port=workload.port, pid=workload.handle.pid if workload.handle else None)
        finally:
            workload.resyncing = False

    async def _set_state(self, workload: Workload, state: str, message: str, **extra: Any) -> None:
        workload.state, workload.message = state, message
        workload.resyncing = True  # this report is the sync; don't send it twice meanwhile
        try:
            await self.api.report(workload.instance.id, state, message, **extra)
        finally:
            workload.resyncing = False

    def _launch(self, instance: InstanceOut) -> None:
        workload = Workload(instance=instance)
        self.workloads[instance.id] = workload
        workload.task = asyncio.create_task(self._run_workload(workload), name=f"workload-{instance.name}")

    def log_path(self, instance_id: int) -> Path:
        return self.logs_dir / f"{instance_id}.log"

    async def _run_workload(self, workload: Workload) -> None:
        instance = workload.instance
        path = self.log_path(instance.id)
        if path.exists() and path.stat().st_size:
            path.replace(path.with_suffix(".previous.log"))
        try:
            workload.port = self.ports.allocate()
            context = await self.launch_context(instance, workload.port)  # one fetch of a custom definition
            spec = build_launch(instance, context)
            choice = await self.runtimes.choose(instance.spec.backend, spec, is_multi_host(instance))
            workload.runtime = runtime = choice.runtime
            await self.api.event(instance.id, "RuntimeChosen", f"{runtime.name}: {choice.reason}")
            # Before any download: a backend missing here fails at once.
            if missing := await asyncio.to_thread(runtime.missing, instance.spec.backend, spec):
                raise BackendError(missing)
            fetched = await self._fetch_model(workload)  # the same instance, a hub source now a path here
            if fetched is not instance:
                instance, spec = fetched, build_launch(fetched, context)
            workload.launch = spec
            if is_multi_host(instance):
                ray_env = await self._start_ray_head(workload, instance)
                if custom_name(instance.spec.backend) is not None:  # its command may name {ray_address}
                    spec = build_launch(instance, replace(context, ray_address=ray_env["RAY_ADDRESS"]))
                    workload.launch = spec
                spec.env.update(ray_env)
            request = StartRequest(instance, spec, workload.port, path, gpus=await asyncio.to_thread(self.gpus.read))
            pulling = f"pulling image {spec.image}"  # what a runtime fetches first (Docker: the image)
            workload.handle = await runtime.start(request, lambda f: self._downloading(workload, pulling, f))
            started = f"{runtime.describe(workload.handle)}, port {workload.port}"
        except (BackendError, OSError, RuntimeError, aiohttp.ClientError, TimeoutError, DockerError) as exc:
            workload.exited = True
            self.ports.release(workload.port)
            await self.ray.stop_head(instance.id)
            await self._set_state(workload, "error", f"could not start: {exc}")
            return
        handle = workload.handle
        await self._set_state(workload, "starting", f"{started}; {runtime.name} runtime: {choice.reason}",
                              port=workload.port, pid=handle.pid)
        await self._supervise(workload, spec.health_path, path)

    # --- multi-host placements (Ray; agent/ray.py) ------------------------------------------

    def _subordinate(self, instance: InstanceOut) -> bool:
        return instance.worker_id != self.api.worker_id and subordinate_of(instance, self.api.worker_id)

    def _ray_python(self, instance: InstanceOut) -> str:
        """Ray runs from the backend's environment: the driver (vLLM) and the nodes must match.
        A custom backend's driver must use the Ray of the agent's own environment (or backend_python's)."""
        return self.config.backend_python.get(instance.spec.backend) or sys.executable

    async def _start_ray_head(self, workload: Workload, instance: InstanceOut) -> dict[str, str]:
        if workload.runtime is not None and workload.runtime.runs_in_container:
            raise BackendError("a multi-host placement needs the process runtime on its workers for now "
                               "(the Ray nodes run from the backend's Python environment)")

        async def starting(message: str) -> None:
            await self._set_state(workload, "starting", message, port=workload.port)

        return await self.ray.start_head(instance, self._ray_python(instance), starting)

    def files_in_use(self) -> set[str]:
        """Model file keys of the workloads here (agent/cache.py never evicts or removes them)."""
        return {key for w in list(self.workloads.values()) if not w.exited
                if (key := key_or_none(w.instance.spec.source)) is not None}

    async def _fetch_model(self, workload: Workload) -> InstanceOut:
        """Download a hub source into the model cache (state `downloading` with progress); local paths pass."""
        instance = workload.instance
        source = instance.spec.source
        if self.models.parse(source).kind == "local":
            if os.path.isabs(source) or custom_name(instance.spec.backend) is None:
                path = await self.models.resolve(source)  # a clear error now rather than a backend's traceback later
                traits = BACKEND_TRAITS.get(instance.spec.backend)
                roots = [*self.config.model_roots, str(self.models.root)]
                if problem := await asyncio.to_thread(source_problem, path, roots, traits.layout if traits else "any",
                                                      must_exist=True):
                    raise SourceError(f"model source refused: {problem}")
                await self.files.note_local(path)  # listed with what it holds (estimates without a copy)
            return instance  # a custom backend may take a name of its own (not a path) as its source
        what = f"downloading {source} into {self.models.root}"
        await self._downloading(workload, what, 0.0)
        path = await self.files.fetch(source, lambda f: self._downloading(workload, what, f))
        return instance.model_copy(update={"spec": instance.spec.model_copy(update={"source": path})})

    async def _downloading(self, workload: Workload, message: str, fraction: float) -> None:
        await self._set_state(workload, "downloading", message, download_progress=round(fraction, 4))

    async def _supervise(self, workload: Workload, health_path: str, path: Path, adopted: bool = False) -> None:
        """Probe until healthy, report running, then wait for the exit and report it unless asked to stop."""
        handle = workload.handle
        exit_wait = asyncio.create_task(workload.runtime.wait(handle))
        healthy = await self._probe_until_healthy(workload.port, health_path, exit_wait)
        if healthy:
            how = "adopted after an agent restart; " if adopted else ""
            await self._set_state(workload, "running", f"{how}serving on {self.config.address}:{workload.port}",
                                  port=workload.port, pid=handle.pid)
        code = await exit_wait
        workload.exited = True
        self.ports.release(workload.port)
        if not workload.stopping:
            why = "did not become healthy" if not healthy else "exited"
            what = "container" if workload.runtime is not None and workload.runtime.runs_in_container else "process"
            await self._set_state(workload, "error",
                                  f"{what} {why} (exit code {'unknown' if code is None else code}); "
                                  f"log tail:\n{tail_text(path, 30)}")

    # --- adopting what a previous agent left running (processes by pidfile, containers by label) ----------

    def settle_leftovers(self) -> None:
        """After the first snapshot: adopt the left-over workloads still wanted as they are, stop the rest
        (those of deleted instances, of older generations or restarts, containers that no longer run)."""
        leftovers, self._leftovers = self._leftovers, []
        for key, runtime, record in leftovers:
            instance = self.desired.get(int(key)) if key.isdigit() else None
            wanted = (instance is not None and instance.state in _RUNNABLE and instance.id not in self.workloads
                      and record.get("restart_count") == instance.restart_count and record.get("port")
                      and record.get("generation") == instance.generation and record.get("running", True))
            if wanted:
                self._adopt(instance, key, runtime, record)
            else:
                log.info("stopping workload %s left by a previous agent: no longer wanted", key)
                asyncio.create_task(asyncio.to_thread(runtime.stop_leftover, key, record))

    def _adopt(self, instance: InstanceOut, key: str, runtime: Runtime, record: dict[str, Any]) -> None:
        workload = Workload(instance=instance, port=int(record["port"]), handle=runtime.adopt(key, record),
                            runtime=runtime)
        self.ports.reserve(workload.port)
        self.workloads[instance.id] = workload
        log.info("adopted instance %s (pid %s, port %s) left running by a previous agent", instance.name,
                 workload.handle.pid, workload.port)

        async def supervise() -> None:
            health_path = "/health"
            try:
                workload.launch = await self.launch_for(instance, workload.port)
                health_path = workload.launch.health_path
            except (BackendError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("adopted instance %s: %s (probing %s)", instance.name, exc, health_path)
            await self._supervise(workload, health_path, self.log_path(instance.id), adopted=True)

        workload.task = asyncio.create_task(supervise(), name=f"adopted-{instance.name}")

    async def launch_for(self, instance: InstanceOut, port: int) -> LaunchSpec:
        """The exact launch of `instance` on this host (a custom backend's definition comes from the server)."""
        return build_launch(instance, await self.launch_context(instance, port))

    async def launch_context(self, instance: InstanceOut, port: int) -> LaunchContext:
        """What a launch of `instance` on this host depends on besides the instance itself."""
        definition = None
        name = custom_name(instance.spec.backend)
        if name is not None:
            definition = await self.api.backend_definition(name)
        secrets = await self.api.secrets(instance.id) if any(
            not isinstance(value, str) for value in instance.spec.env.values()) else {}
        return LaunchContext(host=self.config.address, port=port, real_gpus=not self.config.simulate_gpus,
                             python=dict(self.config.backend_python), custom=definition, secrets=secrets,
                             gpu_kind=await self.gpu_kind(instance), images=dict(self.config.backend_images),
                             api_key=await self.api.backend_key(instance.id) if name is None else None)

    async def gpu_kind(self, instance: InstanceOut) -> str:
        """What the GPUs of the instance's claim are (cuda, rocm, ascend): its image follows them."""
        claim = instance.claim
        if claim is None or claim.device != "gpu" or not claim.gpu_indexes:
            return "cuda"  # not used: a claim without GPUs takes the cpu image
        vendors = {g.index: g.vendor for g in await asyncio.to_thread(self.gpus.read)}
        return GPU_KINDS.get(vendors.get(claim.gpu_indexes[0], "nvidia"), "cuda")

    async def _probe_until_healthy(self, port: int, health_path: str, exit_wait: asyncio.Task[int]) -> bool:
        url = f"http://{self.config.address}:{port}{health_path}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.health_timeout
        interval = 0.02  # small models are up in tens of milliseconds; big ones take minutes
        while loop.time() < deadline and not exit_wait.done():
            try:
                async with self.api.http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return True
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 1.0)
        return False

    async def _terminate(self, instance_id: int, workload: Workload | None, report: bool) -> None:
        if workload is not None and report and workload.state == "running" and (
                self.config.drain_seconds > 0 or self.config.drain_max_seconds > 0):
            await self._drain(workload)
        if workload is not None:
            await self.stop_workload(workload)
            self.workloads.pop(instance_id, None)
        if report and await self.api.report(instance_id, "terminated", "workload stopped"):
            self.desired.pop(instance_id, None)

    async def _drain(self, workload: Workload) -> None:
        """Keep a terminating backend serving until it holds no request (agent/drain.py), and say how it ended."""
        launch = workload.launch
        probe = None
        if launch is not None and launch.metrics_path and workload.port and counts_in_flight(launch.metrics):
            url = f"http://{self.config.address}:{workload.port}{launch.metrics_path}"

            async def probe() -> float | None:
                return in_flight(await scrape(self.api.http, url, key=launch.api_key), launch.metrics)

        done = await drain(self.config.drain_seconds, self.config.drain_max_seconds, probe,
                           lambda: workload.exited)
        log.info("instance %s: %s", workload.instance.name, done.describe())
        await self.api.event(workload.instance.id, "DrainMaximum" if done.why == "maximum" else "Drained",
                             done.describe())

    async def stop_workload(self, workload: Workload) -> None:
        workload.stopping = True
        if workload.handle is not None:
            await workload.runtime.stop(workload.handle)
        elif workload.task is not None:
            workload.task.cancel()  # still downloading: nothing runs yet, stop waiting for the download
        if workload.task is not None:
            await asyncio.gather(workload.task, return_exceptions=True)
        await self.ray.stop_head(workload.instance.id)
        self.ports.release(workload.port)
