"""ComfyUI files keyed exactly as Comfy-Org's repackaged Wan2.2 files (spec §3.3), built from the tiny fixtures.

- DiT `diffusion_models/wan2.2_{t2v,i2v}_{high,low}_noise_14B_{fp16,fp8_scaled}.safetensors`,
  `wan2.2_ti2v_5B_fp16.safetensors`: official names under `model.diffusion_model.`. fp16: every tensor float16.
  fp8_scaled: the block Linear weights (self/cross attention q, k, v, o and ffn.0 / ffn.2) float8_e4m3fn with a
  0-dim float32 `.scale_weight` each (absmax / 448), a `scaled_fp8` marker under the same prefix, everything else
  (norms, biases, modulation, the patch-embedding conv, embeddings, head) float16.
- text encoder `text_encoders/umt5_xxl_{fp16,fp8_e4m3fn_scaled}.safetensors`: bare HF-T5 names (`shared.weight`,
  `encoder.block.N.layer.0.SelfAttention.q.weight`, a relative_attention_bias in every block,
  `encoder.final_layer_norm.weight`) and the tokenizer as `spiece_model` (the serialized sentencepiece ModelProto,
  1-D uint8). fp8_e4m3fn_scaled: the 7 Linears of every layer float8_e4m3fn + `.scale_weight`, a bare `scaled_fp8`
  marker (ComfyUI's T5 detection reads it), the embedding, norms and position biases float16.
- VAE `vae/wan_2.1_vae.safetensors`, `vae/wan2.2_vae.safetensors`: the official module names, bare.

Two departures from the real files, both forced by the tiny fixtures and both explained where they happen:
- the DiT files carry the official config.json as the safetensors metadata string `config` (the one optional hint
  the loader reads, as our own converters write it): real Wan DiTs have 128-wide heads, so the loader takes
  heads = dim // 128 from shapes, but the tiny DiT has 2 heads of 32, which no shape tells;
- the embedded proto is the tiny `spiece.model` with its normalizer set to agree with the tiny `tokenizer.json`
  (see `agreeing_proto`).

The VAE keeps the fixture's float32 values (the real files are half precision by their size; which half is not
verified). Every writer returns the official-named float32 weights its file decodes to (fp16 / fp8 rounding
included), so a test can build the same weights offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
DIT_STEM = "diffusion_pytorch_model"
DIT_PREFIX = "model.diffusion_model."
MARKER = "scaled_fp8"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DIT_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight|blocks\.\d+\.ffn\.[02]\.weight")
FP8_UMT5_LINEAR = re.compile(
    r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.[qkvo]\.weight"
    r"|encoder\.block\.\d+\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wo)\.weight"
)
DIT_KINDS = ("fp16", "fp8_scaled")
TE_KINDS = {"fp16": "umt5_xxl_fp16.safetensors", "fp8_scaled": "umt5_xxl_fp8_e4m3fn_scaled.safetensors"}
VAE_FILES = {
    "wan2.1": ("Wan2.1_VAE.pth", "wan_2.1_vae.safetensors"),
    "wan2.2": ("Wan2.2_VAE.pth", "wan2.2_vae.safetensors"),
}


def _experts(kind: str) -> dict[str | None, str]:
    return {f"{e}_noise_model": f"wan2.2_{kind}_{e}_noise_14B" for e in ("high", "low")}


#: task -> (fixture folder, ComfyUI DiT file stem per official expert folder (None: the root DiT), VAE kind)
TASKS = {
    "t2v-A14B": ("t2v-A14B", _experts("t2v"), "wan2.1"),
    "i2v-A14B": ("i2v-A14B", _experts("i2v"), "wan2.1"),
    "ti2v-5B": ("ti2v-5B", {None: "wan2.2_ti2v_5B"}, "wan2.2"),
}

# ---------------------------------------------------------------------------------------------------- sources


def official_dit_sd(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of an official DiT folder as stored (one file or the shards of the index)."""
    index = folder / f"{DIT_STEM}.safetensors.index.json"
    if not index.is_file():
        return load_file(str(folder / f"{DIT_STEM}.safetensors"))
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}


