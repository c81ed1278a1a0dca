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

from wan_local.errors import InputError, WanLocalError
from wan_local.jobs import commands as jobs_commands
from wan_local.memory import estimate
from wan_local.options import (
    add_generation_options,
    add_memory_options,
    generation_fields,
    memory_overrides,
    resolve_memory,
)

log = logging.getLogger("wan_local")

EXIT_ERROR, EXIT_OOM, EXIT_INTERRUPTED = 2, 3, 130


def default_output_path(task: str, size: tuple[int, int], prompt: str, folder: Path = Path("outputs")) -> Path:
    """outputs/<task>_<W>x<H>_<first words of the prompt>_<timestamp>.mp4"""
    words = re.sub(r"[^\w-]+", "_", prompt.strip())[:50].strip("_") or "video"
    stamp = time.strftime("%Y%m%d_%H%M%S")
    return folder / f"{task}_{size[0]}x{size[1]}_{words}_{stamp}.mp4"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one video", description="Generate one video with Wan2.2.")
    add_generation_options(p)
    add_memory_options(p)
    p.add_argument("--save-latents", type=Path, help="also write the final latent and decoded video (.safetensors)")
    p.set_defaults(func=_run_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-local", description="Wan2.2 video generation on one local GPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    jobs_commands.register(sub)
    estimate.register(sub)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    import torch  # imported here so `wan-local --help` stays instant

    from wan_local.pipeline import GenerationSettings, WanPipeline
    from wan_local.video import save_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.device is None:
        log.warning("no CUDA device found: running on the CPU (very slow at real sizes)")
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    settings = GenerationSettings(**generation_fields(args)).resolve()
    if args.output is not None and args.output.suffix.lower() != ".mp4":
        raise InputError(f"--output {args.output} must end in .mp4")
    print(f"seed: {settings.seed}", flush=True)
    preset, memory = resolve_memory(args.preset, memory_overrides(args), device)
    log.info("memory preset %s: %s", preset, memory)
    pipeline = WanPipeline(args.ckpt_dir, settings.task, device=device, dtype=dtype, memory=memory)

    def progress(event) -> None:
        log.info("step %d/%d  t=%d  expert=%s", event.index + 1, event.total, event.timestep, event.expert)

    result = pipeline.generate(settings, on_step=progress)
    output = args.output or default_output_path(settings.task, settings.size, settings.prompt)
    metadata = {**result.metadata(), "dtype": dtype_name, "device": device, "preset": preset}
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
