"""Memory a replica needs. v0: llama.cpp GGUF = weights + f16 KV cache for the context + compute buffer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from server import schemas

MiB = 1024**2
_COMPUTE_OVERHEAD = 64 * MiB  # llama.cpp's compute buffers and the server's own heap, measured small


@dataclass(frozen=True)
class GGUFShape:
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int


@lru_cache(maxsize=256)
def _gguf_shape(path: str, _mtime_ns: int) -> GGUFShape | None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception:  # not a GGUF we can read: fall back to the file size alone
        return None
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        return None
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()

    def value(key: str, default: int) -> int:
        field = reader.get_field(f"{arch}.{key}")
        return int(field.parts[field.data[0]][0]) if field is not None else default

    n_head = value("attention.head_count", 1)
    return GGUFShape(value("block_count", 1), value("embedding_length", 0), n_head,
                     value("attention.head_count_kv", n_head))


def estimate_bytes(spec: schemas.ModelSpec) -> int:
    """Bytes one replica needs, wherever it runs (GPU or host RAM)."""
    try:
        stat = os.stat(spec.source)
    except OSError:
        return _COMPUTE_OVERHEAD
    weights = stat.st_size
    shape = _gguf_shape(spec.source, stat.st_mtime_ns)
    kv = 0
    if shape and shape.n_head:
        kv_width = shape.n_embd * shape.n_head_kv // shape.n_head
        kv = 2 * shape.n_layers * spec.context_length * kv_width * 2  # K and V, f16
    return weights + kv + _COMPUTE_OVERHEAD
