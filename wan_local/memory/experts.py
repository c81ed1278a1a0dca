"""Which DiT expert is loaded where: the active one on the device (resident or streamed), at most one idle.

A14B runs the high-noise expert for the first steps and the low-noise one after the boundary, so an expert is
loaded once per job. `ExpertSlots` hands the denoise loop the expert it asks for and decides, from the plan, what
happens to the other:

- keep_idle False (RAM is short): an expert is released before the next one is loaded, so only one is ever held.
- keep_idle True (RAM allows both): the next expert is read from disk in a background thread while the current one
  computes, and a finished expert is parked in host RAM for the next job.

Quantized experts come from the quantization cache; ComfyUI fp8_scaled, optimum-quanto and GGUF files are used
as stored (GGUF Linears stay packed and are dequantized on the device as their block runs). Streaming follows
the plan's streamed blocks. An expert's streamer packs (and on CUDA pins) its blocks' host slabs once; parking a
kept expert only detaches the device side, so its next activation re-attaches without packing or pinning
anything. Releasing an expert uninstalls its streamer (unpins) before the model is dropped.

Every expert held is an entry of the memory ledger (kind "dit"): reserved with its file size when its read starts,
then its measured host, pinned and VRAM bytes; an idle expert is evictable (`MemoryLedger.make_room` drops it), and
the entry is released when the expert is dropped.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from wan_local.errors import CheckpointError
from wan_local.memory.ledger import MemoryLedger, process_ledger, tensor_bytes
from wan_local.memory.options import MemoryOptions
from wan_local.memory.plan import ResidencyPlan
from wan_local.memory.streaming import BlockStreamer, move_unstreamed
from wan_local.models.dit import WanDiT
from wan_local.specs import TASKS
from wan_local.weights import fp8
from wan_local.weights.files import read_safetensors
from wan_local.weights.headers import checkpoint_file_bytes
from wan_local.weights.layout import SINGLE
from wan_local.weights.loading import load_dit

log = logging.getLogger(__name__)


def is_prequantized(path: Path) -> bool:
    """A single-file DiT stored in fp8 (ComfyUI fp8_scaled) or in optimum-quanto format."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from wan_local.memory.quant.formats import is_quanto_checkpoint

    sd = read_safetensors(path)  # memory-mapped: only the header is read here
    return fp8.is_fp8_checkpoint(sd) or is_quanto_checkpoint(sd)


@dataclass
class _Held:
    """One expert in memory: its model, its streamer (None when resident), its ledger key."""

    expert: str
    model: WanDiT
    key: int
    streamer: BlockStreamer | None = None


