"""Reading tensors from checkpoint files without unpickling and without copying them into RAM.

safetensors files are memory-mapped (the OS pages weights in as they are used); `.pth` files are read with
`torch.load(weights_only=True, mmap=True)`, so no code inside a file is ever executed. Every failure is turned into
a CheckpointError naming the file and what to do.

`open_safetensors` / `open_sharded_safetensors` read only the headers: each tensor is a `StoredTensor` (dtype,
shape, where its bytes lie) that becomes a memory-mapped view when used as stored, or is read with plain file reads
when it must be converted or quantized (`wan_local.weights.convert`), so a float32 file loaded as bf16 is never
mapped and copied at once.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def _shard_index(folder: Path, stem: str) -> tuple[Path | None, list[Path], Mapping[str, str]]:
    """(single file or None, shard files, index weight_map) of `<stem>.safetensors` or its sharded form."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return single, [single], {}
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
    return None, [folder / name for name in shards], weight_map


def _check_index(folder: Path, stem: str, weight_map: Mapping[str, str], tensors: Mapping[str, Any]) -> None:
    absent = [key for key in weight_map if key not in tensors]
    if absent:
        index = folder / f"{stem}.safetensors.index.json"
        raise CheckpointError(
            f"{len(absent)} tensors listed in {index} are not in their shards (first: {absent[:3]}); {_REDOWNLOAD}"
        )


def read_sharded_safetensors(folder: Path, stem: str = "diffusion_pytorch_model") -> StateDict:
    """Tensors of `<stem>.safetensors`, or of the shards listed in `<stem>.safetensors.index.json`.

    The index's `weight_map` is checked against the shards: a missing shard file, or a key the index promises but
    its shard lacks, raises a CheckpointError naming both.
    """
    folder = Path(folder)
    single, shards, weight_map = _shard_index(folder, stem)
    if single is not None:
        return read_safetensors(single)
    tensors: StateDict = {}
    for shard in shards:
        tensors.update(read_safetensors(shard))
    _check_index(folder, stem, weight_map, tensors)
    return tensors


# ---------------------------------------------------------------------------------------- headers only

#: safetensors dtype names <-> torch dtypes (the names the format's specification uses).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100_000_000  # the bound safetensors itself puts on a header


class StoredTensor:
    """One tensor of a safetensors file, not read yet: its dtype and shape (from the header) and where its bytes lie.

    `mapped()` is the zero-copy memory-mapped view (what `read_safetensors` returns); `offset` / `nbytes` locate the
    bytes for plain reads (`wan_local.weights.convert.read_tensors`). It answers `.shape`, `.dtype` and
    `.is_floating_point()` like a tensor, so key and shape checks and config readers need no data.
    """

    __slots__ = ("_file", "dtype", "key", "nbytes", "offset", "shape")

    def __init__(self, file: _MappedFile, key: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> None:
        self._file = file
        self.key = key
        self.dtype = dtype
        self.shape = torch.Size(shape)
        self.offset = offset  # absolute, from the start of the file
        self.nbytes = math.prod(shape) * dtype.itemsize

    @property
    def path(self) -> Path:
        return self._file.path

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def element_size(self) -> int:
        return self.dtype.itemsize

    def dim(self) -> int:
        return len(self.shape)

    def mapped(self) -> torch.Tensor:
        """The tensor as stored, memory-mapped (pages are read when touched)."""
        return self._file.tensor(self.key)

    def __repr__(self) -> str:
        return f"StoredTensor({self.key!r}, {self.dtype}, {tuple(self.shape)}, {self.path.name}@{self.offset})"


class _MappedFile:
    """A safetensors file whose memory map is made only when a tensor is first used as stored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors: StateDict | None = None

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is None:
            self._tensors = read_safetensors(self.path)
        return self._tensors[key]


def _parse_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header dict, offset of the data section, file size), checked the way safetensors checks it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); {_REDOWNLOAD}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file (header is not a JSON object); {_REDOWNLOAD}")
    return header, 8 + n, size


def open_safetensors(path: Path) -> dict[str, StoredTensor | torch.Tensor]:
    """The tensors of a safetensors file as `StoredTensor`s, from its header alone (nothing mapped or read).

    Offsets and sizes are checked against the file (a truncated file raises a CheckpointError naming it). A file
    holding a dtype this reader does not know is returned memory-mapped, as `read_safetensors` returns it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    header, data_start, size = _parse_header(path)
    file = _MappedFile(path)
    out: dict[str, StoredTensor | torch.Tensor] = {}
    end_max = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: header entry {key!r} is malformed ({exc}); {_REDOWNLOAD}") from exc
        if dtype is None:
            return dict(read_safetensors(path))  # a dtype for safetensors itself to interpret
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: header entry {key!r} has inconsistent offsets; {_REDOWNLOAD}")
        end_max = max(end_max, end)
        out[key] = StoredTensor(file, key, dtype, shape, data_start + begin)
    if data_start + end_max != size:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (its header describes {data_start + end_max} bytes, the "
            f"file has {size}); {_REDOWNLOAD}"
        )
    return out


def open_sharded_safetensors(folder: Path, stem: str = "diffusion_pytorch_model") -> dict[str, Any]:
    """`open_safetensors` over `<stem>.safetensors` or the shards of its index (checked as in
    `read_sharded_safetensors`)."""
    folder = Path(folder)
    _, shards, weight_map = _shard_index(folder, stem)
    tensors: dict[str, Any] = {}
    for shard in shards:
        tensors.update(open_safetensors(shard))
    _check_index(folder, stem, weight_map, tensors)
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
