"""UMT5-XXL encoder checkpoints: naming detection, key maps, fp8 dequantisation and the model config.

Three sources end up as one transformers ``UMT5EncoderModel`` state dict (names of spec §4.3):

- the official ``models_t5_umt5-xxl-enc-bf16.pth`` (official names, §4.2) → ``official_umt5_to_transformers``;
- a diffusers ``text_encoder`` folder (transformers names already);
- a ComfyUI ``umt5_xxl_*.safetensors`` (bare transformers names, or under a bundle prefix such as
  ``text_encoders.umt5.transformer.``; fp16, or "fp8_scaled": float8 Linear weights with a per-layer scale; the
  tokenizer as ``spiece_model``, which is not a weight and is skipped here) → ``normalize_transformers_umt5``.

``prepare_umt5_state_dict`` does detection, mapping, config derivation and the key check in one call.
No file is read here: callers load the tensors (memory-mapped) and pass the file name for messages.
Renaming never copies tensors; only fp8 weights are materialised (dequantised one layer at a time).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import torch

from wan_local.errors import CheckpointError
from wan_local.weights.fp8 import FP8_DTYPES, dequantize_state_dict
from wan_local.weights.tokenizer_source import SPIECE_KEY

if TYPE_CHECKING:
    from transformers import UMT5Config

logger = logging.getLogger(__name__)

Naming = Literal["official", "transformers"]

# Not stored in any checkpoint; fixed by the architecture (spec §4.1).
RELATIVE_ATTENTION_MAX_DISTANCE = 128
LAYER_NORM_EPS = 1e-6

# Official per-block suffix → transformers per-block suffix (spec §4.3).
_BLOCK_MAP: dict[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_MAP: dict[str, str] = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_TRANSFORMERS_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_OFFICIAL_Q = re.compile(r"blocks\.\d+\.attn\.q\.weight")

# Transformers keeps the embedding twice (tied); checkpoints may store either name or both.
TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"

# Keys that locate the UMT5 encoder inside a (possibly prefixed / bundled) transformers-named file.
_ANCHORS = (
    "encoder.final_layer_norm.weight",
    "shared.weight",
    "encoder.block.0.layer.0.SelfAttention.q.weight",
)

_LIST_LIMIT = 8


def _where(source: str | None) -> str:
    return source if source else "UMT5 state dict"


def _preview(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", … ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


def detect_umt5_naming(sd: Mapping[str, torch.Tensor], source: str | None = None) -> Naming:
    """Tell which naming a UMT5 encoder state dict uses: ``"official"`` (Wan ``.pth``, §4.2) or
    ``"transformers"`` (diffusers text_encoder / ComfyUI, possibly prefixed).

    Raises CheckpointError if it is neither.
    """
    if "token_embedding.weight" in sd or any(_OFFICIAL_Q.fullmatch(k) for k in sd):
        return "official"
    if any(k.endswith(anchor) for k in sd for anchor in (*_ANCHORS, TIED_EMBEDDING_KEY)):
        return "transformers"
    raise CheckpointError(
        f"{_where(source)} is not a UMT5 text encoder: expected official keys (token_embedding.weight, "
        f"blocks.N.attn.q.weight, …) or transformers keys (shared.weight, encoder.block.N.…); "
        f"found {len(sd)} keys: {_preview(sd)}."
    )


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str | None) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{_where(source)}: missing key {key}, needed to infer the UMT5 configuration.")
    return sd[key].shape


def _block_indices(sd: Mapping[str, torch.Tensor], pattern: re.Pattern[str]) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def umt5_config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str | None = None) -> UMT5Config:
    """Build the ``transformers.UMT5Config`` of an encoder state dict from its tensor shapes.

    Accepts official names or (unprefixed) transformers names. vocab/d_model come from the embedding,
    num_heads/num_buckets from the per-layer relative-position table [buckets, heads], d_kv from q's rows,
    d_ff from the FFN, num_layers from the block indices; max distance 128, gated tanh-GELU, eps 1e-6 are
    fixed by the architecture. Dropout is 0 (inference only).
    """
    from transformers import UMT5Config

    if detect_umt5_naming(sd, source) == "official":
        emb, blocks = "token_embedding.weight", _block_indices(sd, _OFFICIAL_BLOCK)
        q, ff, bias = "attn.q.weight", "ffn.fc1.weight", "pos_embedding.embedding.weight"
        prefix = "blocks.{}."
    else:
        emb, blocks = "shared.weight", _block_indices(sd, _TRANSFORMERS_BLOCK)
        if emb not in sd and TIED_EMBEDDING_KEY in sd:
            emb = TIED_EMBEDDING_KEY
        q, ff = _BLOCK_MAP["attn.q.weight"], _BLOCK_MAP["ffn.fc1.weight"]
        bias, prefix = _BLOCK_MAP["pos_embedding.embedding.weight"], "encoder.block.{}."
    if not blocks:
        raise CheckpointError(f"{_where(source)}: no encoder blocks found.")
    first = prefix.format(blocks[0])
    vocab_size, d_model = _shape(sd, emb, source)
    num_buckets, num_heads = _shape(sd, first + bias, source)
    inner_dim = _shape(sd, first + q, source)[0]
    if inner_dim % num_heads:
        raise CheckpointError(
            f"{_where(source)}: attention width {inner_dim} is not a multiple of the {num_heads} heads "
            f"given by {first + bias}."
        )
    return UMT5Config(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        d_kv=int(inner_dim // num_heads),
        d_ff=int(_shape(sd, first + ff, source)[0]),
        num_layers=blocks[-1] + 1,
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=LAYER_NORM_EPS,
        dropout_rate=0.0,
    )


def expected_umt5_shapes(config: UMT5Config, naming: Naming = "transformers") -> dict[str, tuple[int, ...]]:
    """Every key of a complete encoder state dict in ``naming`` with its shape (tied alias not included)."""
    inner, d, ff = config.num_heads * config.d_kv, config.d_model, config.d_ff
    block = {
        "norm1.weight": (d,),
        "attn.q.weight": (inner, d),
        "attn.k.weight": (inner, d),
        "attn.v.weight": (inner, d),
        "attn.o.weight": (d, inner),
        "pos_embedding.embedding.weight": (config.relative_attention_num_buckets, config.num_heads),
        "norm2.weight": (d,),
        "ffn.gate.0.weight": (ff, d),
        "ffn.fc1.weight": (ff, d),
        "ffn.fc2.weight": (d, ff),
    }
    shapes = {"token_embedding.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.num_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    if naming == "official":
        return shapes
    return {_official_to_transformers_key(k): v for k, v in shapes.items()}


def check_umt5_keys(
    sd: Mapping[str, torch.Tensor], config: UMT5Config, naming: Naming, source: str | None = None
) -> None:
    """Raise CheckpointError listing missing / unexpected keys and wrong shapes (first few + count)."""
    expected = expected_umt5_shapes(config, naming)
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {expected[k]})"
        for k in sorted(expected.keys() & sd.keys())
        if tuple(sd[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} tensors with a wrong shape: {_preview(wrong)}")
    raise CheckpointError(
        f"{_where(source)} does not match a UMT5 encoder ({naming} names, {config.num_layers} layers, "
        f"d_model {config.d_model}): " + "; ".join(parts) + ". Is this the right file, and is it complete?"
    )


def _official_to_transformers_key(key: str) -> str | None:
    if key in _TOP_MAP:
        return _TOP_MAP[key]
    m = _OFFICIAL_BLOCK.fullmatch(key)
    if m and m.group(2) in _BLOCK_MAP:
        return f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
    return None


def official_umt5_to_transformers(sd: Mapping[str, torch.Tensor], source: str | None = None) -> dict[str, torch.Tensor]:
    """Rename an official Wan UMT5 state dict (§4.2) to transformers ``UMT5EncoderModel`` names (§4.3).

    Tensors are not copied. The tied ``encoder.embed_tokens.weight`` is not emitted (only ``shared.weight``).
    Raises CheckpointError listing keys that have no transformers counterpart.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        new = _official_to_transformers_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise CheckpointError(
            f"{_where(source)}: {len(unknown)} unexpected keys for an official UMT5 encoder: {_preview(unknown)}."
        )
    return out


