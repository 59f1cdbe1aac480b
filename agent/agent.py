"""The agent: registers, heartbeats, watches its instances and makes the running workloads match them.

It never touches the database: REST and the watch stream with its own worker token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from agent.backends import BackendError, launch_spec
from agent.devices import GPUInventory, host_info
from agent.logs import tail_lines, tail_text
from agent.ports import DEFAULT_RANGE, PortAllocator
from agent.runtimes import ProcessHandle, ProcessRuntime
from server.schemas import InstanceOut, WorkerRegistered

log = logging.getLogger(__name__)

_RUNNABLE = {"scheduled", "starting", "running", "unreachable"}


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
    # After an instance turns `terminating` the gateways stop routing to it; its process
    # keeps running this long so requests already in flight can finish.
    drain_seconds: float = 5.0
    port_range: tuple[int, int] = DEFAULT_RANGE
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Workload:
    instance: InstanceOut
    handle: ProcessHandle | None = None
    port: int | None = None
    task: asyncio.Task[None] | None = None
    exited: bool = False
    stopping: bool = False
    state: str | None = None  # what this agent last told the server
    message: str = ""
    resyncing: bool = False


class ServerRejected(Exception):
    pass


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.gpus = GPUInventory(config.simulate_gpus)
        self.runtime = ProcessRuntime(config.data_dir / "run")
        self.ports = PortAllocator(config.address, *config.port_range)
        self.logs_dir = config.data_dir / "logs"
        self.desired: dict[int, InstanceOut] = {}
        self.workloads: dict[int, Workload] = {}
        self.worker_id: int | None = None
        self._worker_token = ""
        self._agent_secret = ""
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.main_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._terminating: set[int] = set()
        self.registered = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        left = await asyncio.to_thread(self.runtime.clean_up_leftovers)
        if left:
            log.info("stopped %d workloads left by a previous agent", left)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, sock_connect=5))
        await self._serve_http()
        self.main_task = asyncio.create_task(self._main(), name="agent-main")

    async def stop(self) -> None:
        if self.main_task is not None:
            self.main_task.cancel()
            await asyncio.gather(self.main_task, return_exceptions=True)
        await asyncio.gather(*(self._stop_workload(w) for w in list(self.workloads.values())), return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()
        if self._http:
            await self._http.close()

    async def _main(self) -> None:
        await self._register_until_accepted()
        loops = [self._heartbeat_loop(), self._watch_loop(), self._reconcile_loop()]
        await asyncio.gather(*loops)

    # --- talking to the server ------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._worker_token}"}

    async def _register_until_accepted(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._register()
                return
            except ServerRejected:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("cannot reach the server at %s (%s); retrying", self.config.server_url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _register(self) -> None:
        body = {"name": self.config.name, "address": self.config.address, "agent_port": self.config.port,
                "labels": self.config.labels, "gpus": [g.model_dump(mode="json") for g in self.gpus.read()],
                "host": host_info().model_dump(mode="json")}
        async with self._http.post(f"{self.config.server_url}/v2/agent/register", json=body,
                                   headers={"Authorization": f"Bearer {self.config.token}"}) as response:
            if response.status in (401, 403, 422):
                raise ServerRejected(f"the server refused registration ({response.status}): {await response.text()}")
            response.raise_for_status()
            registered = WorkerRegistered.model_validate(await response.json())
        self.worker_id = registered.worker.id
        self._worker_token = registered.token
        self._agent_secret = registered.agent_secret
        self.registered.set()
        log.info("registered as worker %s (id %s) with %d GPUs", self.config.name, self.worker_id,
                 len(registered.worker.gpus))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            await self.heartbeat()

    async def heartbeat(self) -> None:
        body = {"gpus": [g.model_dump(mode="json") for g in self.gpus.read()],
                "host": host_info().model_dump(mode="json")}
        try:
            async with self._http.post(f"{self.config.server_url}/v2/agent/heartbeat", json=body,
                                       headers=self._headers()) as response:
                if response.status in (401, 404):
                    log.warning("the server no longer knows this worker; registering again")
                    await self._register_until_accepted()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("heartbeat failed: %s", exc)

    async def _watch_loop(self) -> None:
        version: int | None = None
        delay = 0.5
        while True:
            params = {"kinds": "instances"} | ({"since": str(version)} if version is not None else {})
            try:
                async with self._http.get(f"{self.config.server_url}/v2/watch", params=params, headers=self._headers(),
                                          timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as response:
                    if response.status == 401:
                        await self._register_until_accepted()
                        version = None
                        continue
                    response.raise_for_status()
                    delay = 0.5
                    async for line in response.content:
                        message = json.loads(line)
                        version = message["version"]
                        self._apply_watch(message)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.info("watch stream ended (%s); reconnecting", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)

    def _apply_watch(self, message: dict[str, Any]) -> None:
        if message["type"] == "snapshot":
            self.desired = {i["id"]: InstanceOut.model_validate(i) for i in message["items"]["instances"]}
        elif message["type"] == "event":
            instance = InstanceOut.model_validate(message["object"])
            if message["action"] == "deleted" or instance.worker_id != self.worker_id:
                self.desired.pop(instance.id, None)
            else:
                self.desired[instance.id] = instance
        else:
            return
        self._wake.set()

    async def _report(self, instance_id: int, state: str, message: str = "", **extra: Any) -> bool:
        """Tell the server an instance's state. True once the server answered (accepted or refused)."""
        body = {"state": state, "message": message, **{k: v for k, v in extra.items() if v is not None}}
        for attempt in range(5):
            try:
                async with self._http.put(f"{self.config.server_url}/v2/agent/instances/{instance_id}/status",
                                          json=body, headers=self._headers()) as response:
                    if response.status < 300:
                        return True
                    if response.status in (404, 409):  # gone or moved on; the watch tells us what is wanted
                        log.info("report %s for instance %s refused: %s", state, instance_id, await response.text())
                        return True
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("report failed (%s), retrying", exc)
            await asyncio.sleep(0.5 * (attempt + 1))
        return False

    # --- making actual match desired ------------------------------------------------

    async def _reconcile_loop(self) -> None:
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

    def _spawn_restart(self, instance: InstanceOut, workload: Workload) -> None:
        """An operator asked for a restart of a running workload: stop it, then start it afresh."""
        self._terminating.add(instance.id)

        async def restart() -> None:
            try:
                await self._stop_workload(workload)
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
            await self._report(workload.instance.id, workload.state, workload.message,
                               port=workload.port, pid=workload.handle.pid if workload.handle else None)
        finally:
            workload.resyncing = False

    async def _set_state(self, workload: Workload, state: str, message: str, **extra: Any) -> None:
        workload.state, workload.message = state, message
        workload.resyncing = True  # this report is the sync; don't send it twice meanwhile
        try:
            await self._report(workload.instance.id, state, message, **extra)
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
            gpu_offload = bool(instance.claim and instance.claim.device == "gpu" and not self.config.simulate_gpus)
            spec = launch_spec(instance, self.config.address, workload.port, gpu_offload)
            workload.handle = await self.runtime.start(str(instance.id), spec.command, spec.env, path)
        except (BackendError, OSError, RuntimeError) as exc:
            workload.exited = True
            self.ports.release(workload.port)
            await self._set_state(workload, "error", f"could not start: {exc}")
            return
        handle = workload.handle
        await self._set_state(workload, "starting", f"pid {handle.pid}, port {workload.port}",
                              port=workload.port, pid=handle.pid)
        exit_wait = asyncio.create_task(self.runtime.wait(handle))
        healthy = await self._probe_until_healthy(workload.port, spec.health_path, exit_wait)
        if healthy:
            await self._set_state(workload, "running", f"serving on {self.config.address}:{workload.port}",
                                  port=workload.port, pid=handle.pid)
        code = await exit_wait
        workload.exited = True
        self.ports.release(workload.port)
        if not workload.stopping:
            why = "did not become healthy" if not healthy else "exited"
            await self._set_state(workload, "error",
                                  f"process {why} (exit code {code}); log tail:\n{tail_text(path, 30)}")

    async def _probe_until_healthy(self, port: int, health_path: str, exit_wait: asyncio.Task[int]) -> bool:
        url = f"http://{self.config.address}:{port}{health_path}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.health_timeout
        interval = 0.02  # small models are up in tens of milliseconds; big ones take minutes
        while loop.time() < deadline and not exit_wait.done():
            try:
                async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return True
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 1.0)
        return False

    async def _terminate(self, instance_id: int, workload: Workload | None, report: bool) -> None:
        if workload is not None and report and workload.state == "running" and self.config.drain_seconds > 0:
            await asyncio.sleep(self.config.drain_seconds)
        if workload is not None:
            await self._stop_workload(workload)
            self.workloads.pop(instance_id, None)
        if report and await self._report(instance_id, "terminated", "workload stopped"):
            self.desired.pop(instance_id, None)

    async def _stop_workload(self, workload: Workload) -> None:
        workload.stopping = True
        if workload.handle is not None:
            await self.runtime.stop(workload.handle)
        if workload.task is not None:
            await asyncio.gather(workload.task, return_exceptions=True)
        self.ports.release(workload.port)

    # --- the agent's own endpoint -------------------------------------------------------

    async def _serve_http(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", _ok)
        app.router.add_get("/instances/{id}/logs", self._handle_logs)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.address, self.config.port)
        await site.start()
        self.config.port = self._runner.addresses[0][1]

    async def _handle_logs(self, request: web.Request) -> web.StreamResponse:
        if not self._agent_secret or request.headers.get("Authorization") != f"Bearer {self._agent_secret}":
            return web.json_response({"error": {"code": "unauthorized", "message": "bad agent secret"}}, status=401)
        instance_id, tail = request.match_info["id"], request.query.get("tail", "200")
        if not (instance_id.isascii() and instance_id.isdigit() and len(instance_id) < 19):
            return web.json_response({"error": {"code": "not_found", "message": "no such instance"}}, status=404)
        if not (tail.lstrip("-").isascii() and tail.lstrip("-").isdigit() and len(tail) < 10):
            return web.json_response({"error": {"code": "bad_request", "message": "tail: a whole number"}}, status=400)
        tail = int(tail)
        path = self.log_path(int(instance_id))
        if request.query.get("previous") == "1":
            path = path.with_suffix(".previous.log")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        offset = path.stat().st_size if path.exists() else 0  # the tail ends here and following starts here
        try:
            await response.write(await asyncio.to_thread(tail_lines, path, tail, offset))
            while request.query.get("follow") == "1":
                workload = self.workloads.get(int(instance_id))
                size = path.stat().st_size if path.exists() else 0
                if size > offset:
                    with open(path, "rb") as handle:
                        handle.seek(offset)
                        chunk = handle.read(size - offset)
                    offset = size
                    await response.write(chunk)
                elif (workload.exited if workload else int(instance_id) not in self.desired):
                    break  # nothing more will come (a starting instance is followed until its log appears)
                await asyncio.sleep(0.25)
            await response.write_eof()
        except ConnectionResetError:  # the reader left
            pass
        return response


async def _ok(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
