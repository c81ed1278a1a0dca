"""The residency plan: which DiT blocks stay in VRAM, which stream from RAM, and what every stage needs.

Everything here is a pure function of byte counts (no device calls), so the plan can be made for any machine and
tested on a CPU. Units are in every name: *_bytes are exact integers, *_gb are GiB (1024**3), as everywhere in
wan_local. Numbers agree with /work/shared/spec/budgets.md (tests check them).

Model of a job (the engine's stages, each freeing the last):
1. encode_text: UMT5-XXL (bf16) on the GPU when it fits the usable VRAM, else on the CPU.
2. denoise: DiT non-block weights + resident blocks + `prefetch_depth + 1` block buffers of the streamer
   (wan_local.memory.streaming) + activations of one forward + one dequantized-weight scratch (quantized Linears
   are dequantized to bf16 per call). The VAE waits in RAM.
3. decode: the VAE on the GPU (DiT released), spatially tiled when the untiled decode does not fit; the video
   accumulates in host RAM. I2V's conditioning encode (whole video, before the DiT loads) uses the same tile.
RAM: the active expert is materialised whole on the host while it loads (the loaders build it before the
streamer moves resident blocks out), so one expert counts in full; the idle A14B expert may stay in RAM; UMT5 is
released before the DiT loads unless RAM holds both. A fixed process overhead (Python, torch, CUDA runtime) is
added to every stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wan_local.errors import InputError
from wan_local.memory.bytes import GIB, MIB, TEXT_ENCODER_WORK_BYTES, ModelBytes, PipelineBytes
from wan_local.memory.options import MemoryOptions

log = logging.getLogger(__name__)

#: Python + torch + CUDA runtime resident set, counted in every stage's RAM (a CPU-only process: ~0.3 GiB after
#: its imports, ~0.5 GiB while a job runs, measured by benchmarks/bench_realsize_cpu.py).
PROCESS_RAM_BYTES = 2 * GIB
CPU_PROCESS_RAM_BYTES = GIB // 2
#: Slack kept free before choosing an optional RAM use (idle expert, UMT5 kept alongside the DiT).
RAM_SAFETY_BYTES = 2 * GIB
#: The streamer's two pinned staging chunks for pageable blocks (streaming.DEFAULT_CHUNK_BYTES each).
STAGING_HOST_BYTES = 2 * 64 * MIB
#: Token chunks tried for the FFN when activations do not fit, largest first.
FFN_CHUNK_CANDIDATES = (16384, 8192, 4096, 2048, 1024)
#: Smallest spatial VAE tile (latent positions) the planner proposes (vae_tiling.MIN_TILE).
VAE_MIN_TILE_LATENT_PX = 8


class PlanError(InputError):
    """The job cannot run within the VRAM / RAM given; the message names what is short and by how much."""


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# ------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class ResidencyPlan:
    """Where every part of a job lives, and the peaks that follow. Block indices are in forward order.

    prefetch_depth: loads in flight ahead of the running block (the streamer allocates prefetch_depth + 1
    buffers of the largest streamed block: gpu_buffer_bytes); 0 when nothing streams. Pinned blocks hold their
    host slab page-locked; the others are pageable and go through staging_host_bytes of pinned chunks.
    experts_in_ram: A14B experts held in host RAM while denoising (2 = the idle one is kept).
    *_vram_bytes / *_ram_bytes per stage; peak_* are their maxima (RAM includes the process overhead).
    condition_vram_bytes: the VAE encode of I2V's conditioning video (81 frames at full size), tiled like the
    decode.
    """

    device: str
    num_blocks: int
    resident_blocks: tuple[int, ...]
    non_block_bytes: int
    activation_bytes: int
    experts_in_ram: int
    release_text_encoder_before_dit: bool
    encode_ram_bytes: int
    denoise_ram_bytes: int
    decode_ram_bytes: int
    streamed_blocks: tuple[int, ...] = ()
    prefetch_depth: int = 0
    gpu_buffer_bytes: int = 0
    resident_block_bytes: int = 0
    dequant_scratch_bytes: int = 0
    ffn_chunk_tokens: int | None = None
    usable_vram_bytes: int = 0
    streamed_bytes_per_forward: int = 0
    pinned_blocks: tuple[int, ...] = ()
    pinned_host_bytes: int = 0
    pageable_host_bytes: int = 0
    staging_host_bytes: int = 0
    text_encoder_on_gpu: bool = False
    vae_tile_latent_px: int | None = None
    encode_vram_bytes: int = 0
    condition_vram_bytes: int = 0
    denoise_vram_bytes: int = 0
    decode_vram_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def peak_vram_bytes(self) -> int:
        """Largest VRAM of any stage (encode, condition, denoise, decode), reserve excluded."""
        stages = (self.encode_vram_bytes, self.condition_vram_bytes, self.denoise_vram_bytes, self.decode_vram_bytes)
        return max(stages)

    @property
    def peak_ram_bytes(self) -> int:
        """Largest RAM of any stage, process overhead included."""
        return max(self.encode_ram_bytes, self.denoise_ram_bytes, self.decode_ram_bytes)

    def describe(self) -> list[str]:
        """Human-readable lines (GiB) summarising the plan."""
        n, s = self.num_blocks, len(self.streamed_blocks)
        lines = [f"device          {self.device}"]
        buffers = f"{self.prefetch_depth + 1} x {_gib(self.gpu_buffer_bytes / (self.prefetch_depth + 1))}"
        stream = f"{s} streamed (prefetch {self.prefetch_depth}, buffers {buffers})" if s else "none streamed"
        lines += [
            f"DiT blocks      {n - s} of {n} resident, {stream}",
            f"streamed        {list(self.streamed_blocks)}" if s else "streamed        []",
        ]
        if self.device == "cuda":
            pinned = f"{len(self.pinned_blocks)} blocks / {_gib(self.pinned_host_bytes)}"
            lines += [
                f"VRAM weights    {_gib(self.resident_block_bytes)} blocks + {_gib(self.non_block_bytes)} non-block",
                f"pinned host     {pinned}, pageable {_gib(self.pageable_host_bytes)}",
            ]
        lines += [
            f"activations     {_gib(self.activation_bytes)} "
            + (f"(FFN in chunks of {self.ffn_chunk_tokens} tokens)" if self.ffn_chunk_tokens else "(FFN unchunked)"),
            f"experts in RAM  {self.experts_in_ram}; UMT5 on {'GPU' if self.text_encoder_on_gpu else 'CPU'}, "
            "released before the DiT loads",
            f"VAE tile        {self.vae_tile_latent_px or 'untiled'}"
            + (" latent px" if self.vae_tile_latent_px else ""),
        ]
        if self.device == "cuda":
            lines.append(
                f"VRAM by stage   encode {_gib(self.encode_vram_bytes)}, "
                + (f"condition {_gib(self.condition_vram_bytes)}, " if self.condition_vram_bytes else "")
                + f"denoise {_gib(self.denoise_vram_bytes)}, decode {_gib(self.decode_vram_bytes)} "
                f"(usable {_gib(self.usable_vram_bytes)})"
            )
        lines += [
            f"RAM by stage    encode {_gib(self.encode_ram_bytes)}, denoise {_gib(self.denoise_ram_bytes)}, "
            f"decode {_gib(self.decode_ram_bytes)}",
        ]
        return lines


ActivationFn = Callable[[int | None], int]
VaeDecodeFn = Callable[[int | None], int]


def _spread(n: int, count: int) -> tuple[int, ...]:
    """`count` indices spread evenly over range(n), centred ((2i+1)·n / 2count): never 0 unless count > n/2."""
    return tuple((2 * i + 1) * n // (2 * count) for i in range(count))


def _split(n: int, resident: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(resident, streamed) indices with the smaller set spread evenly, so streamed blocks interleave.

    With at most n/2 streamed, no two streamed blocks are adjacent (wrap-around included: the first streamed
    index is >= 1), so every copy overlaps at least one resident block's compute (mmgp's insight).
    """
    streamed_count = n - resident
    if streamed_count <= resident:
        streamed = _spread(n, streamed_count) if streamed_count else ()
        return tuple(i for i in range(n) if i not in streamed), streamed
    kept = _spread(n, resident) if resident else ()
    return kept, tuple(i for i in range(n) if i not in kept)


