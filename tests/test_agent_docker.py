"""The docker runtime as data: the exact container specification per backend, the image per device kind,
the runtime choice of `--runtime auto`, and the thin engine calls against a stand-in docker client.

Nothing here needs or asks a Docker engine (the suite gives the same result with one or without); the real
engine, registry and containers are tests/test_docker_engine.py (`make test-docker`). GPU device requests
(NVIDIA `DeviceRequest`s, Ascend device nodes) cannot run on a machine without GPUs and a GPU container
runtime: they are checked here as data only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

from agent.agent import Agent, AgentConfig, make_runtimes
from agent.backends import BackendDefinition, BackendError, LaunchContext, build_launch, image_for, with_tag
from agent.runtimes import ProcessRuntime, StartRequest
from agent.runtimes.choice import RuntimeChooser
from agent.runtimes.docker import ContainerOptions, DockerRuntime, PullProgress, container_spec, split_image
from server.schemas import GPUDevice, ResourceClaim
from test_backends import instance

GPUS = [GPUDevice(index=i, name="H100", uuid=f"GPU-{i}", memory_total=80 * 10**9) for i in range(4)]
OPTIONS = ContainerOptions(worker="w1", model_cache=Path("/var/lib/maas/models"), shm_size="8g")
CTX = LaunchContext(host="10.0.0.5", port=20001)


def spec_for(inst, gpus=GPUS, context=CTX):
    launch = build_launch(inst, context)
    return container_spec(inst, launch.image, launch.container_command, launch.env, gpus, OPTIONS,
                          accelerator=launch.accelerator)


def test_vllm_container_spec():
    claim = ResourceClaim(device="gpu", gpu_indexes=[2, 3], tensor_parallel_size=2, gpu_memory_utilization=0.85)
    inst = instance("vllm", claim, source="meta-llama/Llama-3.1-8B-Instruct", max_model_len=8192,
                    backend_version="v0.11.0", env={"HF_TOKEN": "t"})
    assert spec_for(inst) == {
        "image": "vllm/vllm-openai:v0.11.0",
        "command": ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "m", "--host", "10.0.0.5",
                    "--port", "20001", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85",
                    "--max-model-len", "8192"],
        "name": "maas-m-7-7",
        "detach": True,
        "environment": {"HF_TOKEN": "t", "HF_HOME": "/var/lib/maas/models/huggingface"},  # no host CUDA pin inside
        "labels": {"maas.managed": "true", "maas.instance-id": "7", "maas.instance": "m-7", "maas.model": "m",
                   "maas.generation": "1", "maas.restart-count": "0", "maas.worker": "w1"},
        "network_mode": "host",
        "ipc_mode": "host",
        "shm_size": "8g",
        "device_requests": [{"Driver": "nvidia", "DeviceIDs": ["GPU-2", "GPU-3"], "Capabilities": [["gpu"]],
                             "Count": 0, "Options": {}}],
        # The model cache at the same path inside: commands name snapshot paths, whose files link into blobs.
        "volumes": {"/var/lib/maas/models": {"bind": "/var/lib/maas/models", "mode": "rw"}},
        "restart_policy": {"Name": "no"},
    }


def test_sglang_container_command_and_index_fallback():
    claim = ResourceClaim(device="gpu", gpu_indexes=[1], gpu_memory_utilization=0.5)
    spec = spec_for(instance("sglang", claim, source="/models/qwen"), gpus=[])  # inventory without UUIDs
    assert spec["image"] == "lmsysorg/sglang:latest"
    assert spec["command"][:3] == ["python3", "-m", "sglang.launch_server"]
    assert spec["command"][3:5] == ["--model-path", "/models/qwen"]
    assert spec["device_requests"][0]["DeviceIDs"] == ["1"]
    assert spec["volumes"]["/models/qwen"] == {"bind": "/models/qwen", "mode": "ro"}  # the local model, read-only


def test_llama_cpp_container_on_cpu_and_gpu():
    cpu = spec_for(instance("llama.cpp", ResourceClaim(device="cpu", ram_bytes=1), context_length=4096))
    assert cpu["image"] == "ghcr.io/ggml-org/llama.cpp:server"  # the CPU image for a claim without GPUs
    assert cpu["command"] == ["--model", "/models/m.gguf", "--alias", "m", "--host", "10.0.0.5", "--port", "20001",
                              "--ctx-size", "4096", "--metrics"]
    assert cpu["device_requests"] == []
    assert cpu["volumes"]["/models/m.gguf"]["mode"] == "ro"
    gpu = spec_for(instance("llama.cpp", ResourceClaim(device="gpu", gpu_indexes=[0], gpu_layers=12)))
    assert gpu["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda"
    assert gpu["command"][-2:] == ["--n-gpu-layers", "12"]
    assert gpu["device_requests"][0]["DeviceIDs"] == ["GPU-0"]


@pytest.mark.parametrize("backend, kind, version, image", [
    ("llama.cpp", "cpu", None, "ghcr.io/ggml-org/llama.cpp:server"),
    ("llama.cpp", "cuda", None, "ghcr.io/ggml-org/llama.cpp:server-cuda"),
    ("llama.cpp", "rocm", "server-rocm-b6000", "ghcr.io/ggml-org/llama.cpp:server-rocm-b6000"),
    ("llama.cpp", "ascend", None, None),  # no published CANN image: natively, or MAAS_LLAMACPP_IMAGE
    ("vllm", "cpu", "v0.11.0", "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.11.0"),
    ("vllm", "cuda", None, "vllm/vllm-openai:latest"),
    ("vllm", "rocm", None, "rocm/vllm:latest"),
    ("vllm", "ascend", None, "quay.io/ascend/vllm-ascend:latest"),
    ("sglang", "cpu", None, None),
])
def test_the_image_follows_the_devices(backend: str, kind: str, version: str | None, image: str | None):
    assert image_for(backend, kind, version, CTX) == image


def test_an_agents_image_override_keeps_the_specs_tag():
    context = LaunchContext(host="127.0.0.1", port=20001, images={"llama.cpp": "127.0.0.1:5000/maas/llama:cpu"})
    assert image_for("llama.cpp", "cuda", None, context) == "127.0.0.1:5000/maas/llama:cpu"
    assert image_for("llama.cpp", "cpu", "b6000", context) == "127.0.0.1:5000/maas/llama:b6000"
    assert with_tag("registry.local:5000/team/img", "2") == "registry.local:5000/team/img:2"
    assert with_tag("img@sha256:abcd", "3") == "img:3"


async def test_the_gpu_kind_comes_from_the_claimed_gpus(tmp_path: Path):
    agent = Agent(AgentConfig(server_url="http://x", token="t", data_dir=tmp_path, simulate_gpus="1xL4-24GB"))
    assert await agent.serving.gpu_kind(instance("vllm", ResourceClaim(device="gpu", gpu_indexes=[0]))) == "cuda"
    agent.gpus.simulated[0] = agent.gpus.simulated[0].model_copy(update={"vendor": "amd"})
    inst = instance("llama.cpp", ResourceClaim(device="gpu", gpu_indexes=[0]))
    context = LaunchContext(host="127.0.0.1", port=20001, gpu_kind=await agent.serving.gpu_kind(inst))
    assert build_launch(inst, context).image == "ghcr.io/ggml-org/llama.cpp:server-rocm"


def test_custom_backend_container():
    definition = BackendDefinition(name="tgi", image="ghcr.io/huggingface/text-generation-inference:3",
                                   command=["--model-id", "{model_path}", "--port", "{port}"])
    inst = instance("custom:tgi", ResourceClaim(device="gpu", gpu_indexes=[0, 1]), memory_bytes=1, source="org/m")
    spec = spec_for(inst, context=LaunchContext(host="0.0.0.0", port=20009, custom=definition))
    assert spec["image"] == "ghcr.io/huggingface/text-generation-inference:3"
    assert spec["command"] == ["--model-id", "org/m", "--port", "20009"]
    assert spec["device_requests"][0]["DeviceIDs"] == ["GPU-0", "GPU-1"]


def test_runtime_selection_without_an_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """'No engine' made explicit: DOCKER_HOST names a socket nothing listens on (whatever runs on this machine)."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    config = AgentConfig(server_url="http://x", token="t", data_dir=tmp_path)
    chooser = make_runtimes(config)  # the default for in-process agents: processes only
    assert chooser.mode == "process" and chooser.docker is None
    config.runtime = "auto"
    chooser = make_runtimes(config)
    assert chooser.docker is None and f"no Docker engine answers at unix://{tmp_path}/no-engine.sock" in chooser.no_docker
    config.runtime = "docker"
    with pytest.raises(docker.errors.DockerException):
        make_runtimes(config)
    config.runtime = "containers"
    with pytest.raises(ValueError, match="auto, docker or process"):
        make_runtimes(config)


