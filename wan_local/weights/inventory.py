"""What a checkpoint folder holds, file by file: format, precision and role of every model file found.

The inventory is what layout detection explains itself with and what the Models tab lists. It reads names,
`config.json` files and safetensors headers only (never tensor data, never a pickle):

- official shard sets and diffusers components: a sub-folder (or the root) with `config.json` + safetensors
  shards; the config's `_class_name` tells which (`WanModel` official, `WanTransformer3DModel` diffusers), its
  `model_type` / `in_channels` the task; the folder name the expert (`high_noise_model`, `transformer` = high,
  `low_noise_model`, `transformer_2` = low).
- official `.pth` files: by their published names (`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` ...).
- single safetensors files (ComfyUI and similar): by tensor names in the header (`patch_embedding.weight` DiT
  with its input channels 16 t2v / 36 i2v / 48 ti2v, `decoder.conv1.weight` VAE with 16 or 48 latent channels,
  `relative_attention_bias` UMT5), the precision by the stored dtypes (fp32 / bf16 / fp16 / fp8_scaled when fp8
  weights come with per-layer scales); A14B experts by "high"/"low" in the file name, as published.
- GGUF files: the header says the architecture (`wan` DiT, `t5encoder` UMT5), the task (the patch embedding's
  input channels) and the quant type its weights mostly use; the file name says the expert (`HighNoise` /
  `high_noise`, `LowNoise` / `low_noise`: nothing inside tells them apart) and the quant mix (`Q4_K_M`).
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

HIGH, LOW, SINGLE = "high_noise", "low_noise", "model"  # the same role names as weights.layout
EXPERT = "expert"  # an A14B DiT whose name says neither high nor low noise
TEXT_ENCODER, VAE, TOKENIZER, INDEX, UNKNOWN = "text_encoder", "vae", "tokenizer", "index", "unknown"
#: Roles a user can pick a file for (the Models tab, settings' model_files, find_checkpoints' choice).
PICKABLE = (HIGH, LOW, SINGLE, TEXT_ENCODER, VAE)
ROLE_NAMES = {
    HIGH: "high-noise expert",
    LOW: "low-noise expert",
    SINGLE: "5B DiT",
    EXPERT: "A14B expert (high or low not in the name)",
    TEXT_ENCODER: "text encoder",
    VAE: "VAE",
    TOKENIZER: "tokenizer",
    INDEX: "diffusers pipeline index",
    UNKNOWN: "not a Wan2.2 file",
}
_PATCH_CHANNELS = {16: "t2v", 36: "i2v", 48: "ti2v"}
_Z_CHANNELS = {16: "wan2.1", 48: "wan2.2"}
_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}
_OFFICIAL_PTH = {
    "wan2.1_vae.pth": (VAE, "wan2.1"),
    "wan2.2_vae.pth": (VAE, "wan2.2"),
    "models_t5_umt5-xxl-enc-bf16.pth": (TEXT_ENCODER, "umt5"),
}
_COMPONENT_DIRS = {"high_noise_model": HIGH, "low_noise_model": LOW, "transformer": HIGH, "transformer_2": LOW}
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
#: ComfyUI's model folders, whose sub-folders ComfyUI lists too (users sort files into them).
COMFYUI_DIRS = ("diffusion_models", "unet", "text_encoders", "clip", "vae")
_GGUF_QUANT = re.compile(r"(?:^|[-_.])(Q\d_K_[SML]|Q\d_K|Q\d_\d|IQ\d_\w+|BF16|F16|F32)(?=\.gguf$)", re.IGNORECASE)
_MAX_HEADER = 100_000_000  # a safetensors header larger than this is not a real one
#: A relative position bias past block 0 (HF names, or llama.cpp's in a GGUF): UMT5 has one in every block, a
#: T5 v1.1 (Flux / SD3's t5xxl, same names otherwise) in block 0 only (spec §3.3).
_UMT5_LATER_BIAS = re.compile(
    r"(?:block\.[1-9]\d*\.layer\.0\.SelfAttention\.relative_attention_bias|blk\.[1-9]\d*\.attn_rel_b)\.weight$"
)
NOT_UMT5 = "a T5 text encoder, not UMT5: its relative position bias is in block 0 only (Flux / SD3's t5xxl)"


def is_dit_patch_embedding(shape: Iterable[int] | None) -> bool:
    """Whether a `...patch_embedding.weight` of this shape is a Wan DiT's (a 5-D Conv3d; CLIP vision's is 4-D)."""
    return shape is not None and len(tuple(shape)) == 5


def is_umt5(names: Iterable[str]) -> bool:
    """Whether T5-encoder tensor names are UMT5's (a relative position bias in a block after the first)."""
    return any(_UMT5_LATER_BIAS.search(name) for name in names)


