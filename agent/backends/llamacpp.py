"""llama.cpp: our xllamacpp wrapper (llamacpp_server.py) as a process; upstream llama-server in a container."""

from __future__ import annotations

from agent.backends.base import LaunchContext, LaunchSpec, gpu_env, device_kind, image_for
from server.schemas import InstanceOut
from server.schemas.backend_traits import LLAMACPP_METRICS


def llama_cpp(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    spec, claim = instance.spec, instance.claim
    command = [context.python_for("llama.cpp"), "-m", "agent.backends.llamacpp_server", "--model", spec.source,
               "--alias", instance.model_name, "--host", context.host, "--port", str(context.port),
               "--ctx-size", str(spec.context_length)]
    if claim and claim.device == "gpu" and context.real_gpus:
        layers = claim.gpu_layers if claim.gpu_layers is not None else 999  # 999: every layer
        command += ["--n-gpu-layers", str(layers)]
    # The official image's entrypoint is llama-server itself, which takes the same flags (our wrapper too).
    container = ["--model", spec.source, "--alias", instance.model_name, "--host", context.host,
                 "--port", str(context.port), "--ctx-size", str(spec.context_length), "--metrics"]
    if claim and claim.device == "gpu":
        container += ["--n-gpu-layers", str(claim.gpu_layers if claim.gpu_layers is not None else 999)]
    key = {"LLAMA_API_KEY": context.api_key} if context.api_key else {}  # our wrapper and llama-server read it
    return LaunchSpec(command=command + list(spec.args), env={**gpu_env(instance, context), **spec.env, **key},
                      api_key=context.api_key,
                      health_path="/health", metrics_path="/metrics", metrics=dict(LLAMACPP_METRICS),
                      image=image_for("llama.cpp", device_kind(instance, context), spec.backend_version, context),
                      container_command=container + list(spec.args),
                      requires=("module", context.python_for("llama.cpp"), "xllamacpp"))
