"""Reading a Hugging Face layout: config.json, safetensors headers, the safetensors index.

Pure file reading (a few kilobytes per file: headers, never weights) and arithmetic on
the model's shape. Callers run it off the event loop and cache it.

Where the weight bytes come from, best first:
1. the safetensors headers of every shard (exact bytes and dtypes of every tensor),
2. the index's ``metadata.total_size`` (exact bytes, dtypes from the config),
3. the config's shape (parameter count times bytes per parameter, quantization included).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

# Bytes per element of safetensors dtypes.
ST_BYTES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_ST = {"F32", "F16", "BF16"}
TORCH_BYTES: dict[str, int] = {
    "float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
}
# Encoder-only families: no KV cache, no CUDA graphs in vLLM's pooling runner.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet",
                 "nomic_bert", "new", "modernbert", "camembert", "ernie"}
# MLPs without a gate (two matrices, not three).
UNGATED_TYPES = ENCODER_TYPES | {"gpt2", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "mpt", "starcoder2",
                                 "gpt_bigcode"}


class HFError(Exception):
    """The layout cannot be read; the message says what is missing."""


@dataclass
class Weights:
    bytes: int  # at the checkpoint's dtypes
    float_bytes: int  # of that, tensors stored as F32/F16/BF16 (these follow --dtype)
    float_elem_bytes: int  # bytes per element of those float tensors in the checkpoint (0: mixed/unknown)
    method: str  # safetensors | index | config


@dataclass
class Shape:
    model_type: str
    architectures: list[str]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position: int
    torch_dtype: str
    tied: bool
    encoder_only: bool
    gated: bool
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    moe_layers: int = 0
    shared_intermediate: int = 0
    mla: dict[str, int] = field(default_factory=dict)  # DeepSeek MLA: a latent is cached instead of K and V
    quant_method: str | None = None
    quant_bits: float | None = None  # bits per quantized linear weight, overheads included
    kv_cache_dtype_bytes: int | None = None  # from the checkpoint's kv cache scheme
    vision: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _quantization(cfg: dict[str, Any]) -> tuple[str | None, float | None, int | None, list[str]]:
    """(method, effective bits per quantized weight, kv cache bytes, notes)."""
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(q, dict):
        return None, None, None, []
    method = str(q.get("quant_method") or q.get("quant_type") or "unknown").lower()
    notes: list[str] = []
    kv_bytes = None
    if method == "fp8" or method == "fbgemm_fp8":
        return "fp8", 8.0, None, notes
    if method in ("awq", "gptq", "marlin", "awq_marlin", "gptq_marlin", "auto-round", "autoround"):
        bits = int(q.get("bits") or q.get("w_bit") or 4)
        group = int(q.get("group_size") or q.get("q_group_size") or 128)
        # scale (fp16) and zero point (bits) per group
        extra = (16 + bits) / group if group > 0 else 0.0
        return method.split("_")[0], bits + extra, None, notes
    if method == "bitsandbytes":
        if q.get("load_in_8bit"):
            return "bitsandbytes", 8.0 + 32 / 64, None, notes
        return "bitsandbytes", 4.0 + 32 / 64, None, notes
    if method == "compressed-tensors":
        bits = 16.0
        for group in (q.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            num_bits = weights.get("num_bits")
            if num_bits:
                group_size = weights.get("group_size") or 0
                bits = float(num_bits) + ((16 + num_bits) / group_size if group_size else 0.0)
                break
        scheme = q.get("kv_cache_scheme") or {}
        if scheme.get("num_bits") == 8:
            kv_bytes = 1
        return f"compressed-tensors-w{int(bits)}", bits, kv_bytes, notes
    if method == "mxfp4":
        return "mxfp4", 4.25, None, notes
    notes.append(f"quantization {method!r} not modelled: weights counted at 16 bits unless the files say otherwise")
    return method, None, None, notes


def parse_shape(cfg: dict[str, Any]) -> Shape:
    """The architecture numbers that decide memory, from config.json (text config for VLMs)."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    # Many VLM configs keep the LLM under text_config; fields missing there fall back to the top level.
    merged = {**cfg, **text} if text else cfg
    model_type = str(_get(merged, "model_type", default="")).lower()
    architectures = [str(a) for a in (cfg.get("architectures") or [])]
    hidden = _get(merged, "hidden_size", "d_model", "n_embd", "dim")
    layers = _get(merged, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _get(merged, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if not (hidden and layers and heads):
        raise HFError("config.json lacks hidden_size, num_hidden_layers or num_attention_heads")
    hidden, layers, heads = int(hidden), int(layers), int(heads)
    kv_heads = _get(merged, "num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")
    if kv_heads is None:
        kv_heads = 1 if merged.get("multi_query") else heads
    head_dim = int(_get(merged, "head_dim", default=0) or hidden // heads)
    intermediate = int(_get(merged, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", default=0) or 4 * hidden)
    vocab = int(_get(merged, "vocab_size", "padded_vocab_size", default=32000))
    max_position = int(_get(merged, "max_position_embeddings", "max_sequence_length", "seq_length", "n_positions",
                            "max_seq_len", default=2048))
    torch_dtype = str(_get(cfg, "torch_dtype", "dtype", default="") or _get(merged, "torch_dtype", "dtype", default="bfloat16"))
    encoder_only = model_type in ENCODER_TYPES or any(
        a.endswith(("BertModel", "RobertaModel", "ForMaskedLM")) for a in architectures)
    if model_type in ("roberta", "xlm-roberta", "camembert") and max_position > 2:
        max_position -= 2  # positions start after the padding index
    tied = bool(merged.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)))
    method, bits, kv_bytes, notes = _quantization(cfg)
    shape = Shape(model_type=model_type, architectures=architectures, hidden=hidden, layers=layers, heads=heads,
                  kv_heads=int(kv_heads), head_dim=head_dim, intermediate=intermediate, vocab=vocab,
                  max_position=max_position, torch_dtype=torch_dtype.replace("torch.", ""), tied=tied,
                  encoder_only=encoder_only, gated=model_type not in UNGATED_TYPES, quant_method=method,
                  quant_bits=bits, kv_cache_dtype_bytes=kv_bytes, notes=notes)
    experts = _get(merged, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", default=0) or 0
    if experts:
        shape.experts = int(experts)
        shape.experts_per_token = int(_get(merged, "num_experts_per_tok", "moe_top_k", "top_k", default=2))
        shape.moe_intermediate = int(_get(merged, "moe_intermediate_size", default=0) or intermediate)
        dense_first = int(_get(merged, "first_k_dense_replace", default=0) or 0)
        step = int(_get(merged, "decoder_sparse_step", "moe_layer_freq", default=1) or 1)
        mlp_only = set(merged.get("mlp_only_layers") or [])
        shape.moe_layers = sum(1 for i in range(layers)
                               if i >= dense_first and i not in mlp_only and (i + 1) % step == 0)
        shared = _get(merged, "shared_expert_intermediate_size", default=0) or 0
        if not shared and merged.get("n_shared_experts"):
            shared = int(merged["n_shared_experts"]) * shape.moe_intermediate
        shape.shared_intermediate = int(shared)
    if merged.get("kv_lora_rank"):
        shape.mla = {"q_lora": int(merged.get("q_lora_rank") or 0), "kv_lora": int(merged["kv_lora_rank"]),
                     "nope": int(merged.get("qk_nope_head_dim") or 128), "rope": int(merged.get("qk_rope_head_dim") or 64),
                     "v": int(merged.get("v_head_dim") or 128)}
    vision = cfg.get("vision_config")
    if isinstance(vision, dict) and (vision.get("hidden_size") or vision.get("embed_dim")):
        vh = int(vision.get("hidden_size") or vision.get("embed_dim"))
        shape.vision = {"hidden": vh, "layers": int(vision.get("num_hidden_layers") or vision.get("depth") or 24),
                        "intermediate": int(vision.get("intermediate_size") or 4 * vh)}
    return shape


def parameter_counts(shape: Shape) -> tuple[int, int]:
    """(linear-layer parameters that quantization applies to, other parameters: embeddings, norms, vision)."""
    h, hd = shape.hidden, shape.head_dim
    if shape.mla:
        m, n = shape.mla, shape.heads
        q = (h * m["q_lora"] + m["q_lora"] * n * (m["nope"] + m["rope"])) if m["q_lora"] else h * n * (m["nope"] + m["rope"])
        attn = q + h * (m["kv_lora"] + m["rope"]) + m["kv_lora"] * n * (m["nope"] + m["v"]) + n * m["v"] * h
    else:
        attn = h * shape.heads * hd + 2 * h * shape.kv_heads * hd + shape.heads * hd * h
    mats = 3 if shape.gated else 2
    dense_mlp = mats * h * shape.intermediate
    linear = shape.layers * attn
    if shape.is_moe:
        moe_mlp = shape.experts * 3 * h * shape.moe_intermediate + 3 * h * shape.shared_intermediate
        linear += shape.moe_layers * moe_mlp + (shape.layers - shape.moe_layers) * dense_mlp
        other_router = shape.moe_layers * h * shape.experts
    else:
        linear += shape.layers * dense_mlp
        other_router = 0
    embeddings = shape.vocab * h
    other = embeddings + other_router + shape.layers * 2 * h + h
    if shape.encoder_only:
        other += shape.max_position * h + 2 * h  # absolute positions, token types
    elif not shape.tied:
        other += embeddings  # lm_head (quantizers leave it in 16 bits)
    if shape.vision:
        vh, vl, vi = shape.vision["hidden"], shape.vision["layers"], shape.vision["intermediate"]
        other += vl * (4 * vh * vh + 2 * vh * vi) + vh * h * 4  # encoder blocks and a projector
    return int(linear), int(other)


def weights_from_shape(shape: Shape) -> Weights:
    linear, other = parameter_counts(shape)
    float_bytes_each = TORCH_BYTES.get(shape.torch_dtype, 2)
    if shape.quant_bits is not None:
        quantized = math.ceil(linear * shape.quant_bits / 8)
        floats = other * float_bytes_each
        return Weights(quantized + floats, floats, float_bytes_each, "config")
    total = (linear + other) * float_bytes_each
    return Weights(total, total, float_bytes_each, "config")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        length = safetensors_header_length(handle.read(8), path.name)
        raw = handle.read(length)
    return parse_safetensors_header(raw, path.name)


def header_sums(header: dict[str, Any], name: str) -> tuple[int, int, frozenset[str]]:
    """(all tensor bytes, float tensor bytes, float dtypes) of one shard's parsed header (a local file's or a hub's)."""
    total = floats = 0
    float_dtypes: set[str] = set()
    for tensor, info in header.items():
        if tensor == "__metadata__" or not isinstance(info, dict):
            continue
        start, end = info.get("data_offsets", (0, 0))
        nbytes = int(end) - int(start)
        if nbytes < 0:
            raise HFError(f"{name}: tensor {tensor} has negative size")
        total += nbytes
        if info.get("dtype") in FLOAT_ST:
            floats += nbytes
            float_dtypes.add(info["dtype"])
    return total, floats, frozenset(float_dtypes)


def parse_safetensors_header(raw: bytes, name: str) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise HFError(f"{name}: unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise HFError(f"{name}: unreadable safetensors header")
    return header


def safetensors_header_length(head: bytes, name: str) -> int:
    """The header length in a safetensors file's first 8 bytes (bounded: a header is never the weights)."""
    if len(head) < 8:
        raise HFError(f"{name}: not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= 256 * 1024**2:
        raise HFError(f"{name}: not a safetensors file (header length {length})")
    return length


@lru_cache(maxsize=1024)
def _header_sums(path: str, _mtime_ns: int, _size: int) -> tuple[int, int, frozenset[str]]:
    """(all tensor bytes, float tensor bytes, float dtypes) of one shard, from its header alone."""
    return header_sums(read_safetensors_header(Path(path)), Path(path).name)


def weights_from_sums(sums: list[tuple[int, int, frozenset[str]]]) -> Weights:
    """Weights from the header sums of every shard."""
    total = floats = 0
    dtypes: set[str] = set()
    for t, f, d in sums:
        total, floats = total + t, floats + f
        dtypes |= d
    elem = int(ST_BYTES[next(iter(dtypes))]) if len(dtypes) == 1 else 0
    return Weights(total, floats, elem, "safetensors")


def weights_from_index(index: dict[str, Any], shape: Shape | None) -> Weights | None:
    """Weights from the index's metadata.total_size (shards absent); None without it."""
    size = (index.get("metadata") or {}).get("total_size")
    if not isinstance(size, (int, float)) or size <= 0:
        return None
    elem = TORCH_BYTES.get(shape.torch_dtype, 2) if shape else 2
    if shape is not None and shape.quant_bits is not None:
        # Only the unquantized part (embeddings, norms) follows --dtype.
        _, other = parameter_counts(shape)
        floats = min(int(size), other * elem)
    else:
        floats = int(size)
    return Weights(int(size), floats, elem, "index")


def index_shards(index: dict[str, Any]) -> list[str]:
    return sorted(set((index.get("weight_map") or {}).values()))


def read_weights(directory: Path, shape: Shape | None) -> Weights | None:
    """Weights from headers (every shard present) or from the index; None when neither is there."""
    index_path = directory / "model.safetensors.index.json"
    index: dict[str, Any] | None = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except ValueError as exc:
            raise HFError(f"{index_path.name}: {exc}") from None
    shards: list[Path]
    if index is not None:
        shards = [directory / name for name in index_shards(index)]
    else:
        shards = sorted(directory.glob("*.safetensors"))
    if shards and all(p.is_file() for p in shards):
        sums = []
        for shard in shards:
            stat = shard.stat()
            sums.append(_header_sums(str(shard), stat.st_mtime_ns, stat.st_size))
        return weights_from_sums(sums)
    if index is not None:
        return weights_from_index(index, shape)
    return None


def hub_cache_dir(repo_id: str) -> Path | None:
    """A downloaded snapshot of `org/name` in the Hugging Face cache, if there is one."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    base = home / f"models--{repo_id.replace('/', '--')}"
    ref = base / "refs" / "main"
    if ref.is_file():
        snapshot = base / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    snapshots = sorted((base / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return snapshots[0].parent if snapshots else None


def resolve(source: str) -> Path:
    path = Path(source)
    if path.is_absolute():
        if path.is_file() and path.name == "config.json":
            return path.parent
        if (path / "config.json").is_file():
            return path
        raise HFError(f"no config.json in {source}")
    cached = hub_cache_dir(source)
    if cached is None:
        raise HFError(f"{source!r} is not a local directory and has no downloaded snapshot in the Hugging Face "
                      "cache; download it, or give memory_bytes")
    return cached


@lru_cache(maxsize=512)
def _load(directory: str, _config_mtime: int, _listing: tuple[tuple[str, int], ...]) -> tuple[Shape, Weights]:
    path = Path(directory)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise HFError(f"cannot read {path / 'config.json'}: {exc}") from None
    if not isinstance(cfg, dict):
        raise HFError(f"{path / 'config.json'} is not a JSON object")
    shape = parse_shape(cfg)
    weights = read_weights(path, shape) or weights_from_shape(shape)
    return shape, weights


def load(source: str) -> tuple[Shape, Weights, Path]:
    directory = resolve(source)
    listing = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in directory.iterdir()
                           if p.name.endswith((".safetensors", ".json"))))
    shape, weights = _load(str(directory), (directory / "config.json").stat().st_mtime_ns, listing)
    return shape, weights, directory
