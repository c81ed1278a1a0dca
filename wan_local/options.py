"""Options shared by every command that describes a video (`generate`, `queue add`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wan_local.errors import InputError
from wan_local.specs import TASKS


def parse_guide_scale(text: str) -> tuple[float, float]:
    """ "5" -> (5, 5); "3,4" -> (low-noise 3, high-noise 4)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--guide-scale {text!r} must be a number or LOW,HIGH (e.g. 3.5 or 3,4)") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise InputError(f"--guide-scale {text!r} takes one value or two (low-noise,high-noise)")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The options that describe one video, shared by `generate` and `queue add` (generate adds its own extras,
    such as --save-latents)."""
    p = parser
    p.add_argument("--task", required=True, choices=list(TASKS), help="which Wan2.2 task")
    p.add_argument("--ckpt-dir", required=True, type=Path, help="checkpoint folder (official, diffusers or ComfyUI)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="empty: the official default negative prompt")
    p.add_argument("--image", type=Path, help="input image (i2v-A14B: required; ti2v-5B: image-to-video)")
    p.add_argument("--size", help="W*H (or WxH); with an image only its area counts (default: the task's)")
    p.add_argument("--frames", type=int, help="number of frames, 4k+1 (default 81, ti2v-5B 121)")
    p.add_argument("--steps", type=int, help="sampling steps (default 40, ti2v-5B 50)")
    p.add_argument("--shift", type=float, help="timestep shift (default 12 t2v-A14B, else 5)")
    p.add_argument("--guide-scale", help="CFG scale: one value, or LOW,HIGH for the low-/high-noise experts")
    p.add_argument("--solver", default="unipc", choices=["unipc", "dpm++", "euler"])
    p.add_argument("--seed", type=int, default=-1, help="random seed (-1: random; the seed used is printed)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--output", type=Path, help="output .mp4 (default: outputs/<task>_<size>_<prompt>_<time>.mp4)")
