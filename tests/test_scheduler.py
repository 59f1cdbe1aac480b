"""The scheduler on worker-inventory fixtures: estimates, filters, placement, scoring, explanations, snapshot.

Pure logic: no server, no database. Inventories use the sizes simulated GPUs report
(H100-80GB = 80 * 10**9 bytes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server import schemas
from server.scheduler import estimate as est
from server.scheduler.estimate import MemoryEstimate
from server.scheduler.placement import (Cluster, Placement, Request, WorkerSnapshot, evaluate, failure_message, plan,
                                        summarize)
from server.scheduler.snapshot import ClusterState, Reserves, worker_from_wire
from server.schemas import parse_size

GB = 1000**3
GiB = 1024**3
FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA_8B = FIXTURES / "llama-3.1-8b-instruct"
LLAMA_70B = FIXTURES / "llama-3.1-70b-instruct"
QWEN_7B = FIXTURES / "qwen2.5-7b-instruct"
MIXTRAL = FIXTURES / "mixtral-8x7b-instruct-v0.1"
LLAMA_8B_FP8 = FIXTURES / "llama-3.1-8b-instruct-fp8"
LLAMA_70B_AWQ = FIXTURES / "llama-3.1-70b-instruct-awq-int4"
BGE_M3 = FIXTURES / "bge-m3"


# --- inventories ------------------------------------------------------------------------


def gpu_worker(name: str, id: int, count: int, kind: str = "H100", size_gb: int = 80, *, ram_gib: int = 512,
               labels: dict[str, str] | None = None, vendor: str = "nvidia", ready: bool = True,
               cordoned: bool = False) -> WorkerSnapshot:
    return WorkerSnapshot(id=id, name=name, address=f"10.0.0.{id}", ready=ready, cordoned=cordoned,
                          ram_total=ram_gib * GiB, gpu_total={i: size_gb * GB for i in range(count)},
                          labels=dict(labels or {}), gpu_names={i: f"NVIDIA {kind}-{size_gb}GB" for i in range(count)},
                          gpu_vendors={i: vendor for i in range(count)})


def cpu_worker(name: str, id: int, ram_gib: int = 64) -> WorkerSnapshot:
    return WorkerSnapshot(id=id, name=name, address=f"10.0.0.{id}", ready=True, cordoned=False,
                          ram_total=ram_gib * GiB, gpu_total={})


def h100x8() -> Cluster:
    return Cluster([gpu_worker("h100-box", 1, 8)])


def mixed() -> Cluster:
    return Cluster([gpu_worker("h100-a", 1, 8, labels={"zone": "a"}),
                    gpu_worker("a100-b", 2, 8, "A100", 40, labels={"zone": "b"}),
                    gpu_worker("l4-c", 3, 4, "L4", 24, labels={"zone": "c"}),
                    cpu_worker("cpu-d", 4)])


def cpu_only() -> Cluster:
    return Cluster([cpu_worker("cpu-1", 1, 64), cpu_worker("cpu-2", 2, 128)])


def two_l4_boxes() -> Cluster:
    return Cluster([gpu_worker("l4-1", 1, 4, "L4", 24), gpu_worker("l4-2", 2, 4, "L4", 24)])


def vllm(source: Path | str, **fields) -> schemas.ModelSpec:
    return schemas.ModelSpec(**({"source": str(source), "backend": "vllm"} | fields))


def llamacpp(**fields) -> schemas.ModelSpec:
    return schemas.ModelSpec(**({"source": "/models/m.gguf", "backend": "llama.cpp"} | fields))


def request(spec: schemas.ModelSpec, key: object = "m") -> Request:
    return Request(spec, est.estimate(spec), key)


def place_replicas(req: Request, cluster: Cluster, n: int) -> list[Placement]:
    out = []
    for _ in range(n):
        result = plan(req, cluster)
        assert isinstance(result, Placement), failure_message(result)
        cluster.commit(result, req.model_key)
        out.append(result)
    return out


# --- estimates against the published figures -------------------------------------------------


@pytest.mark.parametrize("fixture, published", [
    (LLAMA_8B, 16_060_522_496), (LLAMA_70B, 141_107_412_992), (QWEN_7B, 15_231_233_024), (MIXTRAL, 93_405_585_408)])
def test_weights_are_the_published_total_size(fixture: Path, published: int):
    memory = est.estimate(vllm(fixture, max_model_len=4096))
    assert memory.method == "index"
    assert memory.weights == published


def test_quantized_weights():
    fp8 = est.estimate(vllm(LLAMA_8B_FP8, max_model_len=4096))
    assert 8.4 * GiB < fp8.weights < 8.5 * GiB  # vLLM logs ~8.46 GiB for this checkpoint
    assert "compressed-tensors" in " ".join(fp8.notes)
    awq = est.estimate(vllm(LLAMA_70B_AWQ, max_model_len=4096))
    assert 36.5 * GiB < awq.weights < 37.5 * GiB  # 4-bit body + fp16 embeddings and head
    assert "awq" in " ".join(awq.notes)


@pytest.mark.parametrize("fixture", [LLAMA_8B, LLAMA_70B, QWEN_7B, MIXTRAL, LLAMA_8B_FP8, LLAMA_70B_AWQ, BGE_M3])
def test_shape_estimate_without_weight_files_is_within_one_percent(fixture: Path, tmp_path: Path):
    shutil.copy(fixture / "config.json", tmp_path / "config.json")
    from_config = est.estimate(vllm(tmp_path, max_model_len=4096))
    from_files = est.estimate(vllm(fixture, max_model_len=4096))
    assert from_config.method == "config"
    assert abs(from_config.weights / from_files.weights - 1) < 0.01


def test_safetensors_headers_give_exact_bytes_and_fp32_loads_as_fp16():
    memory = est.estimate(vllm(BGE_M3))
    assert memory.method == "safetensors"
    assert memory.weights == 2_271_019_008 // 2  # the checkpoint is fp32; vLLM's auto dtype loads it in fp16
    assert memory.kv_cache == 0 and memory.max_model_len == 8192  # encoder-only, positions minus padding
    as_stored = est.estimate(vllm(BGE_M3, args=["--dtype", "float32"]))
    assert as_stored.weights == 2_271_019_008


def test_kv_cache_follows_gqa_context_and_concurrency():
    # Llama 3.1 8B: 2 (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB per token
    full = est.estimate(vllm(LLAMA_8B))
    assert full.max_model_len == 131072  # the config's default
    assert full.kv_cache == 131072 * 128 * 1024 == 16 * GiB
    assert est.estimate(vllm(LLAMA_8B, max_model_len=8192)).kv_cache == 1 * GiB
    assert est.estimate(vllm(LLAMA_8B, max_model_len=8192, concurrency=4)).kv_cache == 4 * GiB
    assert est.estimate(vllm(LLAMA_8B, max_model_len=8192, args=["--kv-cache-dtype", "fp8"])).kv_cache == GiB // 2
    assert est.estimate(vllm(LLAMA_70B)).kv_cache == 40 * GiB  # 80 layers
    # Qwen2.5-7B keeps 4 KV heads for 28 query heads: 2 x 28 x 4 x 128 x 2 bytes per token
    assert est.estimate(vllm(QWEN_7B, max_model_len=1000)).kv_cache == 1000 * 57344


def test_moe_keeps_every_expert_resident():
    memory = est.estimate(vllm(MIXTRAL, max_model_len=8192))
    assert memory.weights > 86 * GiB  # 8 experts x 32 layers; only 2 are active per token
    assert any("mixture of experts" in note for note in memory.notes)


def test_tensor_parallel_sizes_divide_the_heads():
    assert est.estimate(vllm(QWEN_7B)).tp_sizes == (1, 2, 4, 28)  # 28 heads, 4 KV heads: no 8
    assert est.estimate(vllm(LLAMA_70B)).tp_sizes[:4] == (1, 2, 4, 8)
    assert est.tensor_parallel_sizes(40, 8) == (1, 2, 4, 8, 40)  # 5 divides 40 but not 8 KV heads


def test_per_gpu_need_shrinks_with_tensor_and_pipeline_parallelism():
    memory = est.estimate(vllm(LLAMA_70B, max_model_len=8192))
    one, two, four = memory.per_gpu(1), memory.per_gpu(2), memory.per_gpu(4)
    assert one > two > four > memory.per_gpu(4, 2)
    assert two < one / 2 + 3 * GiB  # weights and KV split, the overhead mostly not


def test_estimate_of_a_source_without_config_says_why(tmp_path: Path):
    with pytest.raises(est.EstimateError, match="config.json"):
        est.estimate(vllm(tmp_path))
    with pytest.raises(est.EstimateError, match="Hugging Face cache"):
        est.estimate(vllm("some-org/not-downloaded"))
    override = est.estimate(vllm("some-org/not-downloaded", memory_bytes=20 * GiB))
    assert override.total() == 20 * GiB and override.method == "override"


# --- placement on inventories ----------------------------------------------------------------


def test_claim_is_what_is_needed_with_a_matching_utilization():
    cluster = h100x8()
    result = plan(request(vllm(LLAMA_8B, max_model_len=8192)), cluster)
    assert isinstance(result, Placement)
    claim = result.claim
    assert claim.gpu_indexes == [0] and claim.tensor_parallel_size == 1
    assert 17 * GiB < claim.vram_bytes_per_gpu < 20 * GiB  # not 0.9 x 80 GB
    assert claim.gpu_memory_utilization == pytest.approx(claim.vram_bytes_per_gpu / (80 * GB), abs=1e-4)
    assert claim.gpu_memory_utilization * 80 * GB <= claim.vram_bytes_per_gpu  # rounded down: stays inside
    assert claim.estimate is not None and claim.estimate.weights_bytes == 16_060_522_496


def test_8xh100_packs_many_small_models_per_gpu():
    cluster = h100x8()
    req = request(vllm(BGE_M3))
    per_replica = req.estimate.total()  # ~2.1 GiB: 35 fit on an 80 GB H100, not one (0.9 x GPU)
    fit = (80 * GB) // per_replica
    assert fit == 35
    placements = place_replicas(req, cluster, 8 * fit)
    per_gpu: dict[int, int] = {}
    for p in placements:
        per_gpu[p.claim.gpu_indexes[0]] = per_gpu.get(p.claim.gpu_indexes[0], 0) + 1
    assert per_gpu == {i: fit for i in range(8)}
    # The scraps left on each GPU would hold it split 8 ways; a model is never split wider because GPUs are busy.
    assert req.estimate.per_gpu(8) < cluster.workers[1].gpu_free(0)
    assert isinstance(plan(req, cluster), list)


def test_8xh100_70b_uses_the_smallest_tensor_parallel_size_that_fits():
    short = plan(request(vllm(LLAMA_70B, max_model_len=8192)), h100x8())
    assert isinstance(short, Placement)
    assert short.claim.tensor_parallel_size == 2 and short.claim.gpu_indexes == [0, 1]
    full = plan(request(vllm(LLAMA_70B)), h100x8())  # 128k context: 40 GiB of KV cache more
    assert isinstance(full, Placement) and full.claim.tensor_parallel_size == 4


def test_tensor_parallel_never_uses_a_size_the_heads_forbid():
    # 28 heads, 4 KV heads: sizes 1, 2, 4, 28. 400 GiB of weights need more than 4 H100s; 8 would do but 8 does not divide 28.
    memory = MemoryEstimate(method="config", weights=400 * GiB, kv_cache=0, layers=28, layer_weights=390 * GiB,
                            heads=28, kv_heads=4, tp_sizes=est.tensor_parallel_sizes(28, 4))
    assert memory.per_gpu(4) > 80 * GB > memory.per_gpu(8)
    result = plan(Request(vllm(QWEN_7B), memory, "m"), h100x8())
    assert isinstance(result, list) and result[0].reason == "insufficient_vram"
    assert "even with its GPUs empty" in result[0].message and "1, 2, 4, 28" in result[0].message
    # KV heads replicate once the tensor-parallel size passes them: Qwen2.5-7B (4 KV heads) gains nothing at 28.
    qwen = est.estimate(vllm(QWEN_7B, concurrency=200))
    assert qwen.per_gpu(28) > qwen.kv_cache / 4


def test_mixed_cluster_spread_puts_replicas_on_different_workers():
    cluster = mixed()
    placements = place_replicas(request(vllm(LLAMA_8B_FP8, max_model_len=8192)), cluster, 3)
    assert sorted(p.worker.name for p in placements) == ["a100-b", "h100-a", "l4-c"]


def test_mixed_cluster_binpack_fills_the_tightest_gpu():
    cluster = mixed()
    placements = place_replicas(request(vllm(LLAMA_8B_FP8, max_model_len=8192, placement_strategy="binpack")), cluster, 3)
    # ~12 GiB each: an L4 (22.4 GiB) takes one; the next tightest is another L4.
    assert [(p.worker.name, p.claim.gpu_indexes) for p in placements] == [("l4-c", [0]), ("l4-c", [1]), ("l4-c", [2])]


def test_mixed_cluster_filters_by_gpu_type_vendor_and_labels():
    cluster = mixed()
    on_h100 = plan(request(vllm(LLAMA_8B_FP8, max_model_len=8192, gpu_type="h100")), cluster)
    assert isinstance(on_h100, Placement) and on_h100.worker.name == "h100-a"
    in_zone_b = plan(request(vllm(LLAMA_8B_FP8, max_model_len=8192, worker_selector={"zone": "b"})), cluster)
    assert isinstance(in_zone_b, Placement) and in_zone_b.worker.name == "a100-b"
    amd = plan(request(vllm(LLAMA_8B_FP8, max_model_len=8192, gpu_vendor="amd")), cluster)
    assert isinstance(amd, list)
    by_worker = {r.worker: r for r in amd}
    assert by_worker["h100-a"].reason == "gpu_mismatch" and "gpu_vendor=amd" in by_worker["h100-a"].message
    assert by_worker["cpu-d"].reason == "no_gpu"
    nowhere = plan(request(vllm(LLAMA_8B_FP8, worker_selector={"zone": "z"})), cluster)
    assert isinstance(nowhere, list) and {r.reason for r in nowhere} == {"selector_mismatch"}
    assert "zone=z" in nowhere[0].message


def test_mixed_cluster_explains_a_model_too_big_everywhere():
    cluster = mixed()
    reasons = plan(request(vllm(LLAMA_70B, concurrency=16)), cluster)  # 128k x 16 sequences: 640 GiB of KV
    assert isinstance(reasons, list)
    by_worker = {r.worker: r for r in reasons}
    assert set(by_worker) == {"h100-a", "a100-b", "l4-c", "cpu-d"}
    h100 = by_worker["h100-a"]
    assert h100.reason == "insufficient_vram" and h100.need_bytes and h100.free_bytes == 80 * GB
    assert by_worker["cpu-d"].reason == "no_gpu" and "vllm needs a GPU" in by_worker["cpu-d"].message


def test_busy_worker_reports_the_closest_multi_gpu_option():
    cluster = h100x8()
    w = cluster.workers[1]
    for i in range(2, 8):
        w.gpu_claimed[i] = 70 * GB  # six GPUs nearly full, two empty
    reasons = plan(request(vllm(LLAMA_70B)), cluster)  # needs tp=4
    assert isinstance(reasons, list) and len(reasons) == 1
    r = reasons[0]
    assert (r.reason, r.gpus_needed, r.gpus_fitting) == ("insufficient_vram", 4, 2)
    assert "needs 4 GPUs" in r.message


def test_cpu_only_cluster_serves_llamacpp_and_refuses_vllm():
    cluster = cpu_only()
    cluster.workers[1].ram_claimed = 1 * GiB
    memory = MemoryEstimate.fixed(10 * GiB)
    result = plan(Request(llamacpp(), memory, "m"), cluster)
    assert isinstance(result, Placement) and result.claim.device == "cpu" and result.claim.ram_bytes == 10 * GiB
    assert result.worker.name == "cpu-2"  # spread: the least loaded
    binpack = plan(Request(llamacpp(placement_strategy="binpack"), memory, "m"), cluster)
    assert isinstance(binpack, Placement) and binpack.worker.name == "cpu-1"  # the tightest RAM
    refused = plan(request(vllm(LLAMA_8B)), cluster)
    assert isinstance(refused, list) and [r.reason for r in refused] == ["no_gpu", "no_gpu"]


def test_70b_needs_two_workers_and_only_goes_there_when_distributed():
    spec = vllm(LLAMA_70B, max_model_len=8192)
    alone = plan(request(spec), two_l4_boxes())
    assert isinstance(alone, list)
    assert [r.reason for r in alone] == ["insufficient_vram", "insufficient_vram"]
    assert all(r.need_bytes > r.free_bytes for r in alone)

    cluster = two_l4_boxes()
    together = plan(request(spec.model_copy(update={"distributed": True})), cluster)
    assert isinstance(together, Placement)
    claim = together.claim
    assert (claim.tensor_parallel_size, claim.pipeline_parallel_size) == (4, 2)
    assert together.worker.name == "l4-1" and claim.gpu_indexes == [0, 1, 2, 3]
    assert [(s.worker_name, s.gpu_indexes) for s in claim.subordinate_workers] == [("l4-2", [0, 1, 2, 3])]
    assert claim.vram_bytes_per_gpu <= 24 * GB
    cluster.commit(together, "70b")
    assert all(cluster.workers[w].gpu_claimed[i] == claim.vram_bytes_per_gpu for w in (1, 2) for i in range(4))
    again = plan(request(spec.model_copy(update={"distributed": True})), cluster)
    assert isinstance(again, list) and again[-1].reason == "insufficient_vram_distributed"


def test_distributed_is_not_used_when_one_worker_fits():
    cluster = Cluster([gpu_worker("big", 1, 8), gpu_worker("big2", 2, 8)])
    result = plan(request(vllm(LLAMA_70B, max_model_len=8192, distributed=True)), cluster)
    assert isinstance(result, Placement) and result.claim.pipeline_parallel_size == 1


def _layered(weights_gib: int, layers: int = 80) -> MemoryEstimate:
    """What a custom backend's GGUF estimate looks like: layers to split, any tensor-parallel size."""
    return MemoryEstimate(method="test", weights=weights_gib * GiB, kv_cache=0, layers=layers,
                          layer_weights=(weights_gib - 10) * GiB, tp_sizes=None, cpu_capable=True)


