"""Workloads as Docker containers.

`container_spec()` builds the exact container specification (the keyword arguments of the
docker SDK's `containers.run`) as plain data, so it is tested without an engine. The
`DockerRuntime` keeps the engine calls thin: pull, run, wait, stop, follow logs into the instance log
file, and find the containers a previous agent left (labels identify instance, generation, restart and
port), to adopt those still wanted and remove the rest. tests/test_docker_engine.py runs it against a
real engine (`make test-docker`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backends import BackendError, LaunchSpec
from agent.progress import ProgressCallback, run_with_progress
from agent.runtimes.base import StartRequest
from server.schemas import GPUDevice, InstanceOut

log = logging.getLogger(__name__)

LABEL_PREFIX = "maas."
MANAGED_LABEL = "maas.managed"


@dataclass
class ContainerOptions:
    worker: str
    # The agent's model cache (agent/sources.py), mounted at the same path inside: the launch command names
    # snapshot paths on the host, and their files are relative links into the cache's blobs.
    model_cache: Path
    shm_size: str = "16g"
    extra_labels: dict[str, str] = field(default_factory=dict)


def container_name(instance: InstanceOut) -> str:
    return f"maas-{instance.name}-{instance.id}"


def labels(instance: InstanceOut, worker: str) -> dict[str, str]:
    return {MANAGED_LABEL: "true", "maas.instance-id": str(instance.id), "maas.instance": instance.name,
            "maas.model": instance.model_name, "maas.generation": str(instance.generation),
            "maas.restart-count": str(instance.restart_count), "maas.worker": worker}


def device_requests(instance: InstanceOut, gpus: list[GPUDevice]) -> list[dict[str, Any]]:
    """GPUs by UUID when the inventory knows it (stable across reboots and reorderings), else by index."""
    claim = instance.claim
    if not claim or claim.device != "gpu" or not claim.gpu_indexes:
        return []
    by_index = {g.index: g for g in gpus}
    ids = [by_index[i].uuid if i in by_index and by_index[i].uuid else str(i) for i in claim.gpu_indexes]
    return [{"Driver": "nvidia", "DeviceIDs": ids, "Capabilities": [["gpu"]], "Count": 0, "Options": {}}]


# An Ascend NPU container: the claimed davinci devices, the shared control devices and the host driver.
ASCEND_CONTROL_DEVICES = ("/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
ASCEND_HOST_PATHS = ("/usr/local/dcmi", "/usr/local/bin/npu-smi", "/usr/local/Ascend/driver/lib64",
                     "/usr/local/Ascend/driver/version.info", "/etc/ascend_install.info")


def ascend_devices(instance: InstanceOut) -> list[str]:
    claim = instance.claim
    if not claim or claim.device != "gpu" or not claim.gpu_indexes:
        return []
    return [f"/dev/davinci{i}:/dev/davinci{i}:rwm" for i in claim.gpu_indexes] + \
        [f"{d}:{d}:rwm" for d in ASCEND_CONTROL_DEVICES]


def container_spec(instance: InstanceOut, image: str, command: list[str], env: dict[str, str],
                   gpus: list[GPUDevice], options: ContainerOptions, accelerator: str = "nvidia") -> dict[str, Any]:
    """The keyword arguments of `client.containers.run` for this instance. `accelerator`: what the claimed
    devices are (the backend's LaunchSpec says), nvidia GPUs or ascend NPUs."""
    claim = instance.claim
    pinned = ",".join(str(i) for i in claim.gpu_indexes) if claim and claim.device == "gpu" else None
    ascend = accelerator == "ascend"
    # Inside the container the requested GPUs (NPUs) are renumbered from 0: the host pin must not leak in.
    environment = {k: v for k, v in env.items()
                   if not (k in ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES") and v == pinned)}
    cache = str(options.model_cache)
    volumes = {cache: {"bind": cache, "mode": "rw"}}
    source = instance.spec.source
    inside_cache = os.path.commonpath([cache, source]) == cache if os.path.isabs(source) else False
    if os.path.isabs(source) and not inside_cache:  # a local model: the same path inside, read-only
        volumes[source] = {"bind": source, "mode": "ro"}
    environment.setdefault("HF_HOME", os.path.join(cache, "huggingface"))
    if ascend:
        volumes.update({path: {"bind": path, "mode": "ro"} for path in ASCEND_HOST_PATHS})
    return {
        "image": image,
        "command": list(command),
        "name": container_name(instance),
        "detach": True,
        "environment": environment,
        "labels": {**labels(instance, options.worker), **options.extra_labels},
        "network_mode": "host",  # the port the agent allocated is the port the server binds
        "ipc_mode": "host",  # NCCL and PyTorch shared memory between tensor-parallel ranks
        "shm_size": options.shm_size,
        "device_requests": [] if ascend else device_requests(instance, gpus),
        "volumes": volumes,
        "restart_policy": {"Name": "no"},  # the server decides restarts
    } | ({"devices": ascend_devices(instance)} if ascend else {})


class PullProgress:
    """The fraction of an image pull, from the JSON events of the engine's pull stream.

    Each layer reports `Pulling fs layer`, then `Downloading` with progressDetail current/total, then
    `Download complete`, `Extracting`, `Pull complete`; a layer already here says `Already exists`.
    The fraction is downloaded bytes over the total of the layers whose size is known so far; layers
    announced without a size yet count as not done, so it never reads 100% too early.
    """

    DONE = ("Download complete", "Extracting", "Verifying Checksum", "Pull complete", "Already exists")

    def __init__(self) -> None:
        self.layers: dict[str, tuple[int, int | None]] = {}  # id -> (bytes downloaded, size or None)
        self.error: str | None = None

    def feed(self, event: dict[str, Any]) -> None:
        if event.get("error"):
            self.error = str(event.get("errorDetail", {}).get("message") or event["error"])
            return
        layer, status = event.get("id"), str(event.get("status", ""))
        if not layer or status.startswith(("Pulling from", "Digest:", "Status:")):
            return  # lines about the whole image, not a layer
        current, total = self.layers.get(layer, (0, None))
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and detail.get("total"):
            current, total = int(detail.get("current", 0)), int(detail["total"])
        elif status.startswith(self.DONE):
            current = total if total is not None else current
            if total is None:  # done without a size seen (e.g. Already exists): weigh it as nothing left
                total = current = 0
        self.layers[layer] = (current, total)

    def fraction(self) -> float | None:
        if not self.layers:
            return None
        if any(total is None for _, total in self.layers.values()):
            sized = [(c, t) for c, t in self.layers.values() if t]
            unsized = sum(1 for _, t in self.layers.values() if t is None)
            # A layer of unknown size is at least as big as the average known one.
            average = sum(t for _, t in sized) / len(sized) if sized else 1
            done = sum(c for c, _ in sized)
            return min(done / (sum(t for _, t in sized) + unsized * average), 0.99)
        total = sum(t or 0 for _, t in self.layers.values())
        if total == 0:  # only layers already here so far: nothing to say until bytes move (the end says 1.0)
            return None
        return min(sum(c for c, _ in self.layers.values()) / total, 1.0)


def split_image(image: str) -> tuple[str, str]:
    """`repo[:tag]` or `repo@digest` -> (repository, tag or digest) as the engine's pull API takes them."""
    if "@" in image:
        repository, digest = image.split("@", 1)
        return repository, digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:  # a colon after the last slash is a tag; before it, a registry port
        return image[:colon], image[colon + 1:]
    return image, "latest"


def engine_problem() -> str | None:
    """None when a Docker engine answers here (DOCKER_HOST, else /var/run/docker.sock), else why not."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            client.ping()
            return None
        finally:
            client.close()
    except Exception as exc:  # DockerException without a socket; anything else: no usable engine
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return f"no Docker engine answers at {where} ({type(exc).__name__})"


def engine_answers() -> bool:
    """True when a Docker engine answers here."""
    return engine_problem() is None


@dataclass
class ContainerHandle:
    key: str
    container: Any
    log_path: Path
    returncode: int | None = None
    name: str = ""  # the container's name and image, for the state message
    image: str = ""
    _follower: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        try:
            return int(self.container.attrs["State"]["Pid"]) or None
        except (KeyError, TypeError, ValueError):
            return None


class DockerRuntime:
    """Implements agent/runtimes/base.py Runtime."""

    name = "docker"
    runs_in_container = True

    def __init__(self, worker: str = "", stop_grace: float = 10.0, client: Any = None,
                 model_cache: Path | None = None, shm_size: str = "16g"):
        self.worker = worker
        self.model_cache = model_cache  # the agent's model cache, mounted into every container
        self.shm_size = shm_size
        self.progress_interval = 1.0  # seconds between pull progress reports
        if client is None:
            import docker

            client = docker.from_env()
        self.client = client
        self.stop_grace = stop_grace

    def image_here(self, image: str) -> bool:
        """True when the engine holds `image` (blocking)."""
        import docker

        try:
            self.client.images.get(image)
            return True
        except docker.errors.ImageNotFound:
            return False

    def pull_problem(self, image: str) -> str | None:
        """None when the engine can pull `image` (its registry answers with the manifest; nothing is
        pulled), else the engine's reason (blocking)."""
        import docker

        try:
            self.client.api.inspect_distribution(image)
            return None
        except docker.errors.APIError as exc:
            return str(exc.explanation or exc)[:300]
        except Exception as exc:  # the engine's connection itself: a read timeout, a reset
            return f"{type(exc).__name__}: {exc}"[:300]

    async def pull(self, image: str, on_progress: Any = None) -> bool:
        """Pull `image` unless the engine has it; `on_progress(fraction)` (a coroutine function) follows the
        pull. False when it was already here. Raises RuntimeError with the engine's reason."""
        import docker

        if await asyncio.to_thread(self.image_here, image):
            return False
        progress = PullProgress()
        repository, tag = split_image(image)

        def pull() -> None:
            for event in self.client.api.pull(repository, tag=tag, stream=True, decode=True):
                progress.feed(event)  # plain assignments: read from the event loop between events
                if progress.error:  # raised here: no 100% report for a pull that failed
                    raise RuntimeError(f"cannot pull image {image}: {progress.error}")

        try:
            await run_with_progress(pull, progress.fraction, on_progress, self.progress_interval, f"pull-{image}")
        except docker.errors.APIError as exc:  # unknown image, no access to the registry
            raise RuntimeError(f"cannot pull image {image}: {exc.explanation or exc}") from None
        return True

    def missing(self, backend: str, launch: LaunchSpec) -> str | None:
        return None  # the image brings the backend; a launch without one fails in container_for

    def container_for(self, request: StartRequest) -> dict[str, Any]:
        """The container specification of the request. Its labels also carry what a later agent needs to
        adopt it: the port and the log file."""
        instance, launch = request.instance, request.launch
        if not launch.image:
            raise BackendError(f"backend {instance.spec.backend} has no container image for this host's devices; "
                               "add `image` to its definition (a custom backend), set MAAS_<BACKEND>_IMAGE, "
                               "or run this worker with --runtime process")
        if self.model_cache is None:
            raise BackendError("this Docker runtime was made without the agent's model cache to mount")
        adoption = {"maas.port": str(request.port), "maas.log-path": str(request.log_path)} if request.port else {}
        options = ContainerOptions(worker=self.worker, model_cache=self.model_cache, shm_size=self.shm_size,
                                   extra_labels=adoption)
        return container_spec(instance, launch.image, launch.container_command or launch.command, launch.env,
                              request.gpus, options, accelerator=launch.accelerator)

    async def start(self, request: StartRequest, on_progress: ProgressCallback | None = None) -> ContainerHandle:
        """Pull the launch's image (progress through `on_progress`), then run its container."""
        if request.launch.image:
            await self.pull(request.launch.image, on_progress)
        spec = self.container_for(request)
        handle = await self.run_container(request.key, spec, request.log_path)
        handle.name, handle.image = spec["name"], spec["image"]
        return handle

    def describe(self, handle: ContainerHandle) -> str:
        return f"container {handle.name} (image {handle.image})"

    async def run_container(self, key: str, spec: dict[str, Any], log_path: Path) -> ContainerHandle:
        """Run the container `spec` (container_spec's keyword arguments), its log followed into `log_path`."""
        import docker

        def run() -> Any:
            try:  # a container of the same name from an earlier run of this instance
                self.client.containers.get(spec["name"]).remove(force=True)
            except docker.errors.NotFound:
                pass
            kwargs = dict(spec)
            kwargs["device_requests"] = [docker.types.DeviceRequest(
                driver=r["Driver"], device_ids=r["DeviceIDs"], capabilities=r["Capabilities"])
                for r in spec["device_requests"]]
            container = self.client.containers.run(**kwargs)
            container.reload()
            return container

        log_path.parent.mkdir(parents=True, exist_ok=True)
        container = await asyncio.to_thread(run)
        handle = ContainerHandle(key, container, log_path)
        self._follow_logs(handle)
        return handle

    def _follow_logs(self, handle: ContainerHandle, since: float | None = None) -> None:
        def follow() -> None:
            try:
                with open(handle.log_path, "ab", buffering=0) as out:
                    extra = {"since": since} if since is not None else {}
                    for chunk in handle.container.logs(stream=True, follow=True, **extra):
                        out.write(chunk)
            except Exception as exc:  # the container went away
                log.debug("log follow of %s ended: %s", handle.key, exc)

        handle._follower = threading.Thread(target=follow, name=f"logs-{handle.key}", daemon=True)
        handle._follower.start()

    async def wait(self, handle: ContainerHandle) -> int:
        # A thread of its own: a container may run for weeks, the default executor must not fill up.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(setter: Any, value: Any) -> None:
            if not future.done():
                setter(value)

        def wait() -> None:
            try:
                result = handle.container.wait()
                loop.call_soon_threadsafe(settle, future.set_result, result)
            except Exception as exc:  # the engine went away: treat as an exit
                loop.call_soon_threadsafe(settle, future.set_exception, exc)

        threading.Thread(target=wait, name=f"wait-{handle.key}", daemon=True).start()
        try:
            result = await future
        except Exception as exc:
            log.warning("waiting for %s failed: %s", handle.key, exc)
            result = {"StatusCode": -1}
        handle.returncode = int(result.get("StatusCode", -1)) if isinstance(result, dict) else -1
        return handle.returncode

    async def stop(self, handle: ContainerHandle) -> int | None:
        def stop() -> None:
            try:
                handle.container.stop(timeout=int(self.stop_grace))
                handle.container.remove(force=True)
            except Exception as exc:
                log.info("stopping %s: %s", handle.key, exc)

        await asyncio.to_thread(stop)
        return handle.returncode

    # --- what a previous agent of this worker left (it was killed, or restarted) ---------------

    def leftovers(self) -> list[tuple[str, dict[str, Any]]]:
        """(instance id, record) for each container a previous agent started, as the process runtime's
        pidfile records: port, restart_count, generation (from the labels), whether it still runs."""
        found = []
        for container in self.managed():
            tags = container.labels or {}
            try:
                record = {"port": int(tags.get("maas.port", 0)) or None,
                          "restart_count": int(tags.get("maas.restart-count", -1)),
                          "generation": int(tags.get("maas.generation", -1)),
                          "log_path": tags.get("maas.log-path", ""), "container": container,
                          "running": container.status == "running"}
            except ValueError:  # labels written by hand: not ours to adopt
                record = {"container": container, "running": False}
            found.append((tags.get("maas.instance-id", container.name), record))
        return found

    def adopt(self, key: str, record: dict[str, Any]) -> ContainerHandle:
        """Take over a running container: wait on it and follow its log from where the last agent's
        follower stopped (the log file's last write)."""
        log_path = Path(record.get("log_path") or "/dev/null")
        handle = ContainerHandle(key, record["container"], log_path)
        since = log_path.stat().st_mtime if log_path.is_file() else None
        self._follow_logs(handle, since=since)
        return handle

    def stop_leftover(self, key: str, record: dict[str, Any]) -> None:
        """Remove a left-over container nobody wants any more (blocking)."""
        container = record["container"]
        try:
            if container.status == "running":
                container.stop(timeout=int(self.stop_grace))
            container.remove(force=True)
            log.info("removed container %s (instance %s) left by a previous agent", container.name, key)
        except Exception as exc:  # gone meanwhile
            log.info("removing leftover container %s: %s", getattr(container, "name", "?"), exc)

    def managed(self) -> list[Any]:
        """Containers this worker's agent started (adopt or remove them after a restart)."""
        return self.client.containers.list(all=True, filters={"label": [f"{MANAGED_LABEL}=true",
                                                                         f"maas.worker={self.worker}"]})

    def clean_up_leftovers(self) -> int:
        """Remove the containers a previous agent of this worker left (it was killed before it could)."""
        removed = 0
        for container in self.managed():
            try:
                container.stop(timeout=int(self.stop_grace))
                container.remove(force=True)
                removed += 1
            except Exception as exc:
                log.info("removing leftover container %s: %s", getattr(container, "name", "?"), exc)
        return removed
