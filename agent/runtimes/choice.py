"""Which runtime runs an instance on this host, and why (`maas agent --runtime auto|docker|process`).

`auto` takes Docker only when an engine answers here and the backend has an image for this host's
devices (agent/backends IMAGES, or MAAS_<BACKEND>_IMAGE) that the engine holds or can pull (it asks the
registry for the manifest without pulling). Otherwise a backend that runs natively (llama.cpp through
xllamacpp, vLLM from MAAS_VLLM_PYTHON, a custom backend's executable) runs as a process; anything else
fails with one message that names both ways out. The agent reports the choice and its reason as an
event (RuntimeChosen) and in the instance's `starting` message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from agent.backends import IMAGE_VARIABLES, BackendError, LaunchSpec, missing_requirement
from agent.runtimes.base import Runtime

# How long the engine's answer about a registry (pullable or not) holds: one deploy of many replicas
# asks once, and a registry that comes back is noticed within a minute.
PULLABLE_TTL = 60.0


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: Runtime  # ProcessRuntime or DockerRuntime
    reason: str


class RuntimeChooser:
    def __init__(self, mode: str, processes: Any, docker: Any | None, no_docker: str = ""):
        self.mode = mode
        self.processes = processes
        self.docker = docker
        self.no_docker = no_docker  # why there is no engine, when docker is None
        self._pullable: dict[str, tuple[float, str | None]] = {}  # image -> (when asked, problem or None)

    async def choose(self, backend: str, launch: LaunchSpec, multi_host: bool = False) -> RuntimeChoice:
        if self.mode == "process":
            return RuntimeChoice(self.processes, "this agent runs with --runtime process")
        if self.mode == "docker":
            return RuntimeChoice(self.docker, "this agent runs with --runtime docker")
        if multi_host:  # agent.py refuses Docker for these: the Ray nodes run from the backend's environment
            return RuntimeChoice(self.processes, "a multi-host placement runs its Ray nodes as processes")
        why_not_docker = await self._docker_problem(backend, launch)
        if why_not_docker is None:
            here = await asyncio.to_thread(self.docker.image_here, launch.image)
            how = "is on this worker's Docker engine" if here else "can be pulled from its registry"
            return RuntimeChoice(self.docker, f"image {launch.image} {how}")
        native = await asyncio.to_thread(missing_requirement, backend, launch)
        if native is None:
            return RuntimeChoice(self.processes, f"{why_not_docker}; {backend} runs natively here")
        variable = IMAGE_VARIABLES.get(backend, "the backend definition's image")
        raise BackendError(f"backend {backend} cannot run on this worker: not in a container ({why_not_docker}: "
                           f"make an image available to the engine, e.g. with {variable}) and not as a process "
                           f"({native}); `maas agent --runtime docker|process` forces one")

    async def _docker_problem(self, backend: str, launch: LaunchSpec) -> str | None:
        """None when Docker can run `launch` now, else why not (for the reason and the error)."""
        if self.docker is None:
            return self.no_docker or "no Docker engine answers here"
        if not launch.image:
            return f"backend {backend} has no container image for this host's devices"
        if await asyncio.to_thread(self.docker.image_here, launch.image):
            return None
        asked = self._pullable.get(launch.image)
        if asked is None or time.monotonic() - asked[0] > PULLABLE_TTL:
            asked = (time.monotonic(), await asyncio.to_thread(self.docker.pull_problem, launch.image))
            self._pullable[launch.image] = asked
        problem = asked[1]
        return None if problem is None else f"image {launch.image} is not on this worker's engine and cannot be " \
                                            f"pulled ({problem})"