# official -> transformers UMT5EncoderModel names, spec §4.3 table (written here, not taken from wan_local).
_UMT5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def umt5_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official UMT5 names (spec §4.2) -> HF-T5 names (§4.3)."""
    out = {}
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        else:
            i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
            out[f"encoder.block.{i}.{_UMT5_BLOCK[rest]}"] = value
    return out


def transformers_to_umt5(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `umt5_to_transformers`."""
    top = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    block = {v: k for k, v in _UMT5_BLOCK.items()}
    out = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
        else:
            i, rest = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key).groups()
            out[f"blocks.{i}.{block[rest]}"] = value
    return out


# ---------------------------------------------------------------------------------------- the embedded proto


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def proto_fields(data: bytes) -> list[tuple[int, int | bytes, bytes]]:
    """(field number, value, raw bytes of the whole field) per field of one protobuf message: varints as ints,
    the other wire types as their bytes."""
    fields, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        fields.append((number, value, data[start:pos]))
    return fields


def set_add_dummy_prefix(proto: bytes, value: bool) -> bytes:
    """`proto` (a sentencepiece ModelProto) with normalizer_spec (field 3) .add_dummy_prefix (its field 3) set.

    A plain protobuf wire-format edit: the old flag (if any) is removed and the new one appended.
    """
    out = bytearray()
    for number, field, raw in proto_fields(proto):
        if number != 3:
            out += raw
            continue
        spec = b"".join(r for n, _, r in proto_fields(field) if n != 3)
        spec += _encode_varint(3 << 3 | 0) + _encode_varint(int(value))
        out += _encode_varint(3 << 3 | 2) + _encode_varint(len(spec)) + spec
    return bytes(out)


def agreeing_proto(tiny: Path) -> bytes:
    """The tiny `spiece.model` with its dummy prefix set as the tiny `tokenizer.json` says.

    A real Comfy-Org text encoder carries the proto of the real umt5-xxl tokenizer, which agrees with its
    `tokenizer.json` (add_dummy_prefix true <-> Metaspace prepend_scheme "always", spec §3.3). The tiny fixture's
    two files disagree on purpose (add_dummy_prefix true, prepend_scheme "never"; the golden ids follow
    tokenizer.json), so the tiny proto as it is would stand for a file no user has. Setting add_dummy_prefix from
    the prepend scheme gives the proto that agrees, as the real one does.
    """
    folder = tiny / "t2v-A14B" / TOKENIZER_DIR
    pre = json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre["type"] == "Metaspace", pre
    return set_add_dummy_prefix((folder / "spiece.model").read_bytes(), pre["prepend_scheme"] != "never")


# --------------------------------------------------------------------------------------------------- writers


def fp8_scaled(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, 0-dim float32 scale = absmax / 448), as ComfyUI's scaled-fp8 files store it."""
    w = weight.float()
    scale = (w.abs().max() / FP8_MAX).reshape(()).to(torch.float32)
    return (w / scale).to(torch.float8_e4m3fn), scale


