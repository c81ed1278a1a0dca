"""The installers' shell side: the Python and venv checks, the Windows .bat files' steps mirrored from run.sh, and
one real run of run.sh in a scratch copy of the project (slow). The decisions themselves are in test_installers."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "installers"))  # where setup_env.py finds the `setup` package
from setup.gpus import ENV_NVIDIA_SMI
from setup.install_log import LOG_NAME
from setup.marker import MARKER_NAME
from setup.plan import current_platform
from setup.python_venv import ensure_venv, path_length_warning, python_problems, venv_python
from setup.torch_choice import ENV_TORCH_INDEX, ENV_TORCH_SPEC
from test_installers import DATA, INSTALLERS, POSIX_ONLY, _fake_nvidia_smi


def test_setup_env_py_runs_the_package_beside_it(tmp_path):
    """The shell scripts run the file, from any folder and without PYTHONPATH: it finds `setup` beside it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env[ENV_NVIDIA_SMI] = str(DATA / "does-not-exist")
    proc = subprocess.run(
        [sys.executable, str(INSTALLERS / "setup_env.py"), "plan", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["torch"]["tag"] == "cpu"


# -------------------------------------------------------------------------------------- Python and venv


def test_python_problems():
    assert python_problems((3, 12, 4), 64, "/usr/bin/python3", "linux") == ([], [])
    errors, _ = python_problems((3, 9, 18), 64, "python", "linux")
    assert "too old" in errors[0] and "3.10 to 3.14" in errors[0]
    errors, _ = python_problems((3, 15, 0), 64, "python", "windows")
    assert "newer than PyTorch's builds support" in errors[0] and "WAN_LOCAL_PYTHON" in errors[0]
    errors, _ = python_problems((3, 12, 4), 32, "python", "windows")
    assert "32-bit" in errors[0]
    store = r"C:\Users\a\AppData\Local\Microsoft\WindowsApps\python.exe"
    assert "Microsoft Store" in python_problems((3, 12, 4), 64, store, "windows")[1][0]


def test_long_windows_paths_are_flagged():
    short = Path(r"C:\wan-local")
    deep = Path("C:\\Users\\someone\\Downloads\\wan-local-main (1)\\wan-local-main\\projects\\video")
    assert path_length_warning(short, long_paths=False) is None
    assert "260-character" in path_length_warning(deep, long_paths=False)
    assert path_length_warning(deep, long_paths=True) is None


def test_ensure_venv_repairs_a_broken_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("not a python")  # e.g. what a half-finished creation left
    platform = current_platform()
    assert ensure_venv(venv, platform).startswith("created")
    python = venv_python(venv, platform)
    assert subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0
    assert ensure_venv(venv, platform).startswith("using")

    # An interrupted pip upgrade leaves a venv without pip: pip comes back, the installed packages stay.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "pip"], capture_output=True, check=True)
    keep = venv / "kept.txt"
    keep.write_text("torch would be here")
    assert ensure_venv(venv, platform).startswith("restored pip")
    assert keep.exists()


# ------------------------------------------------------------------------------------- the shell scripts


def _bat(name: str) -> str:
    raw = (INSTALLERS / name).read_bytes()
    assert raw.isascii(), f"{name} must be ASCII (cmd reads it in the console's code page)"
    assert b"\n" not in raw.replace(b"\r\n", b""), f"{name} must use CRLF line endings everywhere"
    return raw.decode("ascii")


@pytest.mark.parametrize("name", ["run.bat", "test.bat", "update.bat"])
def test_bat_files_are_windows_batch(name):
    text = _bat(name)
    assert text.startswith("@echo off\r\n")
    code = [line for line in text.splitlines() if not re.match(r"\s*(rem\b|::|$)", line, re.I)]
    unix = ["#!", "$(", "${", "export ", "/dev/null", ".venv/bin", "fi", "then", "esac", "source ", "exec ", "rm -"]
    for line in code:
        if re.match(r"\s*echo[ .]", line, re.I):
            continue
        words = re.split(r"\s+", line.strip())
        assert not any(tok in words or (len(tok) > 2 and tok in line) for tok in unix), f"{name}: {line!r}"
        # "a && b || c" runs both b and c in some cmd implementations (seen under wine): use if errorlevel.
        assert not ("&&" in line and "||" in line), f"{name}: && ... || chain: {line!r}"
    labels = re.findall(r"^:(\w+)", text, re.M)
    assert len(labels) == len(set(labels)), f"{name}: a label is defined twice"
    for target in re.findall(r"(?:goto|call)\s+:(\w+)", text, re.I):
        assert target in labels, f"{name}: goto/call :{target} has no label"
    depth = 0
    for line in code:
        bare = re.sub(r'"[^"]*"', '""', re.sub(r"\^.", "", line))  # quoted text and ^-escapes cannot close blocks
        if re.match(r"\s*echo[ .]", bare, re.I) and not depth:
            continue
        for i, ch in enumerate(bare):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            assert depth >= 0, f"{name}: unbalanced ')' in {line!r}"
            # A path such as C:\Program Files (x86)\... expanded unquoted inside a block would end the block.
            if depth and re.match(r"%(ROOT|VENV|VPY|SETUP|PLAN_ENV|CD|APP_ARGS|PY)%", bare[i:]):
                pytest.fail(f"{name}: a path is expanded inside a parenthesized block: {line!r}")
    assert depth == 0, f"{name}: unbalanced '('"


def test_run_bat_has_the_same_steps_as_run_sh():
    bat, sh = _bat("run.bat"), (INSTALLERS / "run.sh").read_text()
    assert "py -3" in bat and 'set "PY=python"' in bat  # the py launcher first, then python on PATH
    for step in ("ensure-venv", "check", "start", "verify", "kernels", "mark"):
        assert re.search(rf'"%SETUP%" {step}\b', bat), f"run.bat does not call setup_env.py {step}"
        assert re.search(rf'"\$SETUP" {step}\b', sh), f"run.sh does not call setup_env.py {step}"
    assert '-m pip install %INDEX_ARGS% "%WAN_TORCH_REQUIREMENT%"' in bat
    assert 'set "INDEX_ARGS=--index-url %WAN_TORCH_INDEX_URL%"' in bat
    assert "-m pip uninstall -y torch" in bat and "-m pip uninstall -y torch" in sh
    assert "-m pip install -e ." in bat and "-m pip install -e ." in sh
    assert '"%VPY%" "%ROOT%\\app.py" %APP_ARGS%' in bat
    assert 'exec "$VPY" "$ROOT/app.py"' in sh
    for flag in ("--cpu", "--repair", "--no-launch"):
        assert f'"{flag}"' in bat and f"{flag})" in sh
    for key in ("TORCH_TAG", "TORCH_INDEX_URL", "TORCH_REQUIREMENT", "TORCH_ACTION"):
        assert f"{key})" in sh and f"WAN_{key}" in bat


def test_test_and_update_scripts():
    test_bat, test_sh = _bat("test.bat"), (INSTALLERS / "test.sh").read_text()
    for text in (test_bat, test_sh):
        assert "setup_env.py ensure-venv" in text and "torch==2.13.0" in text and '-e ".[test]"' in text
    assert "-m pytest %*" in test_bat and '-m pytest "$@"' in test_sh
    update_bat, update_sh = _bat("update.bat"), (INSTALLERS / "update.sh").read_text()
    # One line, parsed before the pull runs: the pull may rewrite update.bat, which cmd reads line by line.
    assert "git pull --ff-only & if errorlevel 1 (goto :pull_failed) else (goto :pulled)" in update_bat
    assert 'run.bat" --repair --no-launch' in update_bat and 'run.sh" --repair --no-launch' in update_sh
    assert 'main "$@"; exit $?' in update_sh and 'main "$@"; exit $?' in (INSTALLERS / "run.sh").read_text()
    for text in (update_bat, update_sh):
        assert "platformdirs" in text and "git diff --quiet" in text


@POSIX_ONLY
@pytest.mark.parametrize("name", ["run.sh", "test.sh", "update.sh"])
def test_sh_files_parse_and_are_executable(name):
    path = INSTALLERS / name
    assert b"\r" not in path.read_bytes()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, check=False).returncode == 0
    assert os.access(path, os.X_OK), f"chmod +x installers/{name}"


# ------------------------------------------------------------------------------------------ end to end


def _copy_project(dest: Path) -> None:
    """Copy what a clean checkout of the working tree holds (tracked and new, not ignored) into dest."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listing.split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(script: Path, *args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{script.name} {' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
@POSIX_ONLY
@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs a git checkout")
def test_run_sh_sets_up_a_fresh_copy_then_only_launches(tmp_path):
    project = tmp_path / "wan-local"
    _copy_project(project)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(
        {
            ENV_TORCH_SPEC: "torch==2.13.0",  # the local CPU wheel: seconds, not a multi-GB CUDA download
            ENV_TORCH_INDEX: "default",
            ENV_NVIDIA_SMI: str(_fake_nvidia_smi(tmp_path, None)),  # "NVIDIA-SMI has failed": no GPU
            "WAN_LOCAL_PYTHON": sys.executable,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
    )
    run_sh = project / "installers" / "run.sh"

    first = _run(run_sh, "--no-launch", env=env, timeout=600)
    assert "No NVIDIA GPU was found" in first.stdout and "Set-up complete: PyTorch 2.13.0+cpu" in first.stdout
    python = project / ".venv" / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import torch, wan_local; print(torch.__version__); print(wan_local.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split()
    assert probe[0] == "2.13.0+cpu"
    assert Path(probe[1]).resolve().is_relative_to(project.resolve())  # the copy's package, editable
    marker = json.loads((project / ".venv" / MARKER_NAME).read_text())
    assert marker["completed"] and marker["torch"]["tag"] == "cpu"
    assert marker["torch"]["requirement"] == "torch==2.13.0" and marker["installed_torch"] == "2.13.0+cpu"
    log = (project / ".venv" / LOG_NAME).read_text()
    assert "set-up started" in log and "CPU build: no NVIDIA GPU found." in log and "set-up completed" in log
    # The installed app really starts: it serves its page on 127.0.0.1 (no browser, no worker).
    port = _free_port()
    app_env = {**env, "WAN_LOCAL_HOME": str(tmp_path / "home")}
    app = subprocess.Popen(
        [str(python), "app.py", "--port", str(port), "--no-browser", "--no-worker"],
        cwd=project, env=app_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and app.poll() is None and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(0.5)
        assert status == 200, f"app did not start: {app.stderr.read().decode()[-2000:] if app.poll() else 'timeout'}"
    finally:
        app.terminate()
        app.wait(timeout=30)

    # A later run only launches, passing the app's options through (a stand-in app records them).
    (project / "app.py").write_text(
        "import json, sys\nopen('launched.json', 'w').write(json.dumps([sys.executable, sys.argv[1:]]))\n"
    )
    start = time.monotonic()
    second = _run(run_sh, "--port", "7861", "--listen", env=env, timeout=120)
    assert time.monotonic() - start < 60
    assert "Set-up is complete" in second.stdout and "Installing PyTorch" not in second.stdout
    executable, argv = json.loads((project / "launched.json").read_text())
    assert argv == ["--port", "7861", "--listen"]
    assert Path(executable).parent == python.parent

    # A changed pyproject.toml (e.g. after git pull) repairs the set-up and keeps the fitting torch.
    with (project / "pyproject.toml").open("a") as fh:
        fh.write("\n# changed\n")
    third = _run(run_sh, "--no-launch", env=env, timeout=600)
    assert "pyproject.toml changed" in third.stdout and "keeping the installed build" in third.stdout
    assert json.loads((project / ".venv" / MARKER_NAME).read_text())["completed"]
