"""Stored tensors read with plain file reads and converted chunk by chunk into their final storage.

A float32 checkpoint loaded as bf16 used to be memory-mapped whole and copied: the mapped file's pages and the
copies were resident together (peak RSS = fp32 file + bf16 copy, 3x the bf16 model). Here the bytes of each tensor
go through a few reused buffers of `CHUNK_BYTES`: a reader thread fills one buffer (and checks its values are
finite) while the caller's thread converts the previous one into the destination tensor, so the peak is the
converted model plus `BUFFERS` x `CHUNK_BYTES`, and reading overlaps converting. Nothing is memory-mapped, so no
file page counts in the process's RSS (the kernel's page cache may keep them, reclaimable).

Tensors read in their stored dtype (the source of on-the-fly quantization) are read straight into their own
storage, without a buffer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from wan_local.errors import CheckpointError
from wan_local.weights.files import StoredTensor

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 << 20
BUFFERS = 2
#: Loads reading at least this much say so in the log, with the measured speed and the time left.
ANNOUNCE_BYTES = 1 << 30
_ESTIMATE_AFTER_S = 2.0
_PROGRESS_EVERY_S = 30.0


class Reader(Protocol):
    """Where stored bytes come from: fill `out` from `path` at `offset` (the whole view, or raise)."""

    def readinto(self, path: Path, offset: int, out: memoryview) -> None: ...

    def close(self) -> None: ...


class FileReader:
    """Plain unbuffered reads, one open file per path (used from one thread at a time)."""

    def __init__(self) -> None:
        self._files: dict[Path, Any] = {}

    def readinto(self, path: Path, offset: int, out: memoryview) -> None:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        f.seek(offset)
        done = 0
        while done < len(out):
            n = f.readinto(out[done:])
            if not n:
                raise CheckpointError(f"{path} ended early (at byte {offset + done}); re-download it")
            done += n

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass
class ReadStats:
    """What one `read_tensors` call did: bytes read from the files, bytes made, seconds, chunks."""

    bytes_read: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    chunks: int = 0
    sources: list[Path] = field(default_factory=list)


@dataclass
class _Chunk:
    index: int  # of the tensor in the sorted list
    start: int  # first element of the tensor this chunk covers
    count: int  # elements


def _chunks(tensors: Sequence[StoredTensor], chunk_bytes: int) -> Iterator[_Chunk]:
    for i, t in enumerate(tensors):
        per = max(1, chunk_bytes // t.dtype.itemsize)
        n = t.numel()
        for start in range(0, n, per):
            yield _Chunk(i, start, min(per, n - start))


def _finite(values: torch.Tensor) -> bool:
    """True when no value is NaN or infinite. One summing pass (NaN / inf propagate through a sum); only a sum
    that overflowed on finite values needs the exact check. numpy sums on this thread alone: torch's would share
    the intra-op thread pool with the conversion running at the same time on the caller's thread."""
    if not values.is_floating_point() or values.numel() == 0:
        return True
    if values.dtype in (torch.float16, torch.float32, torch.float64):
        array = values.numpy()
        return bool(np.isfinite(array.sum())) or bool(np.isfinite(array).all())
    if values.element_size() == 1:  # float8: no sum kernel; rare here (scaled fp8 files are read mapped)
        return bool(torch.isfinite(values.float()).all())
    if bool(torch.isfinite(values.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(values).all())


def read_tensors(
    tensors: Sequence[StoredTensor],
    dtype: torch.dtype | None = None,
    *,
    reader: Reader | None = None,
    chunk_bytes: int | None = None,
    what: str = "weights",
) -> tuple[list[torch.Tensor], list[str], ReadStats]:
    """Read `tensors` with plain reads, floating-point ones converted to `dtype` (None: as stored).

    Returns (tensors in the given order, keys holding NaN or inf in the file, stats). The finite check runs on the
    stored values, as a check of the file (not of the conversion). Peak memory: the results plus `BUFFERS` chunk
    buffers (none when nothing is converted).
    """
    own_reader = reader is None
    reader = reader or FileReader()
    order = sorted(range(len(tensors)), key=lambda i: (str(tensors[i].path), tensors[i].offset))
    src = [tensors[i] for i in order]
    targets = [dtype if dtype is not None and t.dtype.is_floating_point else t.dtype for t in src]
    convert = any(t.dtype != d for t, d in zip(src, targets, strict=True))
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    chunk_bytes = max(64, chunk_bytes - chunk_bytes % 8)  # whole elements of every dtype
    largest = max((t.nbytes for t, d in zip(src, targets, strict=True) if t.dtype != d), default=0)
    buffer_bytes = min(chunk_bytes, largest)  # small loads get small buffers
    buffers = [torch.empty(buffer_bytes, dtype=torch.uint8) for _ in range(BUFFERS if convert else 0)]
    out: list[torch.Tensor | None] = [None] * len(src)
    bad: set[str] = set()
    stats = ReadStats(sources=sorted({t.path for t in src}))
    total = sum(t.nbytes for t in src)
    progress = Progress(total, _describe(src, dtype, what)) if src else None

    def fill(chunk: _Chunk, target: torch.Tensor) -> bool:
        """Reader thread: the chunk's stored bytes into `target` (a buffer or the result itself); finite?"""
        t = src[chunk.index]
        nbytes = chunk.count * t.dtype.itemsize
        view = target.reshape(-1).view(torch.uint8)[:nbytes]
        reader.readinto(t.path, t.offset + chunk.start * t.dtype.itemsize, memoryview(view.numpy()))
        return _finite(view.view(t.dtype))

    def submit(pool: ThreadPoolExecutor, chunk: _Chunk) -> tuple[_Chunk, torch.Tensor, torch.Tensor, Future[bool]]:
        t = src[chunk.index]
        if out[chunk.index] is None:
            out[chunk.index] = torch.empty(t.shape, dtype=targets[chunk.index])
        dest = out[chunk.index].reshape(-1)[chunk.start : chunk.start + chunk.count]  # type: ignore[union-attr]
        target = buffers.pop() if t.dtype != targets[chunk.index] else dest
        return chunk, dest, target, pool.submit(fill, chunk, target)

    start = time.perf_counter()
    chunks = _chunks(src, chunk_bytes)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-read") as pool:
            pending: deque[tuple[_Chunk, torch.Tensor, torch.Tensor, Future[bool]]] = deque()
            for chunk in chunks:
                pending.append(submit(pool, chunk))
                if len(pending) >= max(BUFFERS, 1):
                    break
            while pending:
                chunk, dest, target, done = pending.popleft()
                t = src[chunk.index]
                if not done.result():
                    bad.add(t.key)
                if target is not dest:
                    dest.copy_(target[: chunk.count * t.dtype.itemsize].view(t.dtype))  # rounds as .to() does
                    buffers.append(target)
                stats.bytes_read += chunk.count * t.dtype.itemsize
                stats.chunks += 1
                if progress is not None:
                    progress.update(stats.bytes_read)
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(submit(pool, nxt))
    finally:
        if own_reader:
            reader.close()
    for i, t in enumerate(src):
        if out[i] is None:  # a tensor with no elements
            out[i] = torch.empty(t.shape, dtype=targets[i])
    stats.seconds = time.perf_counter() - start
    stats.bytes_out = sum(o.numel() * o.element_size() for o in out)  # type: ignore[union-attr]
    if progress is not None:
        progress.finish(stats.bytes_read, stats.bytes_out)
    result: list[torch.Tensor] = [None] * len(src)  # type: ignore[list-item]
    for pos, i in enumerate(order):
        result[i] = out[pos]  # type: ignore[assignment]
    return result, sorted(bad), stats


class Progress:
    """Log lines for a long read (`ANNOUNCE_BYTES` or more): what is done first, then the speed measured over the
    first seconds and the time left (again every `_PROGRESS_EVERY_S`), then the totals. Quiet for smaller reads."""

    def __init__(self, total_bytes: int, doing: str) -> None:
        self.total_bytes = total_bytes
        self.loud = total_bytes >= ANNOUNCE_BYTES
        self.estimated = False
        self.start = self.last = time.perf_counter()
        if self.loud:
            log.info("%s: %.1f GB to read; the time this takes follows the disk's read speed", doing, total_bytes / 1e9)

    def update(self, done_bytes: int) -> None:
        now = time.perf_counter()
        seconds = now - self.start
        if not self.loud or seconds < _ESTIMATE_AFTER_S or done_bytes >= self.total_bytes:
            return
        if self.estimated and now - self.last < _PROGRESS_EVERY_S:
            return
        self.estimated, self.last = True, now
        rate = done_bytes / seconds
        left = self.total_bytes - done_bytes
        log.info(
            "%.1f of %.1f GB read at %.2f GB/s: about %.0f s left",
            done_bytes / 1e9,
            self.total_bytes / 1e9,
            rate / 1e9,
            left / rate,
        )

    def finish(self, done_bytes: int, made_bytes: int) -> None:
        if self.loud:
            seconds = time.perf_counter() - self.start
            log.info(
                "read %.1f GB in %.1f s (%.2f GB/s); %.1f GB in memory",
                done_bytes / 1e9,
                seconds,
                done_bytes / max(seconds, 1e-9) / 1e9,
                made_bytes / 1e9,
            )


def _describe(src: Sequence[StoredTensor], dtype: torch.dtype | None, what: str) -> str:
    kinds = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in src}))
    into = f", converting to {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
    folders = ", ".join(sorted({str(t.path.parent) for t in src}))
    return f"reading {kinds} {what} from {folders} ({len({t.path for t in src})} files){into}"