class ChoiceEngine:
    """A stand-in engine for the choice: which images it holds, which its registries would serve."""

    name = "docker"

    def __init__(self, here: set[str], pullable: set[str]):
        self.here, self.pullable, self.asked = here, pullable, []

    def image_here(self, image: str) -> bool:
        return image in self.here

    def pull_problem(self, image: str) -> str | None:
        self.asked.append(image)
        return None if image in self.pullable else f"Get \"https://{image.split('/')[0]}/v2/\": no such host"


async def test_auto_takes_docker_only_with_an_image_for_this_host(tmp_path: Path):
    processes = ProcessRuntime(tmp_path / "run")
    engine = ChoiceEngine(here={"ghcr.io/ggml-org/llama.cpp:server"}, pullable={"vllm/vllm-openai:latest"})
    chooser = RuntimeChooser("auto", processes, engine)
    cpu_llama = build_launch(instance("llama.cpp", ResourceClaim(device="cpu", ram_bytes=1)), CTX)
    choice = await chooser.choose("llama.cpp", cpu_llama)
    assert choice.runtime is engine and choice.reason == "image ghcr.io/ggml-org/llama.cpp:server is on this worker's Docker engine"
    assert engine.asked == []  # present: no registry asked
    gpu_vllm = build_launch(instance("vllm", ResourceClaim(device="gpu", gpu_indexes=[0])), CTX)
    choice = await chooser.choose("vllm", gpu_vllm)
    assert choice.runtime is engine and choice.reason == "image vllm/vllm-openai:latest can be pulled from its registry"

    # The CUDA image of llama.cpp is neither here nor pullable: llama.cpp runs natively (xllamacpp is installed).
    gpu_llama = build_launch(instance("llama.cpp", ResourceClaim(device="gpu", gpu_indexes=[0])),
                             LaunchContext(host="127.0.0.1", port=20001))
    choice = await chooser.choose("llama.cpp", gpu_llama)
    assert choice.runtime is processes
    assert choice.reason.startswith("image ghcr.io/ggml-org/llama.cpp:server-cuda is not on this worker's engine "
                                    "and cannot be pulled (Get \"https://ghcr.io/v2/\": no such host)")
    assert choice.reason.endswith("; llama.cpp runs natively here")
    await chooser.choose("llama.cpp", gpu_llama)
    assert engine.asked.count("ghcr.io/ggml-org/llama.cpp:server-cuda") == 1  # the registry's answer holds a while

    # vLLM on CPU: no image anywhere and no vLLM in this Python: one message naming both ways.
    cpu_vllm = build_launch(instance("vllm", ResourceClaim(device="cpu", ram_bytes=1)),
                            LaunchContext(host="127.0.0.1", port=20001, python={"vllm": str(tmp_path / "nope")}))
    with pytest.raises(BackendError) as refused:
        await chooser.choose("vllm", cpu_vllm)
    message = str(refused.value)
    assert message.startswith("backend vllm cannot run on this worker: not in a container (image "
                              "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:latest is not on this worker's engine")
    assert "MAAS_VLLM_IMAGE" in message and f"the Python interpreter {tmp_path}/nope does not exist" in message
    assert message.endswith("`maas agent --runtime docker|process` forces one")