def test_a_distributed_custom_backend_spans_workers_like_vllm():
    custom = schemas.ModelSpec(source="/models/big.gguf", backend="custom:ray-job", distributed=True)
    # 150 GiB: 37.5 GiB a GPU over one box's four L4s (24 GB each); 20 GiB a GPU as two stages of four.
    together = plan(Request(custom, _layered(150), "job"), two_l4_boxes())
    assert isinstance(together, Placement), failure_message(together)
    claim = together.claim
    assert (claim.tensor_parallel_size, claim.pipeline_parallel_size) == (4, 2)
    assert together.worker.name == "l4-1" and [s.worker_name for s in claim.subordinate_workers] == ["l4-2"]
    assert claim.gpu_memory_utilization is None  # a vLLM/SGLang flag: a custom command sizes itself
    alone = plan(Request(custom.model_copy(update={"distributed": False}), _layered(150), "job"), two_l4_boxes())
    assert isinstance(alone, list) and [r.reason for r in alone] == ["insufficient_vram", "insufficient_vram"]
    too_big = plan(Request(custom, _layered(400), "job"), two_l4_boxes())
    assert isinstance(too_big, list) and too_big[-1].reason == "insufficient_vram_distributed"
    # Manual placement over two workers, as the Ray tier deploys its probe job.
    chosen = [{"worker": "l4-1", "gpu_indexes": [0]}, {"worker": "l4-2", "gpu_indexes": [3]}]
    manual = plan(Request(custom.model_copy(update={"gpu_selector": [schemas.GPUSelection(**c) for c in chosen]}),
                          MemoryEstimate.fixed(GiB), "job"), two_l4_boxes())
    assert isinstance(manual, Placement) and manual.claim.pipeline_parallel_size == 2
    assert [(s.worker_name, s.gpu_indexes) for s in manual.claim.subordinate_workers] == [("l4-2", [3])]


