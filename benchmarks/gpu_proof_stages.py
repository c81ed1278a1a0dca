"""The stages of gpu_proof.py. Each takes a Ctx and returns a JSON-able dict; heavy parts re-use the benchmarks.

A stage's dict may hold `"summary"` (the key numbers, one short string for summary.md). Parts that need CUDA are
recorded as `{"status": "skipped", "reason": "no CUDA"}` in a dry run (toy sizes on the CPU instead).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
NO_CUDA = {"status": "skipped", "reason": "no CUDA"}


@dataclass
class Ctx:
    out: Path
    dry_run: bool
    cuda: bool
    remaining_s: float  # the budget left when the stage starts (a stage bounds its subprocesses with it)


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


def _estimate_peak_vram(cap_gb: float, size: str, frames: int, task: str = "t2v-A14B", extra=()) -> dict:
    """`wan-local estimate` for a `cap_gb` card (pure arithmetic, no GPU needed): predicted peaks."""
    cmd = [sys.executable, "-m", "wan_local", "estimate", "--task", task, "--size", size, "--frames", str(frames)]
    cmd += ["--gpu", "RTX 4090", "--vram-budget-gb", str(cap_gb), "--ram-gb", str(psutil.virtual_memory().total // GIB)]
    cmd += ["--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    try:
        est = json.loads(proc.stdout)["estimate"]
    except (json.JSONDecodeError, KeyError):
        return {"rc": proc.returncode, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    plan = est.get("plan") or {}
    keys = ("peak_vram_bytes", "peak_ram_bytes", "denoise_vram_bytes", "activation_bytes", "gpu_buffer_bytes")
    return {"cap_gb": cap_gb, **{k: est.get(k, plan.get(k)) for k in keys}}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ------------------------------------------------------------------------------------ 1. CUDA correctness


def _pytest_gpu(timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=_env())
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout_s}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail[-1] if tail else "")
    }
    return {"rc": proc.returncode, "counts": counts, "tail": tail}


def streamed_equals_resident(device: torch.device) -> dict:
    """A small WanDiT in fp32 (TF32 off): every block streamed vs resident, bit for bit."""
    from wan_local.memory.streaming import BlockStreamer, move_unstreamed
    from wan_local.models.dit import DiTConfig, WanDiT

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cfg = DiTConfig(
            model_type="t2v",
            in_dim=16,
            out_dim=16,
            dim=256,
            ffn_dim=512,
            freq_dim=256,
            num_heads=2,
            num_layers=4,
            text_len=64,
            text_dim=64,
        )
        torch.manual_seed(0)
        model = WanDiT(cfg).eval()
        resident = copy.deepcopy(model).to(device)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, 16, 3, 16, 16, generator=gen).to(device)
        ctx = torch.randn(1, 64, 64, generator=gen).to(device)
        t = torch.tensor([700.0], device=device)
        move_unstreamed(model, range(cfg.num_layers), device)
        streamer = BlockStreamer(model, range(cfg.num_layers), device, 1).install()
        with torch.inference_mode():
            a, b = resident(x, t, ctx), model(x, t, ctx)
        streamer.uninstall()
        return {"device": str(device), "dtype": "float32", "tf32": False, "equal": torch.equal(a, b)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def correctness(ctx: Ctx) -> dict:
    result = {"pytest_gpu": _pytest_gpu(max(10.0, min(240.0, ctx.remaining_s - 30)))}
    result["cpu_streamed_equals_resident"] = streamed_equals_resident(torch.device("cpu"))
    result["cuda_streamed_equals_resident"] = streamed_equals_resident(torch.device("cuda")) if ctx.cuda else NO_CUDA
    counts = result["pytest_gpu"].get("counts", {})
    eq = result["cuda_streamed_equals_resident"].get("equal", "n/a")
    result["summary"] = f"pytest -m gpu {counts or result['pytest_gpu'].get('status')}; CUDA streamed==resident {eq}"
    if counts.get("failed") or counts.get("error") or counts.get("errors") or eq is False:
        result["status"] = "failed"
    return result


# ------------------------------------------------------------------------ 2. A14B expert forward, real size


def a14b_forward(ctx: Ctx) -> dict:
    import bench_quant
    import bench_streaming

    result: dict = {}
    if ctx.dry_run:
        args = bench_streaming.parse_args(
            [
                "--cpu-dim",
                "256",
                "--cpu-ffn-dim",
                "512",
                "--cpu-layers",
                "2",
                "--cpu-tokens",
                "256",
                "--cpu-text-len",
                "64",
                "--repeats",
                "1",
            ]
        )
        result["streaming_cpu_toy"] = bench_streaming.bench_cpu(args)
        result["quant_cpu_toy"] = bench_quant.bench_cpu(1, 256, 512, 256)
    if ctx.cuda:
        args = bench_streaming.parse_args(["--tokens", "32760", "--vram-gb", "16", "24", "--repeats", "2"])
        result["streaming_cuda"] = bench_streaming.bench_cuda(args)
        result["quant_cuda"] = bench_quant.bench_cuda(3, 32760)
    else:
        result["streaming_cuda"] = result["quant_cuda"] = NO_CUDA
    result["estimate"] = {f"{cap}gb": _estimate_peak_vram(cap, "832*480", 81) for cap in (16, 24)}
    result["summary"] = _a14b_summary(result)
    return result


def _a14b_summary(r: dict) -> str:
    parts = []
    runs = (r.get("streaming_cuda") or {}).get("runs") or (
        [
            {"mode": "cpu-resident", "s": r["streaming_cpu_toy"]["resident_s"]},
            {"mode": "cpu-streamed", "s": r["streaming_cpu_toy"]["streamed_s"]},
        ]
        if "streaming_cpu_toy" in r
        else []
    )
    base = next((min(x["s"]) for x in runs if "resident" in x["mode"]), None)
    for x in runs:
        cap = f"@{x['vram_cap_gb']:g}GB" if x.get("vram_cap_gb") else ""
        ratio = f" x{min(x['s']) / base:.2f}" if base else ""
        peak = f" peak {_gib(x['peak_bytes'])} GiB" if x.get("peak_bytes") else ""
        parts.append(f"{x['mode']}{cap} {min(x['s']):.2f}s{ratio}{peak}")
    for cap, e in r.get("estimate", {}).items():
        if e.get("peak_vram_bytes"):
            parts.append(f"est {cap} {_gib(e['peak_vram_bytes'])} GiB")
    quant = (r.get("quant_cuda") or {}).get("results") or (r.get("quant_cpu_toy") or {}).get("results") or {}
    bf16 = quant.get("bf16", {}).get("forward_s")
    for name, q in quant.items():
        if name != "bf16" and bf16:
            parts.append(f"{name} x{q['forward_s'] / bf16:.2f} relL2 {q['rel_l2_vs_fp32']:.1e}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ 3. one full t2v-A14B job


def _tokenizer_fixture(ckpt: types.ModuleType) -> None:
    """realsize_ckpt names the fixture tokenizer at /work/shared; elsewhere use $WAN_LOCAL_FIXTURES or ./shared."""
    if ckpt.TOKENIZER_FIXTURE.is_dir():
        return
    for root in (os.environ.get("WAN_LOCAL_FIXTURES"), REPO / "shared/fixtures/wan22-tiny"):
        alt = Path(root or "/nonexistent") / "t2v-A14B" / ckpt.TOKENIZER_DIR
        if alt.is_dir():
            ckpt.TOKENIZER_FIXTURE = alt
            ckpt.tokenizer_vocab.__defaults__ = (alt,)
            return
    raise FileNotFoundError(f"no tokenizer fixture at {ckpt.TOKENIZER_FIXTURE} (set WAN_LOCAL_FIXTURES)")


def a14b_job(ctx: Ctx) -> dict:
    import bench_realsize_cpu as rs
    import realsize_ckpt as ckpt

    _tokenizer_fixture(ckpt)
    shapes = ckpt.TOY if ctx.dry_run else ckpt.REAL
    root = ctx.out / "scratch" / shapes.name
    if not ctx.dry_run:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < 40 * GIB:
            return {"status": "skipped", "reason": f"only {_gib(free)} GiB free under {root}, needs 40"}
    job = rs.JOBS["t2v"]
    t0 = time.perf_counter()
    files = rs.write_files(root, shapes, [job], spiece=False)
    write_s = time.perf_counter() - t0
    settings = rs.job_settings(job, 2, "bf16")
    device = "cuda" if ctx.cuda else "cpu"
    if not ctx.dry_run:
        settings |= {"size": "832*480", "frames": 81}
    run_dir = root / "run-t2v"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = rs.child_env(run_dir / "home")
    ckpt_dir = root / job.folder
    cmd = [sys.executable, "-m", "wan_local", "generate", "--task", job.task, "--ckpt-dir", str(ckpt_dir)]
    cmd += ["--prompt", rs.PROMPT, "--size", settings["size"], "--frames", str(settings["frames"]), "--steps", "2"]
    cmd += ["--shift", str(settings["shift"]), "--seed", "0", "--device", device, "--dtype", "bf16"]
    cmd += ["--output", str(run_dir / "out.mp4")]
    if ctx.cuda:
        cmd += ["--vram-budget-gb", "24"]
    timeout = max(30.0, ctx.remaining_s - write_s - 15)
    run_args = types.SimpleNamespace(timeout_s=timeout, guard_gib=1.5, interval_s=0.2)
    run = rs.run_child(cmd, env, run_dir / "generate.log", run_args, "t2v")
    measured = rs.summarize(run, files[job.key], None, True)
    vram = [int(m) for _, line in run["lines"] for m in re.findall(r"vram_peak_bytes\D+(\d+)", line)]
    est = _estimate_peak_vram(24, settings["size"], settings["frames"], extra=("--ckpt-dir", str(ckpt_dir)))
    shutil.rmtree(run_dir / "home", ignore_errors=True)
    shutil.rmtree(root.parent, ignore_errors=True)  # ~35 GB at real size: leave the disk as found
    expert = [e for e in measured["events"] if e.get("kind") in ("dit_load", "prefetch")]
    stages = {k: v.get("wall_s") for k, v in measured["stages"].items()}
    result = {
        "settings": settings,
        "device": device,
        "argv": cmd[2:],
        "write_s": round(write_s, 1),
        "files": files,
        "measured": measured,
        "vram_peak_bytes_logged": max(vram) if vram else None,
        "estimate_24gb": est,
        "expert_events": expert,
        "status": "ok" if run["rc"] == 0 else "failed",
    }
    result["summary"] = (
        f"rc {run['rc']}; wall {measured['wall_s']}s (write {write_s:.0f}s); stages {stages}; "
        f"peak RSS {measured['peak_rss_gib']} GiB vs est {_gib(est.get('peak_ram_bytes'))}; "
        f"peak VRAM {_gib(result['vram_peak_bytes_logged'])} vs est {_gib(est.get('peak_vram_bytes'))} GiB"
    )
    return result


# ----------------------------------------------------------------------------- 4. diffusers side by side


def vs_diffusers(ctx: Ctx) -> dict:
    if importlib.util.find_spec("diffusers") is None:
        return {"status": "skipped", "reason": "diffusers is not importable"}
    import bench_vs_diffusers as vs

    if ctx.dry_run:
        args = vs.parse_args(
            [
                "--cpu-only",
                "--cpu-dim",
                "256",
                "--cpu-ffn-dim",
                "512",
                "--cpu-heads",
                "2",
                "--cpu-layers",
                "2",
                "--cpu-latent",
                "2",
                "8",
                "8",
                "--cpu-repeats",
                "1",
            ]
        )
        return {"cpu_toy": vs.bench_cpu(args), "cuda": NO_CUDA if not ctx.cuda else None, "summary": "toy CPU run"}
    args = vs.parse_args(["--skip-cpu", "--layers", "20", "--vram-gb", "0", "16", "--repeats", "1"])
    result = {"cuda": vs.bench_cuda(args)}
    result["summary"] = "; ".join(
        f"{r.get('mode')}@{r.get('vram_gb', r.get('vram_cap_gb'))} {min(r['s']):.2f}s"
        for r in result["cuda"].get("runs", [])
        if r.get("s")
    )
    return result


# ------------------------------------------------------------------------------ 5. TI2V-5B 720p x 121


def ti2v_720p(ctx: Ctx) -> dict:
    import bench_vae
    import realsize_ckpt as ckpt

    from wan_local.models.dit import WanDiT

    result: dict = {}
    if ctx.dry_run:
        torch.manual_seed(0)
        model = WanDiT(ckpt.TOY.ti2v).eval()
        x = torch.randn(1, 48, 2, 8, 8)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(x, torch.tensor([700.0]), torch.randn(1, ckpt.TOY.ti2v.text_len, ckpt.TOY.ti2v.text_dim))
        result["dit_cpu_toy"] = {"s": time.perf_counter() - t0, "finite": bool(out.isfinite().all())}
        result["vae_cpu_toy"] = _toy_vae_decode(bench_vae, ckpt.TOY.vae22)
    if not ctx.cuda:
        result["dit_cuda"] = result["vae_cuda"] = NO_CUDA
        result["summary"] = f"toy DiT {result['dit_cpu_toy']['s']:.2f}s; CUDA parts skipped (no CUDA)"
        return result
    result["dit_cuda"] = _ti2v_dit_cuda(ckpt.REAL.ti2v)
    result["vae_cuda"] = bench_vae.run_cuda()
    torch.cuda.set_per_process_memory_fraction(1.0)
    d, v = result["dit_cuda"], result["vae_cuda"]["tiled"]
    result["summary"] = (
        f"DiT fwd {d.get('s')}s peak {_gib(d.get('peak_bytes'))} GiB (oom {d.get('oom')}); "
        f"VAE tiled {v.get('seconds', v.get('s'))}s peak {v.get('peak_allocated_mib')} MiB"
    )
    return result


def gguf_dequant(ctx: Ctx) -> dict:
    """One real-size A14B block of GGUF weights (Q8_0, Q4_K_M): dequantizing its packed Linears on the device
    against the block's matmuls at 480p x 81 frames (bench_gguf.py); toy sizes on the CPU in a dry run."""
    import argparse

    import bench_gguf

    if ctx.cuda and not ctx.dry_run:
        device, args = torch.device("cuda"), argparse.Namespace(dim=5120, ffn=13824, tokens=bench_gguf.REAL_TOKENS)
    else:
        device, args = torch.device("cpu"), argparse.Namespace(dim=512, ffn=1536, tokens=64)
    args.repeats = 3
    blocks = [bench_gguf.bench_block(ftype, args, device, torch.bfloat16) for ftype in ("Q8_0", "Q4_K_M")]
    ratios = ", ".join(f"{b['ftype']} {b['dequant_over_matmul_at_real_tokens']:.3f}" for b in blocks)
    return {
        "device": str(device),
        "args": vars(args),
        "blocks": blocks,
        "summary": f"dequant / matmul of one block at {bench_gguf.REAL_TOKENS} tokens: {ratios} ({device})",
    }


