"""Activation peaks measured, not only formulated: real-size DiT forwards and VAE decodes traced on fake tensors.

For each reference job (A14B 832x480 and 1280x720 at 81 frames, TI2V-5B 1280x704 at 121 frames), the real WanDiT
forward (official config, bf16 weights, bf16 autocast) runs on fake tensors under `live_bytes.LiveStorageTracker`
(memory.meta_trace: meta storage, nothing materialised; see its docstring for the autocast and attention choices),
unchunked and with every FFN chunk the planner picks for the `--cards` (a 16 GB card by default, and an 8 GB one,
where the 5B streams with a smaller chunk). The tracked peak of one forward, with the inputs the pipeline holds for
it (latent, both text contexts, per-token timesteps for the 5B), is compared with memory.bytes.activation_bytes:

- `estimate` is activation_bytes (what the planner reserves); `forward estimate` leaves out the sampler's
  latent-sized tensors that live outside a forward, except the latent the forward takes (1 of SAMPLER_LATENTS).
- ratio = forward estimate / tracked; the estimator must be within 10 % of the tracked peak.
- The attribution table sets each ActivationTerms term beside the traced phase it models (bytes a block phase holds
  on top of everything alive at the block's entry, modulation tables included).
Attention: SDPA's fused kernel on fake tensors returns its output and log-sum-exp (`attention_lse_bytes`), which is
what the formula counts; the kernel's own workspace (tiles, FlashAttention's scratch) is not modelled on either side.

The VAE decode of the same latent runs the same way (float32, as `WanPipeline.decode`: chunk by chunk, the video
assembled in host RAM), untiled and with the tile the planner picks for each card, compared with
vae_tiling.decode_bytes_estimate (the working set of 3 chunks traced on the meta device; the planner adds the
weights and DEFAULT_HEADROOM on top).

Writes benchmarks/results/activation-meta-<date>.json and prints the markdown tables.
Run: python benchmarks/bench_activation_meta.py [--jobs a14b-480p ...] [--cards 16 8] [--skip-vae] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import time
from pathlib import Path

import torch
from common import peak_rss

from wan_local.machine import MachineInfo
from wan_local.memory import bytes as B
from wan_local.memory import vae_tiling
from wan_local.memory.estimate import estimate_job
from wan_local.memory.meta_trace import DiTTrace, trace_dit_forward, trace_vae_decode
from wan_local.memory.options import MemoryOptions
from wan_local.memory.plan import PlanError
from wan_local.specs import get_task

log = logging.getLogger("bench_activation_meta")
RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3
JOBS = {  # budgets.md's reference jobs: task, width, height, frames
    "a14b-480p": ("t2v-A14B", 832, 480, 81),
    "a14b-720p": ("t2v-A14B", 1280, 720, 81),
    "5b-720p": ("ti2v-5B", 1280, 704, 121),
}
TOLERANCE = 0.10


def card(vram_gb: int) -> MachineInfo:
    """A desktop with a `vram_gb` card (1 GiB held by the desktop and CUDA context) and 64 GiB of RAM."""
    return MachineInfo("NVIDIA GeForce RTX", vram_gb * GIB, (vram_gb - 1) * GIB, (8, 9), 64 * GIB, 61 * GIB, 500 * GIB)


def planner_choices(job: str, cards: list[int]) -> tuple[list[int | None], list[int | None]]:
    """(FFN chunks, VAE tiles) the planner picks for `job` on each card (int8 blocks); None (unchunked, untiled)
    first."""
    task, w, h, f = JOBS[job]
    chunks, tiles = [None], [None]
    for vram in cards:
        try:
            plan = estimate_job(
                task, (w, h), f, get_task(task).steps, MemoryOptions(quant="int8"), card(vram), os_name="linux"
            ).plan
        except PlanError as e:
            log.info("%s on a %d GB card: no plan (%s)", job, vram, e)
            continue
        chunks += [plan.ffn_chunk_tokens] if plan.ffn_chunk_tokens not in chunks else []
        tiles += [plan.vae_tile_latent_px] if plan.vae_tile_latent_px not in tiles else []
    return chunks, tiles


def outside_forward_bytes(terms: B.ActivationTerms) -> int:
    """The sampler's latent-sized tensors that live outside a forward: all but the latent the forward takes."""
    return terms.sampler_bytes - terms.sampler_bytes // B.SAMPLER_LATENTS


def attribution(terms: B.ActivationTerms, trace: DiTTrace) -> dict[str, tuple[int, int | None]]:
    """Traced bytes beside the formula's term for each part of the forward's peak (None: no term of its own)."""
    mod = terms.modulation_bytes
    return {
        "block input (residual)": (trace.input_bytes, terms.residual_bytes),
        "persistent (rope, context, latent, y)": (
            trace.persistent_bytes,
            terms.persistent_bytes - outside_forward_bytes(terms),
        ),
        "self_attn q/k norm + rope": (
            trace.phase_bytes["self_attn.norm_rope"],
            mod + max(terms.self_attn_norm_bytes, terms.self_attn_rope_bytes),
        ),
        "self_attn kernel": (trace.phase_bytes["self_attn.kernel"], mod + terms.self_attn_kernel_bytes),
        "cross_attn": (trace.phase_bytes["cross_attn"], mod + terms.cross_attn_bytes),
        "ffn": (trace.phase_bytes["ffn"], mod + terms.ffn_bytes),
        "block (largest phase)": (trace.block_bytes, terms.block_peak_bytes),
        "modulate (no term: <= block)": (trace.phase_bytes["modulate"], None),
        "self_attn out + gated add (no term: <= block)": (trace.phase_bytes["self_attn.out"], None),
        "head (no term: <= block)": (trace.head_bytes, None),
    }