@dataclass(frozen=True)
class _VramChoice:
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    depth: int
    buffer_bytes: int
    chunk: int | None
    activation_bytes: int
    denoise_bytes: int


def _leanest_chunk(act: ActivationFn) -> int | None:
    """The largest FFN chunk reaching the smallest activation peak (below some chunk attention dominates)."""
    sizes = {chunk: act(chunk) for chunk in (None, *FFN_CHUNK_CANDIDATES)}
    least = min(sizes.values())
    return next(chunk for chunk, size in sizes.items() if size <= least)


def _vram_short_error(model: ModelBytes, act_bytes: int, usable: int, budget: int, quant_hint: bool) -> PlanError:
    need = model.non_block_bytes + model.dequant_scratch_bytes + act_bytes + 2 * model.largest_block_bytes
    hint = "lower the resolution or frames" + (", or use --quant int8" if quant_hint else "")
    return PlanError(
        f"needs {_gib(need - usable)} more VRAM than the {_gib(usable)} usable ({_gib(budget)} budget minus the "
        f"reserve) even with every block streamed: {_gib(model.non_block_bytes)} non-block weights, "
        f"{_gib(act_bytes)} activations, 2 block buffers of {_gib(model.largest_block_bytes)}; {hint}"
    )


def _plan_vram(model: ModelBytes, act: ActivationFn, usable: int, budget: int, offload: str) -> _VramChoice:
    """Fewest streamed blocks that fit (offload "auto"/"blocks"), all resident ("none"), or all streamed ("full")."""
    n, fixed = model.num_blocks, model.non_block_bytes + model.dequant_scratch_bytes
    chunks = (None, *FFN_CHUNK_CANDIDATES)
    if offload != "full":
        for chunk in chunks:
            a = act(chunk)
            need = fixed + model.blocks_total_bytes + a
            if need <= usable:
                return _VramChoice(tuple(range(n)), (), 0, 0, chunk, a, need)
        if offload == "none":
            a = act(_leanest_chunk(act))
            need = fixed + model.blocks_total_bytes + a
            raise PlanError(
                f"offload='none' needs {_gib(need)} of VRAM for all {n} blocks but {_gib(usable)} is usable "
                f"({_gib(need - usable)} short); use --offload auto to stream some blocks"
            )
    lean = _leanest_chunk(act)
    # Streaming: the leanest activations leave the most room for resident blocks; "full" keeps chunking optional.
    candidates = [c for c in chunks if c is None or act(c) < act(None)] if offload == "full" else [lean]
    for chunk in candidates:
        a = act(chunk)
        for resident in range(0 if offload == "full" else n - 1, -1, -1):
            kept, streamed = _split(n, resident)
            buf = max(model.block_bytes[i] for i in streamed)
            base = fixed + a + sum(model.block_bytes[i] for i in kept)
            if base + 2 * buf <= usable:
                # With resident blocks between the streamed ones, each copy overlaps resident compute and one load
                # in flight (2 buffers) suffices; a third buffer would cost a resident block. Streaming everything,
                # a second load in flight absorbs jitter and costs nothing when VRAM is left.
                depth = 2 if resident == 0 and base + 3 * buf <= usable else 1
                return _VramChoice(kept, streamed, depth, (depth + 1) * buf, chunk, a, base + (depth + 1) * buf)
    raise _vram_short_error(model, act(lean), usable, budget, model.quant == "none")


