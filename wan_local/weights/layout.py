"""Find the files of a task in a checkpoint folder, whichever of the three layouts it uses.

- official (Wan-AI/Wan2.2-*): `high_noise_model/` + `low_noise_model/` or a root DiT, `Wan2.1_VAE.pth` /
  `Wan2.2_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/`.
- diffusers (Wan-AI/Wan2.2-*-Diffusers): `model_index.json`, `transformer/` (high noise), `transformer_2/` (low
  noise), `vae/`, `text_encoder/`, `tokenizer/`.
- ComfyUI single files, flat or in `diffusion_models/`, `text_encoders/`, `vae/` sub-folders; recognised by the
  tensor names in their headers. Their high/low-noise experts are told apart by the word "high"/"low" in the file name,
  as the published files are named (`…_high_noise_…`, QuantStack's GGUF `…-HighNoise-Q4_K_M.gguf`). GGUF DiTs
  (`diffusion_models/*.gguf`, `unet/*.gguf`) count as DiT files of this layout. The tokenizer travels inside the
  text-encoder file (`spiece_model`); a tokenizer folder next to the files is used when there is one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from wan_local.errors import CheckpointError
from wan_local.specs import TaskSpec
from wan_local.weights.inventory import comfyui_files, expert_from_name, is_dit_patch_embedding, is_umt5
from wan_local.weights.tokenizer_source import carries_tokenizer

HIGH, LOW, SINGLE = "high_noise", "low_noise", "model"

_OFFICIAL_VAE = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}
_OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
_TOKENIZER_DIRS = ("google/umt5-xxl", "tokenizer", "umt5-xxl")
_HOW_TO_GET = {
    "t2v-A14B": "Wan-AI/Wan2.2-T2V-A14B",
    "i2v-A14B": "Wan-AI/Wan2.2-I2V-A14B",
    "ti2v-5B": "Wan-AI/Wan2.2-TI2V-5B",
}


@dataclass(frozen=True)
class CheckpointSet:
    """Where each component of one task lives. `dit` maps HIGH/LOW (two experts) or SINGLE to a folder or file.
    `tokenizer` is the tokenizer folder, None when the text-encoder file carries the tokenizer (ComfyUI)."""

    format: str
    dit: dict[str, Path]
    vae: Path
    text_encoder: Path
    tokenizer: Path | None


def find_checkpoints(ckpt_dir: Path, spec: TaskSpec, choice: Mapping[str, str | Path] | None = None) -> CheckpointSet:
    """Locate every file `spec` needs under `ckpt_dir`; raise a CheckpointError saying what was found and what is
    missing. choice: role -> file (`weights.inventory.PICKABLE` roles) where the folder holds several candidates;
    a role with several candidates and no choice is refused with the candidates listed (`weights.choice`)."""
    from wan_local.weights import choice as choosing
    from wan_local.weights.inventory import scan_folder

    root = Path(ckpt_dir).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    found = scan_folder(root)
    picks = choosing.resolve_picks(root, spec, found, choice)
    result = choosing.apply_picks(_detect(root, spec), picks)
    choosing.check_components(root, spec, result, found)
    return result


def _detect(root: Path, spec: TaskSpec) -> CheckpointSet:
    experts = (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir()
    official_files = any((root / name).is_file() for name in (_OFFICIAL_T5, *_OFFICIAL_VAE.values()))
    if (root / "model_index.json").is_file() and (root / "transformer").is_dir() and not experts:
        return _diffusers(root, spec)
    if experts or official_files or (root / "config.json").is_file():
        return _official(root, spec)  # a stray model_index.json next to official files does not make it diffusers
    if (root / "model_index.json").is_file():
        return _diffusers(root, spec)
    return _comfyui(root, spec)


def _missing(root: Path, spec: TaskSpec, what: list[str], layout: str | None = None) -> CheckpointError:
    from wan_local.weights.choice import found_summary
    from wan_local.weights.inventory import scan_folder

    repo = _HOW_TO_GET[spec.name]
    seen = f" ({layout} layout)" if layout else ""
    todo = f"Download the complete {repo} repository (or its -Diffusers version) into that folder."
    if layout is None:  # single files (ComfyUI / GGUF): the missing ones can be added one by one
        todo = (
            "Add the missing files (the Models tab downloads Comfy-Org's and QuantStack's) or download the "
            f"complete {repo} repository into another folder."
        )
    return CheckpointError(
        f"{root}{seen} lacks what {spec.name} needs: {'; '.join(what)}. "
        f"{found_summary(root, scan_folder(root), spec, layout)} {todo}"
    )


def _is_official_dit(folder: Path) -> bool:
    """Whether `folder` holds an official DiT (config.json of a WanModel); a config.json that is not valid JSON
    raises a CheckpointError naming it (a broken download must not be blamed on other files)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config} cannot be read ({exc}); download it again") from exc
    return isinstance(data, dict) and data.get("_class_name") == "WanModel"


