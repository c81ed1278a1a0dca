"""VAE decode: time and peak memory, untiled vs tiled (wan_local.memory.vae_tiling).

CPU part (always, Linux): the real Wan2.1 VAE architecture with random weights decodes a 256x256, 9-frame latent
([1, 16, 3, 32, 32]) untiled and with two tilings. Each case runs in a fresh subprocess, twice (cold, then warm);
before each run the kernel's RSS high-water mark is reset (/proc/self/clear_refs), so "peak_rss_delta" is the peak
RSS during that decode minus the RSS just before it (weights and latent already allocated): the decode's working
memory as the OS saw it. It is set next to `decode_bytes_estimate` (meta-device trace) + the output buffer, which
calibrates the estimate against a real allocator.

CUDA part (--cuda, needs a GPU): the real Wan2.2 VAE with random weights decodes the TI2V-5B 720p 121-frame
latent [1, 48, 31, 44, 80] under a 16 GiB cap (torch.cuda.set_per_process_memory_fraction), with the tile
`choose_tile` picks from the free memory under the cap, video assembled on the CPU; then the untiled decode under
the same cap (expected to run out of memory). Reports time, peak allocated / reserved VRAM and the estimate.

Results go to benchmarks/results/bench_vae_{cpu,cuda}.json. Run: python benchmarks/bench_vae.py [--cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from wan_local.memory.vae_tiling import (
    choose_tile,
    decode_bytes_estimate,
    decode_output_bytes,
    default_overlap,
    tiled_decode,
    weight_bytes,
)
from wan_local.models.vae21 import VAE21Config, WanVAE21
from wan_local.models.vae22 import VAE22Config, WanVAE22

logger = logging.getLogger("bench_vae")

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
CPU_LATENT = (1, 16, 3, 32, 32)  # 256 x 256 x 9 frames through the Wan2.1 VAE
CPU_CASES = [None, (20, 4), (12, 3)]  # untiled; 2x2 tiles of 160 px; 4x4 tiles of 96 px
CUDA_LATENT = (1, 48, 31, 44, 80)  # TI2V-5B 1280 x 704 x 121 frames through the Wan2.2 VAE
CUDA_CAP_BYTES = 16 * 2**30
CUDA_RESERVE_BYTES = 2**30  # CUDA context outside the allocator's view, fragmentation


def _random_vae(model_cls: type, cfg: object, device: str) -> torch.nn.Module:
    """A VAE of the real architecture with seeded random weights (values do not matter for time or memory)."""
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        vae = model_cls(cfg)
    vae = vae.to_empty(device=device).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
    return vae


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_case(tile: tuple[int, int] | None) -> dict:
    """One case in this (fresh) process: a cold decode, then a warm one; time and peak RSS growth of each.

    The cold run also pays one-off runtime memory (oneDNN primitive caches, malloc arenas) that stays allocated
    afterwards; the warm run shows the decode's own working memory.
    """
    vae = _random_vae(WanVAE21, VAE21Config(), "cpu")
    latent = torch.randn(CPU_LATENT, generator=torch.Generator().manual_seed(1))
    result: dict = {"tile": None if tile is None else tile[0], "overlap": None if tile is None else tile[1]}
    for run in ("cold", "warm"):
        _reset_peak_rss()
        before = _rss_bytes()
        start = time.perf_counter()
        video = vae.decode(latent) if tile is None else tiled_decode(vae, latent, tile[0], tile[1])
        result[f"{run}_seconds"] = round(time.perf_counter() - start, 2)
        result[f"{run}_peak_rss_delta_mib"] = round((_peak_rss_bytes() - before) / MIB, 1)
        result["video_shape"] = list(video.shape)
        del video
    return result


def run_cpu() -> dict:
    """All CPU cases, each in a subprocess; adds the estimates."""
    cfg = VAE21Config()
    out_bytes = decode_output_bytes(cfg, CPU_LATENT)
    cases = []
    for case in CPU_CASES:
        args = [sys.executable, __file__, "--worker"] + ([] if case is None else [str(case[0]), str(case[1])])
        proc = subprocess.run(args, capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        estimate = decode_bytes_estimate(cfg, CPU_LATENT, None if case is None else case[0])
        result["estimate_tile_mib"] = round(estimate / MIB, 1)
        result["estimate_plus_output_mib"] = round((estimate + out_bytes) / MIB, 1)
        for run in ("cold", "warm"):
            ratio = result[f"{run}_peak_rss_delta_mib"] / result["estimate_plus_output_mib"]
            result[f"{run}_rss_over_estimate"] = round(ratio, 3)
        logger.info("cpu %s", result)
        cases.append(result)
    return {
        "what": "Wan2.1 VAE (real architecture, random weights) decode of a 256x256x9 latent on the CPU",
        "latent": list(CPU_LATENT),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "weights_mib": round(weight_bytes(cfg) / MIB, 1),
        "output_mib": round(out_bytes / MIB, 1),
        "cases": cases,
    }


def _cuda_decode(vae: torch.nn.Module, latent: torch.Tensor, tile: tuple[int, int], overlap: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        tiled_decode(vae, latent, tile, overlap, device="cuda", output_device="cpu")
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as exc:
        return {"tile": list(tile), "overlap": overlap, "oom": str(exc).splitlines()[0]}
    return {
        "tile": list(tile),
        "overlap": overlap,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1),
    }


def run_cuda() -> dict:
    """Wan2.2 720p x 121 under a 16 GiB cap: the chosen tile, then untiled."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CUDA_CAP_BYTES / total))
    cfg = VAE22Config()
    vae = _random_vae(WanVAE22, cfg, "cuda")
    latent = torch.randn(CUDA_LATENT, generator=torch.Generator().manual_seed(1))
    weights = torch.cuda.memory_allocated()
    free = CUDA_CAP_BYTES - weights - CUDA_RESERVE_BYTES
    tile = choose_tile(cfg, CUDA_LATENT[-2:], free)
    overlap = default_overlap(tile)
    estimate = decode_bytes_estimate(cfg, CUDA_LATENT, tile)
    tiled = _cuda_decode(vae, latent, tile, overlap)
    tiled["estimate_mib"] = round(estimate / MIB, 1)
    if "peak_allocated_mib" in tiled:
        tiled["allocated_minus_weights_over_estimate"] = round(
            (tiled["peak_allocated_mib"] * MIB - weights) / estimate, 3
        )
    logger.info("cuda tiled %s", tiled)
    untiled = _cuda_decode(vae, latent, CUDA_LATENT[-2:], 0)
    untiled["estimate_mib"] = round(decode_bytes_estimate(cfg, CUDA_LATENT) / MIB, 1)
    logger.info("cuda untiled %s", untiled)
    return {
        "what": "Wan2.2 VAE (real architecture, random weights) decode of TI2V-5B 1280x704x121 under a 16 GiB cap",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "latent": list(CUDA_LATENT),
        "cap_mib": CUDA_CAP_BYTES // MIB,
        "weights_mib": round(weights / MIB, 1),
        "free_for_decode_mib": round(free / MIB, 1),
        "tiled": tiled,
        "untiled": untiled,
    }


def main() -> None:
    """Entry point; `--worker [tile overlap]` is the per-case subprocess."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="also run the 16 GiB-capped CUDA benchmark")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU benchmark")
    parser.add_argument("--worker", nargs="*", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        tile = tuple(args.worker) if args.worker else None
        sys.stdout.write(json.dumps(cpu_case(tile)) + "\n")  # the parent reads this line
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.skip_cpu:
        (RESULTS / "bench_vae_cpu.json").write_text(json.dumps(run_cpu(), indent=2) + "\n")
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda needs a CUDA device")
        (RESULTS / "bench_vae_cuda.json").write_text(json.dumps(run_cuda(), indent=2) + "\n")


if __name__ == "__main__":
    main()
