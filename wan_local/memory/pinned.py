"""Host memory for streamed weights: slabs (page-locked or pageable), staging chunks and the copy thread.

A `HostSlab` is one block's bytes in host memory. It is page-locked in place with `cudaHostRegister` (exact size,
whole pages owned by this allocation only) while a pinned-memory cap allows, and pageable beyond it.

Pageable slabs are copied by one `CopyThread` through two reused pinned staging chunks (host memcpy into one while
the GPU reads the other), so the host memcpy overlaps both the DMA and the compute. The compute thread only waits
until a load's copies are *issued*; that bounds how far the CPU runs ahead of the GPU but never idles the GPU. While
the copy thread exists every load goes through it, which keeps the copy stream in load order.

Nothing here knows about blocks or models: `streaming.py` decides what is packed where and when it is copied.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

#: Every host slab and CPU-side buffer starts at a multiple of this (the CUDA caching allocator's alignment).
ALIGN_BYTES = 512
DEFAULT_CHUNK_BYTES = 64 << 20  # pinned staging chunk for pageable blocks (two are allocated)
PAGE_BYTES = mmap.PAGESIZE


def align(n: int, to: int) -> int:
    """`n` rounded up to a multiple of `to`."""
    return (n + to - 1) // to * to


def aligned_empty(nbytes: int) -> torch.Tensor:
    """Uninitialised host bytes starting at a multiple of ALIGN_BYTES (torch's CPU allocator only promises 64)."""
    raw = torch.empty(nbytes + ALIGN_BYTES, dtype=torch.uint8)
    start = (-raw.data_ptr()) % ALIGN_BYTES
    return raw[start : start + nbytes]


def pin_plan(nbytes: list[int], cap_bytes: int, chunk_bytes: int) -> list[bool]:
    """Which slabs of these sizes to page-lock: all if they fit `cap_bytes`, else greedily in order within the cap
    less the two staging chunks the pageable rest needs."""
    sizes = [align(n, PAGE_BYTES) for n in nbytes]
    if sum(sizes) <= cap_bytes:
        return [True] * len(sizes)
    budget = max(0, cap_bytes - 2 * chunk_bytes)
    plan = []
    for size in sizes:
        plan.append(size <= budget)
        budget -= size if plan[-1] else 0
    logger.info("pinned cap %.2f GB: %d of %d slabs pinned, rest pageable", cap_bytes / 1e9, sum(plan), len(plan))
    return plan


# ---------------------------------------------------------------------------------------------- slabs


def pinning_available(device: torch.device) -> bool:
    """Whether host memory is page-locked for copies to `device` (CUDA only; the CPU copies synchronously)."""
    return device.type == "cuda"


def _host_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister; the cudaError code (0 = success)."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))


def _host_unregister(ptr: int) -> int:
    """cudaHostUnregister; the cudaError code (0 = success)."""
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def _pin(flat: torch.Tensor, device: torch.device) -> bool:
    """Page-lock `flat` in place with cudaHostRegister (exact size, no power-of-two rounding)."""
    err = _host_register(flat.data_ptr(), flat.numel())
    if err == 0:
        return True
    logger.warning("cudaHostRegister of %d bytes failed (cudaError %d): the block stays pageable", flat.numel(), err)
    _clear_cuda_error(device)
    return False


def _clear_cuda_error(device: torch.device) -> None:
    """Drain the error a failed cudaHostRegister left in the runtime, before a later kernel check reports it."""
    try:
        torch.zeros(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except RuntimeError as exc:  # the stale registration error surfaces (once) here and is now cleared
        logger.debug("cleared CUDA error after failed registration: %s", exc)


class HostSlab:
    """One block's bytes in host memory, in the same layout as the device buffer."""

    def __init__(self, nbytes: int, pin: bool, device: torch.device) -> None:
        self.pinned, self.device = False, device
        if pin and nbytes:
            # Register whole pages that lie inside this allocation only: a page shared with another allocation
            # could be registered twice (an error) or unregistered under someone else.
            span = align(nbytes, PAGE_BYTES)
            raw = torch.empty(span + PAGE_BYTES, dtype=torch.uint8)
            start = (-raw.data_ptr()) % PAGE_BYTES
            self.flat = raw[start : start + span]
            self.pinned = _pin(self.flat, device)
        else:
            self.flat = aligned_empty(nbytes)

    def release_pin(self) -> None:
        """Unregister the pages; the memory stays valid pageable memory for any tensor still viewing it."""
        if self.pinned:
            err = _host_unregister(self.flat.data_ptr())
            if err:
                logger.warning("cudaHostUnregister failed (cudaError %d)", err)
                _clear_cuda_error(self.device)
            self.pinned = False


# ------------------------------------------------------------------------------------------------- copies


@dataclass(eq=False)
class Load:
    """One copy of block `pos` into device slot `slot`; `done` is set once every copy is *issued*."""

    pos: int
    slot: int
    src: torch.Tensor
    dst: torch.Tensor
    pinned: bool
    free: torch.cuda.Event | None = None
    ready: torch.cuda.Event | None = None
    timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def wait_issued(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"copying streamed block {self.pos} failed: {self.error}") from self.error


def issue_copy(load: Load, stream: torch.cuda.Stream, staging: Staging | None) -> None:
    """Queue load's host->device copy on `stream` (the caller made `stream` current)."""
    stream.wait_event(load.free)
    if load.timing:
        load.timing[0].record(stream)
    if staging is None:
        load.dst.copy_(load.src, non_blocking=True)
    else:
        staging.copy(load.src, load.dst, stream)
    if load.timing:
        load.timing[1].record(stream)
    load.ready.record(stream)


class Staging:
    """Two pinned chunks a pageable slab is copied through: memcpy into one while the GPU reads the other."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunks = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        # "the H2D out of chunk i is done"; blocking, so the copy thread sleeps instead of spinning a core
        self.events = [torch.cuda.Event(blocking=True) for _ in range(2)]
        self.nbytes = 2 * chunk_bytes

    def copy(self, src: torch.Tensor, dst: torch.Tensor, stream: torch.cuda.Stream) -> None:
        size = self.chunks[0].numel()
        for k, start in enumerate(range(0, src.numel(), size)):
            i, n = k % 2, min(size, src.numel() - start)
            self.events[i].synchronize()  # host waits for the copy stream only (this is the copy thread)
            self.chunks[i][:n].copy_(src[start : start + n])
            dst[start : start + n].copy_(self.chunks[i][:n], non_blocking=True)
            self.events[i].record(stream)


def make_staging(chunk_bytes: int) -> Staging | None:
    """Pinned staging for pageable blocks, or None (then pageable copies go through the driver's own staging)."""
    try:
        return Staging(chunk_bytes)
    except RuntimeError as exc:  # pinned allocation refused: still correct, copies just overlap less
        logger.warning("could not pin %d bytes of staging (%s); pageable blocks copy unstaged", 2 * chunk_bytes, exc)
        return None


class CopyThread:
    """Issues every load, in order, on the copy stream, so pageable memcpy never blocks the compute thread."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream, staging: Staging | None) -> None:
        self.device, self.stream, self.staging = device, stream, staging
        self.jobs: queue.Queue[Load | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="wan-local-block-copy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):  # both are per-thread state
            while (load := self.jobs.get()) is not None:
                try:
                    issue_copy(load, self.stream, None if load.pinned else self.staging)
                except Exception as exc:  # handed to the compute thread, which raises it
                    load.error = exc
                finally:
                    load.done.set()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