# ------------------------------------------------------------------------------------------- state dicts


def needs_conversion(value: Any, dtype: torch.dtype | None) -> bool:
    """True when `value` (a tensor or StoredTensor) is floating point and stored in another dtype than `dtype`."""
    return dtype is not None and value.is_floating_point() and value.dtype != dtype


def load_state_dict(
    sd: Mapping[str, Any],
    dtype: torch.dtype | None,
    *,
    reader: Reader | None = None,
    chunk_bytes: int | None = None,
    check: Callable[[Mapping[str, torch.Tensor]], list[str]] | None = None,
    keep: Collection[str] = (),
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of `sd` with floating-point ones in `dtype` (None: as stored), and the keys holding NaN or inf.

    Keys in `keep` stay in their stored dtype (quantized weights and their scales).

    StoredTensors needing a conversion are read and converted chunk by chunk (their values checked in the file);
    other StoredTensors become memory-mapped views (zero copy) and, like tensors given as such, are checked with
    `check` (e.g. `loading.non_finite_tensors`) before any `.to(dtype)`.
    """
    stored = {
        k: v for k, v in sd.items() if isinstance(v, StoredTensor) and k not in keep and needs_conversion(v, dtype)
    }
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    if stored:
        values, bad, _ = read_tensors(list(stored.values()), dtype, reader=reader, chunk_bytes=chunk_bytes)
        out.update(zip(stored, values, strict=True))
    rest = {k: (v.mapped() if isinstance(v, StoredTensor) else v) for k, v in sd.items() if k not in stored}
    if check is not None:
        bad += check(rest)
    for k, v in rest.items():
        out[k] = v.to(dtype) if k not in keep and needs_conversion(v, dtype) else v
    return {k: out[k] for k in sd}, bad


def as_tensor(value: Any) -> torch.Tensor:
    """A tensor as stored: a StoredTensor's memory-mapped view, or the tensor itself."""
    return value.mapped() if isinstance(value, StoredTensor) else value


def read_copy(value: Any) -> torch.Tensor:
    """A StoredTensor read into its own memory with plain reads (nothing stays mapped); a tensor as it is."""
    if not isinstance(value, StoredTensor):
        return value
    (tensor,), bad, _ = read_tensors([value])
    if bad:
        raise CheckpointError(f"{value.path} holds NaN or infinite values in {value.key}; download it again")
    return tensor