def test_vllm_cpu_only_goes_to_host_ram_on_any_worker():
    memory = MemoryEstimate(method="test", weights=2 * GiB, kv_cache=GiB, cpu_capable=False)
    spec = vllm(LLAMA_8B, cpu_only=True)
    on_cpu = plan(Request(spec, memory, "m"), cpu_only())
    assert isinstance(on_cpu, Placement), failure_message(on_cpu)
    assert (on_cpu.claim.device, on_cpu.claim.ram_bytes, on_cpu.claim.gpu_indexes) == ("cpu", 3 * GiB, [])
    assert on_cpu.claim.gpu_memory_utilization is None
    # A worker with free GPUs serves it from RAM too: cpu_only never claims a GPU.
    beside_gpus = plan(Request(spec, memory, "m"), h100x8())
    assert isinstance(beside_gpus, Placement) and beside_gpus.claim.device == "cpu"
    assert not any(beside_gpus.worker.gpu_claimed.values())
    # Too big for any worker's RAM: one RAM reason a worker, never a GPU one.
    huge = MemoryEstimate(method="test", weights=200 * GiB, kv_cache=0, cpu_capable=False)
    refused = plan(Request(spec, huge, "m"), cpu_only())
    assert isinstance(refused, list) and [r.reason for r in refused] == ["insufficient_ram", "insufficient_ram"]
    # Without cpu_only vLLM still never lands on a CPU by itself.
    assert [r.reason for r in plan(Request(vllm(LLAMA_8B), memory, "m"), cpu_only())] == ["no_gpu", "no_gpu"]


