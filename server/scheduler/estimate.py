"""Memory a replica needs, and how it splits across GPUs and workers.

- llama.cpp (GGUF): weights (the file) + f16 KV cache for the context + compute buffer;
  layers are known from the tensor names, so a model can be split by layers across GPUs
  or partially offloaded to host RAM.
- vLLM / SGLang (Hugging Face layout, see hf.py): weights (exact from safetensors headers,
  else the index's total_size, else the config's shape; fp8/AWQ/GPTQ/bitsandbytes/
  compressed-tensors and MoE included) + KV cache for max_model_len x concurrency
  (grouped-query heads, MLA, --kv-cache-dtype) + per GPU: CUDA context and buffers,
  the activation peak of one max_num_batched_tokens step, logits, CUDA graphs.
- `memory_bytes` in the spec overrides everything.
- A hub source (hf://, ms://, bare ORG/NAME) is estimated from the same numbers fetched from
  the hub without the weights (hub.py: config.json, safetensors headers, a GGUF's header, file
  sizes); a hub that cannot answer leaves the estimate to MetadataUnavailable.

The claim is what is needed, never a fixed fraction of the GPU; the backend is then
given `gpu_memory_utilization` = claim / GPU total so it stays inside its claim.
Everything here may read files (headers only); the placement math never calls it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache

from server import schemas
from server.scheduler import hf, hub, locality
from server.scheduler.hub import GGUFShape

MiB = 1024**2
GiB = 1024**3
_COMPUTE_OVERHEAD = 64 * MiB  # llama.cpp's compute buffers and the server's own heap, measured small
_LLAMACPP_UBATCH = 512  # llama.cpp's default micro-batch: its logits buffer is n_ubatch x n_vocab floats

# vLLM / SGLang per-GPU overheads beyond weights and KV cache.
_CUDA_BASE = 768 * MiB  # CUDA context, cuBLAS workspace, allocator slack, non-torch memory
_NCCL = 256 * MiB  # communicator buffers when a model spans GPUs
_GRAPHS_BASE = 256 * MiB  # CUDA graph pools: a base plus a little per layer
_GRAPHS_PER_LAYER = 8 * MiB
_VISION = 1 * GiB  # encoder cache and the profiling run of a vision tower
_DEFAULT_BATCHED_TOKENS = 8192  # vLLM V1's max_num_batched_tokens for the API server
_DEFAULT_MAX_SEQS = 256


class EstimateError(Exception):
    """The model's memory cannot be worked out (a file missing or unreadable); says why."""

    reason = "estimate_failed"  # the UnschedulableReason code


class MetadataUnavailable(EstimateError):
    """A hub model's metadata could not be fetched (unreachable hub, no such repository...); says why."""

    reason = "metadata_unavailable"