@dataclass(frozen=True)
class FoundFile:
    """One model file (or shard folder) of a checkpoint folder.

    path: the file, or the folder of a sharded component. layout: "official", "diffusers", "comfyui" (single
    safetensors), "gguf", or "" when unknown. precision: "fp32", "bf16", "fp16", "fp8_scaled", "fp8", a GGUF quant
    type ("Q4_K_M") or "". role: one of HIGH, LOW, SINGLE, EXPERT, TEXT_ENCODER, VAE, TOKENIZER, INDEX, UNKNOWN.
    kind: which model a DiT is for ("t2v", "i2v", "ti2v"), which VAE ("wan2.1", "wan2.2"), "umt5", or "".
    problem: why the file cannot be used (unreadable header, broken config.json), "" when it can. note: what the
    classification rests on when it is not the header (e.g. "by name"), or what else it carries.
    """

    path: Path
    layout: str
    precision: str
    role: str
    kind: str
    size_bytes: int
    problem: str = ""
    note: str = ""

    def name(self, root: Path) -> str:
        """The path relative to `root` (a folder ends in "/")."""
        try:
            rel = self.path.relative_to(root).as_posix()
        except ValueError:
            rel = str(self.path)
        rel = "." if rel in ("", ".") else rel
        return rel + "/" if self.path.is_dir() and rel != "." else rel

    def what(self) -> str:
        """Role, kind and format in words, e.g. "high-noise expert (t2v DiT), comfyui fp8_scaled"."""
        role = ROLE_NAMES[self.role]
        kind = f" ({self.kind} DiT)" if self.role in (HIGH, LOW, SINGLE, EXPERT) and self.kind else ""
        kind = f" ({self.kind})" if self.role == VAE and self.kind else kind
        fmt = " ".join(p for p in (self.layout, self.precision) if p)
        return f"{role}{kind}" + (f", {fmt}" if fmt else "")

    def describe(self, root: Path) -> str:
        """One line: name, what it is, size, and its problem or note."""
        size = f", {self.size_bytes / 1e9:.1f} GB" if self.size_bytes >= 50_000_000 else ""
        extra = f" — {self.problem}" if self.problem else (f" ({self.note})" if self.note else "")
        return f"{self.name(root)}: {self.what()}{size}{extra}"

    def serves(self, role: str, model_type: str, vae: str) -> bool:
        """Whether this file can fill `role` of a task with DiT `model_type` and VAE `vae` (a usable file only)."""
        if self.problem or self.role != role:
            return False
        if role in (HIGH, LOW, SINGLE):
            return self.kind == model_type
        if role == VAE:
            return self.kind == vae
        return role == TEXT_ENCODER


# ---------------------------------------------------------------------------------------------------- reading


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/offsets, plus "__metadata__"); raises
    ValueError for a file that is not safetensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if not 2 <= length <= _MAX_HEADER:
            raise ValueError(f"header length {length} is not plausible")
        data = f.read(length)
    header = json.loads(data)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _find(header: Mapping[str, Any], suffix: str) -> list[int] | None:
    return next((v["shape"] for k, v in header.items() if k.endswith(suffix) and isinstance(v, dict)), None)


def _precision(header: Mapping[str, Any]) -> str:
    """fp8_scaled when fp8 weights come with scales, else the dtype most weights are stored in."""
    tensors = {k: v for k, v in header.items() if isinstance(v, dict) and "dtype" in v}
    weights = Counter(_DTYPES.get(v["dtype"], v["dtype"].lower()) for k, v in tensors.items() if len(v["shape"]) >= 2)
    if not weights:
        return ""
    if weights.get("fp8"):
        scaled = any(k.endswith((".scale_weight", ".weight_scale")) or k.endswith("scaled_fp8") for k in tensors)
        return "fp8_scaled" if scaled else "fp8"
    return weights.most_common(1)[0][0]


def _classify_safetensors(path: Path) -> FoundFile:
    size = path.stat().st_size
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return FoundFile(path, "", "", UNKNOWN, "", size, f"not a readable safetensors file ({exc})")
    precision = _precision(header)
    patch = _find(header, "patch_embedding.weight")
    if is_dit_patch_embedding(patch):
        kind = _PATCH_CHANNELS.get(patch[1], "")
        role = SINGLE if kind == "ti2v" else expert_from_name(path.name)
        problem = "" if kind else f"a DiT with {patch[1]} input channels, which no Wan2.2 task has"
        return FoundFile(path, "comfyui", precision, role, kind, size, problem)
    if _find(header, "decoder.conv1.weight") or _find(header, "decoder.conv_in.weight"):
        z = _find(header, "post_quant_conv.weight") or _find(header, "conv2.weight")
        kind = _Z_CHANNELS.get(z[0], "") if z else ""
        problem = "" if kind else "a VAE of unknown latent channels"
        return FoundFile(path, "comfyui", precision, VAE, kind, size, problem)
    if _find(header, "SelfAttention.relative_attention_bias.weight"):
        if not is_umt5(header):
            return FoundFile(path, "", precision, UNKNOWN, "", size, note=NOT_UMT5)
        note = "carries its tokenizer (spiece_model)" if "spiece_model" in header else ""
        return FoundFile(path, "comfyui", precision, TEXT_ENCODER, "umt5", size, note=note)
    return FoundFile(path, "", precision, UNKNOWN, "", size)


