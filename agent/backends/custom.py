"""A `custom:NAME` backend: the command template of its definition on the server (`maas backend add -f FILE`)."""

from __future__ import annotations

from agent.backends.base import BackendError, LaunchContext, LaunchSpec, gpu_env
from server.schemas import InstanceOut


def custom(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    definition = context.custom
    if definition is None:
        raise BackendError(f"backend {instance.spec.backend!r} is not registered on the server "
                           "(`maas backend list` shows the registered ones)")
    claim = instance.claim
    gpus = ",".join(str(i) for i in claim.gpu_indexes) if claim and claim.device == "gpu" else ""
    values = {"model_path": instance.spec.source, "port": str(context.port), "host": context.host,
              "model_name": instance.model_name, "gpus": gpus, "instance_name": instance.name,
              "ray_address": context.ray_address}
    try:
        command = [part.format_map(values) for part in definition.command]
        env = {key: value.format_map(values) for key, value in definition.env.items()}
        image = definition.image.format_map(values) if definition.image else None
    except (KeyError, ValueError, IndexError) as exc:
        raise BackendError(f"backend {definition.name}: bad command template ({exc})") from None
    return LaunchSpec(command=command + list(instance.spec.args),
                      env={**gpu_env(instance, context), **env, **instance.spec.env},
                      health_path=definition.health_path, metrics_path=definition.metrics_path,
                      metrics=dict(definition.metrics), image=image, requires=("executable", command[0]),
                      container_command=command + list(instance.spec.args))