@pytest.mark.parametrize("fields, message", [
    ({"backend": "sglang", "cpu_only": True}, "sglang has no CPU build"),
    ({"backend": "vllm", "cpu_only": True, "distributed": True}, "cpu_only and distributed exclude each other"),
    ({"backend": "llama.cpp", "distributed": True}, "distributed applies to vllm/sglang and custom backends"),
    ({"backend": "vox-box", "distributed": True}, "distributed applies to"),
])
def test_which_backends_take_cpu_only_and_distributed(fields: dict, message: str):
    with pytest.raises(ValueError, match=message):
        schemas.ModelSpec(source="/m", **fields)
    assert schemas.ModelSpec(source="/m", backend="custom:job", distributed=True).distributed
    assert schemas.ModelSpec(source="/m", backend="vllm", cpu_only=True).cpu_only


def test_manual_gpu_selection():
    cluster = h100x8()
    chosen = [{"worker": "h100-box", "gpu_indexes": [6, 7]}]
    result = plan(request(vllm(LLAMA_70B, max_model_len=8192, gpu_selector=chosen)), cluster)
    assert isinstance(result, Placement) and result.claim.gpu_indexes == [6, 7]
    assert result.claim.tensor_parallel_size == 2
    cluster.commit(result, "m")
    busy = plan(request(vllm(LLAMA_70B, max_model_len=8192, gpu_selector=chosen)), cluster)
    assert isinstance(busy, list) and busy[0].reason == "insufficient_vram" and busy[0].gpu in (6, 7)
    missing = plan(request(vllm(LLAMA_8B, gpu_selector=[{"worker": "h100-box", "gpu_indexes": [9]}])), cluster)
    assert isinstance(missing, list) and (missing[0].reason, missing[0].gpu) == ("gpu_not_found", 9)
    ghost = plan(request(vllm(LLAMA_8B, gpu_selector=[{"worker": "ghost", "gpu_indexes": [0]}])), cluster)
    assert isinstance(ghost, list) and ghost[0].reason == "worker_not_found"
    three = plan(request(vllm(QWEN_7B, gpu_selector=[{"worker": "h100-box", "gpu_indexes": [0, 1, 2]}])), cluster)
    assert isinstance(three, list) and three[0].reason == "invalid_tensor_parallel_size"
    assert "1, 2, 4, 28" in three[0].message