def _plan_pinning(
    model: ModelBytes, streamed: tuple[int, ...], cap: int, staging: int
) -> tuple[tuple[int, ...], int, int, int]:
    """(pinned blocks, pinned bytes, pageable bytes, staging bytes), as the streamer pins: all if they fit the
    cap, else greedily in order within cap - staging; pageable blocks need the pinned staging chunks."""
    sizes = [model.block_bytes[i] for i in streamed]
    if sum(sizes) <= cap:
        return streamed, sum(sizes), 0, 0
    budget, pinned = max(0, cap - staging), []
    for i, size in zip(streamed, sizes, strict=True):
        if size <= budget:
            pinned.append(i)
            budget -= size
    pinned_bytes = sum(model.block_bytes[i] for i in pinned)
    return tuple(pinned), pinned_bytes + staging, sum(sizes) - pinned_bytes, staging


def _plan_ram(
    expert_bytes: int,
    pipe: PipelineBytes,
    staging: int,
    available: int,
    policy: str,
    process: int,
    safety: int,
    extra: tuple[int, int, int] = (0, 0, 0),
) -> dict[str, Any]:
    """The idle-expert decision, then RAM per stage (encode, denoise, decode) including `process`: the
    ResidencyPlan fields they fill.

    UMT5 is loaded for the prompt encode and released before the DiT loads (the pipeline always does; the prompt
    cache makes repeated prompts free). The idle A14B expert is kept ("auto") only when every stage still fits
    `available - safety`, the limit admission applies (presets.admit), so a job admitted with less RAM is admitted
    with more. Steady state of repeated jobs: a kept expert is counted in every stage. `extra` adds per-stage
    working memory (activations and buffers on a CPU-only plan).
    """
    te, vae = pipe.text_encoder_bytes, pipe.vae_bytes

    def stages(keep_idle: bool) -> tuple[int, int, int]:
        held = pipe.experts * expert_bytes if keep_idle else 0
        active = 0 if keep_idle else expert_bytes
        encode = held + (pipe.text_encoder_encode_bytes or te) + extra[0]
        denoise = held + active + (vae if pipe.vae_in_denoise else 0) + staging + extra[1]
        decode = held + vae + pipe.decoded_video_bytes + extra[2]
        return process + encode, process + denoise, process + decode

    two = pipe.experts > 1
    if two and policy == "keep":
        keep_idle = True
    elif two and policy == "auto":
        keep_idle = max(stages(True)) + safety <= available
    else:
        keep_idle = False
    result = stages(keep_idle)
    if max(result) > available:
        dit = "both DiT experts (keep_idle_expert='keep')" if keep_idle else "one DiT expert"
        held = f" with {dit} held" if keep_idle else ""
        what = (f"UMT5 ({_gib(te)}) while encoding the prompt{held}", f"{dit} while denoising", f"the VAE decode{held}")
        hint = "use keep_idle_expert='drop', " if keep_idle else ""
        raise PlanError(
            f"needs {_gib(max(result))} of RAM for {what[result.index(max(result))]} but only {_gib(available)} "
            f"is available ({_gib(max(result) - available)} short); {hint}close other programs or use --quant int8"
        )
    return {
        "experts_in_ram": pipe.experts if keep_idle else 1,
        "release_text_encoder_before_dit": True,
        **dict(zip(("encode_ram_bytes", "denoise_ram_bytes", "decode_ram_bytes"), result, strict=True)),
    }