_NAME_WORDS = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])")


def expert_from_name(name: str) -> str:
    """HIGH or LOW for an A14B expert file named with the word "high" or "low" (Comfy-Org's `…_high_noise_…`,
    QuantStack's `…-HighNoise-…`, `…_HIGH_fp16`), EXPERT when the name says neither or both. Whole words only:
    "flow" or "highres" say nothing. Nothing inside an expert tells them apart (fact sheet §3.4)."""
    words = {w.lower() for w in _NAME_WORDS.split(Path(name).stem) if w}
    high, low = "high" in words, "low" in words
    return HIGH if high and not low else LOW if low and not high else EXPERT


def gguf_header_details(path: Path) -> dict[str, str] | None:
    """What a GGUF file's own header says: its architecture ("wan", "t5encoder") and its precision (the quant
    type most of its quantized weights use, e.g. "Q4_K" for a Q4_K_M file). None for a file whose header cannot
    be read; the file is then classified by its name alone (`_classify_gguf`)."""
    from collections import Counter

    from wan_local.errors import CheckpointError
    from wan_local.weights.gguf.reader import read_gguf

    try:
        gf = read_gguf(path)
    except CheckpointError:
        return None
    counts = Counter(t.ggml_type.name for t in gf.tensors.values() if t.ggml_type.quantized)
    details = {"architecture": gf.architecture}
    if gf.architecture == "t5encoder" and not is_umt5(gf.tensors):
        details["architecture"] = "t5"  # a T5 v1.1 encoder, not UMT5
    patch = next((t for name, t in gf.tensors.items() if name.endswith("patch_embedding.weight")), None)
    if patch is not None and is_dit_patch_embedding(patch.shape):
        details["kind"] = {16: "t2v", 36: "i2v", 48: "ti2v"}.get(patch.shape[1], "")
    if counts:
        details["quantized"] = counts.most_common(1)[0][0]
    return details


def _classify_gguf(path: Path) -> FoundFile:
    size = path.stat().st_size
    lower = path.name.lower()
    match = _GGUF_QUANT.search(path.name)
    precision = match.group(1).upper() if match else ""
    details = gguf_header_details(path) or {}
    precision = precision or details.get("quantized", "")
    if details.get("architecture") == "t5encoder":
        return FoundFile(path, "gguf", precision, TEXT_ENCODER, "umt5", size)
    if details.get("architecture") == "t5":
        return FoundFile(path, "gguf", precision, UNKNOWN, "", size, note=NOT_UMT5)
    if "umt5" in lower:
        return FoundFile(path, "gguf", precision, TEXT_ENCODER, "umt5", size, note="by name")
    kind = details.get("kind") or (
        "ti2v" if ("ti2v" in lower or "5b" in lower) else "i2v" if "i2v" in lower else "t2v" if "t2v" in lower else ""
    )
    role = SINGLE if kind == "ti2v" else expert_from_name(path.name)  # as weights.layout tells them apart
    problem = "" if kind else "a GGUF file whose name says neither T2V, I2V nor TI2V"
    note = "role by name" if details.get("kind") else "by name"
    return FoundFile(path, "gguf", precision, role, kind, size, problem, note=note)


def _read_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"config.json cannot be read ({exc}); download it again"
    if not isinstance(data, dict):
        return None, "config.json does not hold a JSON object; download it again"
    return data, ""


def _shard_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors") if f.is_file())


