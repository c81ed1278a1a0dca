"""What the wan-local installers decide, written once: which PyTorch build, which optional kernels, and why.

This is the command line of installers/setup_env.py. run.sh (Linux) and run.bat (Windows) call it for every
decision and keep only the steps a shell must do itself (find a Python, run pip, launch the app), so both
platforms decide the same way and the decisions are unit-tested (tests/test_installers.py).

Subcommands (`python installers/setup_env.py SUBCOMMAND --help`):

- ``ensure-venv``  check this Python (3.10-3.14, 64-bit) and create or repair ``.venv``
- ``plan``         detect the NVIDIA GPU and driver, choose PyTorch (and kernels, once torch is installed); print
                   the decisions, or ``--json``; changes nothing
- ``start``        the same, at the start of a set-up: forgets the completed-install marker, logs the plan and writes
                   it as KEY=VALUE lines (``--env-file``) that the shell scripts read; exit 3 when no build can work
- ``verify``       import the installed torch in a fresh process and say what it can use
- ``kernels``      try the optional kernels, prebuilt wheels only; never fails
- ``mark``         record the completed install (marker file) - the last step of a set-up
- ``check``        is the recorded install still right for this PC (driver, torch build, pyproject)? exit 0 yes,
                   1 when the set-up must run (again)
- ``log``          append a line to ``.venv/install.log``

The marker (``.venv/wan-local-install.json``) is written only after every step succeeded, so an interrupted
set-up leaves none and the next launch repairs it. Decisions and step results go to ``.venv/install.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import SetupError
from .gpus import detect_gpus
from .install_log import append_log
from .kernels import KernelChoice, choose_kernels, install_kernels
from .marker import MARKER_NAME, PLAN_NAME, marker_problems, read_json, write_json
from .plan import build_plan, current_platform, describe_plan, file_sha256, gpus_from_plan, plan_env_lines
from .python_venv import ensure_venv, path_length_warning, python_problems, windows_long_paths_enabled
from .torch_installed import installed_torch, verify_torch
from .versions import torch_requirement

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXIT_BLOCKED = 3  # `start`: no PyTorch build can work here (e.g. driver too old); the message says what to do


def _print(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, flush=True)


def _current_plan(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> dict:
    gpus, detection = detect_gpus(env, platform)
    return build_plan(
        gpus,
        detection,
        platform,
        force_cpu=args.cpu,
        requirement=torch_requirement(args.project / "pyproject.toml"),
        env=env,
        have=installed_torch(),
        pyproject_sha256=file_sha256(args.project / "pyproject.toml"),
        python=tuple(sys.version_info[:3]),
    )


def _kernel_choices_now(plan: Mapping, platform: str) -> list[KernelChoice]:
    return choose_kernels(platform, tuple(sys.version_info[:2]), installed_torch(), gpus_from_plan(plan))


def cmd_ensure_venv(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    errors, warnings = python_problems(tuple(sys.version_info[:3]), struct.calcsize("P") * 8, sys.executable, platform)
    _print([f"WARNING: {w}" for w in warnings])
    if errors:
        raise SetupError("\n".join(errors))
    if platform == "windows":
        warning = path_length_warning(args.project, windows_long_paths_enabled())
        if warning:
            print(f"WARNING: {warning}")
    print(ensure_venv(args.venv, platform))
    return 0


def cmd_plan(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = _current_plan(args, env, platform)
    have = installed_torch()
    kernels = _kernel_choices_now(plan, platform) if have else None
    if args.json:
        plan["kernels"] = [dataclasses.asdict(k) for k in kernels] if kernels is not None else None
        print(json.dumps(plan, indent=2))
        return 0
    _print(describe_plan(plan))
    for k in kernels or []:
        print(f"          {k.name}: " + (f"try {k.spec}" if k.spec else f"skip - {k.reason}"))
    return 0


def cmd_start(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    args.venv.mkdir(parents=True, exist_ok=True)
    (args.venv / MARKER_NAME).unlink(missing_ok=True)  # from here on, an interruption means "not installed"
    plan = _current_plan(args, env, platform)
    lines = describe_plan(plan)
    print("== What this set-up will do")
    _print(lines)
    append_log(args.venv, ["set-up started", *lines])
    write_json(args.venv / PLAN_NAME, plan)
    if plan["torch"]["error"]:
        return EXIT_BLOCKED
    if args.env_file:
        Path(args.env_file).write_text("\n".join(plan_env_lines(plan)) + "\n", encoding="utf-8")
    return 0


def cmd_verify(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = read_json(args.venv / PLAN_NAME) or {}
    tag = plan.get("torch", {}).get("tag", "")
    ok, lines = verify_torch(sys.executable, platform, tag)
    _print(lines)
    append_log(args.venv, lines)
    return 0 if ok else 1


def cmd_kernels(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = read_json(args.venv / PLAN_NAME) or {}
    have = installed_torch()
    choices = _kernel_choices_now(plan, platform)
    combo = f"{platform} / Python {sys.version_info[0]}.{sys.version_info[1]} / torch {have.version if have else '-'}"
    print("== Optional speed-ups (prebuilt wheels only; without them the app uses PyTorch's SDPA attention)")
    lines = install_kernels(choices, sys.executable, combo, lambda text: append_log(args.venv, [text]))
    _print(["   " + line for line in lines])
    append_log(args.venv, lines)
    return 0


def cmd_mark(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = read_json(args.venv / PLAN_NAME)
    if plan is None:
        raise SetupError(f"{args.venv / PLAN_NAME} is missing: run the whole set-up (run.sh / run.bat --repair).")
    have = installed_torch()
    plan.update(completed=True, installed_torch=have.version if have else None, completed_at=time.time())
    write_json(args.venv / MARKER_NAME, plan)
    append_log(args.venv, ["set-up completed"])
    version = have.version if have else "?"
    print(f"Set-up complete: PyTorch {version} ({plan['torch']['tag']} build).")
    if plan["torch"]["warning"]:  # repeated once at the end, where it is not lost among pip's output
        print(f"WARNING: {plan['torch']['warning']}")
    return 0


def cmd_check(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    plan = _current_plan(args, env, platform)
    have = installed_torch()
    reasons, warnings = marker_problems(read_json(args.venv / MARKER_NAME), plan, have)
    _print([f"WARNING: {w}" for w in warnings])
    if reasons:
        print("Set-up needed: " + "; ".join(reasons) + ".")
        append_log(args.venv, ["set-up needed: " + "; ".join(reasons)])
        return 1
    print(f"Set-up is complete and fits this PC (PyTorch {have.version if have else '?'}).")
    return 0


def cmd_log(args: argparse.Namespace, env: Mapping[str, str], platform: str) -> int:
    append_log(args.venv, [" ".join(args.message)])
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 failure or set-up needed, 3 blocked)."""
    if hasattr(sys.stdout, "reconfigure"):  # never die on a character the console cannot show
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = argparse.ArgumentParser(prog="setup_env.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=PROJECT_ROOT, help="project folder (default: this checkout)")
    parser.add_argument("--venv", type=Path, default=None, help="virtual environment (default: PROJECT/.venv)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "ensure-venv": (cmd_ensure_venv, "check this Python and create or repair the venv"),
        "plan": (cmd_plan, "print the decisions for this PC (changes nothing)"),
        "start": (cmd_start, "begin a set-up: forget the marker, log and write the plan"),
        "verify": (cmd_verify, "import the installed torch and report what it can use"),
        "kernels": (cmd_kernels, "try the optional prebuilt kernels (never fails)"),
        "mark": (cmd_mark, "record a completed set-up"),
        "check": (cmd_check, "exit 0 if the recorded set-up fits this PC, 1 if it must run"),
        "log": (cmd_log, "append a line to .venv/install.log"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        if name in ("plan", "start", "check"):
            p.add_argument("--cpu", action="store_true", help="choose the CPU build of PyTorch")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
        if name == "start":
            p.add_argument("--env-file", help="write KEY=VALUE lines for the shell scripts here")
        if name == "log":
            p.add_argument("message", nargs="+")
    args = parser.parse_args(argv)
    args.project = args.project.resolve()
    args.venv = (args.venv or args.project / ".venv").absolute()
    try:
        return args.func(args, os.environ if env is None else env, current_platform())
    except SetupError as exc:
        print(f"ERROR: {exc}", flush=True)
        append_log(args.venv, [f"ERROR: {exc}"])
        return exc.exit_code