def _plan_vae_tile(
    fn: VaeDecodeFn | None, usable: int, tiling: str, latent_hw: tuple[int, int]
) -> tuple[int | None, int]:
    """(tile side in latent px or None, decode VRAM bytes): untiled when it fits (unless tiling "on"), else the
    largest square tile that fits (fn is monotone in the tile side)."""
    if fn is None:
        return None, 0
    full = fn(None)
    if tiling != "on" and full <= usable:
        return None, full
    if tiling == "off":
        raise PlanError(
            f"the untiled VAE decode needs {_gib(full)} of VRAM but {_gib(usable)} is usable; enable VAE tiling"
        )
    longest = max(latent_hw)
    lo = min(VAE_MIN_TILE_LATENT_PX, longest)
    if fn(lo) > usable:
        raise PlanError(
            f"the VAE decode needs {_gib(fn(lo))} of VRAM even with {lo}x{lo} latent tiles but {_gib(usable)} is "
            "usable; free VRAM or lower the resolution"
        )
    hi = longest if tiling == "auto" else max(lo + 1, math.ceil(longest / 2) + 1)
    while hi - lo > 1:  # invariant: fn(lo) fits, hi does not fit (or is excluded)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fn(mid) <= usable else (lo, mid)
    return lo, fn(lo)