def _classify_component(folder: Path) -> FoundFile | None:
    """A folder with config.json: an official DiT (root or expert folder) or a diffusers component."""
    if not (folder / "config.json").is_file():
        return None
    size = _shard_bytes(folder)
    config, problem = _read_config(folder)
    guess = _COMPONENT_DIRS.get(folder.name, SINGLE)
    if config is None:
        return FoundFile(folder, "", "", guess, "", size, problem)
    cls = config.get("_class_name")
    if cls == "WanModel":
        kind = config.get("model_type") or _PATCH_CHANNELS.get(config.get("in_dim"), "")
        role = SINGLE if kind == "ti2v" else guess if guess != SINGLE else EXPERT
        missing = "" if size else "config.json but no .safetensors shards"
        return FoundFile(folder, "official", _folder_precision(folder), role, kind, size, missing)
    if cls == "WanTransformer3DModel":
        kind = _PATCH_CHANNELS.get(config.get("in_channels"), "")
        role = SINGLE if kind == "ti2v" else guess if guess != SINGLE else EXPERT
        return FoundFile(folder, "diffusers", _folder_precision(folder), role, kind, size)
    if cls == "AutoencoderKLWan":
        kind = _Z_CHANNELS.get(config.get("z_dim", 16), "")
        return FoundFile(folder, "diffusers", _folder_precision(folder), VAE, kind, size)
    if cls in ("UMT5EncoderModel", "T5EncoderModel") or config.get("model_type") in ("umt5", "t5"):
        return FoundFile(folder, "diffusers", _folder_precision(folder), TEXT_ENCODER, "umt5", size)
    return FoundFile(folder, "", "", UNKNOWN, "", size, note=f"config.json of a {cls or 'unknown'} model")


def _folder_precision(folder: Path) -> str:
    shard = next(iter(sorted(folder.glob("*.safetensors"))), None)
    if shard is None:
        return ""
    try:
        return _precision(read_safetensors_header(shard))
    except (OSError, ValueError, UnicodeDecodeError):
        return ""


def _classify_file(path: Path) -> FoundFile | None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _classify_safetensors(path)
    if suffix == ".gguf":
        return _classify_gguf(path)
    if suffix == ".pth" and path.name.lower() in _OFFICIAL_PTH:
        role, kind = _OFFICIAL_PTH[path.name.lower()]
        precision = "bf16" if kind == "umt5" else "fp32"  # as published (spec §3.1)
        return FoundFile(path, "official", precision, role, kind, path.stat().st_size, note="by name")
    if path.name == "model_index.json":
        return FoundFile(path, "diffusers", "", INDEX, "", path.stat().st_size)
    return None


def _tokenizer(folder: Path) -> FoundFile | None:
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return FoundFile(folder, "", "", TOKENIZER, "umt5", 0)
    return None


def comfyui_files(folder: Path) -> list[Path]:
    """The files of a sub-folder of a checkpoint folder; in ComfyUI's model folders (`COMFYUI_DIRS`) also those of
    their sub-folders, as ComfyUI lists them (e.g. `diffusion_models/Wan2.2/…`)."""
    paths = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if folder.name in COMFYUI_DIRS:
        paths += [p for d in paths if d.is_dir() for p in d.iterdir() if not p.name.startswith(".")]
    return [p for p in paths if p.is_file()]


def scan_folder(root: Path | str) -> list[FoundFile]:
    """Every model file of `root` (its files and those one folder down, two in ComfyUI's model folders;
    `google/umt5-xxl/` two down), sorted by path. Shards inside a component folder count once, as the folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found: list[FoundFile] = []
    component = _classify_component(root)
    if component is not None:
        found.append(component)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for path in sorted(root.iterdir()):
        if path.is_file() and not (component is not None and path.suffix == ".safetensors"):
            item = _classify_file(path)
            if item is not None:
                found.append(item)
    for folder in folders:
        sub = _classify_component(folder)
        if sub is not None:
            found.append(sub)
            continue
        token = _tokenizer(folder) or _tokenizer(folder / "umt5-xxl")
        if token is not None:
            found.append(token)
            continue
        for path in sorted(comfyui_files(folder)):
            if path.is_file():
                item = _classify_file(path)
                if item is not None and item.role != INDEX:
                    found.append(item)
    return found


# ---------------------------------------------------------------------------------------------------- choices


def candidates(
    found: Iterable[FoundFile], roles: Iterable[str], model_type: str, vae: str
) -> dict[str, list[FoundFile]]:
    """For each of `roles`, the usable files that can fill it for a task (DiT `model_type`, VAE `vae`)."""
    items = list(found)
    return {role: [f for f in items if f.serves(role, model_type, vae)] for role in roles}


def wrong_task(found: Iterable[FoundFile], role: str, model_type: str) -> list[FoundFile]:
    """DiTs that would fill `role` but belong to another task (e.g. an i2v expert where t2v is asked)."""
    roles = {role, EXPERT} if role in (HIGH, LOW) else {role}
    return [f for f in found if f.role in roles and f.kind and f.kind != model_type and not f.problem]


def as_role(item: FoundFile, role: str) -> FoundFile:
    """`item` taking `role` (a user's pick of an EXPERT file, whose name says neither high nor low)."""
    return replace(item, role=role)
