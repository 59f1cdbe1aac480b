"""Generate a tiny random-weight llama-architecture GGUF model for tests.

The model is meaningless (random weights) but structurally complete, so the
real llama.cpp server loads it in a fraction of a second and serves chat,
completion and streaming requests with it:

* llama architecture: 2 layers, embedding width 64, 4 attention heads
  (2 KV heads, head dim 16), feed-forward 128, context length 2048, rope.
* SentencePiece-style ("llama" tokenizer model) vocabulary: ``<unk>``,
  ``<s>``, ``</s>``, the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``,
  the ChatML control tokens ``<|im_start|>``/``<|im_end|>``, single
  characters and a few hundred ``▁``-prefixed word pieces (every prefix of
  each word is present, so the SPM merge procedure reaches whole words).
* A ChatML-style Jinja chat template in ``tokenizer.chat_template``.

The weights are biased so that sampling almost always picks ordinary word
pieces (never control or byte tokens), which keeps generated text printable
and stops generation only at ``max_tokens``.

Usage::

    from tiny_gguf import write_tiny_gguf
    write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)

or ``python tests/tiny_gguf.py OUT.gguf [--seed N]``.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np
import gguf

ARCH = "llama"
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = N_EMBD // N_HEAD  # 16
N_FF = 128
N_CTX = 2048
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = """
the of and to in is you that it he was for on are as with his they at be this
have from or one had by word but not what all were we when your can said there
use an each which she do how their if will up other about out many then them
these so some her would make like him into time has look two more write go see
number no way could people my than first water been call who its now find long
down day did get come made may part hello world model server test chat token
request response stream answer question yes ok good new old big small fast slow
here where why because just very also only over after before again still say
""".split()

_CHARS = (
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "0123456789"
    ".,!?;:'\"-()"
)

SPACE = "\u2581"  # ▁, SentencePiece's word-boundary marker


def _build_vocab() -> tuple[list[str], list[float], list[int], set[int]]:
    """Return (tokens, scores, types, ids of "wordy" tokens)."""
    TT = gguf.TokenType
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(text: str, score: float, ttype: int) -> int:
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))
        return len(tokens) - 1

    add("<unk>", 0.0, TT.UNKNOWN)
    add("<s>", 0.0, TT.CONTROL)
    add("</s>", 0.0, TT.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, TT.BYTE)
    add("<|im_start|>", 0.0, TT.CONTROL)
    add("<|im_end|>", 0.0, TT.CONTROL)

    wordy: set[int] = set()
    seen: set[str] = set(tokens)
    # Single characters (with and without the word-boundary marker).
    for piece in [SPACE] + list(_CHARS) + [SPACE + c for c in _CHARS]:
        if piece not in seen:
            seen.add(piece)
            wordy.add(add(piece, -1000.0 + len(piece), TT.NORMAL))
    # Every prefix of every word, so SPM's pairwise merges can build whole
    # words; longer pieces get higher scores and so are preferred.
    for word in _WORDS:
        full = SPACE + word
        for end in range(3, len(full) + 1):
            piece = full[:end]
            if piece not in seen:
                seen.add(piece)
                wordy.add(add(piece, float(len(piece)) - len(tokens) * 1e-4, TT.NORMAL))
    return tokens, scores, types, wordy


def write_tiny_gguf(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write the tiny model to ``path`` and return it as a ``pathlib.Path``.

    Deterministic for a given ``seed``. About 0.67 MB (674,208 bytes), float32
    tensors, vocabulary of 704 tokens.
    """
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    tokens, scores, types, wordy = _build_vocab()
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(out), ARCH)
    w.add_name("tiny-random-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_FREQ_BASE)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(n_vocab)

    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHAT_TEMPLATE)

    f32 = np.float32

    def rnd(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(f32)

    # numpy shapes are the reverse of ggml's ne[] order.
    # Every token embedding has a large constant component in dim 0 and the
    # layers are near-identity (small weights), so after output_norm dim 0 is
    # large and positive; the output matrix uses it to favour word pieces
    # (+) over control/byte tokens (-). That keeps sampled text printable.
    token_embd = rnd(n_vocab, N_EMBD, std=0.5)
    token_embd[:, 0] = 4.0
    output = rnd(n_vocab, N_EMBD, std=0.5)
    sign = np.full(n_vocab, -1.0, dtype=f32)
    sign[sorted(wordy)] = 1.0
    output[:, 0] = sign

    w.add_tensor("token_embd.weight", token_embd)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=f32))
        w.add_tensor(p + "attn_q.weight", rnd(N_HEAD * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_k.weight", rnd(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_v.weight", rnd(N_HEAD_KV * HEAD_DIM, N_EMBD))
        w.add_tensor(p + "attn_output.weight", rnd(N_EMBD, N_HEAD * HEAD_DIM))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=f32))
        w.add_tensor(p + "ffn_gate.weight", rnd(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", rnd(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", rnd(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=f32))
    w.add_tensor("output.weight", output)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiny random-weight llama GGUF model.")
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    args = ap.parse_args(argv)
    path = write_tiny_gguf(args.out, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