async def test_auto_without_an_engine_and_the_forced_modes(tmp_path: Path):
    processes = ProcessRuntime(tmp_path / "run")
    llama = build_launch(instance("llama.cpp", ResourceClaim(device="cpu", ram_bytes=1)), CTX)
    choice = await RuntimeChooser("auto", processes, None, "no Docker engine answers at unix:///x.sock").choose(
        "llama.cpp", llama)
    assert choice.runtime is processes
    assert choice.reason == "no Docker engine answers at unix:///x.sock; llama.cpp runs natively here"
    sglang = build_launch(instance("sglang", ResourceClaim(device="cpu", ram_bytes=1)), CTX)
    engine = ChoiceEngine(set(), set())
    with pytest.raises(BackendError, match="not in a container \\(backend sglang has no container image for this "
                                           "host's devices: .* and not as a process"):
        await RuntimeChooser("auto", processes, engine).choose("sglang", sglang)
    assert (await RuntimeChooser("docker", processes, engine).choose("sglang", sglang)).runtime is engine
    forced = await RuntimeChooser("process", processes, None).choose("sglang", sglang)
    assert forced.runtime is processes and forced.reason == "this agent runs with --runtime process"
    multi = await RuntimeChooser("auto", processes, engine).choose("vllm", llama, multi_host=True)
    assert multi.runtime is processes and "Ray nodes" in multi.reason


