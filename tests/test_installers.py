"""The installers' decisions: GPU detection from recorded nvidia-smi output, the PyTorch and kernel choices made from
it, and the marker that turns later runs into plain launches (the shell scripts: test_installer_scripts)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "installers"))  # where setup_env.py finds the `setup` package
from setup.cli import EXIT_BLOCKED, main
from setup.drivers import cuda_for_driver
from setup.errors import SetupError
from setup.gpus import ENV_NVIDIA_SMI, GpuInfo, detect_gpus, nvidia_smi_path, parse_nvidia_smi
from setup.install_log import LOG_NAME
from setup.kernels import TRITON_FOR_TORCH, KernelChoice, choose_kernels, install_kernels
from setup.marker import MARKER_NAME, marker_problems
from setup.plan import build_plan, describe_plan, plan_env_lines
from setup.torch_choice import ENV_TORCH_INDEX, ENV_TORCH_SPEC, apply_overrides, choose_torch
from setup.torch_installed import InstalledTorch, has_kernels_for, installed_torch, torch_action
from setup.versions import requirement_allows, torch_requirement

INSTALLERS = REPO_ROOT / "installers"
DATA = REPO_ROOT / "tests" / "data" / "nvidia-smi"
POSIX_ONLY = pytest.mark.skipif(os.name == "nt" or shutil.which("bash") is None, reason="needs bash (Linux/macOS)")


def _read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def _recorded(case: str, status: int = 0):
    """A fake nvidia-smi runner answering from the recordings of `case` (as detect_gpus calls it)."""

    def run(args):
        if len(args) == 1:
            return status, _read(f"{case}.txt")
        if "compute_cap" in args[1]:
            if (DATA / f"{case}.query.csv").exists():
                return 0, _read(f"{case}.query.csv")
            return 2, _read(f"{case}.query-compute_cap.txt")  # drivers before R510
        return 0, _read(f"{case}.query3.csv")

    return run


def _gpus(case: str) -> list:
    platform = "windows" if case.endswith("windows") else "linux"
    gpus, _ = detect_gpus({ENV_NVIDIA_SMI: "nvidia-smi"}, platform, run=_recorded(case))
    return gpus


# ------------------------------------------------------------------------------------------- detection

RTX4090 = ("NVIDIA GeForce RTX 4090", 24564)
RTX3060 = ("NVIDIA GeForce RTX 3060", 12288)


@pytest.mark.parametrize(
    ("case", "driver", "cuda", "gpus", "capabilities"),
    [
        ("rtx4090-560-linux", "560.35.03", (12, 6), [RTX4090], [(8, 9)]),
        ("rtx4090-560-windows", "560.94", (12, 6), [RTX4090], [(8, 9)]),
        ("gtx1060-470-linux", "470.256.02", (11, 4), [("NVIDIA GeForce GTX 1060 6GB", 6078)], [None]),
        ("rtx4090-rtx3060-570-linux", "570.133.07", (12, 8), [RTX4090, RTX3060], [(8, 9), (8, 6)]),
        ("rtx5090-581-windows", "581.57", (13, 0), [("NVIDIA GeForce RTX 5090", 32607)], [(12, 0)]),
        ("gtx1080ti-580-linux", "580.95.05", (13, 0), [("NVIDIA GeForce GTX 1080 Ti", 11264)], [(6, 1)]),
        ("rtx3090-535-linux", "535.183.01", (12, 2), [("NVIDIA GeForce RTX 3090", 24576)], [(8, 6)]),
    ],
)
def test_detect_gpus_from_recorded_output(case, driver, cuda, gpus, capabilities):
    found = _gpus(case)
    assert [(g.name, g.memory_total_mib) for g in found] == gpus
    assert {g.driver_version for g in found} == {driver}
    assert {g.cuda_version for g in found} == {cuda}  # from the table's header, not a toolkit
    assert [g.compute_capability for g in found] == capabilities


@pytest.mark.parametrize(
    ("case", "names", "memory"),
    [
        ("rtx4090-560-linux", ["NVIDIA GeForce RTX 4090"], [24564]),
        ("rtx4090-560-windows", ["NVIDIA GeForce RTX 4090"], [24564]),  # its process rows end in "N/A |" too
        ("gtx1060-470-linux", ["NVIDIA GeForce ..."], [6078]),  # the old table cuts long names
        ("rtx4090-rtx3060-570-linux", ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3060"], [24564, 12288]),
    ],
)
def test_parse_the_plain_table_alone(case, names, memory):
    for text in (_read(f"{case}.txt"), _read(f"{case}.txt").replace("\n", "\r\n")):  # Windows line ends too
        gpus = parse_nvidia_smi(text)
        assert [g.name for g in gpus] == names
        assert [g.memory_total_mib for g in gpus] == memory
        assert all(g.compute_capability is None for g in gpus)


def test_parse_the_query_alone_derives_cuda_from_nvidias_driver_table():
    (gpu,) = parse_nvidia_smi(_read("rtx4090-560-linux.query3.csv"))
    assert (gpu.name, gpu.driver_version, gpu.cuda_version) == ("NVIDIA GeForce RTX 4090", "560.35.03", (12, 6))
    assert cuda_for_driver("570.133.07") == (12, 8)
    assert cuda_for_driver("580.95.05") == (13, 0)
    assert cuda_for_driver("470.256.02") == (11, 4)
    assert cuda_for_driver("560.94", "windows") == (12, 6)
    assert cuda_for_driver("560.70", "windows") == (12, 5)  # below 12.6's Windows driver 560.76
    assert cuda_for_driver("390.12") is None


@pytest.mark.parametrize("name", ["failed.txt", "no-devices.txt", "missing-linux.txt", "missing-windows.txt", ""])
def test_no_gpu_outputs_parse_to_nothing(name):
    assert parse_nvidia_smi(_read(name) if name else "") == []
    assert parse_nvidia_smi(_read(name) if name else "", query="") == []


def test_detection_failures_are_explained():
    env = {ENV_NVIDIA_SMI: "nvidia-smi"}
    gpus, note = detect_gpus(env, "linux", run=lambda args: (9, _read("failed.txt")))
    assert gpus == [] and "couldn't communicate with the NVIDIA driver" in note

    gpus, note = detect_gpus(env, "linux", run=lambda args: (6, _read("no-devices.txt")))
    assert gpus == [] and "No devices were found" in note

    def missing(args):
        raise FileNotFoundError(args[0])

    gpus, note = detect_gpus(env, "windows", run=missing)
    assert gpus == [] and "not found" in note


def test_nvidia_smi_is_looked_up_in_the_drivers_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert nvidia_smi_path({ENV_NVIDIA_SMI: "/opt/x/nvidia-smi"}, "linux") == "/opt/x/nvidia-smi"
    system32 = tmp_path / "System32"
    system32.mkdir()
    (system32 / "nvidia-smi.exe").write_bytes(b"")
    assert nvidia_smi_path({"SystemRoot": str(tmp_path)}, "windows") == str(system32 / "nvidia-smi.exe")
    assert nvidia_smi_path({"SystemRoot": str(tmp_path / "none"), "ProgramFiles": str(tmp_path)}, "windows") is None


# ---------------------------------------------------------------------------------------- torch choice

REQ = "torch>=2.4,<2.15"


@pytest.mark.parametrize(
    ("case", "tag"),
    [
        ("rtx4090-560-linux", "cu126"),  # driver CUDA 12.6 -> the 12.6 build
        ("rtx4090-560-windows", "cu126"),
        ("rtx4090-rtx3060-570-linux", "cu128"),
        ("rtx5090-581-windows", "cu130"),  # Blackwell on a CUDA 13 driver
        ("gtx1080ti-580-linux", "cu126"),  # Pascal: CUDA 12.8+/13 builds have no sm_61 kernels
        ("rtx3090-535-linux", "cu121"),  # CUDA 12.2 driver: newest build it runs
    ],
)
def test_choose_torch_matches_the_driver(case, tag):
    platform = "windows" if case.endswith("windows") else "linux"
    choice = choose_torch(_gpus(case), platform, requirement=REQ)
    assert choice.error is None
    assert choice.tag == tag
    assert choice.index_url == f"https://download.pytorch.org/whl/{tag}"
    assert choice.requirement == REQ
    assert tag in choice.reason and choice.reason.isascii()


def test_choice_explanations():
    two = choose_torch(_gpus("rtx4090-rtx3060-570-linux"), "linux")
    assert "RTX 4090" in two.reason and "most memory" in two.reason and two.warning is None
    pascal = choose_torch(_gpus("gtx1080ti-580-linux"), "linux")
    assert "compute capability 6.1" in pascal.reason
    old_build = choose_torch(_gpus("rtx3090-535-linux"), "linux")
    assert "after torch 2.5" in old_build.warning and "560.28.03" in old_build.warning  # the driver for cu126
    assert choose_torch(_gpus("rtx4090-560-linux"), "linux").warning is None


@pytest.mark.parametrize(("platform", "minimum"), [("linux", "520.61.05"), ("windows", "520.06")])
def test_driver_too_old_stops_with_the_minimum_driver(platform, minimum):
    choice = choose_torch(_gpus("gtx1060-470-linux"), platform, requirement=REQ)
    assert choice.tag == "none" and choice.index_url is None
    assert "470.256.02" in choice.error and "CUDA 11.4" in choice.error
    assert f"minimum driver is {minimum}" in choice.error
    assert "https://www.nvidia.com/drivers" in choice.error and "--cpu" in choice.error


def test_gpus_no_build_supports_are_errors():
    blackwell_old_driver = GpuInfo("NVIDIA GeForce RTX 5080", "560.35.03", (12, 6), 16303, (12, 0))
    choice = choose_torch([blackwell_old_driver], "linux")
    assert choice.error and "CUDA 12.8" in choice.error and "570.26" in choice.error
    kepler = GpuInfo("NVIDIA GeForce GTX 780", "560.35.03", (12, 6), 3072, (3, 5))
    assert "older than any GPU" in choose_torch([kepler], "linux").error


def test_other_gpus_the_build_cannot_use_are_named():
    big = GpuInfo("NVIDIA GeForce RTX 5090", "581.57", (13, 0), 32607, (12, 0))
    small = GpuInfo("NVIDIA GeForce GTX 1060 6GB", "581.57", (13, 0), 6144, (6, 1))
    choice = choose_torch([small, big], "windows")
    assert choice.tag == "cu130" and "cannot use NVIDIA GeForce GTX 1060 6GB" in choice.warning


def test_cpu_builds():
    none = choose_torch([], "linux", requirement=REQ, detection="nvidia-smi not found")
    assert (none.tag, none.index_url, none.error) == ("cpu", "https://download.pytorch.org/whl/cpu", None)
    assert "No NVIDIA GPU was found (nvidia-smi not found)" in none.warning and "takes hours" in none.warning
    forced = choose_torch(_gpus("rtx4090-560-windows"), "windows", force_cpu=True)
    assert forced.tag == "cpu" and "--cpu" in forced.reason and forced.warning
    mac = choose_torch([], "macos")
    assert mac.tag == "cpu" and mac.index_url is None  # PyPI's macOS build


def test_environment_overrides_for_tests():
    choice = choose_torch([], "linux", requirement=REQ)
    env = {ENV_TORCH_SPEC: "torch==2.13.0", ENV_TORCH_INDEX: "default"}
    local = apply_overrides(choice, env)
    assert (local.tag, local.requirement, local.index_url) == ("cpu", "torch==2.13.0", None)
    mirror = apply_overrides(choice, {ENV_TORCH_INDEX: "https://mirror.example/whl/cpu"})
    assert mirror.index_url == "https://mirror.example/whl/cpu" and mirror.requirement == REQ
    assert apply_overrides(choice, {}) == choice


def test_torch_requirement_comes_from_pyproject(tmp_path):
    req = torch_requirement(REPO_ROOT / "pyproject.toml")
    assert req.startswith("torch") and requirement_allows(req, "2.13.0")  # the tested lower bound fits
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torchvision>=0.1", "torch >= 2.5, < 3"]\n')
    assert torch_requirement(pyproject) == "torch>=2.5,<3"


@pytest.mark.parametrize(
    ("requirement", "version", "allowed"),
    [
        ("torch>=2.4,<2.15", "2.13.0+cu126", True),
        ("torch>=2.4,<2.15", "2.15.0", False),
        ("torch>=2.4,<2.15", "2.3.1", False),
        ("torch==2.13.0", "2.13.0+cpu", True),
        ("torch==2.13.0", "2.13.1", False),
        ("torch==2.13.*", "2.13.1", True),
        ("torch!=2.9.*", "2.9.1", False),
        ("torch~=2.10", "2.14.1", True),
        ("torch~=2.10.0", "2.11.0", False),
        ("torch", "1.0", True),
    ],
)
def test_requirement_allows(requirement, version, allowed):
    assert requirement_allows(requirement, version) is allowed


def test_torch_action():
    cu126 = choose_torch(_gpus("rtx4090-560-linux"), "linux", requirement=REQ)
    assert torch_action(cu126, None)[0] == "install"
    assert torch_action(cu126, InstalledTorch("2.13.0+cpu", None))[0] == "reinstall"  # e.g. after test.sh
    assert torch_action(cu126, InstalledTorch("2.13.0+cu126", "12.6"))[0] == "keep"
    assert torch_action(cu126, InstalledTorch("2.16.0+cu126", "12.6"))[0] == "reinstall"
    pip_default = apply_overrides(cu126, {ENV_TORCH_INDEX: "default"})
    assert torch_action(pip_default, InstalledTorch("2.13.0", "13.0"))[0] == "keep"  # no index: no tag check


@pytest.mark.parametrize(
    ("arch_list", "cc", "ok"),
    [
        (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], (8, 9), True),  # sm_86 code runs on 8.9
        (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], (6, 1), False),  # Pascal and a CUDA 13 build
        (["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], (12, 0), False),  # Blackwell, cu126
        (["sm_80", "compute_90"], (12, 0), True),  # PTX is compiled for newer GPUs
        (["sm_90a", "sm_100a"], (10, 0), True),
    ],
)
def test_has_kernels_for(arch_list, cc, ok):
    assert has_kernels_for(arch_list, cc) is ok


def test_installed_torch_is_read_without_importing_it():
    have = installed_torch()
    import torch

    assert have.version == torch.__version__
    assert have.cuda == torch.version.cuda
    assert have.tag == ("cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")[:3])


# --------------------------------------------------------------------------------------------- kernels


def _kernels(platform, torch_version, cuda="12.6", python=(3, 12), case="rtx4090-560-linux"):
    torch = InstalledTorch(torch_version, cuda)
    return {k.name: k for k in choose_kernels(platform, python, torch, _gpus(case))}


def test_kernels_on_windows_use_the_triton_windows_release_of_this_torch():
    ks = _kernels("windows", "2.13.0+cu126")
    assert ks["triton-windows"].spec == "triton-windows>=3.7,<3.8"
    assert ks["flash-attn"].spec == "flash-attn"
    assert ks["sageattention"].spec == "sageattention" and ks["sageattention"].needs_triton
    assert _kernels("windows", "2.10.0+cu128")["triton-windows"].spec == "triton-windows>=3.6,<3.7"
    unknown = _kernels("windows", "2.16.0+cu130")["triton-windows"]
    assert unknown.spec is None and "2.16.0" in unknown.reason


def test_kernels_on_linux_take_triton_from_torch():
    ks = _kernels("linux", "2.13.0+cu126")
    assert ks["triton"].spec is None and "comes with PyTorch" in ks["triton"].reason
    assert "triton-windows" not in ks
    assert ks["flash-attn"].spec == "flash-attn" and ks["sageattention"].spec == "sageattention"


@pytest.mark.parametrize(
    ("platform", "torch_version", "cuda", "python", "case", "why"),
    [
        ("linux", "2.13.0+cpu", None, (3, 12), "rtx4090-560-linux", "needs a CUDA build"),
        ("windows", "2.13.0+cu126", "12.6", (3, 15), "rtx4090-560-linux", "no wheels for Python 3.15"),
        ("macos", "2.13.0", None, (3, 12), "rtx4090-560-linux", "no builds for macos"),
        ("windows", "2.13.0+cu126", "12.6", (3, 12), "gtx1080ti-580-linux", "compute capability 8.0+"),
    ],
)
def test_kernels_are_skipped_with_a_reason(platform, torch_version, cuda, python, case, why):
    ks = _kernels(platform, torch_version, cuda, python, case)
    skipped = [k for k in ks.values() if k.name in ("flash-attn", "sageattention")]
    assert skipped and all(k.spec is None and why in k.reason for k in skipped)


def test_triton_table_covers_every_torch_pyproject_allows():
    req = torch_requirement(REPO_ROOT / "pyproject.toml")
    allowed = [(2, minor) for minor in range(0, 40) if requirement_allows(req, f"2.{minor}.0")]
    assert allowed and all(v in TRITON_FOR_TORCH for v in allowed), "add the new torch to TRITON_FOR_TORCH"


def test_install_kernels_never_fails_and_removes_wheels_that_do_not_import():
    choices = [
        KernelChoice("triton", "triton", None, "comes with PyTorch's Linux CUDA build"),
        KernelChoice("flash-attn", "flash_attn", "flash-attn", "FlashAttention-2"),
        KernelChoice("sageattention", "sageattention", "sageattention", "SageAttention 1", needs_triton=True),
        KernelChoice("triton-windows", "triton", None, "no builds for linux"),
    ]
    calls, logged = [], []

    def pip(python, *args):
        calls.append(args)
        return (1, "ERROR: No matching distribution found") if "flash-attn" in args else (0, "ok")

    def imports(python, module):
        return (module == "triton", "" if module == "triton" else "ImportError: undefined symbol")

    lines = install_kernels(
        choices,
        "python",
        "linux / Python 3.12 / torch 2.13.0+cu126",
        logged.append,
        pip=pip,
        imports=imports,
        installed_version=lambda name: None,
    )
    assert lines[0] == "triton: ready - comes with PyTorch's Linux CUDA build"
    assert lines[1] == "flash-attn: skipped - no prebuilt wheel for linux / Python 3.12 / torch 2.13.0+cu126"
    assert lines[2].startswith("sageattention: skipped - the prebuilt wheel does not import here")
    assert lines[3] == "triton-windows: skipped - no builds for linux"
    assert ("install", "--only-binary=:all:", "--no-deps", "flash-attn") in calls  # pip never compiles
    assert ("uninstall", "-y", "sageattention") in calls
    assert any("No matching distribution" in text for text in logged)

    no_triton = install_kernels(
        choices[2:3],
        "python",
        "",
        logged.append,
        pip=pip,
        imports=lambda python, module: (False, ""),
        installed_version=lambda name: None,
    )
    assert no_triton == ["sageattention: skipped - needs Triton, which is not available"]


# ------------------------------------------------------------------------------------- plan and marker


def _plan(case=None, *, force_cpu=False, have=("2.13.0+cu126", "12.6"), sha="abc", env=None):
    gpus = _gpus(case) if case else []
    return build_plan(
        gpus,
        "nvidia-smi reported no GPU" if not gpus else "found",
        "linux",
        force_cpu=force_cpu,
        requirement=REQ,
        env=env or {},
        have=InstalledTorch(*have) if have else None,
        pyproject_sha256=sha,
        python=(3, 12, 4),
    )


def _completed(plan):
    return json.loads(json.dumps({**plan, "completed": True}))  # as stored: tuples become lists


def test_marker_says_when_the_set_up_must_run_again():
    have = InstalledTorch("2.13.0+cu126", "12.6")
    plan = _plan("rtx4090-560-linux")
    assert marker_problems(_completed(plan), plan, have) == ([], [])
    assert "no completed set-up" in marker_problems(None, plan, have)[0][0]
    assert "no completed set-up" in marker_problems({**plan, "completed": False}, plan, have)[0][0]
    assert "no completed set-up" in marker_problems({"completed": True}, plan, have)[0][0]

    new_driver = _plan("rtx4090-rtx3060-570-linux")
    reasons, _ = marker_problems(_completed(plan), new_driver, have)
    assert "the PyTorch build needed changed: cu126 -> cu128" in reasons
    assert "the NVIDIA driver changed: 560.35.03 -> 570.133.07" in reasons

    reasons, _ = marker_problems(_completed(plan), _plan("rtx4090-560-linux", sha="new"), have)
    assert reasons == ["pyproject.toml changed (a new version of wan-local?)"]
    reasons, _ = marker_problems(_completed(plan), plan, None)
    assert reasons == ["PyTorch in .venv changed: 2.13.0+cu126 -> none"]
    cpu = _plan("rtx4090-560-linux", force_cpu=True)
    assert "the PyTorch build needed changed: cu126 -> cpu" in marker_problems(_completed(plan), cpu, have)[0]


def test_a_gpu_that_vanishes_keeps_the_cuda_install():
    have = InstalledTorch("2.13.0+cu126", "12.6")
    reasons, warnings = marker_problems(_completed(_plan("rtx4090-560-linux")), _plan(None), have)
    assert reasons == [] and "keeping it" in warnings[0] and "--repair" in warnings[0]


def test_plan_is_described_in_plain_ascii_and_passed_to_the_shells():
    plan = _plan("rtx4090-560-windows", have=("2.13.0+cpu", None))
    text = "\n".join(describe_plan(plan))
    assert text.isascii()
    assert "NVIDIA 560.94, supports CUDA up to 12.6" in text
    assert "cu126 build, from https://download.pytorch.org/whl/cu126" in text
    assert "now: reinstall" in text
    assert plan_env_lines(plan) == [
        "TORCH_TAG=cu126",
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126",
        f"TORCH_REQUIREMENT={REQ}",
        "TORCH_ACTION=reinstall",
    ]
    blocked = _plan("gtx1060-470-linux")
    assert "ERROR:    The NVIDIA driver 470.256.02" in "\n".join(describe_plan(blocked))
    with pytest.raises(SetupError, match="cannot pass on safely"):
        plan_env_lines(_plan(None, env={ENV_TORCH_SPEC: 'torch"==1'}))


def _fake_nvidia_smi(folder: Path, case: str | None) -> Path:
    """An nvidia-smi stand-in that replays the recordings of `case` ("NVIDIA-SMI has failed" when None)."""
    script = folder / "nvidia-smi"
    if case is None:
        body = f'cat "{DATA / "failed.txt"}"\nexit 9\n'
    else:
        query4 = DATA / f"{case}.query.csv"
        cc = f'cat "{query4}"' if query4.exists() else f'cat "{DATA / (case + ".query-compute_cap.txt")}"; exit 2'
        body = (
            f'case "$1" in\n  *compute_cap*) {cc} ;;\n  --query-gpu=*) cat "{DATA / (case + ".query3.csv")}" ;;\n'
            f'  *) cat "{DATA / (case + ".txt")}" ;;\nesac\n'
        )
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@POSIX_ONLY
def test_start_mark_check_cycle(tmp_path, capsys):
    venv = tmp_path / "venv"
    env = {ENV_NVIDIA_SMI: str(_fake_nvidia_smi(tmp_path, None)), "PATH": os.environ.get("PATH", "")}
    common = ["--project", str(REPO_ROOT), "--venv", str(venv)]
    assert main([*common, "check"], env) == 1  # nothing recorded yet
    assert main([*common, "start", "--env-file", str(tmp_path / "plan.env")], env) == 0
    out = capsys.readouterr().out
    assert "No NVIDIA GPU was found" in out and "couldn't communicate" in out
    lines = (tmp_path / "plan.env").read_text().splitlines()
    assert "TORCH_TAG=cpu" in lines and "TORCH_ACTION=keep" in lines  # this venv's torch 2.13.0+cpu fits
    assert main([*common, "check"], env) == 1  # started, not completed
    assert main([*common, "mark"], env) == 0
    assert main([*common, "check"], env) == 0
    assert "Set-up is complete" in capsys.readouterr().out

    env[ENV_NVIDIA_SMI] = str(_fake_nvidia_smi(tmp_path, "rtx4090-560-linux"))  # a driver got installed
    assert main([*common, "check"], env) == 1
    assert "cpu -> cu126" in capsys.readouterr().out
    assert main([*common, "start"], env) == 0  # and a new set-up forgets the old marker first
    assert not (venv / MARKER_NAME).exists()

    env[ENV_NVIDIA_SMI] = str(_fake_nvidia_smi(tmp_path, "gtx1060-470-linux"))
    assert main([*common, "start"], env) == EXIT_BLOCKED
    assert "minimum driver is 520.61.05" in capsys.readouterr().out
    log = (venv / LOG_NAME).read_text()
    assert "set-up started" in log and "set-up completed" in log and "set-up needed" in log


def test_plan_json_cli(capsys):
    env = {ENV_NVIDIA_SMI: str(DATA / "does-not-exist"), "PATH": ""}
    assert main(["plan", "--json"], env) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["torch"]["tag"] == "cpu" and plan["gpus"] == []
    assert [k["name"] for k in plan["kernels"]][-1] == "sageattention"
