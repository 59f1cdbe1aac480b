"""Workloads as Docker containers.

`container_spec()` builds the exact container specification (the keyword arguments of the
docker SDK's `containers.run`) as plain data, so it is tested without an engine. The
`DockerRuntime` keeps the engine calls thin: run, wait, stop, follow logs into the instance log
file, and find the containers a previous agent left (labels identify instance and generation).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.schemas import GPUDevice, InstanceOut

log = logging.getLogger(__name__)

LABEL_PREFIX = "maas."
MANAGED_LABEL = "maas.managed"
CONTAINER_MODEL_CACHE = "/root/.cache/huggingface"


@dataclass
class ContainerOptions:
    worker: str
    model_cache: Path  # host folder mounted as the model cache (Hugging Face layout)
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


def container_spec(instance: InstanceOut, image: str, command: list[str], env: dict[str, str],
                   gpus: list[GPUDevice], options: ContainerOptions) -> dict[str, Any]:
    """The keyword arguments of `client.containers.run` for this instance."""
    claim = instance.claim
    pinned = ",".join(str(i) for i in claim.gpu_indexes) if claim and claim.device == "gpu" else None
    # Inside the container the requested GPUs are renumbered from 0: the host pin must not leak in.
    environment = {k: v for k, v in env.items() if not (k == "CUDA_VISIBLE_DEVICES" and v == pinned)}
    volumes = {str(options.model_cache): {"bind": CONTAINER_MODEL_CACHE, "mode": "rw"}}
    source = instance.spec.source
    if os.path.isabs(source):  # a local model: the same path inside, read-only
        volumes[source] = {"bind": source, "mode": "ro"}
    environment.setdefault("HF_HOME", CONTAINER_MODEL_CACHE)
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
        "device_requests": device_requests(instance, gpus),
        "volumes": volumes,
        "restart_policy": {"Name": "no"},  # the server decides restarts
    }


def engine_answers() -> bool:
    """True when a Docker engine answers here (for --runtime auto)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # DockerException without a socket; anything else: no usable engine
        return False


@dataclass
class ContainerHandle:
    key: str
    container: Any
    log_path: Path
    returncode: int | None = None
    _follower: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        try:
            return int(self.container.attrs["State"]["Pid"]) or None
        except (KeyError, TypeError, ValueError):
            return None


class DockerRuntime:
    name = "docker"

    def __init__(self, worker: str = "", stop_grace: float = 10.0, client: Any = None):
        self.worker = worker
        if client is None:
            import docker

            client = docker.from_env()
        self.client = client
        self.stop_grace = stop_grace

    async def start(self, key: str, spec: dict[str, Any], log_path: Path) -> ContainerHandle:
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

    def _follow_logs(self, handle: ContainerHandle) -> None:
        def follow() -> None:
            try:
                with open(handle.log_path, "ab", buffering=0) as out:
                    for chunk in handle.container.logs(stream=True, follow=True):
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
