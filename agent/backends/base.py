"""What every backend's launch is made of: the LaunchSpec it returns, the LaunchContext it is built in,
the container images per device kind, and whether this host can run a launch as a process.

Each built-in backend has a module of its own (llamacpp.py, vllm.py, sglang.py, voxbox.py, mindie.py,
custom.py); `agent/backends/__init__.py` assembles them into BACKENDS and builds launches.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from server.schemas import CUSTOM_BACKEND_PREFIX, BackendDefinition, InstanceOut


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


# --- shared by the builders ----------------------------------------------------------


def gpu_env(instance: InstanceOut, context: LaunchContext) -> dict[str, str]:
    claim = instance.claim
    if claim and claim.device == "gpu" and claim.gpu_indexes and context.real_gpus:
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in claim.gpu_indexes)}
    return {}


def parallel_sizes(instance: InstanceOut) -> tuple[int, int, bool]:
    claim = instance.claim
    if claim is None:
        return 1, 1, False
    return claim.tensor_parallel_size, claim.pipeline_parallel_size, bool(claim.subordinate_workers)


def custom_name(backend: str) -> str | None:
    """`custom:tgi` -> `tgi`; None for a built-in backend."""
    return backend[len(CUSTOM_BACKEND_PREFIX):] if backend.startswith(CUSTOM_BACKEND_PREFIX) else None



# --- can this host run it? ------------------------------------------------------------

_found_modules: set[tuple[str, str]] = set()  # only successes are kept: an install later is noticed


def has_module(python: str, module: str) -> bool:
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
        if not has_module(python, module):
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