@dataclass(frozen=True)
class MemoryEstimate:
    method: str
    weights: int  # bytes, at the dtype the backend loads
    kv_cache: int  # bytes, all layers, the whole context
    fixed_overhead: int = 0  # per GPU whatever the split
    split_overhead: int = 0  # per GPU at tp=1, divided by the tensor-parallel size
    comm_overhead: int = 0  # per GPU when the model spans several GPUs (NCCL buffers)
    layers: int = 0
    layer_weights: int = 0  # the part of `weights` that belongs to the repeated layers
    heads: int = 0
    kv_heads: int = 0
    tp_sizes: tuple[int, ...] | None = ()  # allowed tensor-parallel sizes; None: any (llama.cpp layer split)
    cpu_capable: bool = False
    max_model_len: int | None = None
    concurrency: int | None = None
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def fixed(cls, need: int, cpu_capable: bool = True, method: str = "fixed") -> "MemoryEstimate":
        """A single number that cannot be split (the v0 contract of place())."""
        return cls(method=method, weights=need, kv_cache=0, cpu_capable=cpu_capable)

    def total(self) -> int:
        """Bytes on one device: one GPU, or host RAM."""
        return self.weights + self.kv_cache + self.fixed_overhead + self.split_overhead

    @property
    def overhead(self) -> int:
        return self.fixed_overhead + self.split_overhead

    def allows_tp(self, tp: int) -> bool:
        if tp == 1:
            return True
        if self.tp_sizes is None:
            return self.layers == 0 or tp <= self.layers
        return tp in self.tp_sizes

    def tp_candidates(self, limit: int) -> list[int]:
        return [k for k in range(1, limit + 1) if self.allows_tp(k)]

    def per_gpu(self, tp: int = 1, pp: int = 1) -> int:
        """Bytes each GPU needs with `tp` GPUs per worker on `pp` workers (pipeline stages)."""
        if tp == 1 and pp == 1:
            return self.total()
        layers = self.layers or 1
        stage = math.ceil(layers / pp) / layers if pp > 1 else 1.0
        non_layer = self.weights - self.layer_weights  # embeddings, head: counted on every stage (conservative)
        weights = (non_layer + self.layer_weights * stage) / tp
        kv = self.kv_cache * stage
        if self.kv_heads and tp > self.kv_heads:
            kv = kv / self.kv_heads  # heads are replicated, each GPU keeps one
        else:
            kv = kv / tp
        return int(math.ceil(weights + kv + self.fixed_overhead + self.split_overhead / tp + self.comm_overhead))

    def offload(self, gpu_free: int) -> tuple[int, int, int] | None:
        """llama.cpp partial offload on a GPU with `gpu_free` bytes: (gpu layers, vram, host RAM), or None."""
        if not self.cpu_capable or not self.layers:
            return None
        per_layer = (self.layer_weights + self.kv_cache) / self.layers
        if per_layer <= 0:
            return None
        layers_on_gpu = min(int((gpu_free - self.overhead) // per_layer), self.layers - 1)
        if layers_on_gpu < 1:
            return None
        on_gpu = int(math.ceil(layers_on_gpu * per_layer))
        return layers_on_gpu, on_gpu + self.overhead, self.total() - on_gpu

    def to_out(self) -> schemas.MemoryEstimateOut:
        return schemas.MemoryEstimateOut(
            method=self.method, weights_bytes=self.weights, kv_cache_bytes=self.kv_cache,
            overhead_bytes=self.overhead, total_bytes=self.total(), max_model_len=self.max_model_len,
            concurrency=self.concurrency,
            tensor_parallel_sizes=list(self.tp_sizes) if self.tp_sizes is not None else None,
            notes=list(self.notes))


# --- llama.cpp (GGUF) -------------------------------------------------------------


@lru_cache(maxsize=256)
def _gguf_shape(path: str, _mtime_ns: int) -> GGUFShape | None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception:  # not a GGUF we can read: fall back to the file size alone
        return None
    return hub.gguf_shape_of(reader)


def _estimate_gguf(spec: schemas.ModelSpec) -> MemoryEstimate:
    try:
        stat = os.stat(spec.source)
    except OSError:
        return MemoryEstimate(method="missing", weights=0, kv_cache=0, fixed_overhead=_COMPUTE_OVERHEAD,
                              cpu_capable=True, notes=(f"{spec.source} not found",))
    return _gguf_estimate(spec, stat.st_size, _gguf_shape(spec.source, stat.st_mtime_ns))


def _gguf_estimate(spec: schemas.ModelSpec, weights: int, shape: GGUFShape | None,
                   notes: tuple[str, ...] = ()) -> MemoryEstimate:
    if shape is None or not shape.n_head:
        return MemoryEstimate(method="file_size", weights=weights, kv_cache=0, fixed_overhead=_COMPUTE_OVERHEAD,
                              cpu_capable=True,
                              notes=notes + ("not a readable GGUF: the file size stands for the weights",))
    kv_width = shape.n_embd * shape.n_head_kv // shape.n_head
    kv = 2 * shape.n_layers * spec.context_length * kv_width * 2  # K and V, f16
    compute = _COMPUTE_OVERHEAD + _LLAMACPP_UBATCH * shape.n_vocab * 4
    return MemoryEstimate(method="gguf", weights=weights, kv_cache=kv, fixed_overhead=compute,
                          layers=shape.n_layers, layer_weights=min(shape.layer_bytes, weights),
                          heads=shape.n_head, kv_heads=shape.n_head_kv, tp_sizes=None, cpu_capable=True,
                          max_model_len=spec.context_length, notes=notes)


# --- vLLM / SGLang (Hugging Face layout) ---------------------------------------------


def _arg(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in backend arguments (last one wins)."""
    found = None
    for i, item in enumerate(args):
        if item == name and i + 1 < len(args):
            found = args[i + 1]
        elif item.startswith(name + "="):
            found = item.split("=", 1)[1]
    return found


def _int_arg(args: list[str], name: str) -> int | None:
    value = _arg(args, name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def tensor_parallel_sizes(heads: int, kv_heads: int, limit: int = 64) -> tuple[int, ...]:
    """Sizes vLLM accepts: they divide the attention heads, and divide or are a multiple of the KV heads."""
    sizes = []
    for k in range(1, min(limit, heads) + 1):
        if heads % k:
            continue
        if kv_heads and not (kv_heads % k == 0 or k % kv_heads == 0):
            continue
        sizes.append(k)
    return tuple(sizes)


def _estimate_hf(spec: schemas.ModelSpec) -> MemoryEstimate:
    try:
        shape, weights, _directory = hf.load(spec.source)
    except hf.HFError as exc:
        raise EstimateError(str(exc)) from None
    except OSError as exc:
        raise EstimateError(f"cannot read {spec.source}: {exc}") from None
    return _hf_estimate(spec, shape, weights)


def _hf_estimate(spec: schemas.ModelSpec, shape: hf.Shape, weights: hf.Weights,
                 extra_notes: tuple[str, ...] = ()) -> MemoryEstimate:
    args = spec.args
    notes = list(shape.notes) + list(extra_notes)

    dtype = (_arg(args, "--dtype") or "auto").lower()
    checkpoint_bytes = hf.TORCH_BYTES.get(shape.torch_dtype, 2)
    if dtype == "auto":
        runtime = 2 if checkpoint_bytes == 4 else checkpoint_bytes  # vLLM loads fp32 checkpoints as fp16
    else:
        runtime = hf.TORCH_BYTES.get(dtype, 2)
    weight_bytes = weights.bytes
    if weights.float_bytes and weights.float_elem_bytes and runtime != weights.float_elem_bytes:
        weight_bytes += int(weights.float_bytes * runtime / weights.float_elem_bytes) - weights.float_bytes
        notes.append(f"float tensors loaded at {runtime} bytes (checkpoint: {weights.float_elem_bytes})")
    elif weights.float_bytes and not weights.float_elem_bytes:
        notes.append("float tensors of mixed dtypes: counted as stored")

    max_len = spec.max_model_len or _int_arg(args, "--max-model-len") or _int_arg(args, "--context-length") \
        or shape.max_position
    kv_dtype = (_arg(args, "--kv-cache-dtype") or "auto").lower()
    kv_elem = 1 if kv_dtype.startswith("fp8") else (shape.kv_cache_dtype_bytes or runtime)
    if shape.encoder_only:
        per_token = 0
        notes.append("encoder-only: no KV cache")
    elif shape.mla:
        per_token = shape.layers * (shape.mla["kv_lora"] + shape.mla["rope"]) * kv_elem
    else:
        per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_elem
    kv = per_token * max_len * spec.concurrency

    linear, other = hf.parameter_counts(shape)
    per_layer_params = linear + shape.layers * 2 * shape.hidden
    layer_share = per_layer_params / max(1, linear + other)
    layer_weights = int(weight_bytes * min(1.0, layer_share))

    tokens = _int_arg(args, "--max-num-batched-tokens") or _int_arg(args, "--chunked-prefill-size") \
        or (max(max_len, 2048) if shape.encoder_only else _DEFAULT_BATCHED_TOKENS)
    seqs = _int_arg(args, "--max-num-seqs") or _int_arg(args, "--max-running-requests") or _DEFAULT_MAX_SEQS
    inter = (shape.experts_per_token * shape.moe_intermediate + shape.shared_intermediate) if shape.is_moe \
        else shape.intermediate
    split = tokens * 3 * inter * runtime  # gate/up output and the activation: sharded by tensor parallelism
    fixed = _CUDA_BASE + tokens * 6 * shape.hidden * runtime  # residual stream, norms, attention output
    if not shape.encoder_only:
        fixed += seqs * shape.vocab * 4 * 2  # fp32 logits of a full batch and the sampler's copy
    eager = "--enforce-eager" in args or "--disable-cuda-graph" in args
    if not (shape.encoder_only or eager):
        fixed += _GRAPHS_BASE + _GRAPHS_PER_LAYER * shape.layers
    if shape.vision:
        fixed += _VISION
        notes.append("vision tower: 1 GiB for its encoder cache and profiling")
    if shape.is_moe:
        notes.append(f"mixture of experts: all {shape.experts} experts resident, {shape.experts_per_token} active per token")
    if shape.quant_method:
        notes.append(f"quantization: {shape.quant_method}")
    return MemoryEstimate(
        method=weights.method, weights=weight_bytes, kv_cache=kv, fixed_overhead=int(fixed), split_overhead=int(split),
        comm_overhead=_NCCL,
        layers=shape.layers, layer_weights=layer_weights, heads=shape.heads, kv_heads=shape.kv_heads,
        tp_sizes=tensor_parallel_sizes(shape.heads, shape.kv_heads), cpu_capable=False, max_model_len=max_len,
        concurrency=spec.concurrency, notes=tuple(notes))


# --- hub sources (see hub.py) ----------------------------------------------------------

_HUB_BACKENDS = (*schemas.HF_BACKENDS, "llama.cpp", "vox-box")  # custom backends keep their own downloads' sizes


def hub_ref(spec: schemas.ModelSpec) -> hub.HubRef | None:
    """The hub reference whose metadata `estimate(spec)` reads; None when it reads none."""
    if spec.memory_bytes is not None or spec.backend not in _HUB_BACKENDS:
        return None
    ref = hub.ref_of(spec.source)
    if ref is None:
        return None
    bare = not spec.source.startswith(tuple(schemas.HUBS))
    if bare and spec.backend in schemas.HF_BACKENDS and hf.hub_cache_dir(ref.repo_id) is not None:
        return None  # a snapshot downloaded on this host answers without the network (as before)
    return ref


def needs_fetch(spec: schemas.ModelSpec) -> hub.HubRef | None:
    """The hub reference to fetch before `estimate(spec)` can answer without blocking on the network."""
    ref = hub_ref(spec)
    return ref if ref is not None and hub.CACHE.needs_fetch(ref) else None


def _hub_note(ref: hub.HubRef, record: dict) -> str:
    sha = str(record.get("sha") or ref.rev)
    return f"metadata from {ref.key.split('@')[0]}@{sha[:12]} (headers only, no weights downloaded)"


def _hub_weight_files(files: dict[str, int]) -> tuple[int, str]:
    """Bytes of the weight files of a repository: safetensors when present (other formats are copies)."""
    weights = {n: s for n, s in files.items() if n.lower().endswith(hub.WEIGHT_SUFFIXES)}
    safetensors = {n: s for n, s in weights.items() if n.endswith(".safetensors")}
    chosen = safetensors or weights
    kinds = sorted({n.rsplit(".", 1)[-1] for n in chosen}) or ["none"]
    return sum(chosen.values()), "/".join(kinds)


def _estimate_hub_hf(spec: schemas.ModelSpec, ref: hub.HubRef, record: dict) -> MemoryEstimate:
    cfg = record.get("config")
    if not isinstance(cfg, dict):
        what = f"{ref.filename} of " if ref.filename else ""
        raise EstimateError(f"{what}{ref.hub} repository {ref.repo_id}@{ref.rev} has no config.json at the top "
                            f"level: {spec.backend} needs a Hugging Face layout (or give memory_bytes)")
    try:
        shape = hf.parse_shape(cfg)
    except hf.HFError as exc:
        raise EstimateError(f"{ref.key}: {exc}") from None
    notes = [_hub_note(ref, record)]
    shards = record.get("shards")
    weights: hf.Weights | None = None
    files: dict[str, int] = record.get("files") or {}
    if record.get("headers_refused"):
        size = sum(s for n, s in files.items() if n.endswith(".safetensors") and "/" not in n)
        weights = hf.weights_from_index({"metadata": {"total_size": size}}, shape)
        if weights is not None:
            weights.method = "hub_file_size"
            notes.append(f"safetensors headers not readable ({record['headers_refused']}): "
                         "the files' sizes stand for the weights")
    elif shards:
        weights = hf.weights_from_sums([(int(t), int(f), frozenset(d)) for t, f, d in shards.values()])
    elif record.get("index"):
        weights = hf.weights_from_index(record["index"], shape)
    if weights is None:
        weights = hf.weights_from_shape(shape)
    return _hf_estimate(spec, shape, weights, tuple(notes))


def _estimate_hub_files(spec: schemas.ModelSpec, ref: hub.HubRef, record: dict) -> MemoryEstimate:
    files: dict[str, int] = record.get("files") or {}
    note = _hub_note(ref, record)
    if ref.filename:
        size = int(files.get(ref.filename) or 0)
        shape = record.get("gguf")
        if ref.filename.lower().endswith(".gguf"):
            return _gguf_estimate(spec, size, GGUFShape(**shape) if isinstance(shape, dict) else None, (note,))
        weights, kinds = size, ref.filename
    else:
        weights, kinds = _hub_weight_files(files)
    return MemoryEstimate(method="hub_file_size", weights=weights, kv_cache=0, fixed_overhead=_COMPUTE_OVERHEAD,
                          cpu_capable=True, notes=(note, f"weights: the size of the repository's files ({kinds})"))


def _estimate_hub(spec: schemas.ModelSpec, ref: hub.HubRef) -> MemoryEstimate:
    try:
        record = hub.CACHE.get(ref)
    except hub.HubError as exc:
        if (reported := locality.REPORTED.get(ref.key)) is not None:  # a worker's copy answers instead
            return estimate_reported(spec, *reported, why=f"{ref.hub} metadata unavailable: {exc}", ref=ref)
        if exc.transient or spec.backend in schemas.HF_BACKENDS:
            hint = "; give memory_bytes to deploy without it"
            if ref.kind == "huggingface" and not spec.source.startswith(tuple(schemas.HUBS)):
                hint = "; there is no downloaded snapshot in this server's Hugging Face cache either" + hint
            raise MetadataUnavailable(f"cannot fetch the metadata of {ref.key}: {exc}{hint}") from None
        # The hub answered for certain (no such repository or file, a token needed): the worker's download
        # says so on the instance, and the agent may hold a token this server lacks.
        return MemoryEstimate(method="unknown", weights=0, kv_cache=0, fixed_overhead=_COMPUTE_OVERHEAD,
                              cpu_capable=True, notes=(f"hub metadata unavailable ({exc}): the claim covers "
                                                       "the overhead only",))
    if spec.backend in schemas.HF_BACKENDS:
        return _estimate_hub_hf(spec, ref, record)
    return _estimate_hub_files(spec, ref, record)


# --- entry points ----------------------------------------------------------------------


def estimate(spec: schemas.ModelSpec) -> MemoryEstimate:
    """What one replica of `spec` needs. Reads headers only (a hub's over HTTP, bounded, cached);
    raises EstimateError when it cannot tell."""
    if spec.memory_bytes is not None:
        hf_backend = spec.backend in schemas.HF_BACKENDS
        return MemoryEstimate(method="override", weights=spec.memory_bytes, kv_cache=0,
                              tp_sizes=(1, 2, 4, 8) if hf_backend else (), cpu_capable=not hf_backend,
                              max_model_len=spec.max_model_len, concurrency=spec.concurrency,
                              notes=("memory_bytes given in the spec",))
    ref = hub_ref(spec)
    if ref is not None:
        return _estimate_hub(spec, ref)
    if not os.path.exists(spec.source) and (reported := locality.REPORTED.get(spec.source)) is not None:
        return estimate_reported(spec, *reported, why=f"{spec.source} is not on this server")
    if spec.backend in schemas.HF_BACKENDS:
        return _estimate_hf(spec)
    return _estimate_gguf(spec)


def estimate_reported(spec: schemas.ModelSpec, record: dict, worker: str, why: str,
                      ref: hub.HubRef | None = None) -> MemoryEstimate:
    """The estimate from what a worker's agent read of its copy (server/scheduler/locality.py)."""
    note = f"{why}; read by worker {worker} from its copy of the files"
    if ref is not None:
        found = _estimate_hub_hf(spec, ref, record) if spec.backend in schemas.HF_BACKENDS \
            else _estimate_hub_files(spec, ref, record)
        return replace(found, notes=(note, *(n for n in found.notes if not n.startswith("metadata from "))))
    files: dict[str, int] = record.get("files") or {}
    if spec.backend in schemas.HF_BACKENDS:
        try:
            shape = hf.parse_shape(record.get("config") or {})
        except hf.HFError as exc:
            raise EstimateError(f"{spec.source} (as worker {worker} reads it): {exc}") from None
        shards = record.get("shards") or {}
        weights = (hf.weights_from_sums([(int(t), int(f), frozenset(d)) for t, f, d in shards.values()]) if shards
                   else hf.weights_from_index(record.get("index") or {}, shape) or hf.weights_from_shape(shape))
        return _hf_estimate(spec, shape, weights, (note,))
    shape = record.get("gguf")
    return _gguf_estimate(spec, sum(files.values()), GGUFShape(**shape) if isinstance(shape, dict) else None, (note,))


def estimate_bytes(spec: schemas.ModelSpec) -> int:
    """Bytes one replica needs on one device (one GPU or host RAM)."""
    return estimate(spec).total()
