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
    p.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="ROLE=PATH",
        help="where the folder holds several candidates, the file to use for ROLE (high_noise, low_noise, model, "
        "text_encoder, vae), PATH as listed in the error (relative to --ckpt-dir) or any path; repeatable",
    )
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
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="DiT and UMT5 weights (default bf16; fp32 doubles RAM)")
    p.add_argument(
        "--output",
        type=Path,
        help="output .mp4 (default: a new file named after the task, size and prompt in the folder the Gallery shows)",
    )


def generation_fields(args: argparse.Namespace) -> dict[str, object]:
    """The fields of GenerationSettings given by the options of `add_generation_options` (parsed, unresolved)."""
    from wan_local.specs import parse_size

    return {
        "task": args.task,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "image": str(args.image) if args.image else None,
        "size": parse_size(args.size) if args.size else None,
        "frames": args.frames,
        "steps": args.steps,
        "shift": args.shift,
        "guide_scale": parse_guide_scale(args.guide_scale) if args.guide_scale else None,
        "solver": args.solver,
        "seed": args.seed,
    }


def add_memory_options(parser: argparse.ArgumentParser) -> None:
    """Flags of the low-VRAM engine. Unset flags come from the preset ("auto": picked for this machine)."""
    from wan_local.memory import options as m

    g = parser.add_argument_group("memory (defaults come from the preset)")
    g.add_argument("--preset", default="auto", help="memory preset name from presets/, or auto (picked for this PC)")
    g.add_argument("--quant", choices=m.QUANT_MODES, help="storage of the DiT block weights")
    g.add_argument("--quant-scope", choices=m.QUANT_SCOPES, help="quantize all block Linears or only the FFNs")
    g.add_argument(
        "--quant-compute",
        choices=m.QUANT_COMPUTE,
        help="dequant (bf16 matmuls) or scaled_mm (FP8 matmuls; needs an sm89+ GPU)",
    )
    g.add_argument("--offload", choices=m.OFFLOAD_MODES, help="stream DiT blocks from RAM: none, blocks, full, auto")
    g.add_argument("--vram-budget-gb", type=float, help="VRAM the engine may use (default: the free VRAM)")
    g.add_argument("--vram-reserve-gb", type=float, help="VRAM kept free for other programs")
    g.add_argument("--pinned-ram-cap-gb", type=float, help="most page-locked RAM to use for streaming")
    g.add_argument("--keep-idle-expert", choices=m.IDLE_EXPERT_POLICIES, help="A14B: keep the unused expert in RAM")
    g.add_argument("--vae-tiling", choices=m.VAE_TILING, help="spatial tiling of the VAE")
    g.add_argument(
        "--attention",
        choices=m.ATTENTION_BACKENDS,
        help="attention kernel: auto (FlashAttention where it runs, else SDPA), sdpa, flash, sage (8-bit, lossy)",
    )


def add_force_option(parser: argparse.ArgumentParser) -> None:
    """--force: run a job that admission refuses (for experts who know their machine better)."""
    parser.add_argument(
        "--force", action="store_true", help="run even when the memory check refuses the job (risks paging / OOM)"
    )


_MEMORY_FLAGS = (
    "quant",
    "quant_scope",
    "quant_compute",
    "offload",
    "vram_budget_gb",
    "vram_reserve_gb",
    "pinned_ram_cap_gb",
    "keep_idle_expert",
    "vae_tiling",
    "attention",
)


def parse_file_choices(items: list[str], ckpt_dir: Path | None = None) -> dict[str, str]:
    """ "--file high_noise=a.safetensors" options -> {"high_noise": "<absolute path>"}; InputError for a bad one.

    A relative PATH is taken from the current folder when it names a file there, else from `ckpt_dir` (the way
    the candidate lists of the checkpoint errors name files)."""
    from wan_local.weights.inventory import PICKABLE

    choice: dict[str, str] = {}
    for item in items or []:
        role, sep, path = item.partition("=")
        if not sep or role.strip() not in PICKABLE or not path.strip():
            raise InputError(f"--file {item!r} must be ROLE=PATH with ROLE one of {', '.join(PICKABLE)}")
        chosen = Path(path.strip()).expanduser()
        if not chosen.is_absolute() and not chosen.exists() and ckpt_dir is not None:
            chosen = Path(ckpt_dir).expanduser() / chosen
        choice[role.strip()] = str(chosen.absolute())
    return choice


def memory_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The memory flags the user actually gave (field -> value)."""
    return {name: getattr(args, name) for name in _MEMORY_FLAGS if getattr(args, name, None) is not None}


def job_settings_from_args(args: argparse.Namespace):
    """JobSettings from parsed generation and memory options (`generate`, `queue add`)."""
    from wan_local.engine.request import JobSettings

    return JobSettings(
        **generation_fields(args),
        ckpt_dir=str(Path(args.ckpt_dir).expanduser().absolute()),  # a queued job runs from the worker's folder
        files=parse_file_choices(getattr(args, "file", []), args.ckpt_dir),
        device=args.device,
        dtype=args.dtype,
        preset=getattr(args, "preset", None),
        memory=memory_overrides(args),
        output=str(args.output.resolve()) if args.output else None,
        force=bool(getattr(args, "force", False)),
    )