def run_dit(job: str, chunk: int | None) -> dict:
    task, w, h, f = JOBS[job]
    spec, cfg = get_task(task), B.official_dit_config(task)
    t, lh, lw = B.latent_grid(spec, w, h, f)
    pt, ph, pw = cfg.patch_size
    start = time.perf_counter()
    trace = trace_dit_forward(
        cfg, (t // pt, lh // ph, lw // pw), chunk, distinct_timesteps=2 if task == "ti2v-5B" else 1
    )
    seconds = time.perf_counter() - start
    terms = B.activation_terms(cfg, trace.tokens, chunk)
    forward_estimate = terms.peak_bytes - outside_forward_bytes(terms)
    ratio = forward_estimate / trace.peak_bytes
    log.info("%s chunk %s: tracked %.3f GiB, estimate %.3f GiB (%.1f s)", job, chunk, trace.peak_bytes / GIB,
             forward_estimate / GIB, seconds)  # fmt: skip
    return {
        "job": job,
        "task": task,
        "size": [w, h, f],
        "tokens": trace.tokens,
        "ffn_chunk_tokens": chunk,
        "tracked_peak_bytes": trace.peak_bytes,
        "estimate_bytes": terms.peak_bytes,
        "forward_estimate_bytes": forward_estimate,
        "ratio": ratio,
        "within_tolerance": abs(ratio - 1) <= TOLERANCE,
        "peak_phase": trace.peak_phase,
        "attribution": {k: {"traced": a, "formula": b} for k, (a, b) in attribution(terms, trace).items()},
        "traced_phase_bytes": trace.phase_bytes,
        "terms": {k: v for k, v in vars(terms).items()},
        "peak_tensors": list(trace.peak_tensors[:12]),
        "seconds": seconds,
    }


def run_vae(job: str, tile: int | None) -> dict:
    task, w, h, f = JOBS[job]
    spec = get_task(task)
    z_dim = vae_tiling.resolve_kind(spec.vae)[1].z_dim
    shape = (1, z_dim, *B.latent_grid(spec, w, h, f))
    start = time.perf_counter()
    trace = trace_vae_decode(spec.vae, shape, tile)
    seconds = time.perf_counter() - start
    estimate = vae_tiling.decode_bytes_estimate(spec.vae, shape, tile)
    log.info("%s VAE tile %s: tracked %.3f GiB, estimate %.3f GiB (%.1f s)", job, tile, trace.peak_bytes / GIB,
             estimate / GIB, seconds)  # fmt: skip
    return {
        "job": job,
        "vae": spec.vae,
        "latent_shape": list(shape),
        "tile_latent_px": tile,
        "tracked_peak_bytes": trace.peak_bytes,
        "estimate_bytes": estimate,
        "planner_bytes": vae_tiling.weight_bytes(spec.vae) + round(vae_tiling.DEFAULT_HEADROOM * estimate),
        "ratio": estimate / trace.peak_bytes,
        "peak_tensors": list(trace.peak_tensors[:8]),
        "seconds": seconds,
    }


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def markdown(dit: list[dict], vae: list[dict]) -> str:
    lines = [
        "| job | chunk | tracked peak GiB | estimated GiB (forward / planner) | ratio | peak at |",
        "|---|---|---|---|---|---|",
    ]
    for r in dit:
        lines.append(
            f"| {r['job']} | {r['ffn_chunk_tokens'] or 'none'} | {_gib(r['tracked_peak_bytes'])} | "
            f"{_gib(r['forward_estimate_bytes'])} / {_gib(r['estimate_bytes'])} | {r['ratio']:.4f} | "
            f"{r['peak_phase']} |"
        )
    lines += ["", "| job | chunk | part | traced GiB | formula GiB |", "|---|---|---|---|---|"]
    for r in dit:
        for part, v in r["attribution"].items():
            formula = "–" if v["formula"] is None else _gib(v["formula"])
            lines.append(
                f"| {r['job']} | {r['ffn_chunk_tokens'] or 'none'} | {part} | {_gib(v['traced'])} | {formula} |"
            )
    if vae:
        lines += [
            "",
            "| job | VAE tile | tracked peak GiB | estimate GiB (planner: weights + headroom) | ratio |",
            "|---|---|---|---|---|",
        ]
        for r in vae:
            lines.append(
                f"| {r['job']} | {r['tile_latent_px'] or 'untiled'} | {_gib(r['tracked_peak_bytes'])} | "
                f"{_gib(r['estimate_bytes'])} ({_gib(r['planner_bytes'])}) | {r['ratio']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    p.add_argument("--cards", nargs="+", type=int, default=[16, 8], help="card sizes (GB) whose plans give the chunks")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/activation-meta-*)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dit, vae = [], []
    for job in args.jobs:
        chunks, tiles = planner_choices(job, args.cards)
        dit += [run_dit(job, chunk) for chunk in chunks]
        vae += [] if args.skip_vae else [run_vae(job, tile) for tile in tiles]
    result = {
        "benchmark": "bench_activation_meta",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "fake tensors (meta storage): no memory, no GPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tolerance": TOLERANCE,
        "all_within_tolerance": all(r["within_tolerance"] for r in dit),
        "peak_rss_bytes": peak_rss(),
        "dit": dit,
        "vae": vae,
    }
    out = args.out or RESULTS / f"activation-meta-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(dit, vae))
    log.info("wrote %s (peak RSS %.2f GiB)", out, result["peak_rss_bytes"] / GIB)


if __name__ == "__main__":
    main()
