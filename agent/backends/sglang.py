"""SGLang: its launch_server, from the backend's own Python (MAAS_SGLANG_PYTHON) or its image."""

from __future__ import annotations

from agent.backends.base import LaunchContext, LaunchSpec, gpu_env, parallel_sizes, device_kind, image_for
from server.schemas import InstanceOut
from server.schemas.backend_traits import SGLANG_METRICS


def sglang(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    spec, claim = instance.spec, instance.claim
    python = context.python_for("sglang")
    command = [python, "-m", "sglang.launch_server", "--model-path", spec.source,
               "--served-model-name", instance.model_name, "--host", context.host, "--port", str(context.port),
               "--enable-metrics"]
    tp, pp, multi_host = parallel_sizes(instance)
    if tp > 1:
        command += ["--tp-size", str(tp)]
    if pp > 1:
        command += ["--pp-size", str(pp)]
    if claim and claim.gpu_memory_utilization is not None:
        command += ["--mem-fraction-static", f"{claim.gpu_memory_utilization:g}"]
    if spec.max_model_len is not None:
        command += ["--context-length", str(spec.max_model_len)]
    return LaunchSpec(command=command + list(spec.args), env={**gpu_env(instance, context), **spec.env},
                      health_path="/health", metrics_path="/metrics", metrics=dict(SGLANG_METRICS),
                      image=image_for("sglang", device_kind(instance, context), spec.backend_version, context),
                      container_command=["python3", *command[1:], *spec.args],
                      requires=("module", python, "sglang"))