async def test_agent_builds_the_container_from_its_inventory(tmp_path: Path):
    config = AgentConfig(server_url="http://x", token="t", data_dir=tmp_path, name="w9", simulate_gpus="2xL4-24GB",
                         runtime="docker")
    agent = Agent(config, docker_client=FakeClient())
    inst = instance("vllm", ResourceClaim(device="gpu", gpu_indexes=[1]))
    launch = build_launch(inst, LaunchContext(host="127.0.0.1", port=20001))
    gpus = agent.gpus.read()
    spec = agent.runtimes.docker.container_for(StartRequest(inst, launch, 20001, tmp_path / "logs" / "1.log", gpus))
    assert spec["device_requests"][0]["DeviceIDs"] == [gpus[1].uuid]
    assert spec["labels"]["maas.worker"] == "w9" and spec["labels"]["maas.port"] == "20001"
    assert spec["volumes"][str(tmp_path / "models")]["bind"] == str(tmp_path / "models")


def test_a_downloaded_model_is_inside_the_mounted_cache():
    snapshot = "/var/lib/maas/models/huggingface/hub/models--acme--tiny/snapshots/0123abcd"
    spec = spec_for(instance("vllm", ResourceClaim(device="gpu", gpu_indexes=[0]), source=snapshot))
    assert spec["command"][:2] == ["--model", snapshot]
    assert spec["volumes"] == {"/var/lib/maas/models": {"bind": "/var/lib/maas/models", "mode": "rw"}}


class FakeContainer:
    def __init__(self, name: str, labels: dict[str, str]):
        self.name, self.labels, self.calls = name, labels, []
        self.attrs = {"State": {"Pid": 4242}}

    def reload(self): self.calls.append("reload")
    def logs(self, stream, follow): return iter([b"line 1\n", b"line 2\n"])
    def wait(self): return {"StatusCode": 3}
    def stop(self, timeout): self.calls.append(("stop", timeout))
    def remove(self, force): self.calls.append("remove")


class FakeContainers:
    def __init__(self):
        self.run_kwargs, self.existing = None, []

    def get(self, name):
        raise docker.errors.NotFound("no")

    def run(self, **kwargs):
        self.run_kwargs = kwargs
        self.container = FakeContainer(kwargs["name"], kwargs["labels"])
        return self.container

    def list(self, all, filters):
        self.filters = filters
        return self.existing


