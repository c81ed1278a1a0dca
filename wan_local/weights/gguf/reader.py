"""The GGUF container, read over a memory map without any dependency (GGUF v2/v3, little-endian).

Layout: magic "GGUF", uint32 version, uint64 tensor count, uint64 key-value count; the key-values (string key,
uint32 value type, value; arrays carry an item type and a uint64 count); one info per tensor (name, uint32 rank,
uint64 dims fastest-first, uint32 GGML type, uint64 offset into the data section); padding up to
`general.alignment` (default 32); the data section. Torch shapes are the dims reversed.

`read_gguf(path)` parses the header only: pages of the data section are never touched, so a 10 GB expert's tensor
table costs a few kilobytes of reads. `GGUFFile.raw(name)` is a uint8 tensor viewing the tensor's bytes in a
private (copy-on-write) map of the file: nothing is copied until the bytes are used or moved. Truncated or
malformed files raise one CheckpointError naming the file.

A parsed header is kept per process for the few files last read (keyed by path, inode, size and times): a job start
asks for the same headers from the inventory, the layout, the config reader, the planner and the tokenizer,
and a city96 UMT5 file's header holds 256,384 tokenizer strings (0.4 s of parsing each time).
"""

from __future__ import annotations

import math
import mmap
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan_local.errors import CheckpointError
from wan_local.weights.gguf.types import GGML_TYPES, GGMLType

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_REDOWNLOAD = "download it again (the file is damaged or incomplete)"

# GGUF value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {
    **{0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4"},
    **{7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"},
}
_STRING, _ARRAY = 8, 9
_CACHED_HEADERS = 8  # two experts, a text encoder, and a few more of a folder being browsed
_headers: OrderedDict[tuple[str, int, int, int, int], GGUFFile] = OrderedDict()
_headers_lock = threading.Lock()


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: torch shape (dims reversed), GGML type, byte range in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFFile:
    """A parsed GGUF header: key-values, tensor infos (in file order), where the data section starts."""

    path: Path
    version: int
    kv: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_offset: int
    file_bytes: int
    _map: np.ndarray | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of tensor `name` as a uint8 tensor viewing a private map of the file (no copy)."""
        info = self.tensors[name]
        if self._map is None:
            # mode "c": copy-on-write private map, writable for torch without touching the file; pages load lazily.
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        return torch.from_numpy(self._map[info.offset : info.offset + info.nbytes])


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; running past its end is a truncated file."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path} ends inside its GGUF header (truncated at byte {len(self.buf)}); {_REDOWNLOAD}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{self.path}: a GGUF string is not UTF-8 ({exc}); {_REDOWNLOAD}") from exc

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < 2:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _NUMPY:  # numeric arrays in one read
                width = np.dtype(_NUMPY[itype]).itemsize
                items = np.frombuffer(self.take(count * width), dtype=_NUMPY[itype])
                return items.astype(bool).tolist() if itype == 7 else items.tolist()
            return [self.value(itype, depth + 1) for _ in range(count)]
        raise CheckpointError(f"{self.path}: unknown GGUF value type {vtype}; {_REDOWNLOAD}")


def file_identity(path: Path) -> tuple:
    """What tells a file's version apart (path, inode, size, times): the key of what is cached per file."""
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def read_gguf(path: Path | str) -> GGUFFile:
    """Parse the header and tensor table of a GGUF file (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    key = file_identity(path)
    with _headers_lock:
        cached = _headers.get(key)
        if cached is not None:
            _headers.move_to_end(key)
    if cached is None:
        cached = _read_header(path)
        with _headers_lock:
            _headers[key] = cached
            while len(_headers) > _CACHED_HEADERS:
                _headers.popitem(last=False)
    # a fresh GGUFFile (its own lazy map) sharing the parsed, read-only key-values and tensor table
    return GGUFFile(path, cached.version, cached.kv, cached.tensors, cached.data_offset, cached.file_bytes)


def _read_header(path: Path) -> GGUFFile:
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise CheckpointError(f"{path} is too short to be a GGUF file ({size} bytes); {_REDOWNLOAD}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _parse(memoryview(mapped), path, size)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _parse(buf: memoryview, path: Path, size: int) -> GGUFFile:
    cur = _Cursor(buf, path)
    try:
        return _parse_header(cur, path, size)
    finally:
        cur.buf = memoryview(b"")  # drop every view of the map before it closes
        buf.release()


def _parse_header(cur: _Cursor, path: Path, size: int) -> GGUFFile:
    magic = bytes(cur.take(4))
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); {_REDOWNLOAD}")
    version = cur.scalar("<I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise CheckpointError(f"{path}: GGUF version {version}{hint} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > size or n_kv > size:
        raise CheckpointError(f"{path}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys); {_REDOWNLOAD}")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        rank = cur.scalar("<I")
        if rank > 8:
            raise CheckpointError(f"{path}: tensor {name} has {rank} dimensions; {_REDOWNLOAD}")
        dims = [cur.scalar("<Q") for _ in range(rank)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        infos.append((name, dims, type_id, offset))
    alignment = int(kv.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment {alignment} is not a power of two; {_REDOWNLOAD}")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, type_id, offset in infos:
        ggml = GGML_TYPES.get(type_id)
        if ggml is None:
            raise CheckpointError(
                f"{path}: tensor {name} uses GGML type {type_id}, which wan-local does not read "
                f"(supported: {', '.join(t.name for t in GGML_TYPES.values())}); use another quantization"
            )
        numel = math.prod(dims)
        if dims and numel % ggml.block_size:
            raise CheckpointError(f"{path}: tensor {name} of {numel} values is not whole {ggml.name} blocks")
        nbytes = numel // ggml.block_size * ggml.type_size
        start = data_offset + offset
        if offset % alignment or start + nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {name} lies outside the file (bytes {start}..{start + nbytes} of {size}); "
                f"{_REDOWNLOAD}"
            )
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name} is listed twice; {_REDOWNLOAD}")
        tensors[name] = GGUFTensor(name, tuple(int(d) for d in reversed(dims)), ggml, start, nbytes)
    return GGUFFile(path, version, kv, tensors, data_offset, size)
