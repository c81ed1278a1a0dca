"""Find the files of a task in a checkpoint folder, whichever of the three layouts it uses.

- official (Wan-AI/Wan2.2-*): `high_noise_model/` + `low_noise_model/` or a root DiT, `Wan2.1_VAE.pth` /
  `Wan2.2_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/`.
- diffusers (Wan-AI/Wan2.2-*-Diffusers): `model_index.json`, `transformer/` (high noise), `transformer_2/` (low
  noise), `vae/`, `text_encoder/`, `tokenizer/`.
- ComfyUI single files, flat or in `diffusion_models/`, `text_encoders/`, `vae/` sub-folders; recognised by the
  tensor names in their headers. Their high/low-noise experts are told apart by "high"/"low" in the file name,
  as the published files are named (`…_high_noise_…`, QuantStack's GGUF `…-HighNoise-Q4_K_M.gguf`). GGUF DiTs
  (`diffusion_models/*.gguf`, `unet/*.gguf`) count as DiT files of this layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from wan_local.errors import CheckpointError
from wan_local.specs import TaskSpec

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
    """Where each component of one task lives. `dit` maps HIGH/LOW (two experts) or SINGLE to a folder or file."""

    format: str
    dit: dict[str, Path]
    vae: Path
    text_encoder: Path
    tokenizer: Path


def find_checkpoints(ckpt_dir: Path, spec: TaskSpec) -> CheckpointSet:
    """Locate every file `spec` needs under `ckpt_dir`; raise a CheckpointError listing what is missing."""
    root = Path(ckpt_dir).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    experts = (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir()
    official_files = any((root / name).is_file() for name in (_OFFICIAL_T5, *_OFFICIAL_VAE.values()))
    if (root / "model_index.json").is_file() and (root / "transformer").is_dir() and not experts:
        return _diffusers(root, spec)
    if experts or official_files or (root / "config.json").is_file():
        return _official(root, spec)  # a stray model_index.json next to official files does not make it diffusers
    if (root / "model_index.json").is_file():
        return _diffusers(root, spec)
    return _comfyui(root, spec)


def _missing(root: Path, spec: TaskSpec, what: list[str]) -> CheckpointError:
    repo = _HOW_TO_GET[spec.name]
    return CheckpointError(
        f"{root} lacks what {spec.name} needs: {'; '.join(what)}. "
        f"Download the complete {repo} repository (or its -Diffusers version) into that folder."
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
        raise _missing(root, spec, missing)
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
        raise _missing(root, spec, missing)
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
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


def _find_key(header: dict[str, tuple[int, ...]], suffix: str) -> tuple[int, ...] | None:
    return next((shape for key, shape in header.items() if key.endswith(suffix)), None)


def _comfyui(root: Path, spec: TaskSpec) -> CheckpointSet:
    files = sorted({*root.glob("*.safetensors"), *root.glob("*/*.safetensors")})
    files += sorted({*root.glob("*.gguf"), *root.glob("*/*.gguf")})  # GGUF DiTs (diffusion_models/, unet/)
    dits: dict[str, Path] = {}
    vae = text_encoder = None
    for path in files:
        header = _header(path)
        patch = _find_key(header, "patch_embedding.weight")
        if patch is not None:
            model_type = {16: "t2v", 36: "i2v", 48: "ti2v"}.get(patch[1])
            if model_type != spec.model_type:
                continue
            name = path.name.lower()
            role = SINGLE
            if spec.two_experts:
                role = HIGH if "high" in name else LOW if "low" in name else ""
            if role and role not in dits:
                dits[role] = path
            continue
        z_shape = _find_key(header, "post_quant_conv.weight") or _find_key(header, "conv2.weight")
        if _find_key(header, "decoder.conv1.weight") or _find_key(header, "decoder.conv_in.weight"):
            if z_shape is not None and z_shape[0] == spec.latent_channels and vae is None:
                vae = path
            continue
        if _find_key(header, "SelfAttention.relative_attention_bias.weight") and text_encoder is None:
            text_encoder = path
    wanted = [HIGH, LOW] if spec.two_experts else [SINGLE]
    missing = [f"a {spec.model_type} DiT file for the {role.replace('_', '-')} expert" for role in wanted]
    missing = [m for role, m in zip(wanted, missing, strict=True) if role not in dits]
    if vae is None:
        missing.append(f"the {spec.vae} VAE (.safetensors)")
    if text_encoder is None:
        missing.append("the UMT5-XXL text encoder (.safetensors)")
    tokenizer = _tokenizer_dir(root)
    if tokenizer is None:
        missing.append(
            "a tokenizer folder (ComfyUI files carry none: copy google/umt5-xxl/ from the official repository)"
        )
    if missing:
        if not files:
            raise CheckpointError(
                f"{root} holds no Wan2.2 checkpoint in a known layout (official, diffusers or ComfyUI files); "
                f"download {_HOW_TO_GET[spec.name]} into it"
            )
        raise _missing(root, spec, missing)
    return CheckpointSet("comfyui", dits, vae, text_encoder, tokenizer)