def _encode(sd: dict[str, torch.Tensor], quantised: re.Pattern[str], kind: str) -> tuple[dict, dict]:
    """(tensors to store, float32 weights they decode to) for an fp16 or fp8_scaled file (names unchanged)."""
    if kind not in DIT_KINDS:
        raise ValueError(f"kind must be one of {DIT_KINDS}, got {kind!r}")
    stored, effective = {}, {}
    for key, value in sd.items():
        if kind == "fp8_scaled" and quantised.fullmatch(key):
            w8, scale = fp8_scaled(value)
            stored[key], stored[key.removesuffix(".weight") + ".scale_weight"] = w8, scale
            effective[key] = w8.float() * scale
        else:
            stored[key] = value.to(torch.float16)
            effective[key] = stored[key].float()
    if kind == "fp8_scaled":
        stored[MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return stored, effective


def write_comfy_dit(path: Path, official_dit_dir: Path, kind: str = "fp16") -> dict[str, torch.Tensor]:
    """Write an official DiT folder as a Comfy-Org DiT file (`kind` "fp16" or "fp8_scaled"); return the
    official-named float32 weights the file decodes to."""
    stored, effective = _encode(official_dit_sd(official_dit_dir), FP8_DIT_LINEAR, kind)
    # Real files carry no metadata: the loader infers heads = dim // 128 (true of every real Wan DiT). The tiny
    # DiT's 2 heads of 32 are in no shape, so its config.json travels as the optional `config` string.
    config = json.loads((official_dit_dir / "config.json").read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({DIT_PREFIX + k: v.contiguous() for k, v in stored.items()}, str(path), {"config": json.dumps(config)})
    return effective


def write_comfy_text_encoder(path: Path, tiny: Path, kind: str = "fp16") -> dict[str, torch.Tensor]:
    """Write the tiny UMT5 as a Comfy-Org text encoder (`kind` "fp16" or "fp8_scaled", the latter being
    `umt5_xxl_fp8_e4m3fn_scaled`) carrying `spiece_model`; return the HF-named float32 weights it decodes to."""
    official = torch.load(tiny / "t2v-A14B" / T5_FILE, map_location="cpu", weights_only=True)
    stored, effective = _encode(umt5_to_transformers(official), FP8_UMT5_LINEAR, kind)
    stored["spiece_model"] = torch.frombuffer(bytearray(agreeing_proto(tiny)), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    return effective


def write_comfy_vae(path: Path, official_vae: Path) -> dict[str, torch.Tensor]:
    """Write an official VAE `.pth` as a ComfyUI VAE file (official names, bare, values as stored)."""
    sd = torch.load(official_vae, map_location="cpu", weights_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return {k: v.float() for k, v in sd.items()}


def write_comfy_folder(root: Path, tiny: Path, task: str, dit: str = "fp16", te: str = "fp16") -> Path:
    """A ComfyUI models folder for `task` (`diffusion_models/`, `text_encoders/`, `vae/`; no tokenizer folder)
    with the DiT(s) in `dit` and the text encoder in `te` ("fp16" or "fp8_scaled"); returns `root`."""
    fixture, stems, vae = TASKS[task]
    for expert, stem in stems.items():
        src = tiny / fixture / expert if expert else tiny / fixture
        write_comfy_dit(root / "diffusion_models" / f"{stem}_{dit}.safetensors", src, dit)
    write_comfy_text_encoder(root / "text_encoders" / TE_KINDS[te], tiny, te)
    pth, name = VAE_FILES[vae]
    write_comfy_vae(root / "vae" / name, tiny / fixture / pth)
    return root


def write_official_twin(root: Path, tiny: Path, task: str, dit: str = "fp16", te: str = "fp16") -> Path:
    """An official-layout folder for `task` holding, in float32, exactly the weights `write_comfy_folder(..., dit,
    te)` decodes to (rounded offline through fp16 / fp8): the reference a ComfyUI run is compared with."""
    import shutil

    fixture, stems, vae = TASKS[task]
    src_root = tiny / fixture
    for expert in stems:
        src = src_root / expert if expert else src_root
        dst = root / expert if expert else root
        dst.mkdir(parents=True, exist_ok=True)
        _, effective = _encode(official_dit_sd(src), FP8_DIT_LINEAR, dit)
        save_file({k: v.contiguous() for k, v in effective.items()}, str(dst / f"{DIT_STEM}.safetensors"))
        shutil.copy(src / "config.json", dst / "config.json")
    official = torch.load(src_root / T5_FILE, map_location="cpu", weights_only=True)
    _, effective = _encode(umt5_to_transformers(official), FP8_UMT5_LINEAR, te)
    torch.save({k: v.contiguous() for k, v in transformers_to_umt5(effective).items()}, root / T5_FILE)
    shutil.copy(src_root / VAE_FILES[vae][0], root / VAE_FILES[vae][0])
    shutil.copytree(src_root / TOKENIZER_DIR, root / TOKENIZER_DIR)
    return root
