"""What each inference server needs to run: command, environment, health path, metrics names. Starts nothing.

Every backend is data: `build_launch(instance, context)` returns the exact argv, environment,
health path and the map from the backend's own metric names to the unified ones
(`server.schemas.UNIFIED_INSTANCE_METRICS`). The runtimes start it; the agent probes it.

One module per built-in backend (llamacpp.py, vllm.py, sglang.py, voxbox.py, mindie.py) and one for
`custom:NAME` backends (custom.py); what they share is in base.py. llamacpp_server.py is the program
the llama.cpp backend runs (our wrapper around xllamacpp). A new backend: a module here, its line in
BACKENDS, its traits in server/schemas/backend_traits.py.
"""

from __future__ import annotations

from agent.backends.base import (GPU_KINDS, IMAGE_VARIABLES, IMAGES, BackendError, LaunchContext, LaunchSpec,
                                 custom_name, device_kind, has_module, image_for, image_overrides,
                                 missing_requirement, python_overrides, with_tag)
from agent.backends.custom import custom
from agent.backends.llamacpp import llama_cpp
from agent.backends.mindie import MINDIE_DAEMON, mindie, mindie_config
from agent.backends.sglang import sglang
from agent.backends.vllm import vllm
from agent.backends.voxbox import voxbox
from server.schemas import BackendDefinition, InstanceOut
from server.schemas.backend_traits import (LLAMACPP_METRICS, MINDIE_METRICS, SGLANG_METRICS, VLLM_METRICS,
                                           describe, launch_problems, template_problem)

__all__ = ["BACKENDS", "GPU_KINDS", "IMAGES", "IMAGE_VARIABLES", "LLAMACPP_METRICS", "MINDIE_DAEMON", "MINDIE_METRICS",
           "SGLANG_METRICS", "VLLM_METRICS", "BackendDefinition", "BackendError", "LaunchContext", "LaunchSpec",
           "build_launch", "custom", "custom_name", "device_kind", "has_module", "image_for", "image_overrides",
           "llama_cpp", "mindie", "mindie_config", "missing_requirement", "python_overrides", "sglang", "vllm",
           "voxbox", "with_tag"]

BACKENDS = {"llama.cpp": llama_cpp, "vllm": vllm, "sglang": sglang, "vox-box": voxbox, "mindie": mindie}


def _with_secrets(instance: InstanceOut, context: LaunchContext) -> InstanceOut:
    """The instance with each {secret: NAME} env value replaced by the value the server gave (only in
    this launch: nothing stored holds it)."""
    env = instance.spec.env
    if all(isinstance(value, str) for value in env.values()):
        return instance
    plain = {}
    for name, value in env.items():
        if isinstance(value, str):
            plain[name] = value
        elif name in context.secrets:
            plain[name] = context.secrets[name]
        else:
            raise BackendError(f"env {name}: the secret {value.secret!r} was not given to this agent")
    return instance.model_copy(update={"spec": instance.spec.model_copy(update={"env": plain})})


def build_launch(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    """The launch of `instance`, after the checks no spec may fail (the server made them when the spec
    was stored; a spec from before them, or written by hand, stops here)."""
    if problems := launch_problems(instance.spec):
        raise BackendError(f"refused by the agent's spec rules: {describe(problems)}")
    instance = _with_secrets(instance, context)
    backend = instance.spec.backend
    if custom_name(backend) is not None:
        if context.custom is not None and (problem := template_problem(context.custom.command)):
            raise BackendError(f"backend {backend}: {problem}")
        return custom(instance, context)
    try:
        build = BACKENDS[backend]
    except KeyError:
        raise BackendError(f"this agent cannot run backend {backend!r}") from None
    return build(instance, context)