def _find_prefix(sd: Mapping[str, torch.Tensor], source: str | None) -> str:
    """Prefix in front of the encoder's transformers names ('' for a plain text_encoder file)."""
    for anchor in _ANCHORS:
        prefixes = {k[: -len(anchor)] for k in sd if k == anchor or k.endswith("." + anchor)}
        # A decoder's "decoder.final_layer_norm.weight" never matches; ".encoder." would be an encoder prefix.
        if len(prefixes) > 1:
            umt5 = {p for p in prefixes if "umt5" in p.lower()}
            prefixes = umt5 if len(umt5) == 1 else prefixes
        if len(prefixes) == 1:
            return prefixes.pop()
        if prefixes:
            raise CheckpointError(
                f"{_where(source)} holds several text encoders (prefixes {sorted(prefixes)}); "
                "cannot tell which one is UMT5."
            )
    raise CheckpointError(f"{_where(source)}: no UMT5 encoder keys found ({_preview(sd)}).")


def normalize_transformers_umt5(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, source: str | None = None
) -> dict[str, torch.Tensor]:
    """Turn a transformers-named UMT5 dict (diffusers text_encoder, ComfyUI single file or bundle) into plain
    ``UMT5EncoderModel`` names.

    - strips the prefix in front of the encoder names (e.g. ``text_encoders.umt5.transformer.``); in a bundle,
      keys outside that prefix belong to other models and are ignored;
    - dequantises float8 weights: ``W = float(W_fp8) × scale`` with the scale from ``<layer>.scale_weight`` or
      ``<layer>.weight_scale`` (scale 1 when a float8 weight has none); result in ``dtype``, by default the
      dtype of the (never quantised) embedding, or bfloat16;
    - drops format markers (``scaled_fp8``, ``.comfy_quant`` once its format is checked) and activation scales
      (``.scale_input``, ``.input_scale``: they only matter for fp8 matmuls, and the weights are dequantised here);
    - skips the tokenizer the file carries (``spiece_model``);
    - keeps only ``shared.weight`` of the tied embedding pair (taken from ``encoder.embed_tokens.weight`` if
      that is the only one stored).
    Unquantised tensors are passed through without a copy.
    """
    prefix = _find_prefix(sd, source)
    # The tokenizer a ComfyUI file carries (`spiece_model`, spec §3.3) is read by wan_local.weights.tokenizer_source.
    bare = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix) :] != SPIECE_KEY}
    if prefix:
        logger.debug("%s: UMT5 keys under prefix %r (%d of %d keys)", _where(source), prefix, len(bare), len(sd))

    if dtype is None:
        # The embedding is never quantised; its dtype is the file's working precision (bf16 / fp16).
        emb = bare.get("shared.weight", bare.get(TIED_EMBEDDING_KEY))
        dtype = emb.dtype if emb is not None and emb.dtype not in FP8_DTYPES else torch.bfloat16
    out = dequantize_state_dict(bare, dtype, _where(source))
    if TIED_EMBEDDING_KEY in out:
        tied = out.pop(TIED_EMBEDDING_KEY)
        out.setdefault("shared.weight", tied)
    return out


def prepare_umt5_state_dict(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, source: str | None = None
) -> tuple[UMT5Config, dict[str, torch.Tensor]]:
    """Any supported UMT5 encoder dict → (config, complete transformers-named dict), keys checked.

    ``dtype`` only applies to dequantised fp8 weights (see ``normalize_transformers_umt5``); other tensors
    keep their file dtype. ``source`` (a file name) is used in error messages.
    """
    naming = detect_umt5_naming(sd, source)
    if naming == "official":
        config = umt5_config_from_state_dict(sd, source)
        check_umt5_keys(sd, config, "official", source)  # report problems in the file's own names
        return config, official_umt5_to_transformers(sd, source)
    out = normalize_transformers_umt5(sd, dtype, source)
    config = umt5_config_from_state_dict(out, source)
    check_umt5_keys(out, config, "transformers", source)
    return config, out