def _toy_vae_decode(bench_vae: types.ModuleType, cfg) -> dict:
    """The toy Wan2.2 VAE decoding a small latent in 2x2 tiles on the CPU (the tiled path, in seconds)."""
    from wan_local.memory.vae_tiling import tiled_decode
    from wan_local.models.vae22 import WanVAE22

    vae = bench_vae._random_vae(WanVAE22, cfg, "cpu")
    latent = torch.randn(1, cfg.z_dim, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.inference_mode():
        video = tiled_decode(vae, latent, (4, 4), 1, device="cpu", output_device="cpu")
    return {"s": round(time.perf_counter() - t0, 3), "shape": list(video.shape), "finite": bool(video.isfinite().all())}


def _ti2v_dit_cuda(cfg) -> dict:
    """The 5B DiT (random bf16) resident under a 16 GB cap: one forward on the 720p x 121 latent."""
    from wan_local.models.dit import WanDiT

    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        model = WanDiT(cfg).to(torch.bfloat16).eval()  # built uncapped (fp32 first), then capped
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 16e9 / total))
    weights = torch.cuda.memory_allocated()
    x = torch.randn(1, 48, 31, 44, 80, device=dev)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev)
    torch.cuda.reset_peak_memory_stats()
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            model(x, torch.tensor([700.0], device=dev), context)
        torch.cuda.synchronize()
        out = {"s": round(time.perf_counter() - t0, 3), "oom": False}
    except torch.OutOfMemoryError as exc:
        out = {"oom": True, "error": str(exc).splitlines()[0]}
    out |= {"weights_bytes": weights, "peak_bytes": torch.cuda.max_memory_allocated(), "cap_bytes": 16e9}
    del model
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out
