"""Reading tensors from checkpoint files without unpickling and without copying them into RAM.

safetensors files are memory-mapped (the OS pages weights in as they are used); `.pth` files are read with
`torch.load(weights_only=True, mmap=True)`, so no code inside a file is ever executed. Every failure is turned into
a CheckpointError naming the file and what to do.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from wan_local.errors import CheckpointError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_REDOWNLOAD = "re-download it (the file is damaged or incomplete)"


def read_safetensors(path: Path) -> StateDict:
    """All tensors of one safetensors file, memory-mapped (no copy until a tensor is touched or converted)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); {_REDOWNLOAD}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form string metadata of a safetensors header (empty when there is none)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); {_REDOWNLOAD}") from exc


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); {_REDOWNLOAD}") from exc


def read_sharded_safetensors(folder: Path, stem: str = "diffusion_pytorch_model") -> StateDict:
    """Tensors of `<stem>.safetensors`, or of the shards listed in `<stem>.safetensors.index.json`.

    The index's `weight_map` is checked against the shards: a missing shard file, or a key the index promises but
    its shard lacks, raises a CheckpointError naming both.
    """
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if not index.is_file():
        raise CheckpointError(f"no weights in {folder}: expected {single.name} or {index.name} with its shards")
    try:
        weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid shard index (no 'weight_map'): {exc}") from exc
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is missing {len(missing)} of {len(shards)} shards listed in {index.name}: "
            f"{', '.join(missing)}; download the missing files"
        )
    tensors: StateDict = {}
    for name in shards:
        tensors.update(read_safetensors(folder / name))
    absent = [key for key in weight_map if key not in tensors]
    if absent:
        raise CheckpointError(
            f"{len(absent)} tensors listed in {index} are not in their shards (first: {absent[:3]}); {_REDOWNLOAD}"
        )
    return tensors


def read_pth(path: Path) -> StateDict:
    """A plain `torch.save`d state dict, loaded without unpickling code (weights_only) and memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; never do that with a downloaded file.
        # torch names the refused global on a line with "Unsupported" or "unsupported", depending on the version.
        detail = next((ln.strip() for ln in str(exc).splitlines() if "unsupported" in ln.lower()), "")
        raise CheckpointError(
            f"{path} was refused for safety: it holds Python objects, not only tensors ({detail}); "
            "use the official file or a .safetensors copy"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        # torch raises RuntimeError for truncated or non-zip archives.
        raise CheckpointError(f"cannot load {path} ({exc}); {_REDOWNLOAD}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def read_state_dict(path: Path) -> StateDict:
    """Read a `.safetensors`, `.pth`/`.pt`/`.bin` file, or a folder of (sharded) safetensors."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if not candidates:
            raise CheckpointError(f"no .safetensors files in {path}")
        stem = candidates[0].name.split(".safetensors")[0]
        if candidates[0].name.endswith(".index.json"):
            return read_sharded_safetensors(path, stem)
        if len(candidates) > 1:
            raise CheckpointError(
                f"{path} holds several safetensors files without an index: {', '.join(c.name for c in candidates)}"
            )
        return read_safetensors(candidates[0])
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return read_pth(path)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors or .pth)")