def test_not_ready_and_cordoned_workers_are_skipped_with_reasons():
    cluster = Cluster([gpu_worker("down", 1, 8, ready=False), gpu_worker("fenced", 2, 8, cordoned=True)])
    reasons = plan(request(vllm(LLAMA_8B)), cluster)
    assert [(r.worker, r.reason) for r in reasons] == [("down", "not_ready"), ("fenced", "cordoned")]


def test_ties_break_by_worker_id_then_gpu_index():
    for strategy in ("spread", "binpack"):
        cluster = Cluster([gpu_worker("b", 2, 4), gpu_worker("a", 1, 4), gpu_worker("c", 3, 4)])
        result = plan(request(vllm(LLAMA_8B, max_model_len=8192, placement_strategy=strategy)), cluster)
        assert isinstance(result, Placement)
        assert (result.worker.id, result.claim.gpu_indexes) == (1, [0])


def test_spread_uses_best_fit_inside_a_worker():
    cluster = Cluster([gpu_worker("only", 1, 2)])
    first, second = place_replicas(request(vllm(LLAMA_8B_FP8, max_model_len=8192)), cluster, 2)
    assert first.claim.gpu_indexes == second.claim.gpu_indexes == [0]  # the second shares GPU 0


def test_reserved_memory_per_worker_from_labels_and_defaults():
    wire = {"id": 1, "name": "w", "address": "a", "state": "ready", "cordoned": False,
            "labels": {"maas.reserved-vram": "10GB", "maas.reserved-ram": "8GiB"},
            "gpus": [{"index": 0, "name": "H100", "vendor": "nvidia", "memory_total": 80 * GB}],
            "host": {"memory_total": 64 * GiB}}
    w = worker_from_wire(wire, Reserves())
    assert w.gpu_free(0) == 70 * GB and w.ram_free() == 56 * GiB
    default = worker_from_wire({**wire, "labels": {}}, Reserves(ram=4 * GiB, vram=1 * GB))
    assert default.gpu_free(0) == 79 * GB and default.ram_free() == 60 * GiB
    assert parse_size("4GiB") == 4 * GiB and parse_size("512MiB") == 512 * 2**20 and parse_size("8G") == 8 * GB
    assert parse_size("lots") is None


