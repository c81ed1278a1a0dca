"""Real-size CPU proof: `wan-local generate` on random checkpoints of the real shapes, RSS per stage vs estimate.

    python benchmarks/bench_realsize_cpu.py --dry-run                 # toy shapes, same code paths, < 1 min
    python benchmarks/bench_realsize_cpu.py --write-only              # only write the ~59 GB of checkpoints
    python benchmarks/bench_realsize_cpu.py --jobs ti2v               # ti2v-5B only (t2v: A14B only)
    python benchmarks/bench_realsize_cpu.py --scratch /big/disk --clean

Writes random checkpoints (realsize_ckpt.py: a ComfyUI fp8_scaled T2V-A14B set and an official bf16 TI2V-5B set)
under `--scratch`, reused by later runs. Then, per job (ti2v first), `wan-local estimate --cpu --json` predicts the
peak RAM and `python -m wan_local generate --device cpu` runs as a child at the smallest size and frame count;
the child's VmRSS / RssAnon / RssFile are sampled every `--interval-s` and attributed to the stage its log last
announced (`stage: ...`; before the first one: `start`). Expert loads and denoise steps are kept with their times
and the RSS around them, which shows whether the two A14B experts were ever held together. The A14B job's
`--shift` is the largest (from the official 12 down) whose 2-step schedule gives the low-noise expert the second
step. Results: `benchmarks/results/realsize-cpu-<date>.json` (dry runs: in the scratch folder) and a markdown
table on stdout.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import realsize_ckpt as ckpt
import torch

from wan_local.sampling.denoise import expert_for
from wan_local.sampling.schedule import make_schedule
from wan_local.specs import TaskSpec, check_frames, check_size, get_task

log = logging.getLogger("realsize")

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PROMPT = "a red fox running through fresh snow at dawn, cinematic"
EVENTS = {
    "stage": re.compile(r"stage: (\w+)"),
    "dit_load": re.compile(r"loading (\S+) DiT from (\S+)"),
    "prequantized": re.compile(r"is pre-quantized"),
    "prefetch": re.compile(r"prefetching the (\w+) expert"),
    "step": re.compile(r"step (\d+)/(\d+)\s+t=(\d+)\s+expert=(\w+)"),
    "quant": re.compile(r"quantized \d+ Linears|loading cached|stored quantized|loaded quantized"),
    "saved": re.compile(r"saved \d+ frames"),
}
#: The estimate's stage figures and the measured stages they cover.
ESTIMATE_STAGES = {
    "encode": ("start", "encode_text"),
    "denoise": ("condition", "denoise"),
    "decode": ("decode", "save_exit"),
}
STATUS_KEYS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem", "VmHWM": "hwm"}


@dataclass(frozen=True)
class Job:
    key: str
    task: str
    folder: str
    #: Estimate flag sets: as the preset runs it; for fp8 files also as they are held (fp8 as stored).
    estimate_variants: tuple[tuple[str, ...], ...]


JOBS = {
    "ti2v": Job("ti2v", "ti2v-5B", "ti2v-5B-official", ((),)),
    "t2v": Job("t2v", "t2v-A14B", "t2v-A14B-comfyui", ((), ("--quant", "fp8"))),
}


# ---------------------------------------------------------------------------------------------- settings


def pick_shift(spec: TaskSpec, steps: int) -> tuple[float, list[int], list[str]]:
    """(shift, timesteps, experts): the official shift, or for two experts the largest one (in steps of 0.5
    below the official value) whose schedule runs both experts."""
    candidates = [spec.shift] + [x / 2 for x in range(int(spec.shift * 2) - 1, 1, -1)]
    for shift in candidates:
        timesteps = [int(t) for t in make_schedule("unipc", steps, shift).timesteps]
        experts = [expert_for(t, spec.boundary_timestep) for t in timesteps]
        if not spec.two_experts or len(set(experts)) == 2:
            return shift, timesteps, experts
    raise SystemExit(f"no shift lets {steps} steps of {spec.name} run both experts; use --steps 3 or more")


def job_settings(job: Job, steps: int, dtype: str) -> dict[str, object]:
    spec = get_task(job.task)
    size = (spec.size_multiple, spec.size_multiple)  # smallest multiple the size check allows
    frames = 1  # smallest 4k+1
    check_size(spec, *size)
    check_frames(spec, frames)
    shift, timesteps, experts = pick_shift(spec, steps)
    settings = {"task": job.task, "size": f"{size[0]}*{size[1]}", "frames": frames, "steps": steps, "shift": shift}
    return settings | {"dtype": dtype, "timesteps": timesteps, "experts": experts, "boundary": spec.boundary_timestep}


def child_env(home: Path) -> dict[str, str]:
    """This environment with the repository on PYTHONPATH and a fresh WAN_LOCAL_HOME (no cached prompts)."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    env["WAN_LOCAL_HOME"] = str(home)
    return env


