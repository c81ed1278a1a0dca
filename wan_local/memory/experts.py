"""Which DiT expert is loaded where: the active one on the device (resident or streamed), at most one idle.

A14B runs the high-noise expert for the first steps and the low-noise one after the boundary, so an expert is
loaded once per job. `ExpertSlots` hands the denoise loop the expert it asks for and decides, from the plan, what
happens to the other:

- keep_idle False (RAM is short): an expert is released before the next one is loaded, so only one is ever held.
- keep_idle True (RAM allows both): the next expert is read from disk in a background thread while the current one
  computes, and a finished expert is parked in host RAM for the next job.

Quantized experts come from the quantization cache; ComfyUI fp8_scaled and optimum-quanto files are used as
stored. Streaming follows the plan's streamed blocks. An expert's streamer packs (and on CUDA pins) its blocks'
host slabs once; parking a kept expert only detaches the device side, so its next activation re-attaches without
packing or pinning anything. Releasing an expert uninstalls its streamer (unpins) before the model is dropped.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from wan_local.errors import CheckpointError
from wan_local.memory.options import MemoryOptions
from wan_local.memory.plan import ResidencyPlan
from wan_local.memory.streaming import BlockStreamer, move_unstreamed
from wan_local.models.dit import WanDiT
from wan_local.weights import fp8
from wan_local.weights.files import read_safetensors
from wan_local.weights.loading import load_dit

log = logging.getLogger(__name__)


def is_prequantized(path: Path) -> bool:
    """A single-file DiT stored in fp8 (ComfyUI fp8_scaled) or in optimum-quanto format."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from wan_local.memory.quant import is_quanto_checkpoint

    sd = read_safetensors(path)  # memory-mapped: only the header is read here
    return fp8.is_fp8_checkpoint(sd) or is_quanto_checkpoint(sd)