def test_partial_offload_keeps_the_rest_in_host_ram():
    memory = MemoryEstimate(method="gguf", weights=40 * GiB, kv_cache=8 * GiB, fixed_overhead=1 * GiB, layers=80,
                            layer_weights=38 * GiB, tp_sizes=None, cpu_capable=True)
    cluster = Cluster([gpu_worker("small", 1, 1, "L4", 24, ram_gib=128)])
    refused = plan(Request(llamacpp(), memory, "m"), cluster)
    assert isinstance(refused, list) and refused[0].reason == "insufficient_vram"
    result = plan(Request(llamacpp(partial_offload=True), memory, "m"), cluster)
    assert isinstance(result, Placement)
    claim = result.claim
    assert 0 < claim.gpu_layers < 80
    assert claim.vram_bytes_per_gpu <= 24 * GB
    assert claim.vram_bytes_per_gpu + claim.ram_bytes == pytest.approx(memory.total() + memory.overhead, abs=2)
    tight = Cluster([gpu_worker("tight", 1, 1, "L4", 24, ram_gib=16)])
    reasons = plan(Request(llamacpp(partial_offload=True), memory, "m"), tight)
    assert isinstance(reasons, list) and reasons[0].reason == "insufficient_ram"


def test_llamacpp_splits_layers_over_gpus_of_one_worker():
    memory = MemoryEstimate(method="gguf", weights=40 * GiB, kv_cache=2 * GiB, fixed_overhead=1 * GiB, layers=80,
                            layer_weights=38 * GiB, tp_sizes=None, cpu_capable=True)
    result = plan(Request(llamacpp(), memory, "m"), Cluster([gpu_worker("l4s", 1, 4, "L4", 24)]))
    assert isinstance(result, Placement) and result.claim.tensor_parallel_size == 2
    assert result.claim.gpu_memory_utilization is None  # only vllm/sglang take a utilization