class FakeClient:
    def __init__(self):
        self.containers = FakeContainers()


async def test_docker_runtime_engine_calls_are_thin(tmp_path: Path):
    client = FakeClient()
    runtime = DockerRuntime(worker="w1", stop_grace=5, client=client)
    claim = ResourceClaim(device="gpu", gpu_indexes=[0])
    spec = spec_for(instance("vllm", claim))
    handle = await runtime.run_container("7", spec, tmp_path / "logs" / "7.log")
    kwargs = client.containers.run_kwargs
    assert isinstance(kwargs["device_requests"][0], docker.types.DeviceRequest)
    assert kwargs["device_requests"][0]["DeviceIDs"] == ["GPU-0"]
    assert {k: v for k, v in kwargs.items() if k != "device_requests"} == \
        {k: v for k, v in spec.items() if k != "device_requests"}
    assert handle.pid == 4242
    assert await runtime.wait(handle) == 3
    handle._follower.join(5)
    assert (tmp_path / "logs" / "7.log").read_bytes() == b"line 1\nline 2\n"
    await runtime.stop(handle)
    assert client.containers.container.calls[-2:] == [("stop", 5), "remove"]
    client.containers.existing = [FakeContainer("old", {})]
    assert runtime.clean_up_leftovers() == 1
    assert client.containers.filters == {"label": ["maas.managed=true", "maas.worker=w1"]}


# --- image pulls: progress from the engine's pull stream -------------------------------------

# The JSON lines `docker pull` streams (docker SDK `api.pull(..., stream=True, decode=True)`), as an
# engine sends them for a two-layer image, one layer already present.
PULL_STREAM = [
    {"status": "Pulling from vllm/vllm-openai", "id": "v0.11.0"},
    {"status": "Already exists", "progressDetail": {}, "id": "a1b2c3d4e5f6"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "0f1e2d3c4b5a"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "99aa88bb77cc"},
    {"status": "Waiting", "progressDetail": {}, "id": "99aa88bb77cc"},
    {"status": "Downloading", "progressDetail": {"current": 100, "total": 400},
     "progress": "[=====>        ]     100B/400B", "id": "0f1e2d3c4b5a"},
    {"status": "Downloading", "progressDetail": {"current": 300, "total": 600},
     "progress": "[=====>        ]     300B/600B", "id": "99aa88bb77cc"},
    {"status": "Downloading", "progressDetail": {"current": 400, "total": 400}, "id": "0f1e2d3c4b5a"},
    {"status": "Verifying Checksum", "progressDetail": {}, "id": "0f1e2d3c4b5a"},
    {"status": "Download complete", "progressDetail": {}, "id": "0f1e2d3c4b5a"},
    {"status": "Extracting", "progressDetail": {"current": 32768, "total": 400}, "id": "0f1e2d3c4b5a"},
    {"status": "Pull complete", "progressDetail": {}, "id": "0f1e2d3c4b5a"},
    {"status": "Download complete", "progressDetail": {}, "id": "99aa88bb77cc"},
    {"status": "Pull complete", "progressDetail": {}, "id": "99aa88bb77cc"},
    {"status": "Digest: sha256:4f2d8e1c"},
    {"status": "Status: Downloaded newer image for vllm/vllm-openai:v0.11.0"},
]


def test_pull_progress_follows_the_layers():
    progress = PullProgress()
    seen = []
    for event in PULL_STREAM:
        progress.feed(event)
        seen.append(progress.fraction())
    assert seen[0] is None  # the image line is about no layer
    # Two layers announced without sizes: never more than 99% while sizes are unknown.
    assert all(f is None or f <= 0.99 for f in seen[:6])
    assert seen[6] == pytest.approx(400 / 1000)  # 100 of 400 + 300 of 600 (the present layer weighs 0)
    assert seen[7] == pytest.approx(700 / 1000)
    assert seen[-3] == pytest.approx(1.0) and seen[-1] == 1.0
    assert [f for f in seen if f is not None] == sorted(f for f in seen if f is not None)
    assert progress.error is None


