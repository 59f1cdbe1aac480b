"""VoxBox: OpenAI-compatible speech-to-text and text-to-speech."""

from __future__ import annotations

from agent.backends.base import LaunchContext, LaunchSpec, gpu_env, device_kind, image_for
from server.schemas import InstanceOut


def voxbox(instance: InstanceOut, context: LaunchContext) -> LaunchSpec:
    """VoxBox: OpenAI-compatible speech-to-text and text-to-speech (Whisper, FunASR, CosyVoice...)."""
    spec, claim = instance.spec, instance.claim
    on_gpu = claim is not None and claim.device == "gpu" and bool(claim.gpu_indexes)
    # CUDA_VISIBLE_DEVICES pins the claimed GPU, which the process then sees as its first device.
    device = "cuda:0" if on_gpu else "cpu"
    command = ["vox-box", "start", "--model", spec.source, "--host", context.host, "--port", str(context.port),
               "--device", device]
    return LaunchSpec(command=command + list(spec.args), env={**gpu_env(instance, context), **spec.env},
                      health_path="/health", metrics_path=None, metrics={},
                      image=image_for("vox-box", device_kind(instance, context), spec.backend_version, context),
                      container_command=command + list(spec.args), requires=("executable", "vox-box"))