def test_summarize_keeps_the_closest_workers_and_counts_the_rest():
    workers = [gpu_worker(f"w{i:03d}", i, 1, "L4", 24) for i in range(1, 101)]
    workers += [gpu_worker(f"down{i}", 200 + i, 1, ready=False) for i in range(5)]
    reasons = plan(request(vllm(LLAMA_70B)), Cluster(workers))
    assert len(reasons) == 105
    short = summarize(reasons)
    kept = [r for r in short if r.worker]
    assert len(kept) == 24 and all(r.reason == "insufficient_vram" for r in kept)
    lines = {r.reason: r.count for r in short if r.count}
    assert lines == {"insufficient_vram": 76, "not_ready": 5}
    assert "100 insufficient vram" in failure_message(short)


def test_dry_run_evaluation_stops_at_the_first_replica_that_does_not_fit():
    cluster = Cluster([gpu_worker("one", 1, 1)])
    placements = evaluate(request(vllm(LLAMA_8B)), cluster, 4)  # ~33.5 GiB each, 74.5 GiB GPU: two fit
    assert [p.scheduled for p in placements] == [True, True, False, False]
    assert placements[2].reasons == placements[3].reasons and placements[2].reasons[0].reason == "insufficient_vram"


# --- the snapshot follows the bus ------------------------------------------------------------


