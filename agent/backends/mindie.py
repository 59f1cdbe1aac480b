"""MindIE Service on Ascend NPUs."""

from __future__ import annotations

import json

from agent.backends.base import LaunchContext, LaunchSpec, image_for
from server.schemas import InstanceOut
from server.schemas.backend_traits import MINDIE_METRICS


MINDIE_DAEMON = "/usr/local/Ascend/mindie/latest/mindie-service/bin/mindieservice_daemon"


def mindie_config(instance: InstanceOut, context: LaunchContext) -> dict:
    """The part of MindIE's config.json that depends on the instance; MindIE's defaults cover the rest."""
    spec, claim = instance.spec, instance.claim
    devices = len(claim.gpu_indexes) if claim and claim.device == "gpu" and claim.gpu_indexes else 1
    max_len = spec.context_length
    return {
        "ServerConfig": {"ipAddress": context.host, "port": context.port, "managementIpAddress": context.host,
                         "managementPort": context.port, "metricsPort": context.port, "allowAllZeroIpListening": True,
                         "httpsEnabled": False, "interCommTLSEnabled": False},
        "BackendConfig": {
            # ASCEND_RT_VISIBLE_DEVICES renumbers the claimed NPUs from 0, as CUDA_VISIBLE_DEVICES does GPUs.
            "npuDeviceIds": [list(range(devices))], "multiNodesInferEnabled": False, "interNodeTLSEnabled": False,
            "ModelDeployConfig": {
                "maxSeqLen": max_len, "maxInputTokenLen": max_len, "truncation": False,
                "ModelConfig": [{"modelInstanceType": "Standard", "modelName": instance.model_name,
                                 "modelWeightPath": spec.source, "worldSize": devices, "backendType": "atb",
                                 "trustRemoteCode": False}]},
            "ScheduleConfig": {"maxIterTimes": max_len, "maxPrefillTokens": max_len},
        },
    }


def mindie(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    """MindIE Service on Ascend NPUs: its daemon reads a config file, which the launch writes first."""
    spec, claim = instance.spec, instance.claim
    env: dict[str, str] = {"MAAS_MINDIE_CONFIG": json.dumps(mindie_config(instance, context), sort_keys=True),
                           "MIES_CONFIG_JSON_PATH": f"/tmp/maas-mindie-{instance.name}.json",
                           "MIES_SERVICE_MONITOR_MODE": "1"}  # expose /metrics
    if claim and claim.device == "gpu" and claim.gpu_indexes and context.real_gpus:
        env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(i) for i in claim.gpu_indexes)
    # The daemon takes no flags: the config goes through a file named by MIES_CONFIG_JSON_PATH.
    script = 'printf %s "$MAAS_MINDIE_CONFIG" > "$MIES_CONFIG_JSON_PATH" && exec "$0" "$@"'
    command = ["/bin/sh", "-c", script, MINDIE_DAEMON, *spec.args]
    return LaunchSpec(command=command, env={**env, **spec.env}, health_path="/v1/models", metrics_path="/metrics",
                      metrics=dict(MINDIE_METRICS),
                      image=image_for("mindie", "ascend", spec.backend_version, context),
                      container_command=command, requires=("executable", MINDIE_DAEMON), accelerator="ascend")
