"""Backends as data: the exact argv, environment, health path and metrics map for each backend
and claim shape. No engine is started here."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from agent.backends import (LLAMACPP_METRICS, BackendError, LaunchContext, build_launch, missing_requirement,
                            python_overrides)
from server.schemas import BackendDefinition, InstanceOut, ModelSpec, ResourceClaim, SubordinateClaim

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def instance(backend: str, claim: ResourceClaim | None = None, **spec: object) -> InstanceOut:
    source = spec.pop("source", "/models/m.gguf" if backend == "llama.cpp" else "/models/llama-8b")
    return InstanceOut(id=7, name="m-7", model_id=1, model_name="m", generation=1,
                       spec=ModelSpec(source=source, backend=backend, **spec), state="scheduled",
                       claim=claim, created_at=NOW, updated_at=NOW)


CTX = LaunchContext(host="10.0.0.5", port=20001, python={"vllm": "/opt/vllm/bin/python", "sglang": "/opt/sg/bin/python"})


def test_vllm_single_gpu():
    claim = ResourceClaim(device="gpu", gpu_indexes=[3], vram_bytes_per_gpu=20 * 10**9, gpu_memory_utilization=0.25)
    launch = build_launch(instance("vllm", claim, max_model_len=8192, args=["--dtype", "bfloat16"]), CTX)
    assert launch.command == [
        "/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/llama-8b",
        "--served-model-name", "m", "--host", "10.0.0.5", "--port", "20001",
        "--gpu-memory-utilization", "0.25", "--max-model-len", "8192", "--dtype", "bfloat16"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "3"}
    assert launch.health_path == "/health" and launch.metrics_path == "/metrics"
    assert launch.metrics["vllm:num_requests_running"] == "requests_running"
    assert launch.requires == ("module", "/opt/vllm/bin/python", "vllm")
    assert launch.image == "vllm/vllm-openai:latest"


def test_vllm_tensor_and_pipeline_parallel_over_ray():
    claim = ResourceClaim(device="gpu", gpu_indexes=[0, 1, 2, 3], tensor_parallel_size=4, pipeline_parallel_size=2,
                          gpu_memory_utilization=0.9,
                          subordinate_workers=[SubordinateClaim(worker_id=2, worker_name="b", gpu_indexes=[0, 1, 2, 3])])
    launch = build_launch(instance("vllm", claim, distributed=True, env={"HF_HOME": "/cache"}), CTX)
    args = launch.command[launch.command.index("--port") + 2:]
    assert args == ["--tensor-parallel-size", "4", "--pipeline-parallel-size", "2",
                    "--distributed-executor-backend", "ray", "--gpu-memory-utilization", "0.9"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "HF_HOME": "/cache"}


def test_sglang_flags():
    claim = ResourceClaim(device="gpu", gpu_indexes=[4, 5], tensor_parallel_size=2, gpu_memory_utilization=0.6)
    launch = build_launch(instance("sglang", claim, max_model_len=4096), CTX)
    assert launch.command == [
        "/opt/sg/bin/python", "-m", "sglang.launch_server", "--model-path", "/models/llama-8b",
        "--served-model-name", "m", "--host", "10.0.0.5", "--port", "20001", "--enable-metrics",
        "--tp-size", "2", "--mem-fraction-static", "0.6", "--context-length", "4096"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "4,5"}
    assert launch.metrics["sglang:num_queue_reqs"] == "requests_waiting"


@pytest.mark.parametrize("claim, layers, env", [
    (None, None, {}),
    (ResourceClaim(device="cpu", ram_bytes=10**9), None, {}),
    (ResourceClaim(device="gpu", gpu_indexes=[1], vram_bytes_per_gpu=10**9), "999", {"CUDA_VISIBLE_DEVICES": "1"}),
    (ResourceClaim(device="gpu", gpu_indexes=[0], vram_bytes_per_gpu=10**9, gpu_layers=20), "20",
     {"CUDA_VISIBLE_DEVICES": "0"}),
])
def test_llama_cpp_gpu_layers_from_the_claim(claim, layers, env):
    launch = build_launch(instance("llama.cpp", claim, context_length=4096, args=["--parallel", "2"]), CTX)
    expected = [sys.executable, "-m", "agent.backends.llamacpp_server", "--model", "/models/m.gguf", "--alias", "m",
                "--host", "10.0.0.5", "--port", "20001", "--ctx-size", "4096"]
    expected += ["--n-gpu-layers", layers] if layers else []
    assert launch.command == expected + ["--parallel", "2"]
    assert launch.env == env
    assert launch.metrics == LLAMACPP_METRICS


def test_simulated_gpus_are_never_pinned():
    claim = ResourceClaim(device="gpu", gpu_indexes=[1], vram_bytes_per_gpu=10**9)
    launch = build_launch(instance("llama.cpp", claim), LaunchContext(host="127.0.0.1", port=1, real_gpus=False))
    assert "--n-gpu-layers" not in launch.command and launch.env == {}


TGI = {"name": "tgi", "command": "text-generation-launcher --model-id {model_path} --hostname {host} --port {port} "
       "--served-model-name {model_name}", "env": {"CUDA_VISIBLE_DEVICES": "{gpus}", "X": "{instance_name}"},
       "health_path": "/health", "metrics": {"tgi_queue_size": "requests_waiting"}, "image": "ghcr.io/hf/tgi:3"}


def test_custom_backend_template():
    definition = BackendDefinition.model_validate(TGI)
    claim = ResourceClaim(device="gpu", gpu_indexes=[2, 3], tensor_parallel_size=2)
    context = LaunchContext(host="0.0.0.0", port=20002, custom=definition)
    launch = build_launch(instance("custom:tgi", claim, memory_bytes=10**9, source="org/model", args=["--x", "1"]),
                          context)
    assert launch.command == ["text-generation-launcher", "--model-id", "org/model", "--hostname", "0.0.0.0",
                              "--port", "20002", "--served-model-name", "m", "--x", "1"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "2,3", "X": "m-7"}
    assert launch.metrics == {"tgi_queue_size": "requests_waiting"} and launch.image == "ghcr.io/hf/tgi:3"
    assert launch.requires == ("executable", "text-generation-launcher")
    assert "not on this host's PATH" in missing_requirement("custom:tgi", launch)


def test_custom_backend_unregistered_is_an_error():
    with pytest.raises(BackendError, match="not registered"):
        build_launch(instance("custom:nope", memory_bytes=10**9), CTX)


@pytest.mark.parametrize("change, message", [
    ({"command": "serve {model} --port {port}"}, "unknown placeholder {model}"),
    ({"metrics": {"x": "not_a_metric"}}, "not one of"),
    ({"name": "Bad Name"}, "name"),
    ({"health_path": "health"}, "health_path"),
    ({"command": []}, "command"),
])
def test_custom_backend_definition_is_validated(change, message):
    with pytest.raises(ValidationError, match=message):
        BackendDefinition.model_validate(TGI | change)


def test_backend_names_in_model_specs():
    ModelSpec(source="x", backend="custom:tgi")
    with pytest.raises(ValidationError, match="custom:NAME"):
        ModelSpec(source="x", backend="tgi")


def test_uninstalled_backend_is_reported():
    launch = build_launch(instance("vllm", ResourceClaim(device="gpu", gpu_indexes=[0])),
                          LaunchContext(host="h", port=1))  # this venv's Python: no vLLM here
    message = missing_requirement("vllm", launch)
    assert "not installed on this host" in message and "MAAS_VLLM_PYTHON" in message
    launch.requires = ("module", "/nonexistent/python", "vllm")
    assert "does not exist" in missing_requirement("vllm", launch)
    llama = build_launch(instance("llama.cpp"), LaunchContext(host="h", port=1))
    assert missing_requirement("llama.cpp", llama) is None


def test_python_overrides_from_the_environment():
    assert python_overrides({"MAAS_VLLM_PYTHON": "/v/bin/python", "MAAS_SGLANG_PYTHON": ""}) == {"vllm": "/v/bin/python"}


# --- VoxBox (speech) and MindIE (Ascend NPUs) ---------------------------------------------


def test_voxbox_on_a_gpu():
    claim = ResourceClaim(device="gpu", gpu_indexes=[2], vram_bytes_per_gpu=4 * 10**9)
    launch = build_launch(instance("vox-box", claim, source="/models/faster-whisper-small",
                                   args=["--data-dir", "/var/cache/vox"]), CTX)
    assert launch.command == ["vox-box", "start", "--model", "/models/faster-whisper-small", "--host", "10.0.0.5",
                              "--port", "20001", "--device", "cuda:0", "--data-dir", "/var/cache/vox"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "2"}  # the pinned GPU is the process's cuda:0
    assert launch.health_path == "/health" and launch.metrics_path is None and launch.metrics == {}
    assert launch.image == "gpustack/vox-box:latest" and launch.container_command == launch.command
    assert launch.requires == ("executable", "vox-box")


def test_voxbox_on_cpu():
    launch = build_launch(instance("vox-box", ResourceClaim(device="cpu", ram_bytes=10**9), source="/models/tts",
                                   backend_version="0.0.20"), CTX)
    assert launch.command[-2:] == ["--device", "cpu"] and launch.env == {}
    assert launch.image == "gpustack/vox-box:0.0.20"


def test_mindie_on_two_npus():
    import json

    from agent.backends import MINDIE_DAEMON

    claim = ResourceClaim(device="gpu", gpu_indexes=[4, 5], tensor_parallel_size=2)
    launch = build_launch(instance("mindie", claim, source="/models/qwen2.5-7b", context_length=4096,
                                   env={"MINDIE_LOG_LEVEL": "INFO"}), CTX)
    assert launch.command == ["/bin/sh", "-c",
                              'printf %s "$MAAS_MINDIE_CONFIG" > "$MIES_CONFIG_JSON_PATH" && exec "$0" "$@"',
                              MINDIE_DAEMON]
    config = json.loads(launch.env.pop("MAAS_MINDIE_CONFIG"))
    assert launch.env == {"MIES_CONFIG_JSON_PATH": "/tmp/maas-mindie-m-7.json", "MIES_SERVICE_MONITOR_MODE": "1",
                          "ASCEND_RT_VISIBLE_DEVICES": "4,5", "MINDIE_LOG_LEVEL": "INFO"}  # never CUDA_*
    assert config["ServerConfig"]["ipAddress"] == "10.0.0.5" and config["ServerConfig"]["port"] == 20001
    backend = config["BackendConfig"]
    assert backend["npuDeviceIds"] == [[0, 1]]  # renumbered by ASCEND_RT_VISIBLE_DEVICES
    assert backend["ModelDeployConfig"]["maxSeqLen"] == 4096
    assert backend["ModelDeployConfig"]["ModelConfig"] == [{
        "modelInstanceType": "Standard", "modelName": "m", "modelWeightPath": "/models/qwen2.5-7b", "worldSize": 2,
        "backendType": "atb", "trustRemoteCode": False}]
    assert launch.health_path == "/v1/models" and launch.metrics["num_requests_running"] == "requests_running"
    assert launch.image.startswith("ascendhub.huawei.com/public-ascendhub/mindie:")
    assert launch.requires == ("executable", MINDIE_DAEMON)


def test_mindie_launch_writes_its_config_then_runs_the_daemon(tmp_path):
    """The shell step for real: the config lands in the file MindIE reads, then the daemon (here `echo`) runs."""
    import json
    import os
    import subprocess

    launch = build_launch(instance("mindie", ResourceClaim(device="gpu", gpu_indexes=[0]), source="/m"), CTX)
    env = {**os.environ, **launch.env, "MIES_CONFIG_JSON_PATH": str(tmp_path / "config.json")}
    done = subprocess.run([*launch.command[:3], "echo", "daemon started"], env=env, capture_output=True, text=True,
                          timeout=10)
    assert done.stdout == "daemon started\n"
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(launch.env["MAAS_MINDIE_CONFIG"])


def test_new_backends_are_known_to_the_server():
    from server.schemas import KNOWN_BACKENDS

    assert {"vox-box", "mindie"} <= set(KNOWN_BACKENDS)


def test_every_known_backend_is_listed_and_built():
    """`maas backend list` (the server's table) and the agent's builders cover the same names."""
    from agent.backends import BACKENDS
    from server.api.backends import BUILTIN
    from server.schemas import KNOWN_BACKENDS

    assert [b.name for b in BUILTIN] == list(KNOWN_BACKENDS)
    assert set(BACKENDS) == set(KNOWN_BACKENDS)