def _tokenizer_dir(root: Path) -> Path | None:
    for name in _TOKENIZER_DIRS:
        folder = root / name
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            return folder
    return None


def _official(root: Path, spec: TaskSpec) -> CheckpointSet:
    missing = []
    if spec.two_experts:
        dit = {HIGH: root / "high_noise_model", LOW: root / "low_noise_model"}
        missing += [f"{p.name}/" for p in dit.values() if not (p / "config.json").is_file()]
    else:
        dit = {SINGLE: root}
        if not _is_official_dit(root):
            missing.append("config.json of the DiT")
    vae = root / _OFFICIAL_VAE[spec.vae]
    text_encoder = root / _OFFICIAL_T5
    missing += [p.name for p in (vae, text_encoder) if not p.is_file()]
    tokenizer = _tokenizer_dir(root)
    if tokenizer is None:
        missing.append("google/umt5-xxl/ (tokenizer)")
    if missing:
        raise _missing(root, spec, missing, "official")
    return CheckpointSet("official", dit, vae, text_encoder, tokenizer)


def _diffusers(root: Path, spec: TaskSpec) -> CheckpointSet:
    # diffusers' `transformer` is the high-noise expert, `transformer_2` the low-noise one.
    dit = (
        {HIGH: root / "transformer", LOW: root / "transformer_2"}
        if spec.two_experts
        else {SINGLE: root / "transformer"}
    )
    parts = [*dit.values(), root / "vae", root / "text_encoder"]
    missing = [f"{p.name}/" for p in parts if not (p / "config.json").is_file()]
    tokenizer = _tokenizer_dir(root)
    if tokenizer is None:
        missing.append("tokenizer/")
    if missing:
        raise _missing(root, spec, missing, "diffusers")
    return CheckpointSet("diffusers", dit, root / "vae", root / "text_encoder", tokenizer)


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors or GGUF header (nothing else is read)."""
    if path.suffix == ".gguf":
        from wan_local.weights.headers import tensor_table

        return {k: info.shape for k, info in tensor_table(path).items()}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); download it again (the file is damaged or incomplete)"
        ) from exc


def _find_key(header: dict[str, tuple[int, ...]], suffix: str) -> tuple[int, ...] | None:
    return next((shape for key, shape in header.items() if key.endswith(suffix)), None)


def _comfyui(root: Path, spec: TaskSpec) -> CheckpointSet:
    below = [p for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") for p in comfyui_files(d)]
    files = sorted({*root.glob("*.safetensors"), *(p for p in below if p.suffix == ".safetensors")})
    files += sorted({*root.glob("*.gguf"), *(p for p in below if p.suffix == ".gguf")})  # diffusion_models/, unet/
    dits: dict[str, Path] = {}
    vae = text_encoder = None
    for path in files:
        header = _header(path)
        patch = _find_key(header, "patch_embedding.weight")
        if is_dit_patch_embedding(patch):
            model_type = {16: "t2v", 36: "i2v", 48: "ti2v"}.get(patch[1])
            if model_type != spec.model_type:
                continue
            role = SINGLE
            if spec.two_experts:
                role = expert_from_name(path.name)
                role = role if role in (HIGH, LOW) else ""
            if role and role not in dits:
                dits[role] = path
            continue
        z_shape = _find_key(header, "post_quant_conv.weight") or _find_key(header, "conv2.weight")
        if _find_key(header, "decoder.conv1.weight") or _find_key(header, "decoder.conv_in.weight"):
            if z_shape is not None and z_shape[0] == spec.latent_channels and vae is None:
                vae = path
            continue
        if _find_key(header, "SelfAttention.relative_attention_bias.weight") and is_umt5(header) and not text_encoder:
            text_encoder = path
    wanted = [HIGH, LOW] if spec.two_experts else [SINGLE]
    missing = [f"a {spec.model_type} DiT file for the {role.replace('_', '-')} expert" for role in wanted]
    missing = [m for role, m in zip(wanted, missing, strict=True) if role not in dits]
    if vae is None:
        missing.append(f"the {spec.vae} VAE (.safetensors)")
    if text_encoder is None:
        missing.append("the UMT5-XXL text encoder (.safetensors)")
    tokenizer = _tokenizer_dir(root)
    if tokenizer is None and text_encoder is not None and not carries_tokenizer(text_encoder):
        missing.append(
            f"a tokenizer: {text_encoder.name} carries none (no spiece_model, no tokenizer.ggml.* key-values) and "
            "there is no google/umt5-xxl/ folder (Comfy-Org's umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled files and "
            "city96's umt5-xxl-encoder GGUFs carry it)"
        )
    if missing:
        if not files:
            raise CheckpointError(
                f"{root} holds no Wan2.2 checkpoint in a known layout (official, diffusers or ComfyUI files); "
                f"download {_HOW_TO_GET[spec.name]} into it"
            )
        raise _missing(root, spec, missing)
    return CheckpointSet("comfyui", dits, vae, text_encoder, tokenizer)