def plan_residency(
    model: ModelBytes,
    activation_bytes: int | ActivationFn,
    budget_vram_bytes: int,
    reserve_vram_bytes: int,
    ram_available_bytes: int,
    pinned_cap_bytes: int,
    options: MemoryOptions,
    vae_decode_bytes_fn: VaeDecodeFn | None = None,
    pipeline: PipelineBytes | None = None,
    *,
    vae_encode_bytes_fn: VaeDecodeFn | None = None,
    process_ram_bytes: int = PROCESS_RAM_BYTES,
    ram_safety_bytes: int = RAM_SAFETY_BYTES,
    staging_host_bytes: int = STAGING_HOST_BYTES,
) -> ResidencyPlan:
    """Plan a GPU job: residency of the DiT blocks, pinning, idle expert, UMT5 placement and VAE tiling.

    activation_bytes: peak activations of one forward, or a function of the FFN token chunk (None = unchunked)
    so the planner can chunk when that avoids streaming. budget_vram_bytes - reserve_vram_bytes is usable.
    pinned_cap_bytes: page-locked RAM allowed (resolved by the caller, e.g. default_pinned_cap_bytes).
    vae_decode_bytes_fn(tile) -> decode VRAM incl. weights and headroom (tile side in latent px, None =
    untiled); None skips the decode stage. vae_encode_bytes_fn: the same for the I2V conditioning encode, which
    uses the decode's tile (encoding needs less per pixel than decoding). Raises PlanError naming what is short.
    """
    pipe = pipeline or PipelineBytes()
    act: ActivationFn = activation_bytes if callable(activation_bytes) else (lambda _chunk, a=activation_bytes: a)
    usable = budget_vram_bytes - reserve_vram_bytes
    if usable <= 0:
        raise PlanError(
            f"the VRAM budget {_gib(budget_vram_bytes)} leaves nothing after the {_gib(reserve_vram_bytes)} reserve"
        )
    notes = []
    vram = _plan_vram(model, act, usable, budget_vram_bytes, options.offload)
    pinned, pinned_bytes, pageable, staging = _plan_pinning(model, vram.streamed, pinned_cap_bytes, staging_host_bytes)
    if pageable:
        notes.append(
            f"pinned-memory cap {_gib(pinned_cap_bytes)} reached: {len(vram.streamed) - len(pinned)} streamed "
            f"blocks ({_gib(pageable)}) stay pageable and are copied through pinned staging (slower)"
        )
    if vram.chunk is not None:
        notes.append(f"FFN computed in chunks of {vram.chunk} tokens to fit the activations")
    ram = _plan_ram(
        model.total_bytes,
        pipe,
        staging,
        ram_available_bytes,
        options.keep_idle_expert,
        process_ram_bytes,
        ram_safety_bytes,
    )
    if pipe.experts > 1 and ram["experts_in_ram"] == 1:
        notes.append("the idle expert is dropped from RAM and read from disk again at the switch")
    # UMT5 runs on the CPU (the pipeline's policy): its 11 GB never compete with the DiT for VRAM, and the
    # prompt cache makes repeated prompts free.
    te_on_gpu = False
    tile, decode_vram = _plan_vae_tile(vae_decode_bytes_fn, usable, options.vae_tiling, pipe.latent_hw)
    if tile is not None:
        notes.append(f"VAE decode tiled: {tile}x{tile} latent px per tile")
    condition_vram = 0 if vae_encode_bytes_fn is None else vae_encode_bytes_fn(tile)
    if condition_vram > usable:
        raise PlanError(
            f"the VAE encode of the conditioning video needs {_gib(condition_vram)} of VRAM but {_gib(usable)} is "
            "usable; lower the resolution or frames"
        )
    log.debug(
        "plan: %d resident / %d streamed blocks, chunk %s, tile %s, denoise %.2f of %.2f GiB usable",
        len(vram.resident),
        len(vram.streamed),
        vram.chunk,
        tile,
        vram.denoise_bytes / GIB,
        usable / GIB,
    )
    return ResidencyPlan(
        device="cuda",
        num_blocks=model.num_blocks,
        resident_blocks=vram.resident,
        non_block_bytes=model.non_block_bytes,
        activation_bytes=vram.activation_bytes,
        streamed_blocks=vram.streamed,
        prefetch_depth=vram.depth,
        gpu_buffer_bytes=vram.buffer_bytes,
        resident_block_bytes=sum(model.block_bytes[i] for i in vram.resident),
        dequant_scratch_bytes=model.dequant_scratch_bytes,
        ffn_chunk_tokens=vram.chunk,
        usable_vram_bytes=usable,
        streamed_bytes_per_forward=sum(model.block_bytes[i] for i in vram.streamed),
        pinned_blocks=pinned,
        pinned_host_bytes=pinned_bytes,
        pageable_host_bytes=pageable,
        staging_host_bytes=staging,
        text_encoder_on_gpu=te_on_gpu,
        vae_tile_latent_px=tile,
        encode_vram_bytes=pipe.text_encoder_vram_bytes if te_on_gpu else 0,
        condition_vram_bytes=condition_vram,
        denoise_vram_bytes=vram.denoise_bytes,
        decode_vram_bytes=decode_vram,
        notes=tuple(notes),
        **ram,
    )