def _worker_wire(id: int, name: str, gpus: int = 2, state: str = "ready", memory_used: int = 0) -> dict:
    return {"id": id, "name": name, "address": "127.0.0.1", "state": state, "cordoned": False, "labels": {},
            "gpus": [{"index": i, "name": "H100 (simulated)", "vendor": "simulated", "memory_total": 80 * GB,
                      "memory_used": memory_used} for i in range(gpus)],
            "host": {"memory_total": 64 * GiB}}


def _instance_wire(id: int, state: str, worker_id: int | None = None, claim: dict | None = None) -> dict:
    return {"id": id, "name": f"m-{id}", "model_id": 7, "generation": 1, "state": state, "worker_id": worker_id,
            "claim": claim, "spec": {"source": "/m.gguf", "backend": "llama.cpp"}, "schedule_reasons": []}


def test_snapshot_follows_claims_from_events_not_usage():
    state = ClusterState()
    state.load([_worker_wire(1, "w1")], [_instance_wire(1, "pending")])
    assert list(state.pending) == [1]
    claim = schemas.ResourceClaim(device="gpu", gpu_indexes=[1], vram_bytes_per_gpu=30 * GB).model_dump(mode="json")
    assert state.apply("instances", "updated", _instance_wire(1, "scheduled", 1, claim))
    w = state.cluster.workers[1]
    assert w.gpu_claimed[1] == 30 * GB and not state.pending and w.replicas == {7: 1}
    # The same claim again (running now), and a heartbeat with usage: nothing to reschedule.
    assert not state.apply("instances", "updated", _instance_wire(1, "running", 1, claim))
    assert not state.apply("workers", "updated", _worker_wire(1, "w1", memory_used=79 * GB))
    assert w.gpu_claimed[1] == 30 * GB
    assert state.apply("workers", "updated", {**_worker_wire(1, "w1"), "cordoned": True})
    assert state.cluster.workers[1].cordoned and state.cluster.workers[1].gpu_claimed[1] == 30 * GB
    assert state.apply("instances", "deleted", _instance_wire(1, "running", 1, claim))
    assert state.cluster.workers[1].gpu_claimed[1] == 0 and state.cluster.workers[1].replicas == {}


def test_snapshot_applies_claims_of_a_worker_that_appears_later():
    state = ClusterState()
    claim = schemas.ResourceClaim(device="gpu", gpu_indexes=[0], vram_bytes_per_gpu=10 * GB,
                                  subordinate_workers=[schemas.SubordinateClaim(worker_id=2, worker_name="w2",
                                                                                gpu_indexes=[0, 1],
                                                                                vram_bytes_per_gpu=10 * GB)])
    state.load([_worker_wire(1, "w1")], [_instance_wire(1, "running", 1, claim.model_dump(mode="json"))])
    assert state.apply("workers", "created", _worker_wire(2, "w2"))
    assert state.cluster.workers[2].gpu_claimed == {0: 10 * GB, 1: 10 * GB}
    assert state.cluster.workers[1].gpu_claimed == {0: 10 * GB}
