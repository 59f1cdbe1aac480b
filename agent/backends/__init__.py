"""What each inference server needs to run: command, environment, health path. Starts nothing."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from server.schemas import InstanceOut


@dataclass
class LaunchSpec:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"


class BackendError(Exception):
    pass


def llama_cpp(instance: InstanceOut, host: str, port: int, gpu_offload: bool) -> LaunchSpec:
    spec = instance.spec
    command = [sys.executable, "-m", "agent.backends.llamacpp_server", "--model", spec.source,
               "--alias", instance.model_name, "--host", host, "--port", str(port),
               "--ctx-size", str(spec.context_length)]
    if gpu_offload:
        command += ["--n-gpu-layers", "999"]
    return LaunchSpec(command=command + list(spec.args), env=dict(spec.env), health_path="/health")


BACKENDS = {"llama.cpp": llama_cpp}


def launch_spec(instance: InstanceOut, host: str, port: int, gpu_offload: bool) -> LaunchSpec:
    try:
        build = BACKENDS[instance.spec.backend]
    except KeyError:
        raise BackendError(f"this agent cannot run backend {instance.spec.backend!r}") from None
    return build(instance, host, port, gpu_offload)