class ExpertSlots:
    """Loads DiT experts on demand and places them on the device according to a ResidencyPlan.

    `slots(expert)` returns the expert ready to run; `park()` ends its use (the streamer is removed; the model is
    kept in host RAM when `keep_idle`, else released); `release()` drops everything.
    """

    def __init__(
        self,
        paths: dict[str, Path],
        model_type: str,
        device: torch.device,
        dtype: torch.dtype,
        memory: MemoryOptions,
        quant_cache_dir: Path | None = None,
    ) -> None:
        self._paths = paths
        self._model_type = model_type
        self._device = device
        self._dtype = dtype
        self._memory = memory
        self._quant_cache_dir = quant_cache_dir
        self._lock = threading.Lock()
        self._active: tuple[str, WanDiT, BlockStreamer | None] | None = None  # (expert, model, streamer)
        self._idle: dict[str, tuple[WanDiT, BlockStreamer | None]] = {}  # streamer: prepared, detached
        self._pending: dict[str, Future[WanDiT]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.plan: ResidencyPlan | None = None
        self.keep_idle = False
        #: Experts read from disk, in order (tests and logs).
        self.loads: list[str] = []

    # ------------------------------------------------------------------------------------------- configuration

    def configure(self, plan: ResidencyPlan | None, keep_idle: bool) -> None:
        """Set the plan for the next job. Idle experts are dropped when the new plan cannot keep them."""
        self.plan = plan
        self.keep_idle = keep_idle
        if not keep_idle:
            self._drop_idle()

    def held(self) -> list[str]:
        """Experts currently held in memory (active, idle or being prefetched)."""
        with self._lock:
            names = list(self._idle) + list(self._pending)
        if self._active is not None:
            names.insert(0, self._active[0])
        return names

    # ------------------------------------------------------------------------------------------- loading

    def _read(self, expert: str) -> WanDiT:
        path = self._paths[expert]
        quant = self._memory.quant
        if quant != "none" or is_prequantized(path):
            from wan_local.memory.quant import QuantCache, load_quantized_dit

            cache = QuantCache(self._quant_cache_dir) if self._quant_cache_dir is not None else None
            model = load_quantized_dit(
                path,
                quant if quant != "none" else "fp8",  # a pre-quantized file keeps its own format
                self._memory.quant_scope,
                self._dtype,
                cache=cache,
                expected_model_type=self._model_type,
                compute=self._memory.quant_compute,
            )
        else:
            model = load_dit(path, dtype=self._dtype, expected_model_type=self._model_type)
        self.loads.append(expert)
        return model

    def _take(self, expert: str) -> tuple[WanDiT, BlockStreamer | None]:
        """The expert (and its prepared streamer, if any) from the idle set, the prefetch or the disk."""
        with self._lock:
            idle = self._idle.pop(expert, None)
            pending = self._pending.pop(expert, None)
        if idle is not None:
            return idle
        if pending is not None:
            return pending.result(), None
        return self._read(expert), None

    def prefetch(self, expert: str) -> None:
        """Start reading `expert` from disk in the background (only when idle experts may be kept)."""
        if not self.keep_idle or expert not in self._paths:
            return
        with self._lock:
            if expert in self._idle or expert in self._pending:
                return
            if self._active is not None and self._active[0] == expert:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")
            self._pending[expert] = self._pool.submit(self._read, expert)
        log.info("prefetching the %s expert in the background", expert)

    # ------------------------------------------------------------------------------------------- placement

    def _place(self, model: WanDiT, streamer: BlockStreamer | None) -> BlockStreamer | None:
        """Put `model` on the device: resident, or non-block weights resident and the plan's blocks streamed.

        `streamer` is the one kept from the expert's last use: re-attached when it streams what the plan streams
        (nothing is packed or pinned again), else uninstalled. Every block runs its FFN in the plan's token chunks
        (`DiTBlock.ffn_chunk_tokens`), or unchunked when the plan has none (or there is no plan): a model kept from
        an earlier job never keeps a stale chunk.
        """
        plan = self.plan
        chunk = None if plan is None else plan.ffn_chunk_tokens
        for block in getattr(model, "blocks", ()):  # wrappers without blocks (golden-test recorders) run as they are
            block.ffn_chunk_tokens = chunk
        if plan is None or not plan.streamed_blocks:
            if streamer is not None:
                streamer.uninstall()
            model.to(self._device)
            return None
        # On the CPU too: the same plan, slots and block order, with synchronous copies.
        cap = plan.pinned_host_bytes + plan.staging_host_bytes
        wanted = (sorted(plan.streamed_blocks), plan.prefetch_depth, cap)
        if streamer is not None and (streamer.indices, streamer.depth, streamer.pinned_cap_bytes) != wanted:
            streamer.uninstall()
            streamer = None
        move_unstreamed(model, plan.streamed_blocks, self._device)
        if streamer is None:
            streamer = BlockStreamer(model, plan.streamed_blocks, self._device, plan.prefetch_depth, cap)
        return streamer.attach()

    def __call__(self, expert: str) -> WanDiT:
        if self._active is not None and self._active[0] == expert:
            return self._active[1]
        if expert not in self._paths:
            raise CheckpointError(f"no checkpoint for the {expert} expert")
        self.park()
        model, streamer = self._take(expert)
        self._active = (expert, model, self._place(model, streamer))
        return model

    def park(self) -> None:
        """End the active expert's use: keep it in host RAM (its streamer detached, slabs kept) or release it."""
        if self._active is None:
            return
        expert, model, streamer = self._active
        self._active = None
        if self.keep_idle:
            if streamer is not None:
                streamer.detach()
            model.to("cpu")  # the non-streamed weights; streamed ones already are views of their host slabs
            with self._lock:
                self._idle[expert] = (model, streamer)
        elif streamer is not None:
            streamer.uninstall()
        del model, streamer
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _drop_idle(self) -> None:
        """Release every idle expert (its streamer unpinned first)."""
        with self._lock:
            idle = list(self._idle.values())
            self._idle.clear()
        for _, streamer in idle:
            if streamer is not None:
                streamer.uninstall()

    def release(self) -> None:
        """Drop every expert (active, idle and prefetched)."""
        keep, self.keep_idle = self.keep_idle, False
        self.park()
        self.keep_idle = keep
        self._drop_idle()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for future in pending:
            future.cancel()
            if not future.cancelled():
                future.exception()  # wait; a failed prefetch is of no interest once released
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
