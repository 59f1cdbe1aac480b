"""What a runtime is: the one interface the serving loop (agent/serving.py) uses for processes and
containers alike, so it never asks which runtime it has, only what the runtime does.

A runtime starts an instance's workload from a `StartRequest` (the instance, its launch, its port and log
file, this host's GPUs), waits for it, stops it, and after an agent restart finds what a previous agent
left (`leftovers`: key and record, the record carrying port, restart_count and generation), adopts what
is still wanted and stops the rest. Traits that differ are asked as properties (`runs_in_container`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent.backends import LaunchSpec
from agent.progress import ProgressCallback
from server.schemas import GPUDevice, InstanceOut


@dataclass(frozen=True)
class StartRequest:
    """One instance's workload to start."""

    instance: InstanceOut
    launch: LaunchSpec
    port: int
    log_path: Path
    gpus: list[GPUDevice] = field(default_factory=list)  # this host's GPUs (containers name them by UUID)

    @property
    def key(self) -> str:
        """What names the workload in the runtime (a pidfile, a container label): the instance id."""
        return str(self.instance.id)

    def record(self) -> dict[str, Any]:
        """What a later agent needs to adopt the workload as it runs."""
        return {"port": self.port, "restart_count": self.instance.restart_count,
                "generation": self.instance.generation}


@runtime_checkable
class Runtime(Protocol):
    name: str  # "process" or "docker": how people see it (events, `maas doctor`)
    # True: the workload runs in a container from the launch's image, not from this host's environment
    # (no backend installed here is needed; a multi-host placement's Ray nodes cannot join it).
    runs_in_container: bool

    def missing(self, backend: str, launch: LaunchSpec) -> str | None:
        """Why this runtime cannot run `launch` on this host, known before any download; None when it can.
        Blocking (it may run the backend's Python)."""
        ...

    async def start(self, request: StartRequest, on_progress: ProgressCallback | None = None) -> Any:
        """Start the workload (after what it needs first, e.g. an image pull, reported through
        `on_progress(fraction)`); returns its handle (`.pid`: the host pid, or None)."""
        ...

    def describe(self, handle: Any) -> str:
        """The started workload in a few words for its state message ("pid 42", "container c (image i)")."""
        ...

    async def wait(self, handle: Any) -> int | None:
        """Until the workload exits: its exit code (None when unknown, e.g. an adopted process)."""
        ...

    async def stop(self, handle: Any) -> int | None:
        ...

    def leftovers(self) -> list[tuple[str, dict[str, Any]]]:
        """(key, record) of each workload a previous agent left (blocking)."""
        ...

    def adopt(self, key: str, record: dict[str, Any]) -> Any:
        ...

    def stop_leftover(self, key: str, record: dict[str, Any]) -> None:
        """Stop a left-over workload nobody wants any more (blocking)."""
        ...

    def clean_up_leftovers(self) -> int:
        ...
