"""Command line: `wan-local generate ...` (also `python -m wan_local`).

Flags are parsed here and only here; everything below receives plain values.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from wan_local.errors import InputError, WanLocalError
from wan_local.jobs import commands as jobs_commands
from wan_local.options import (
    add_force_option,
    add_generation_options,
    add_memory_options,
    job_settings_from_args,
    memory_overrides,
)
from wan_local.specs import TASKS

log = logging.getLogger("wan_local")

EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130


def default_output_path(task: str, size: tuple[int, int], prompt: str, folder: Path | None = None) -> Path:
    """<folder>/<task>_<W>x<H>_<first words of the prompt>_<timestamp>.mp4; the folder defaults to the one the app's
    Gallery shows (`settings.videos_folder`: the Settings tab's output folder, else <data folder>/outputs)."""
    if folder is None:
        from wan_local.settings import videos_folder

        folder = videos_folder()
    words = re.sub(r"[^\w-]+", "_", prompt.strip())[:50].strip("_") or "video"
    stamp = time.strftime("%Y%m%d_%H%M%S")
    return folder / f"{task}_{size[0]}x{size[1]}_{words}_{stamp}.mp4"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one video", description="Generate one video with Wan2.2.")
    add_generation_options(p)
    add_memory_options(p)
    add_force_option(p)
    p.add_argument("--save-latents", type=Path, help="also write the final latent and decoded video (.safetensors)")
    p.set_defaults(func=_run_generate)


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="plan memory and estimate the time of a job",
        description="Admit a job as `generate` would, and show where the model will live (VRAM / RAM), the peaks "
        "and the expected time, for this machine or one described by --gpu / --vram-budget-gb / --ram-gb / --cpu.",
    )
    p.add_argument("--task", required=True, choices=list(TASKS), help="which Wan2.2 task")
    p.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (default: the official files are assumed)")
    p.add_argument("--size", help="W*H (or WxH; default: the task's)")
    p.add_argument("--frames", type=int, help="number of frames, 4k+1 (default: the task's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the task's)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="DiT and UMT5 weights (default bf16)")
    add_memory_options(p)
    p.add_argument("--ram-gb", type=float, help="plan for a machine with this much RAM in total (GiB)")
    p.add_argument("--gpu", help="plan for this GPU model, e.g. 'RTX 4090' (its speed; its VRAM unless given)")
    p.add_argument("--cpu", action="store_true", help="plan for a machine without a GPU")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_estimate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-local", description="Wan2.2 video generation on one local GPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    jobs_commands.register(sub)
    _add_estimate(sub)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    from wan_local.engine.admit import admit_job
    from wan_local.engine.resolve import resolve_job
    from wan_local.engine.run import Pipelines, run_job
    from wan_local.video import save_video

    if args.output is not None and args.output.suffix.lower() != ".mp4":
        raise InputError(f"--output {args.output} must end in .mp4")
    job = resolve_job(job_settings_from_args(args))
    if job.device == "cpu" and args.device is None:
        log.warning("no CUDA device found: running on the CPU (very slow at real sizes)")
    admission = admit_job(job, force=args.force)
    admission.raise_if_refused()
    if admission.degraded or admission.forced:
        log.warning("%s", admission.message)
    settings = job.settings
    print(f"seed: {settings.seed}", flush=True)

    def progress(event) -> None:
        log.info("step %d/%d  t=%d  expert=%s", event.index + 1, event.total, event.timestep, event.expert)

    pipelines = Pipelines(keep=1)
    result = run_job(job, admission, pipelines, on_step=progress)
    output = args.output or default_output_path(settings.task, settings.size, settings.prompt)
    metadata = {**result.metadata(), "dtype": job.dtype, "device": job.device, "preset": admission.preset.name}
    save_video(result.video, output, result.fps, metadata)
    if args.save_latents is not None:
        from safetensors.torch import save_file

        args.save_latents.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {"latents": result.latent.float().contiguous(), "video": result.video.float().contiguous()},
            str(args.save_latents),
            metadata={"settings": json.dumps(metadata, ensure_ascii=False)},
        )
    print(f"saved: {output}", flush=True)
    return 0


def _run_estimate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`wan-local estimate`: resolve and admit the job like `generate`, then print the verdict and estimate."""
    from wan_local.engine.admit import admit_job
    from wan_local.engine.request import JobSettings
    from wan_local.engine.resolve import resolve_job
    from wan_local.machine import detect_machine
    from wan_local.memory.estimate import estimate_to_dict, format_estimate, machine_for
    from wan_local.specs import parse_size

    out = out or sys.stdout
    machine = machine_for(
        detect_machine(), gpu=args.gpu, vram_gb=args.vram_budget_gb, ram_gb=args.ram_gb, cpu_only=args.cpu
    )
    request = JobSettings(
        task=args.task,
        ckpt_dir=str(args.ckpt_dir) if args.ckpt_dir else "",
        prompt="",
        size=parse_size(args.size) if args.size else None,
        frames=args.frames,
        steps=args.steps,
        seed=0,
        device="cpu" if not machine.has_gpu else "cuda",
        dtype=args.dtype,
        preset=args.preset,
        memory=memory_overrides(args),
    )
    job = resolve_job(request, machine=machine, need_image=False)
    admission = admit_job(job, refused="Would not start")
    est, s = admission.estimate, job.settings
    shown = admission.memory or job.memory(job.requested)
    if args.json:
        data = {"admitted": admission.admitted, "preset": admission.preset.name if admission.preset else None}
        data["message"] = admission.message
        if est is not None:
            data.update(estimate_to_dict(est, job.spec, s.size, s.frames, s.steps, shown, job.machine))
        else:
            data["estimate"] = None
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        verdict = "admitted" if admission.admitted else "refused"
        lines = [f"verdict         {verdict}: {admission.message}"]
        if est is not None:
            lines.append(format_estimate(est, job.spec, s.size, s.frames, s.steps, job.machine))
        out.write("\n".join(lines) + "\n")
    return 0 if admission.admitted else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `wan-local` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except WanLocalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        from wan_local.jobs.runner import is_out_of_memory

        if is_out_of_memory(exc):
            print(
                f"error: out of memory ({exc}). Try a smaller size, fewer frames, or close other programs.",
                file=sys.stderr,
            )
            return EXIT_OOM
        raise


if __name__ == "__main__":
    sys.exit(main())