def test_pull_progress_keeps_the_engine_error():
    progress = PullProgress()
    progress.feed({"errorDetail": {"message": "manifest for vllm/vllm-openai:nope not found: manifest unknown"},
                   "error": "manifest for vllm/vllm-openai:nope not found: manifest unknown"})
    assert progress.error == "manifest for vllm/vllm-openai:nope not found: manifest unknown"


@pytest.mark.parametrize("image, parts", [
    ("vllm/vllm-openai:v0.11.0", ("vllm/vllm-openai", "v0.11.0")),
    ("gpustack/vox-box", ("gpustack/vox-box", "latest")),
    ("registry.local:5000/team/img", ("registry.local:5000/team/img", "latest")),
    ("registry.local:5000/team/img:1.2", ("registry.local:5000/team/img", "1.2")),
    ("img@sha256:abcd", ("img", "sha256:abcd")),
])
def test_split_image(image: str, parts: tuple[str, str]):
    assert split_image(image) == parts


class FakeImages:
    def __init__(self, present: set[str]):
        self.present = present

    def get(self, image):
        if image not in self.present:
            raise docker.errors.ImageNotFound("no such image")
        return object()


class FakeApi:
    def __init__(self, stream):
        self.stream, self.pulled = stream, []

    def pull(self, repository, tag, stream, decode):
        assert stream and decode
        self.pulled.append((repository, tag))
        return iter(self.stream)


async def test_docker_runtime_pull_reports_progress_once_per_percent():
    client = FakeClient()
    client.images, client.api = FakeImages({"here:1"}), FakeApi(PULL_STREAM)
    runtime = DockerRuntime(worker="w1", client=client)
    runtime.progress_interval = 0.01
    reports: list[float] = []

    async def note(fraction: float) -> None:
        reports.append(fraction)

    assert await runtime.pull("here:1", note) is False and reports == []  # present: nothing pulled
    assert await runtime.pull("vllm/vllm-openai:v0.11.0", note) is True
    assert client.api.pulled == [("vllm/vllm-openai", "v0.11.0")]
    assert reports[-1] == 1.0 and reports == sorted(reports)
    client.api = FakeApi([PULL_STREAM[0], {"error": "pull access denied", "errorDetail": {"message": "denied"}}])
    with pytest.raises(RuntimeError, match="cannot pull image private/x:1: denied"):
        await runtime.pull("private/x:1", note)


async def test_a_pull_that_times_out_fails_at_once_with_that_error():
    """A TimeoutError from the engine's stream is the pull's failure, not a pull still under way."""

    class TimingOutApi(FakeApi):
        def pull(self, repository, tag, stream, decode):
            raise TimeoutError("read timed out")

    client = FakeClient()
    client.images, client.api = FakeImages(set()), TimingOutApi([])
    runtime = DockerRuntime(worker="w1", client=client)
    runtime.progress_interval = 0.01
    reports: list[float] = []

    async def note(fraction: float) -> None:
        reports.append(fraction)

    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError, match="read timed out"):
            await runtime.pull("vllm/vllm-openai:v0.11.0", note)
    assert reports == []


def test_mindie_container_maps_the_claimed_npus():
    spec = spec_for(instance("mindie", ResourceClaim(device="gpu", gpu_indexes=[2, 3]), source="/models/qwen"))
    assert spec["device_requests"] == []  # no NVIDIA request for NPUs
    assert spec["devices"] == ["/dev/davinci2:/dev/davinci2:rwm", "/dev/davinci3:/dev/davinci3:rwm",
                               "/dev/davinci_manager:/dev/davinci_manager:rwm", "/dev/devmm_svm:/dev/devmm_svm:rwm",
                               "/dev/hisi_hdc:/dev/hisi_hdc:rwm"]
    assert "ASCEND_RT_VISIBLE_DEVICES" not in spec["environment"]  # renumbered from 0 inside
    assert spec["volumes"]["/usr/local/Ascend/driver/lib64"] == {"bind": "/usr/local/Ascend/driver/lib64", "mode": "ro"}


