"""GPU proof: one prepared command for a brief GPU session; every stage writes its JSON as soon as it ends.

    python benchmarks/gpu_proof.py --out benchmarks/results/gpu-proof-<device>-<date>   # on the GPU machine
    python benchmarks/gpu_proof.py --dry-run --out /tmp/gp                               # toy sizes, CPU, < 3 min

Stages, in priority order (gpu_proof_stages.py; they re-use the other benchmarks' functions):
  1 correctness   `pytest -m gpu` as a subprocess + streamed == resident on CUDA in fp32, TF32 off
  2 a14b_forward  A14B expert blocks at 480p x 81 (32,760 tokens): resident vs streamed under 16 / 24 GB caps,
                  peak VRAM vs `wan-local estimate`; bf16 vs int8 / fp8 FFN Linear (speed ratio, rel. L2)
  3 a14b_job      one t2v-A14B job on random ComfyUI fp8 files (written to --out/scratch, deleted after):
                  480p, 81 frames, 2 steps; wall per stage, expert switch, peak VRAM / RAM vs the estimate
  4 gguf_dequant  one real-size A14B block in GGUF Q8_0 / Q4_K_M: dequantize on the GPU vs the block's matmuls
  5 vs_diffusers  diffusers' group offloading side by side (skipped when diffusers is not importable)
  6 ti2v_720p     TI2V-5B 720p x 121: one DiT forward and the tiled VAE decode under a 16 GB cap

The whole run keeps to --budget-s: before a stage starts its estimated duration is compared with what is left,
and it is skipped (recorded with the reason) when it would overrun. A stage that raises is recorded with its
traceback and the next one runs. `summary.md` (stage, status, seconds, key numbers) is written and printed last.
Results of a real run belong in benchmarks/results/gpu-proof-<device>-<date>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark modules import as top-level names
import gpu_proof_stages as stages

log = logging.getLogger("gpu_proof")

#: (name, function, estimated seconds on an H200, estimated seconds of the dry run)
STAGES: list[tuple[str, Callable[[stages.Ctx], dict], float, float]] = [
    ("correctness", stages.correctness, 90, 40),
    ("a14b_forward", stages.a14b_forward, 120, 30),
    ("a14b_job", stages.a14b_job, 200, 40),
    ("gguf_dequant", stages.gguf_dequant, 30, 10),
    ("vs_diffusers", stages.vs_diffusers, 150, 20),
    ("ti2v_720p", stages.ti2v_720p, 60, 20),
]


def _json_default(o: object) -> object:
    return str(o)


def run_stage(name: str, fn: Callable, ctx: stages.Ctx, estimate_s: float, deadline: float) -> dict:
    """Run one stage (or skip it), write DIR/<name>.json, return its record."""
    left = deadline - time.perf_counter()
    record: dict = {"stage": name, "estimate_s": estimate_s, "budget_left_s": round(left, 1)}
    if left < estimate_s:
        record |= {"status": "skipped", "reason": f"{left:.0f} s of budget left, the stage needs ~{estimate_s:.0f} s"}
    else:
        ctx.remaining_s = left
        start = time.perf_counter()
        log.info("stage %s (estimate %.0f s, %.0f s left)", name, estimate_s, left)
        try:
            result = fn(ctx)
            record |= {"status": result.pop("status", "ok"), **result}
        except Exception as exc:  # a stage's failure is a result: record it and go on
            record |= {"status": "error", "error": repr(exc), "traceback": traceback.format_exc()}
            log.error("stage %s failed: %r", name, exc)
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
        record["wall_s"] = round(time.perf_counter() - start, 1)
    (ctx.out / f"{name}.json").write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    return record


def summary_md(records: list[dict], meta: dict) -> str:
    lines = [
        f"# GPU proof {meta['date']} — {meta['device']}",
        "",
        f"torch {meta['torch']}, dry run: {meta['dry_run']}, budget {meta['budget_s']} s, total {meta['total_s']} s",
        "",
        "| stage | status | s | key numbers |",
        "|---|---|---|---|",
    ]
    for r in records:
        key = r.get("summary") or r.get("reason") or r.get("error") or ""
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('wall_s', '')} | {str(key).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results folder (real runs: results/gpu-proof-<dev>-<date>)")
    p.add_argument("--budget-s", type=float, default=420.0, help="hard time budget of the whole run (s)")
    p.add_argument("--dry-run", action="store_true", help="every stage at toy sizes on the CPU (CUDA parts skipped)")
    p.add_argument("--stages", default=",".join(s[0] for s in STAGES), help="comma list, in priority order")
    args = p.parse_args(argv)
    unknown = set(args.stages.split(",")) - {s[0] for s in STAGES}
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(s[0] for s in STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "argv": sys.argv[1:],
    }
    if not torch.cuda.is_available() and not args.dry_run:
        log.warning("no CUDA: the CUDA parts are skipped (use --dry-run for the toy CPU run)")
    ctx = stages.Ctx(out=args.out, dry_run=args.dry_run, cuda=cuda, remaining_s=args.budget_s)
    records = []
    for name, fn, est_gpu, est_dry in STAGES:
        if name in args.stages.split(","):
            if not args.dry_run and not cuda and name != "correctness":
                record = {"stage": name, "status": "skipped", "reason": "no CUDA"}
                (args.out / f"{name}.json").write_text(json.dumps(record) + "\n")
            else:
                record = run_stage(name, fn, ctx, est_dry if args.dry_run else est_gpu, deadline)
            records.append(record)
    meta["total_s"] = round(time.perf_counter() - start, 1)
    text = summary_md(records, meta)
    (args.out / "summary.md").write_text(text)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(text)
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