class ExpertSlots:
    """Loads DiT experts on demand and places them on the device according to a ResidencyPlan.

    `slots(expert)` returns the expert ready to run; `park()` ends its use (the streamer is detached; the model is
    kept in host RAM when `keep_idle`, else released); `release()` drops everything.
    ledger: where the experts held are accounted (default: the process-wide `process_ledger()`).
    """

    def __init__(
        self,
        paths: dict[str, Path],
        model_type: str,
        device: torch.device,
        dtype: torch.dtype,
        memory: MemoryOptions,
        quant_cache_dir: Path | None = None,
        ledger: MemoryLedger | None = None,
    ) -> None:
        self._paths = paths
        self._model_type = model_type
        self._device = device
        self._dtype = dtype
        self._memory = memory
        self._quant_cache_dir = quant_cache_dir
        self._ledger = ledger if ledger is not None else process_ledger()
        self._task = next((t.name for t in TASKS.values() if t.model_type == model_type), model_type)
        self._lock = threading.Lock()
        self._active: _Held | None = None
        self._idle: dict[str, _Held] = {}  # their streamers prepared, detached
        self._pending: dict[str, Future[_Held]] = {}
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
            names.insert(0, self._active.expert)
        return names

    # ------------------------------------------------------------------------------------------- loading

    def _read(self, expert: str) -> _Held:
        """Read `expert` from disk (in the prefetch thread, or the caller's), accounted in the ledger."""
        path = self._paths[expert]
        name = f"{self._task} DiT" if expert == SINGLE else f"{self._task} {expert} DiT"  # "t2v-A14B high_noise DiT"
        key = self._ledger.reserve(name, "dit", host_bytes=checkpoint_file_bytes(path))
        try:
            model = self._load(path)
        except BaseException:
            self._ledger.release(key)
            raise
        self._ledger.register(name, "dit", host_bytes=_footprint(model, None)[0], key=key)
        weakref.finalize(model, self._ledger.release, key)  # a model dropped without release() is not counted on
        self.loads.append(expert)
        return _Held(expert, model, key)

    def _load(self, path: Path) -> WanDiT:
        quant = self._memory.quant
        if (quant != "none" and Path(path).suffix != ".gguf") or is_prequantized(path):
            from wan_local.memory.quant.cache import QuantCache
            from wan_local.memory.quant.formats import load_quantized_dit

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
        else:  # GGUF files too: kept in their own quantization, whatever `quant` says
            model = load_dit(path, dtype=self._dtype, expected_model_type=self._model_type)
        return model

    def _take(self, expert: str) -> _Held:
        """The expert (with its prepared streamer, if any) from the idle set, the prefetch or the disk."""
        with self._lock:
            idle = self._idle.pop(expert, None)
            pending = self._pending.pop(expert, None)
        if idle is not None:
            self._ledger.set_evictable(idle.key, None)
            return idle
        if pending is not None:
            return pending.result()
        return self._read(expert)

    def prefetch(self, expert: str) -> None:
        """Start reading `expert` from disk in the background (only when idle experts may be kept)."""
        if not self.keep_idle or expert not in self._paths:
            return
        with self._lock:
            if expert in self._idle or expert in self._pending:
                return
            if self._active is not None and self._active.expert == expert:
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
        if self._active is not None and self._active.expert == expert:
            return self._active.model
        if expert not in self._paths:
            raise CheckpointError(f"no checkpoint for the {expert} expert")
        self.park()
        held = self._take(expert)
        try:
            held.streamer = self._place(held.model, held.streamer)
        except BaseException:
            self._drop(held)
            raise
        self._active = held
        self._account(held)
        return held.model

    def _account(self, held: _Held) -> None:
        """Tell the ledger where the expert's bytes are now."""
        host, vram = _footprint(held.model, held.streamer)
        pinned = 0 if held.streamer is None else held.streamer.pinned_host_bytes
        self._ledger.update(held.key, host_bytes=host, pinned_bytes=pinned, vram_bytes=vram)

    def park(self) -> None:
        """End the active expert's use: keep it in host RAM (its streamer detached, slabs kept) or release it."""
        held, self._active = self._active, None
        if held is None:
            return
        if self.keep_idle:
            if held.streamer is not None:
                held.streamer.detach()
            held.model.to("cpu")  # the non-streamed weights; streamed ones already are views of their host slabs
            self._account(held)
            with self._lock:
                self._idle[held.expert] = held
            self._ledger.set_evictable(held.key, self._evicter(held.expert))
        else:
            self._drop(held)
        del held
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _drop(self, held: _Held) -> None:
        """Let go of an expert: unpin and free its streamer's host side, release its ledger entry."""
        if held.streamer is not None:
            held.streamer.uninstall()
        self._ledger.release(held.key)

    def _evicter(self, expert: str) -> Callable[[], bool]:
        """The ledger's handle to evict the idle `expert`; it holds these slots weakly (no cycle through the
        process-wide ledger keeps them, or their models, alive)."""
        slots = weakref.ref(self)
        return lambda: (owner := slots()) is not None and owner._evict(expert)

    def _evict(self, expert: str) -> bool:
        """Drop the idle `expert` (from any thread); False when it is no longer idle."""
        with self._lock:
            held = self._idle.pop(expert, None)
        if held is None:
            return False
        self._drop(held)
        log.info("dropped the idle %s expert to make room", expert)
        return True

    def _drop_idle(self) -> None:
        """Release every idle expert (its streamer unpinned first)."""
        with self._lock:
            idle = list(self._idle.values())
            self._idle.clear()
        for held in idle:
            self._drop(held)

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
            if not future.cancelled() and future.exception() is None:  # waits; a failed read released itself
                self._drop(future.result())
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _footprint(model: torch.nn.Module, streamer: BlockStreamer | None) -> tuple[int, int]:
    """(host bytes, VRAM bytes) of the model's tensors where they are now, plus the streamer's device buffers."""
    host, vram = tensor_bytes(model) if isinstance(model, torch.nn.Module) else (0, 0)  # test wrappers hold none
    if streamer is not None and streamer.installed and streamer.device.type != "cpu":
        vram += streamer.stats.device_buffer_bytes
    if streamer is not None:
        host += streamer.stats.staging_bytes if streamer.prepared else 0
    return host, vram
