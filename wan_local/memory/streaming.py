"""Stream DiT blocks from host RAM to the compute device, a few blocks ahead of the compute.

`BlockStreamer` attaches to a model from outside with removable forward hooks. Each streamed block keeps one
copy of its weights in host memory: a flat byte slab, page-locked (pinned) while a pinned-memory cap allows,
pageable beyond it. The device holds `prefetch_depth + 1` pre-allocated flat byte buffers sized for the largest
streamed block, reused round-robin. While a block runs, its parameters and buffers are views into the device
buffer its weights were copied to; between runs they are views into its host slab.

Order of moves for the streamed block at position p (positions are the forward order of the streamed blocks and
wrap around to 0 at the next forward: the DiT runs once per CFG branch):
1. load(p) into slot s, on the copy stream: wait `free[s]` (the compute that last read slot s is done), copy
   host slab -> buffer s, record `ready[s]`. Issued `prefetch_depth` blocks ahead, by the pre-hook of an
   earlier block (or by the model's pre-hook for the first blocks of a forward).
2. pre-hook of block p: the compute stream waits `ready[s]` (GPU side, no host sync), the block's tensors are
   re-pointed at views of buffer s, and loads are issued for the next `prefetch_depth` positions.
3. post-hook of block p: record `free[s]` on the compute stream, re-point the tensors at the host slab.
Slots are handed out round-robin, so the running block and the `prefetch_depth` queued loads always hold
`prefetch_depth + 1` distinct slots. The buffers are owned here (never freed while installed), so no
`record_stream` is needed.

Host memory (slabs, pinning, staging, the copy thread) is `pinned.py`'s. Pageable blocks are copied by its copy
thread; the compute thread only waits, at block p's pre-hook, until p's copies are *issued*, which bounds how far
the CPU runs ahead of the GPU to about `prefetch_depth` blocks. With all blocks pinned there is no thread and no
host wait at all.

On device "cpu" the same code runs without streams, events or pinning: loads are synchronous copies into the
reused buffers, which lets CPU tests prove streamed == resident bit for bit.

Inference only: tensors are re-pointed with `tensor.data = view`, which autograd does not track.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wan_local.errors import InputError
from wan_local.memory.block_layout import BlockLayout, block_nbytes, check_not_shared, move_unstreamed
from wan_local.memory.pinned import (
    DEFAULT_CHUNK_BYTES,
    CopyThread,
    HostSlab,
    Load,
    Staging,
    aligned_empty,
    issue_copy,
    make_staging,
    pin_plan,
    pinning_available,
)

__all__ = ["BlockStreamer", "StreamStats", "block_nbytes", "move_unstreamed"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- streamer


@dataclass
class StreamStats:
    """What the streamer holds and has done. Times are seconds; sizes are bytes, of the last prepare and attach.

    Per-forward counters (forwards .. copy_s) count since the last `attach` or `reset_stats`.
    stall_s: time the compute waited for copies (CUDA: event pairs around the wait; CPU: the synchronous copies).
    copy_s: time the copies themselves took (CUDA: events on the copy stream; CPU: same as stall_s).
    Both are measured only by a streamer made with `timing=True` (profiling); otherwise they stay 0.
    on_demand_loads: loads not prefetched (first block of a run, or after an interrupted forward).
    packs / pins: blocks packed into host slabs, and page-lock operations (slab registrations and staging
    allocations), over the streamer's life: a re-attach adds neither.
    """

    forwards: int = 0
    loads: int = 0
    on_demand_loads: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0
    copy_s: float = 0.0
    pinned_bytes: int = 0
    pageable_bytes: int = 0
    staging_bytes: int = 0
    device_buffer_bytes: int = 0
    packs: int = 0
    pins: int = 0

    @property
    def bytes_per_forward(self) -> float:
        return self.bytes_moved / self.forwards if self.forwards else 0.0


class BlockStreamer:
    """Keeps the chosen blocks of `model.<blocks_attr>` in host RAM and streams them to `device` per forward.

    model: any module whose `blocks_attr` is an nn.ModuleList called in index order once per forward.
    streamed: indices of the blocks to stream; the others are left alone (the caller places them).
    device: the compute device ("cuda", "cuda:N" or "cpu").
    prefetch_depth: 1 or 2 loads in flight ahead of the running block; `prefetch_depth + 1` device buffers.
    pinned_cap_bytes: most page-locked host bytes (block slabs + staging); blocks beyond it stay pageable.
    chunk_bytes: size of each of the two pinned staging chunks used for pageable blocks.
    timing: measure stall_s and copy_s (profiling). On CUDA that records 4 timing events per block per forward,
        so production runs leave it off.

    Lifecycle, in two halves so that a model parked and used again is not packed or pinned again:
    - `prepare()`: the host side, once: pack every streamed block into its slab (pinned within the cap) and
      re-point its tensors there, plus the staging chunks for pageable slabs.
    - `attach()`: the device side: buffers, copy stream, events, copy thread and hooks (prepares first if needed).
      `detach()` removes them again; the streamed tensors stay views of their slabs (host RAM, still pinned).
    - `uninstall()`: detach, unpin, and give every streamed tensor back its original device.
    `install()` = prepare + attach; `with BlockStreamer(...):` installs and uninstalls. While prepared, do not
    move or convert the streamed blocks (`model.to(...)` only to the CPU) and do not train.
    """

    def __init__(
        self,
        model: nn.Module,
        streamed: Sequence[int],
        device: torch.device | str,
        prefetch_depth: int = 1,
        pinned_cap_bytes: int = 0,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        blocks_attr: str = "blocks",
        timing: bool = False,
    ) -> None:
        blocks = getattr(model, blocks_attr, None)
        if not isinstance(blocks, nn.ModuleList):
            raise InputError(f"model.{blocks_attr} is not an nn.ModuleList of blocks")
        indices = sorted(set(int(i) for i in streamed))
        if len(indices) != len(streamed) or not indices or indices[0] < 0 or indices[-1] >= len(blocks):
            raise InputError(f"streamed={list(streamed)}: need distinct block indices in [0, {len(blocks)})")
        if prefetch_depth not in (1, 2):
            raise InputError(f"prefetch_depth={prefetch_depth}: must be 1 or 2")
        if pinned_cap_bytes < 0 or chunk_bytes <= 0:
            raise InputError(f"pinned_cap_bytes={pinned_cap_bytes}, chunk_bytes={chunk_bytes}: must be >= 0 / > 0")
        self.device = _compute_device(device)
        self.model, self.indices, self.depth = model, indices, prefetch_depth
        self.pinned_cap_bytes, self.chunk_bytes = pinned_cap_bytes, chunk_bytes
        self.timing = timing
        self._blocks = [blocks[i] for i in indices]
        self._blocks_attr = blocks_attr
        self._layouts = self._build_layouts()
        check_not_shared(model, self._blocks, indices)
        self.stats = StreamStats()
        self._attached = False
        self._reset_host()
        self._reset_device()

    def _build_layouts(self) -> list[BlockLayout]:
        pairs = zip(self._blocks, self.indices, strict=True)
        cpu = self.device.type == "cpu"
        return [BlockLayout(b, f"{self._blocks_attr}.{i}", keep_alignment=cpu) for b, i in pairs]

    def _reset_host(self) -> None:
        """No host side (also what a failed prepare or an uninstall leaves behind)."""
        self._slabs: list[HostSlab] = []
        self._host_views: list[list[torch.Tensor]] = []
        self._staging: Staging | None = None
        self._prepared = False

    def _reset_device(self) -> None:
        """No device side (also what a failed attach or a detach leaves behind)."""
        self._buffers: list[torch.Tensor] = []
        self._dev_views: list[list[list[torch.Tensor]]] = []
        self._stream: torch.cuda.Stream | None = None
        self._thread: CopyThread | None = None
        self._free: list[torch.cuda.Event] = []
        self._ready: list[torch.cuda.Event] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._queue: deque[Load] = deque()
        self._current: Load | None = None
        self._next_slot = 0
        self._pending_timing: list[tuple[torch.cuda.Event, ...]] = []

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def prepared(self) -> bool:
        """Whether the streamed weights live in the streamer's host slabs (packed, pinned as planned)."""
        return self._prepared

    @property
    def installed(self) -> bool:
        """Whether the device side is attached: buffers allocated and hooks streaming every forward."""
        return self._attached

    @property
    def pinned_host_bytes(self) -> int:
        """Page-locked host bytes held now (pinned slabs + staging): kept while detached, 0 once uninstalled."""
        return self.stats.pinned_bytes + self.stats.staging_bytes if self._prepared else 0

    @property
    def buffer_bytes(self) -> int:
        """Size of each device buffer: the largest streamed block (aligned layout)."""
        return max(layout.nbytes for layout in self._layouts)

    def install(self) -> BlockStreamer:
        """`prepare()` then `attach()`."""
        if self._attached:
            raise InputError("BlockStreamer.install(): already installed")
        return self.prepare().attach()

    def prepare(self) -> BlockStreamer:
        """Pack the streamed weights into host slabs and pin them within the cap; nothing if already prepared.

        Host RAM: each block is packed into its slab and its tensors re-pointed there one block at a time, so the
        original storage is freed as it goes (peak = slabs + one block, if nothing else holds the originals).
        On failure everything done so far is undone and the error is re-raised.
        """
        if self._prepared:
            return self
        self._layouts = self._build_layouts()  # the blocks may have changed (dtype, device) since __init__
        sizes = [layout.nbytes for layout in self._layouts]
        pin = [False] * len(sizes)
        if pinning_available(self.device):
            pin = pin_plan(sizes, self.pinned_cap_bytes, self.chunk_bytes)
        try:
            with torch.inference_mode(False), torch.no_grad():  # slabs and views must be usable outside it
                for layout, want_pin in zip(self._layouts, pin, strict=True):
                    slab = HostSlab(layout.nbytes, want_pin, self.device)
                    self._slabs.append(slab)
                    layout.pack_into(slab.flat)
                    views = layout.views(slab.flat)
                    layout.point_at(views)  # the original storage is freed here, one block at a time
                    self._host_views.append(views)
                    self.stats.packs += 1
                    self.stats.pins += slab.pinned
                if self.device.type == "cuda" and not all(s.pinned for s in self._slabs):
                    self._staging = make_staging(self.chunk_bytes)
                    self.stats.pins += self._staging is not None
        except BaseException:
            self._release_host()
            raise
        self._prepared = True
        s = self.stats
        s.pinned_bytes = sum(slab.flat.numel() for slab in self._slabs if slab.pinned)
        s.pageable_bytes = sum(slab.flat.numel() for slab in self._slabs if not slab.pinned)
        s.staging_bytes = 0 if self._staging is None else self._staging.nbytes
        return self

    def attach(self) -> BlockStreamer:
        """Allocate the device buffers and attach the hooks (prepares first if needed); zeroes the counters."""
        if self._attached:
            raise InputError("BlockStreamer.attach(): already installed")
        self.prepare()
        try:
            with torch.inference_mode(False), torch.no_grad():
                self._attach()
        except BaseException:
            self._detach()
            raise
        self._attached = True
        self.reset_stats()
        s, mb = self.stats, 1e6
        logger.info(
            "streaming %d blocks to %s: %.0f MB pinned + %.0f MB pageable host, %d device buffers of %.1f MB",
            *(len(self.indices), self.device, s.pinned_bytes / mb, s.pageable_bytes / mb, self.depth + 1),
            self.buffer_bytes / mb,
        )
        return self

    def _attach(self) -> None:
        k = self.depth + 1
        if self.device.type == "cuda":  # the caching allocator aligns to 512 bytes
            self._buffers = [torch.empty(self.buffer_bytes, dtype=torch.uint8, device=self.device) for _ in range(k)]
            self._stream = torch.cuda.Stream(self.device)
            self._free = [torch.cuda.Event() for _ in range(k)]
            self._ready = [torch.cuda.Event() for _ in range(k)]
            if not all(s.pinned for s in self._slabs):
                self._thread = CopyThread(self.device, self._stream, self._staging)
        else:
            self._buffers = [aligned_empty(self.buffer_bytes) for _ in range(k)]
        self._dev_views = [[layout.views(buf) for layout in self._layouts] for buf in self._buffers]
        self.stats.device_buffer_bytes = k * self.buffer_bytes
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model_forward, prepend=True))
        for pos, block in enumerate(self._blocks):
            self._hooks.append(block.register_forward_pre_hook(self._make_pre_hook(pos), prepend=True))
            self._hooks.append(block.register_forward_hook(self._make_post_hook(pos), always_call=True))

    def detach(self) -> None:
        """Remove the hooks and free the device side; the host slabs stay (pinned) for the next `attach`.

        Synchronises the copy and compute streams once. Idempotent.
        """
        if self._attached:
            self._detach()

    def _detach(self) -> None:
        """Undo whatever part of `_attach` happened; safe on a partial attach."""
        try:
            self._discard_queue()
        finally:
            if self._thread is not None:
                self._thread.close()
            if self._stream is not None:
                torch.cuda.synchronize(self.device)  # no copy/compute may still use a buffer or read a slab
                self._resolve_timing(block=True)
            for hook in self._hooks:
                hook.remove()
            with torch.inference_mode(False), torch.no_grad():
                for layout, views in zip(self._layouts, self._host_views, strict=True):
                    layout.point_at(views)  # a forward stopped inside a block may have left device views
            self._reset_device()
            self._attached = False

    def uninstall(self) -> None:
        """Detach, unpin, and give every streamed tensor back its original device (values unchanged). Idempotent.

        Streamed tensors that lived on the CPU stay views of their (now unpinned) slab: no copy. Tensors that
        lived on another device are copied back there.
        """
        self.detach()
        if self._prepared:
            self._release_host()

    def _release_host(self) -> None:
        """Undo whatever part of `prepare` happened; safe on a partial prepare."""
        with torch.inference_mode(False), torch.no_grad():
            for layout, views, slab in zip(self._layouts, self._host_views, self._slabs, strict=False):
                layout.point_at(views)
                slab.release_pin()
                for s in layout.slots:
                    if s.device.type != "cpu":
                        s.owner.data = s.owner.data.to(s.device)
            for slab in self._slabs[len(self._host_views) :]:  # packed but never pointed at
                slab.release_pin()
        self._reset_host()

    def __enter__(self) -> BlockStreamer:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def reset_stats(self) -> None:
        """Zero the per-forward counters (keeps the byte sizes and the packs / pins counts)."""
        self._resolve_timing(block=True)
        zero = {f: 0 for f in ("forwards", "loads", "on_demand_loads", "bytes_moved", "stall_s", "copy_s")}
        self.stats = dataclasses.replace(self.stats, **zero)

    def read_stats(self) -> StreamStats:
        """The counters, with every pending CUDA timing resolved (synchronises on those events)."""
        self._resolve_timing(block=True)
        return self.stats

    # ---------------------------------------------------------------------------------------------- hooks

    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        self.stats.forwards += 1
        if self._current is not None:  # the previous forward stopped inside a block (exception)
            self._release(self._current)
        if not self._queue or self._queue[0].pos != 0:
            self._discard_queue()
        self._top_up(self.depth + 1)  # nothing runs yet: all depth + 1 slots can be filling
        self._resolve_timing(block=False)

    def _make_pre_hook(self, pos: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._current is not None:
                self._release(self._current)
            if self._queue and self._queue[0].pos == pos:
                load = self._queue.popleft()
            else:  # not prefetched: blocks called out of order or outside model.forward
                self._discard_queue()
                load = self._issue(pos)
                self.stats.on_demand_loads += 1
            self._wait_ready(load)
            self._layouts[pos].point_at(self._dev_views[load.slot][pos])
            self._current = load
            self._top_up(self.depth)

        return hook

    def _make_post_hook(self, pos: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._current is not None and self._current.pos == pos:
                self._release(self._current)

        return hook

    # ------------------------------------------------------------------------------------------ transfers

    def _top_up(self, limit: int) -> None:
        """Queue loads for the positions after the last queued (or running) one until `limit` are queued."""
        m = len(self._layouts)
        while len(self._queue) < limit:
            last = self._queue[-1] if self._queue else self._current
            self._queue.append(self._issue(0 if last is None else (last.pos + 1) % m))

    def _issue(self, pos: int) -> Load:
        slot = self._next_slot
        self._next_slot = (slot + 1) % len(self._buffers)
        nbytes = self._layouts[pos].nbytes
        slab = self._slabs[pos]
        load = Load(pos, slot, slab.flat[:nbytes], self._buffers[slot][:nbytes], slab.pinned)
        self.stats.loads += 1
        self.stats.bytes_moved += nbytes
        if self._stream is None:  # CPU: a synchronous copy into the reused buffer
            t0 = time.perf_counter() if self.timing else 0.0
            load.dst.copy_(load.src)
            if self.timing:
                elapsed = time.perf_counter() - t0
                self.stats.copy_s += elapsed
                self.stats.stall_s += elapsed
            load.done.set()
            return load
        load.free, load.ready = self._free[slot], self._ready[slot]
        if self.timing:
            load.timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        if self._thread is not None:
            self._thread.jobs.put(load)
        else:
            with torch.cuda.stream(self._stream):
                issue_copy(load, self._stream, None)
            load.done.set()
        return load

    def _wait_ready(self, load: Load) -> None:
        """Make the compute stream wait for the load's copy (GPU side; the host waits only for its issue)."""
        load.wait_issued()
        if self._stream is None:
            return
        compute = torch.cuda.current_stream(self.device)
        if self.timing:
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(load.ready)
            after.record(compute)
            self._pending_timing.append((before, after, *load.timing))
        else:
            compute.wait_event(load.ready)

    def _release(self, load: Load) -> None:
        """The block at load.pos is done: free its slot after the queued compute, point it back at the host."""
        if self._stream is not None:
            self._free[load.slot].record(torch.cuda.current_stream(self.device))
        self._layouts[load.pos].point_at(self._host_views[load.pos])
        self._current = None

    def _discard_queue(self) -> None:
        """Forget queued loads (their copies still complete; later copies into a slot are ordered after them)."""
        for load in self._queue:
            load.wait_issued()  # a load still owned by the copy thread must not record `ready` after a reuse
        self._queue.clear()

    def _resolve_timing(self, block: bool) -> None:
        """Fold finished event pairs into stall_s / copy_s; with block=True wait for all of them."""
        keep = []
        for events in self._pending_timing:
            if not block and not events[1].query():
                keep.append(events)
                continue
            events[1].synchronize()
            events[3].synchronize()
            self.stats.stall_s += events[0].elapsed_time(events[1]) / 1e3
            self.stats.copy_s += events[2].elapsed_time(events[3]) / 1e3
        self._pending_timing = keep


# ------------------------------------------------------------------------------------------------- helpers


def _compute_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"device={device!r}: block streaming supports 'cuda' and 'cpu'")
    if not torch.cuda.is_available():
        raise InputError(f"device={device!r}: CUDA is not available in this PyTorch build or machine")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