def test_voxbox_container():
    spec = spec_for(instance("vox-box", ResourceClaim(device="gpu", gpu_indexes=[1]), source="/models/whisper"))
    assert spec["image"] == "gpustack/vox-box:latest"
    assert spec["command"][:2] == ["vox-box", "start"]
    assert spec["device_requests"][0]["DeviceIDs"] == ["GPU-1"]


async def test_agent_reports_the_image_pull_as_downloading(server, admin, tmp_path: Path):
    """Through the real server and agent, the docker runtime on a stand-in engine: the pull shows as
    `downloading` with its fraction, then the container starts."""
    import threading

    from conftest import eventually

    halfway = threading.Event()  # the engine's stream pauses after the first layer's bytes until the test saw them

    class PausingApi(FakeApi):
        def pull(self, repository, tag, stream, decode):
            self.pulled.append((repository, tag))
            for n, event in enumerate(PULL_STREAM):
                if n == 8:
                    halfway.wait(30)
                yield event

    client = FakeClient()
    client.images, client.api = FakeImages(set()), PausingApi([])
    agent = Agent(AgentConfig(server_url=server.url, token=server.cluster_token or "", data_dir=tmp_path / "agent",
                              name="docker-1", simulate_gpus="1xL4-24GB", heartbeat_interval=1.0, health_timeout=1.0,
                              runtime="docker"), docker_client=client)
    agent.runtime.progress_interval = 0.05
    await agent.start()
    try:
        model_dir = tmp_path / "weights"
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")  # a Hugging Face folder, as vLLM's layout asks
        await admin.create_model({"name": "pulled", "source": str(model_dir), "backend": "vllm", "memory_bytes": 10**9})

        async def pulling() -> bool:
            found = await admin.list_instances("pulled")
            return bool(found) and found[0].state == "downloading" and (found[0].download_progress or 0) >= 0.4

        await eventually(pulling, timeout=30, message="the pull to show as downloading")
        [instance] = await admin.list_instances("pulled")
        assert "pulling image vllm/vllm-openai:latest" in instance.state_message
        assert instance.download_progress < 1.0
        halfway.set()

        async def started() -> bool:
            return client.containers.run_kwargs is not None

        await eventually(started, timeout=30, message="the container to start after the pull")
        assert client.api.pulled == [("vllm/vllm-openai", "latest")]
        assert client.containers.run_kwargs["image"] == "vllm/vllm-openai:latest"
        events = [(e.reason, e.message) for e in await admin.list_events(name=instance.name)]
        assert ("Downloading", "pulling image vllm/vllm-openai:latest") in events
    finally:
        halfway.set()
        await agent.stop()


def test_both_runtimes_implement_the_runtime_protocol_with_its_signatures(tmp_path: Path):
    """The serving loop calls one interface (agent/runtimes/base.py): the same parameters in both runtimes."""
    import inspect

    from agent.runtimes import Runtime

    assert isinstance(ProcessRuntime(tmp_path / "run"), Runtime)
    assert isinstance(DockerRuntime(worker="w1", client=FakeClient()), Runtime)
    assert (ProcessRuntime.runs_in_container, DockerRuntime.runs_in_container) == (False, True)
    methods = [name for name, value in vars(Runtime).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert {"start", "wait", "stop", "leftovers", "adopt", "stop_leftover", "missing", "describe"} <= set(methods)
    for name in methods:
        wanted = [(p.name, p.kind) for p in inspect.signature(getattr(Runtime, name)).parameters.values()]
        for runtime in (ProcessRuntime, DockerRuntime):
            got = [(p.name, p.kind) for p in inspect.signature(getattr(runtime, name)).parameters.values()]
            assert got == wanted, f"{runtime.__name__}.{name}"