def _cpu_streaming(model: ModelBytes, options: MemoryOptions) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(resident, streamed, buffer bytes) of a CPU job: offload "blocks"/"full" streams every block through two
    reused buffers, unless `vram_budget_gb` leaves room for some resident blocks ("blocks" only)."""
    n = model.num_blocks
    if options.offload not in ("blocks", "full"):
        return tuple(range(n)), (), 0
    budget = None if options.vram_budget_gb is None else int(options.vram_budget_gb * GIB)
    resident = 0
    if options.offload == "blocks" and budget is not None:
        for count in range(n - 1, 0, -1):
            kept, streamed = _split(n, count)
            if sum(model.block_bytes[i] for i in kept) + 2 * max(model.block_bytes[i] for i in streamed) <= budget:
                resident = count
                break
    kept, streamed = _split(n, resident)
    return kept, streamed, 2 * max(model.block_bytes[i] for i in streamed)


def plan_cpu(
    model: ModelBytes,
    activation_bytes: int,
    ram_available_bytes: int,
    options: MemoryOptions,
    vae_decode_bytes: int = 0,
    pipeline: PipelineBytes | None = None,
    *,
    process_ram_bytes: int = CPU_PROCESS_RAM_BYTES,
    ram_safety_bytes: int = RAM_SAFETY_BYTES,
) -> ResidencyPlan:
    """Plan a CPU-only job: activations and the VAE decode working set in RAM, the blocks resident, or streamed
    through two reused buffers when `options.offload` asks for it (the same streamer and slots as on a GPU, with
    synchronous copies: it proves the streaming path on any machine).

    vae_decode_bytes: decode working memory (weights excluded). Raises PlanError when RAM is short.
    """
    pipe = pipeline or PipelineBytes()
    resident, streamed, buffers = _cpu_streaming(model, options)
    extra = (TEXT_ENCODER_WORK_BYTES, activation_bytes + buffers, vae_decode_bytes)
    ram = _plan_ram(
        model.total_bytes,
        pipe,
        0,
        ram_available_bytes,
        options.keep_idle_expert,
        process_ram_bytes,
        ram_safety_bytes,
        extra,
    )
    return ResidencyPlan(
        device="cpu",
        num_blocks=model.num_blocks,
        resident_blocks=resident,
        streamed_blocks=streamed,
        prefetch_depth=1 if streamed else 0,
        gpu_buffer_bytes=buffers,
        streamed_bytes_per_forward=sum(model.block_bytes[i] for i in streamed),
        non_block_bytes=model.non_block_bytes,
        activation_bytes=activation_bytes,
        resident_block_bytes=sum(model.block_bytes[i] for i in resident),
        dequant_scratch_bytes=model.dequant_scratch_bytes,
        notes=("no CUDA GPU: everything runs on the CPU (very slow at real sizes)",),
        **ram,
    )
