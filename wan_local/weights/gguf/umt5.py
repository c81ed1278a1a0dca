"""A GGUF UMT5-XXL encoder (city96/umt5-xxl-encoder-gguf: architecture `t5encoder`, llama.cpp tensor names, fact
sheet §3.4) as a state dict under transformers' UMT5 names (§4.3), dequantized on load.

The encoder runs on the CPU once per prompt (and its embeddings are cached), so its weights are dequantized to the
run dtype when the file loads, one tensor at a time (peak: the converted weights plus one tensor's float32
temporaries, the file's pages mapped). The tokenizer such files carry as `tokenizer.ggml.*` key-values is rebuilt
by `tokenizer.sentencepiece_model_from_gguf` (`weights.tokenizer_source`: no tokenizer folder is needed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from wan_local.errors import CheckpointError
from wan_local.weights.gguf.quants import dequantize
from wan_local.weights.gguf.reader import GGUFFile, read_gguf

ARCHITECTURE = "t5encoder"
_TOP = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_BLOCK_NAME = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.weight")


def transformers_name(name: str) -> str | None:
    """transformers UMT5EncoderModel name of a llama.cpp T5-encoder tensor name (None for an unknown one)."""
    if name in _TOP:
        return _TOP[name]
    match = _BLOCK_NAME.fullmatch(name)
    if match and match.group(2) in _BLOCK:
        return f"encoder.block.{match.group(1)}.{_BLOCK[match.group(2)]}.weight"
    return None


def transformers_names(gf: GGUFFile) -> dict[str, str]:
    """{stored name: transformers name} of every tensor; CheckpointError listing names no rule maps."""
    names = {name: transformers_name(name) for name in gf.tensors}
    unknown = sorted(k for k, v in names.items() if v is None)
    if unknown:
        raise CheckpointError(
            f"{gf.path}: {len(unknown)} tensors of this {ARCHITECTURE} GGUF are not UMT5 encoder weights "
            f"({', '.join(unknown[:5])}); is it the UMT5-XXL encoder?"
        )
    return names  # type: ignore[return-value]


def read_gguf_umt5(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers-named UMT5 tensors of a `t5encoder` GGUF, every one dequantized to `dtype`."""
    gf = read_gguf(path)
    if gf.architecture != ARCHITECTURE:
        raise CheckpointError(
            f"{path} holds a {gf.architecture or 'unknown'!r} GGUF model, not the UMT5 text encoder ({ARCHITECTURE!r})"
        )
    out = {}
    for stored, name in transformers_names(gf).items():
        info = gf.tensors[stored]
        out[name] = dequantize(gf.raw(stored), info.ggml_type, info.shape, dtype)
    return out