# ---------------------------------------------------------------------------------------------- estimate


def _predicted_peak(data: dict) -> int | None:
    """estimate.peak_ram_bytes (the new layout and the current one), else estimate.plan.peak_ram_bytes."""
    est = data.get("estimate") or {}
    for value in (est.get("peak_ram_bytes"), (est.get("plan") or {}).get("peak_ram_bytes")):
        if isinstance(value, int):
            return value
    return None


def run_estimate(job: Job, s: dict, ckpt_dir: Path, flags: tuple[str, ...], env: dict) -> dict[str, object]:
    py = [sys.executable, "-m", "wan_local", "estimate"]
    help_text = subprocess.run([*py, "--help"], capture_output=True, text=True, env=env).stdout
    cmd = [*py, "--task", job.task, "--size", s["size"], "--frames", str(s["frames"]), "--steps", str(s["steps"])]
    cmd += ["--ckpt-dir", str(ckpt_dir), "--cpu", "--json", *flags]
    if "--preset" in help_text:
        cmd += ["--preset", "auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out: dict[str, object] = {"flags": list(flags), "argv": cmd[3:], "rc": proc.returncode}
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return out
    est = data.get("estimate") or {}
    stages = {k: v for d in (est.get("plan") or {}, est) for k, v in d.items() if k.endswith("_ram_bytes")}
    out |= {"peak_ram_bytes": _predicted_peak(data), "ram_bytes_by_stage": stages}
    out |= {k: data[k] for k in ("admitted", "preset", "message") if k in data}
    return out


# ---------------------------------------------------------------------------------------------- the child


def read_status(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM (bytes) and CPU seconds of a live process; None once gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[STATUS_KEYS[key]] = int(value.split()[0]) * 1024
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out if "rss" in out else None


def run_child(cmd: list[str], env: dict, log_path: Path, args: argparse.Namespace, tag: str) -> dict:
    """Run `cmd`, sampling its memory; returns rc, wall seconds, samples [(t, status)], lines [(t, text)].

    The child is killed after `args.timeout_s`, or when the machine's available RAM falls below `args.guard_gib`
    (other people use this machine: the OOM killer must never have to choose).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        with open(log_path, "w") as f:
            for line in proc.stdout:
                t = time.perf_counter() - start
                lines.append((t, line.rstrip()))
                f.write(f"{t:9.2f} {line}")
                print(f"[{tag} {t:7.1f}s] {line.rstrip()}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    samples: list[tuple[float, dict[str, int]]] = []
    timed_out = guard = False
    while proc.poll() is None:
        status = read_status(proc.pid)
        if status is not None:
            samples.append((time.perf_counter() - start, status))
        timed_out = time.perf_counter() - start > args.timeout_s
        guard = psutil.virtual_memory().available < args.guard_gib * GIB
        if timed_out or guard:
            log.error("killing %s: %s", tag, "timeout" if timed_out else "available RAM below the guard")
            proc.kill()
            break
        time.sleep(args.interval_s)
    rc = proc.wait()
    reader.join(timeout=10)
    return {
        "rc": rc,
        "timed_out": timed_out,
        "guard": guard,
        "wall_s": time.perf_counter() - start,
        "samples": samples,
        "lines": lines,
    }


# ---------------------------------------------------------------------------------------------- analysis


def events_of(lines: list[tuple[float, str]]) -> list[dict[str, object]]:
    out = []
    for t, text in lines:
        for kind, pattern in EVENTS.items():
            m = pattern.search(text)
            if m:
                out.append({"t_s": round(t, 2), "kind": kind, "groups": list(m.groups()), "text": text[-200:]})
                break
    return out


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def stage_table(samples: list, events: list[dict], wall_s: float) -> dict[str, dict[str, object]]:
    """Per stage (start, then each `stage:` line): wall and CPU seconds, peak RSS and its anon / file split."""
    named = {"stage": None, "saved": "save_exit"}
    marks = [(0.0, "start")]
    marks += [(e["t_s"], named[e["kind"]] or e["groups"][0]) for e in events if e["kind"] in named]
    out: dict[str, dict[str, object]] = {}
    for i, (t0, name) in enumerate(marks):
        t1 = marks[i + 1][0] if i + 1 < len(marks) else wall_s
        inside = [s for t, s in samples if t0 <= t < t1]
        row: dict[str, object] = {"wall_s": round(t1 - t0, 2), "samples": len(inside)}
        if inside:
            peak = max(inside, key=lambda s: s["rss"])
            row |= {"peak_rss_gib": _gib(peak["rss"]), "anon_at_peak_gib": _gib(peak["anon"])}
            row |= {"file_at_peak_gib": _gib(peak["file"]), "max_anon_gib": _gib(max(s["anon"] for s in inside))}
            row |= {"max_file_gib": _gib(max(s["file"] for s in inside))}
            row["cpu_s"] = round(inside[-1]["cpu_s"] - inside[0]["cpu_s"], 1)
        out[name] = row
    return out


def _rss_at(samples: list, t: float) -> dict[str, int] | None:
    """The last sample at or before t (else the first one after it)."""
    times = [x for x, _ in samples]
    i = bisect.bisect_right(times, t) - 1
    return samples[max(i, 0)][1] if samples else None


def expert_residency(samples: list, events: list[dict], files: list[dict]) -> dict[str, object] | None:
    """A14B: RSS while the high-noise expert is active (at its last step) vs the peak after the low-noise one is
    loaded. If the first were released, the peak after the switch stays near the first; if both were held it
    rises by about one expert's file size (threshold: half of it, at least 256 MiB of RSS noise)."""
    loads = {("high" if "high" in e["groups"][1] else "low"): e["t_s"] for e in events if e["kind"] == "dit_load"}
    steps = [e for e in events if e["kind"] == "step"]
    high_steps = [e["t_s"] for e in steps if e["groups"][3] == "high_noise"]
    low_steps = [e["t_s"] for e in steps if e["groups"][3] == "low_noise"]
    if "low" not in loads or not high_steps or not low_steps:
        return {"complete": False, "loads": loads, "steps": [e["groups"] for e in steps]}
    expert_bytes = next(f["bytes"] for f in files if "low_noise" in f["path"])
    active = _rss_at(samples, high_steps[-1])
    end = next((e["t_s"] for e in events if e["kind"] == "stage" and e["groups"][0] == "decode"), samples[-1][0])
    after = [s for t, s in samples if loads["low"] - 1.0 <= t <= end]
    between = [s for t, s in samples if high_steps[-1] <= t <= loads["low"]]
    peak_after = max(s["rss"] for s in after) if after else None
    together = peak_after is not None and peak_after > active["rss"] + max(expert_bytes // 2, 2**28)
    order = [f"{e['kind']}:{Path(e['groups'][-1]).name}" for e in events if e["kind"] in ("dit_load", "step")]
    return {
        "complete": True,
        "held_together": together,
        "expert_file_gib": _gib(expert_bytes),
        "rss_high_active_gib": _gib(active["rss"]),
        "anon_high_active_gib": _gib(active["anon"]),
        "file_high_active_gib": _gib(active["file"]),
        "min_rss_between_gib": _gib(min(s["rss"] for s in between)) if between else None,
        "peak_rss_after_switch_gib": _gib(peak_after),
        "prefetch_logged": any(e["kind"] == "prefetch" for e in events),
        "log_order": order,
    }


def summarize(run: dict, files: list[dict], predicted: int | None, two_experts: bool) -> dict[str, object]:
    samples = run["samples"]
    events = events_of(run["lines"])
    peak = max((s for _, s in samples), key=lambda s: s["rss"], default=None)
    hwm = samples[-1][1].get("hwm") if samples else None
    measured = max(peak["rss"] if peak else 0, hwm or 0) or None
    trace, window = [], -1
    for t, s in samples:  # at most one point per second: the one with the highest RSS
        if int(t) != window:
            trace.append([round(t, 1), s["rss"] >> 20, s["anon"] >> 20, s["file"] >> 20])
            window = int(t)
        elif s["rss"] >> 20 > trace[-1][1]:
            trace[-1] = [round(t, 1), s["rss"] >> 20, s["anon"] >> 20, s["file"] >> 20]
    return {
        "rc": run["rc"],
        "timed_out": run["timed_out"],
        "killed_by_guard": run["guard"],
        "wall_s": round(run["wall_s"], 2),
        "cpu_s": samples[-1][1]["cpu_s"] if samples else None,
        "peak_rss_gib": _gib(measured),
        "peak_sampled_rss_gib": _gib(peak["rss"]) if peak else None,
        "vmhwm_last_gib": _gib(hwm),
        "anon_at_peak_gib": _gib(peak["anon"]) if peak else None,
        "file_at_peak_gib": _gib(peak["file"]) if peak else None,
        "max_anon_gib": _gib(max((s["anon"] for _, s in samples), default=0)),
        "max_file_gib": _gib(max((s["file"] for _, s in samples), default=0)),
        "predicted_peak_ram_gib": _gib(predicted),
        "measured_over_predicted": round(measured / predicted, 3) if measured and predicted else None,
        "stages": stage_table(samples, events, run["wall_s"]),
        "experts": expert_residency(samples, events, files) if two_experts else None,
        "events": events,
        "trace_s_rss_anon_file_mib": trace,
        "log_tail": [text for _, text in run["lines"][-15:]] if run["rc"] else [],
    }


def stage_ratios(stages: dict[str, dict], estimate: dict) -> dict[str, dict[str, float]]:
    """Measured peak RSS of the stages each estimate figure covers vs that figure (`<stage>_ram_bytes`)."""
    out = {}
    for name, covered in ESTIMATE_STAGES.items():
        predicted = (estimate.get("ram_bytes_by_stage") or {}).get(f"{name}_ram_bytes")
        peaks = [stages[n]["peak_rss_gib"] for n in covered if stages.get(n, {}).get("peak_rss_gib")]
        if predicted and peaks:
            ratio = round(max(peaks) * GIB / predicted, 3)
            out[name] = {"measured_gib": max(peaks), "predicted_gib": _gib(predicted), "ratio": ratio}
    return out


# ---------------------------------------------------------------------------------------------- main


def write_files(root: Path, shapes: ckpt.Shapes, jobs: list[Job], spiece: bool) -> dict[str, list[dict]]:
    if ckpt.tokenizer_vocab() > shapes.umt5["vocab_size"]:
        raise SystemExit("the fixture tokenizer emits ids beyond the UMT5 embedding")
    models = ckpt.model_shapes(shapes)
    rng = ckpt.RandomBytes()
    report = {}
    for job in jobs:
        if job.key == "t2v":
            proto = (ckpt.TOKENIZER_FIXTURE / "spiece.model").read_bytes() if spiece else None
            files, small = ckpt.a14b_comfy_files(shapes, models, proto), {}
        else:
            files, small = ckpt.ti2v_official_files(shapes, models)
        report[job.key] = ckpt.write_set(root / job.folder, files, small, rng)
    return report


def ram_shortage(min_available_bytes: int, job: Job) -> str | None:
    """Why `job` must not start now (too little available RAM), or None."""
    available = psutil.virtual_memory().available
    if available >= min_available_bytes:
        return None
    return (
        f"not running {job.task}: only {available / GIB:.1f} GiB of RAM is available, it needs "
        f"{min_available_bytes / GIB:.0f} GiB (other jobs on this machine?); try again later"
    )


def markdown(results: list[dict]) -> str:
    rows = ["| job | stage | wall s | CPU s | peak RSS GiB | anon GiB | file GiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for name, st in r["measured"]["stages"].items():
            cells = [st.get(k, "") for k in ("wall_s", "cpu_s", "peak_rss_gib", "anon_at_peak_gib", "file_at_peak_gib")]
            rows.append(f"| {r['job']} | {name} | " + " | ".join(str(c) for c in cells) + " |")
    rows += ["", "| job | rc | peak RSS GiB (anon / file) | predicted GiB | measured / predicted | by stage "]
    rows[-1] += "(encode, denoise, decode) | experts together |"
    rows.append("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["measured"]
        together = (m["experts"] or {}).get("held_together", "n/a")
        split = f"{m['peak_rss_gib']} ({m['anon_at_peak_gib']} / {m['file_at_peak_gib']})"
        rows.append(
            f"| {r['job']} | {m['rc']} | {split} | {m['predicted_peak_ram_gib']} | {m['measured_over_predicted']} "
            f"| {', '.join(str(v['ratio']) for v in m['stages_vs_predicted'].values())} | {together} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="toy shapes (2 layers, small dims): checks the script")
    p.add_argument("--jobs", default="ti2v,t2v", help="comma list of ti2v, t2v (ti2v always runs first)")
    p.add_argument("--scratch", type=Path, default=Path("/work/scratch-realsize"), help="checkpoint folder")
    p.add_argument("--clean", action="store_true", help="delete the written checkpoints at the end")
    p.add_argument("--write-only", action="store_true", help="write (or check) the checkpoints, run nothing")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="generate --dtype (fp32: 2x RAM)")
    p.add_argument("--interval-s", type=float, default=0.2, help="RSS sampling period")
    p.add_argument("--timeout-s", type=float, default=4 * 3600, help="per generate run")
    p.add_argument("--guard-gib", type=float, default=1.5, help="kill the child below this much available RAM")
    p.add_argument("--min-available-gib", type=float, help="RAM needed to start a job (default 18; toy 1)")
    p.add_argument("--comfy-spiece", action="store_true", help="put `spiece_model` in the UMT5 file as Comfy-Org")
    p.add_argument("--out", type=Path, help="results JSON (default results/realsize-cpu-<date>.json)")
    args = p.parse_args(argv)
    unknown = set(args.jobs.split(",")) - set(JOBS)
    if unknown:
        p.error(f"--jobs: unknown {sorted(unknown)}; choose from {', '.join(JOBS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shapes = ckpt.TOY if args.dry_run else ckpt.REAL
    root = args.scratch / shapes.name
    jobs = [JOBS[k] for k in JOBS if k in args.jobs.split(",")]
    start = time.perf_counter()
    files = write_files(root, shapes, jobs, args.comfy_spiece)
    log.info("checkpoints ready under %s after %.0f s", root, time.perf_counter() - start)
    if args.write_only:
        return 0
    date = datetime.date.today().isoformat()
    out = args.out or (
        root / f"realsize-cpu-toy-{date}.json" if args.dry_run else RESULTS / f"realsize-cpu-{date}.json"
    )
    min_available = int((args.min_available_gib or (1 if args.dry_run else 18)) * GIB)
    vm = psutil.virtual_memory()
    report = {
        "benchmark": "bench_realsize_cpu.py",
        "date": date,
        "shapes": shapes.name,
        "argv": sys.argv[1:],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "ram_total_gib": _gib(vm.total),
            "ram_available_start_gib": _gib(vm.available),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "shape_set": ckpt.shapes_summary(shapes),
        "files": files,
        "jobs": [],
        "notes": [
            "the prediction is `wan-local estimate --cpu --json`'s estimate.peak_ram_bytes for the same job; "
            "peak RSS includes the mapped file pages the job touches",
            f"generate runs with --dtype {args.dtype} (the default; fp32 doubles every weight)",
            "ComfyUI tensors kept in 'higher precision' (norms, biases, embeddings, VAE) are written as float16: "
            "the spec leaves their dtype open",
            "the checkpoints were just written, so the page cache may hold them: load times are warm-ish",
        ],
    }
    for job in jobs:
        shortage = ram_shortage(min_available, job)
        if shortage:
            log.error("%s", shortage)
            report["notes"].append(shortage)
            break
        settings = job_settings(job, args.steps, args.dtype)
        run_dir = root / f"run-{job.key}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        env = child_env(run_dir / "home")
        ckpt_dir = root / job.folder
        estimates = [run_estimate(job, settings, ckpt_dir, flags, env) for flags in job.estimate_variants]
        used = next((e for e in estimates if e.get("peak_ram_bytes")), {})
        predicted = used.get("peak_ram_bytes")
        cmd = [sys.executable, "-m", "wan_local", "generate", "--task", job.task, "--ckpt-dir", str(ckpt_dir)]
        cmd += ["--prompt", PROMPT, "--size", settings["size"], "--frames", str(settings["frames"])]
        cmd += ["--steps", str(args.steps), "--shift", str(settings["shift"]), "--seed", "0", "--device", "cpu"]
        cmd += ["--dtype", args.dtype, "--output", str(run_dir / "out.mp4")]
        log.info("running %s: %s", job.task, " ".join(cmd[2:]))
        run = run_child(cmd, env, run_dir / "generate.log", args, job.key)
        measured = summarize(run, files[job.key], predicted, get_task(job.task).two_experts)
        measured["predicted_from_flags"] = used.get("flags")
        measured["stages_vs_predicted"] = stage_ratios(measured["stages"], used)
        report["jobs"].append(
            {"job": job.key, "settings": settings, "argv": cmd[2:], "estimates": estimates, "measured": measured}
        )
        shutil.rmtree(run_dir / "home", ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report["jobs"]))
    log.info("wrote %s", out)
    if args.clean:
        shutil.rmtree(root)
        log.info("deleted %s", root)
    ran_all = len(report["jobs"]) == len(jobs)
    return 0 if ran_all and all(j["measured"]["rc"] == 0 for j in report["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
