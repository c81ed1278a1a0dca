"""`QuantCache`: what on-the-fly quantization produced, kept on disk for the next start; `write_safetensors`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from wan_local.errors import CheckpointError, InputError
from wan_local.memory.quant.formats import quantized_layers
from wan_local.weights.convert import as_tensor, read_copy
from wan_local.weights.files import open_safetensors, read_safetensors_metadata

log = logging.getLogger(__name__)

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file one tensor at a time (RAM stays flat: no serialized copy of the whole dict), and
    fsync it. Key order is sorted; the header is space-padded to 8 bytes as the format allows. Values are tensors
    or `files.StoredTensor`s (each read with plain reads just before it is written, then dropped)."""
    keys = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in keys:
        t = tensors[key]
        if t.dtype not in _ST_DTYPES:
            raise InputError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in keys:
            t = read_copy(tensors[key]).detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data)  # zero-copy view of a CPU tensor's bytes
        f.flush()
        os.fsync(f.fileno())


class QuantCache:
    """Quantized DiT state dicts on disk, keyed by their source files, so a later start skips quantization.

    key = sha256 of (resolved source paths, sizes, mtimes; mode; scope; FORMAT_VERSION). A file is written to a
    temporary name and renamed into place (atomic); older versions for the same sources are then removed. On load,
    a file whose header, size, metadata or scales do not check out is deleted and None returned (the caller
    rebuilds). The tensor bytes themselves are not hashed (that would read the whole file at every start).
    """

    FORMAT_VERSION = 1

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def _ident(self, sources: Sequence[Path], mode: str, scope: str, with_stat: bool) -> str:
        files = []
        for p in sorted(Path(s).resolve() for s in sources):
            st = p.stat()
            files.append([str(p), st.st_size, st.st_mtime_ns] if with_stat else [str(p)])
        blob = json.dumps({"v": self.FORMAT_VERSION, "mode": mode, "scope": scope, "files": files})
        return hashlib.sha256(blob.encode()).hexdigest()

    def key(self, sources: Sequence[Path], mode: str, scope: str) -> str:
        """The cache key of a source set (64 hex digits)."""
        return self._ident(sources, mode, scope, with_stat=True)

    def path(self, sources: Sequence[Path], mode: str, scope: str) -> Path:
        """Where the entry for these sources lives: `dit-<mode>-<scope>-<sources id>-<key>.safetensors`."""
        group = self._ident(sources, mode, scope, with_stat=False)[:12]
        return self.cache_dir / f"dit-{mode}-{scope}-{group}-{self.key(sources, mode, scope)[:16]}.safetensors"

    def load(self, sources: Sequence[Path], mode: str, scope: str) -> dict[str, Any] | None:
        """The cached state dict (`files.StoredTensor`s: headers read, scales checked), or None when absent or found
        broken (then it is deleted)."""
        path = self.path(sources, mode, scope)
        if not path.is_file():
            return None
        try:
            meta = read_safetensors_metadata(path)
            if meta.get("wan_local.key") != self.key(sources, mode, scope):
                raise CheckpointError(f"metadata does not match (format {meta.get('wan_local.format')!r})")
            sd = open_safetensors(path)  # headers: quantized weights are used mapped, the rest read as needed
            if len(sd) != int(meta.get("wan_local.tensors", -1)):
                raise CheckpointError(f"{len(sd)} tensors instead of {meta.get('wan_local.tensors')}")
            quantized_layers(sd, str(path))
            scales = [as_tensor(v) for k, v in sd.items() if k.endswith(".scale")]
            if not all(bool(torch.isfinite(s).all()) and bool((s > 0).all()) for s in scales):
                raise CheckpointError("a scale is not finite and positive")
        except (CheckpointError, ValueError) as exc:
            log.warning("quantization cache %s is damaged (%s); deleting it and quantizing again", path, exc)
            sd = None  # drop the memory maps before deleting (Windows cannot delete a mapped file)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as unlink_error:
                log.warning("cannot delete %s (%s)", path, unlink_error)
            return None
        log.info("loaded quantized weights from cache %s", path)
        return sd

    def store(self, sources: Sequence[Path], mode: str, scope: str, sd: Mapping[str, Any]) -> Path | None:
        """Write `sd` atomically; returns the path, or None (logged) when the disk is full or not writable."""
        path = self.path(sources, mode, scope)
        size = sum(t.numel() * t.element_size() for t in sd.values())
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        meta = {"wan_local.key": self.key(sources, mode, scope), "wan_local.tensors": str(len(sd))}
        meta.update({"wan_local.format": str(self.FORMAT_VERSION), "wan_local.mode": mode, "wan_local.scope": scope})
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.cache_dir).free < size + (256 << 20):
                raise OSError(f"needs {size / 2**30:.1f} GiB free")
            write_safetensors(tmp, sd, meta)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write quantization cache %s (%s); the next start quantizes again", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        for old in self.cache_dir.glob(path.name.rsplit("-", 1)[0] + "-*.safetensors"):
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()  # an older key of the same sources (file changed since)
        log.info("stored quantized weights (%.2f GiB) in %s", size / 2**30, path)
        return path

    def get_or_create(
        self, sources: Sequence[Path], mode: str, scope: str, build: Callable[[], Mapping[str, Any]]
    ) -> Mapping[str, Any]:
        """The cached state dict, or `build()` stored for next time and read back from the cache file.

        The first start computes with the very tensors later starts read (the memory-mapped cache file), not with
        the in-memory result: a GEMM's bits depend on where its weights lie in memory (the kernel picks its code
        path by alignment), so a first start computing from other addresses would differ from every later one.
        Reading back also frees the quantized copy in anonymous memory (the mapped pages are reclaimable).
        """
        cached = self.load(sources, mode, scope)
        if cached is not None:
            return cached
        source_bytes = sum(Path(s).stat().st_size for s in sources)
        log.info(
            "first start with %s weights (scope %s) for these %.1f GB of files: quantizing them once and keeping the "
            "result in %s, so that later starts read the smaller cache file instead",
            mode,
            scope,
            source_bytes / 1e9,
            self.cache_dir,
        )
        sd = build()
        if self.store(sources, mode, scope, sd) is None:
            return sd  # disk full or read-only: this start computes from memory (logged by store)
        stored = self.load(sources, mode, scope)
        return sd if stored is None else stored
