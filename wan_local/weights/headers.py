"""DiT configs and component sizes read from checkpoint headers (safetensors headers, memory-mapped .pth), never
tensor data. `wan_local.engine.checkpoint` calls these once per job; nothing else should.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wan_local.errors import CheckpointError
from wan_local.memory.bytes import BF16_BYTES, ComponentBytes
from wan_local.specs import get_task

if TYPE_CHECKING:
    from wan_local.models.dit import DiTConfig


@dataclass(frozen=True)
class TensorInfo:
    """Shape and stored dtype of one tensor, from a file header (dtype as safetensors / torch names it, e.g. "BF16",
    "F8_E4M3", "torch.bfloat16")."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_table(path: Path) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} of a safetensors file or folder, a GGUF file (headers only) or a .pth
    (memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix == ".gguf":
        from wan_local.weights.gguf.dit import gguf_tensor_table
        from wan_local.weights.gguf.reader import read_gguf

        return gguf_tensor_table(read_gguf(path))  # dtype: the GGML type name ("Q4_K", "F32", ...)
    if not (path.is_dir() or path.suffix == ".safetensors"):
        from wan_local.weights.files import read_pth

        return {k: TensorInfo(tuple(t.shape), str(t.dtype)) for k, t in read_pth(path).items()}
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    table: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118
                    part = f.get_slice(key)
                    table[key] = TensorInfo(tuple(part.get_shape()), str(part.get_dtype()))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({exc}); "
                "download it again (the file is damaged or incomplete)"
            ) from exc
    return table


def _header_shapes(path: Path) -> dict[str, Any]:
    """{tensor name: object with .shape} from safetensors headers only (a file, or every file of a folder)."""
    return tensor_table(path)


def dit_tensor_table(path: Path) -> dict[str, TensorInfo]:
    """The DiT's tensors under official names (ComfyUI prefixes stripped, diffusers names mapped)."""
    from wan_local.weights import keymaps

    table = keymaps.strip_prefix(tensor_table(path))
    if "condition_embedder.time_proj.weight" in table:
        table = keymaps.dit_diffusers_to_official(table)
    return table


def read_dit_config(path: Path) -> DiTConfig:
    """DiTConfig of a DiT folder (config.json) or single file (header shapes), reading no tensor data."""
    from wan_local.weights.files import read_safetensors_metadata
    from wan_local.weights.loading import (
        dit_config_from_diffusers,
        dit_config_from_official,
        dit_config_from_state_dict,
    )

    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {exc}") from exc
        if config.get("_class_name") == "WanTransformer3DModel":
            return dit_config_from_diffusers(config)
        return dit_config_from_official(config, _header_shapes(path))
    shapes = dit_tensor_table(path)
    if path.suffix == ".gguf":
        from wan_local.weights.gguf.dit import gguf_config_hints
        from wan_local.weights.gguf.reader import read_gguf

        return dit_config_from_state_dict(shapes, gguf_config_hints(read_gguf(path)))
    try:
        hints = json.loads(read_safetensors_metadata(path).get("config", "{}"))
    except json.JSONDecodeError:
        hints = {}
    return dit_config_from_state_dict(shapes, hints)


def checked_dit_config(path: Path, spec: Any) -> DiTConfig:
    """`read_dit_config(path)` for task `spec`, every failure a CheckpointError naming the file."""
    try:
        cfg = read_dit_config(Path(path))
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing tensor or config field {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid model configuration ({exc})") from exc
    if cfg.model_type != spec.model_type:
        raise CheckpointError(f"{path} holds a {cfg.model_type!r} DiT but {spec.name} needs {spec.model_type!r}")
    return cfg


def dit_config_for_checkpoint(ckpt_dir: Path | str, task: str, choice: Any = None) -> DiTConfig:
    """The real DiT config of the checkpoint of `task` under `ckpt_dir` (any of the three layouts).

    Reads config.json and safetensors headers only, never tensor data. For A14B the high-noise expert is read
    (both experts have the same shapes). choice: find_checkpoints' role -> file picks.
    """
    from wan_local.weights.layout import HIGH, SINGLE, find_checkpoints

    spec = get_task(task)
    files = find_checkpoints(Path(ckpt_dir), spec, choice)
    return checked_dit_config(files.dit[HIGH if spec.two_experts else SINGLE], spec)


def checkpoint_file_bytes(path: Path) -> int:
    """Bytes of a checkpoint on disk: a file, or the safetensors shards of a folder."""
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file())


def param_count(path: Path) -> int:
    """Number of tensor elements in a safetensors file/folder (headers only) or a .pth (memory-mapped)."""
    return sum(info.numel for info in tensor_table(path).values())


def component_bytes_for_checkpoint(ckpt_dir: Path | str, task: str, choice: Any = None) -> ComponentBytes:
    """ComponentBytes of the checkpoint of `task` under `ckpt_dir` (choice: find_checkpoints' picks), so estimates
    fit the files really used."""
    from wan_local.weights.layout import find_checkpoints

    files = find_checkpoints(Path(ckpt_dir), get_task(task), choice)
    return ComponentBytes(param_count(files.text_encoder) * BF16_BYTES, param_count(files.vae) * 4)
