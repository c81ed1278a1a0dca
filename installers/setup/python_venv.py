"""The Python that creates .venv (version, 64-bit, Windows path limits) and the venv itself, created or repaired."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .errors import SetupError

PYTHON_MIN = (3, 10)  # pyproject.toml's requires-python
PYTHON_MAX = (3, 14)  # newest Python the PyTorch releases allowed by pyproject.toml publish wheels for
WINDOWS_MAX_PATH = 260
LONGEST_TORCH_FILE = 172  # longest path inside a torch 2.13 wheel, relative to site-packages (measured)


def python_problems(
    version: tuple[int, int, int], pointer_bits: int, executable: str, platform: str
) -> tuple[list[str], list[str]]:
    """Can this interpreter host the venv? (errors, warnings)."""
    errors, warnings = [], []
    have = ".".join(map(str, version))
    wanted = f"Python {PYTHON_MIN[0]}.{PYTHON_MIN[1]} to {PYTHON_MAX[0]}.{PYTHON_MAX[1]} (64-bit; 3.12 recommended)"
    get = "https://www.python.org/downloads/" + ("windows/" if platform == "windows" else "")
    if version[:2] < PYTHON_MIN:
        errors.append(f"Python {have} ({executable}) is too old: wan-local needs {wanted}. Get one from {get}.")
    elif version[:2] > PYTHON_MAX:
        errors.append(
            f"Python {have} ({executable}) is newer than PyTorch's builds support: wan-local needs {wanted}. "
            f"Install Python 3.12 from {get} and run this again with it (set WAN_LOCAL_PYTHON to its path)."
        )
    if pointer_bits != 64:
        errors.append(f"Python {have} ({executable}) is a 32-bit build; PyTorch needs 64-bit Python ({get}).")
    if platform == "windows" and "WindowsApps" in executable:
        warnings.append(
            "This Python comes from the Microsoft Store, which redirects some file writes; if the set-up fails, "
            f"install Python from {get} instead."
        )
    return errors, warnings


def windows_long_paths_enabled() -> bool:
    """Is the Windows 260-character path limit lifted (LongPathsEnabled = 1)?"""
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except OSError:
        return False


def path_length_warning(root: Path, long_paths: bool) -> str | None:
    """Warn when PyTorch's deepest files would pass Windows' 260-character limit inside root/.venv."""
    venv_site = len(str(root)) + len("\\.venv\\Lib\\site-packages\\")
    if long_paths or venv_site + LONGEST_TORCH_FILE < WINDOWS_MAX_PATH:
        return None
    return (
        f"The folder path {root} is {len(str(root))} characters long; some PyTorch files would pass Windows' "
        f"260-character path limit and the install would fail with 'No such file or directory'. Move the folder "
        r"somewhere shorter (e.g. C:\wan-local), or enable long paths (Windows setting 'LongPathsEnabled')."
    )


def venv_python(venv: Path, platform: str) -> Path:
    """The venv's interpreter: Scripts\\python.exe on Windows, bin/python elsewhere."""
    return venv / "Scripts" / "python.exe" if platform == "windows" else venv / "bin" / "python"


def _venv_state(python: Path) -> str:
    """ "ok", "missing", "no-pip" (Python runs, pip does not import) or "broken" (the Python does not start)."""
    if not python.exists():
        return "missing"
    for code, failure in (("import sys", "broken"), ("import pip", "no-pip")):
        try:
            proc = subprocess.run([str(python), "-c", code], capture_output=True, timeout=300, check=False)
        except subprocess.TimeoutExpired as exc:  # slow, not broken (antivirus scans): never delete the venv for it
            raise SetupError(f"{python} did not answer within {exc.timeout:.0f} s; run this again.") from exc
        except OSError:
            return "broken"
        if proc.returncode != 0:
            return failure
    return "ok"


def ensure_venv(venv: Path, platform: str) -> str:
    """Make `venv` usable and say what was done. A venv whose pip is missing (e.g. an interrupted pip upgrade)
    gets pip back with ensurepip and keeps its packages; a venv whose Python no longer starts (e.g. the Python it
    was made from was uninstalled) or that never got pip (a creation that failed half-way) is made anew."""
    python = venv_python(venv, platform)
    state = _venv_state(python)
    if state == "ok":
        return f"using the virtual environment {venv}"
    if state == "no-pip":
        subprocess.run([str(python), "-m", "ensurepip", "--upgrade", "--default-pip"], capture_output=True, check=False)
        if _venv_state(python) == "ok":
            return f"restored pip in the virtual environment {venv}"
    if venv.exists():
        print(f"The virtual environment {venv} is broken (its Python or pip does not start); re-creating it.")
        try:
            shutil.rmtree(venv)
        except OSError as exc:
            raise SetupError(
                f"Could not delete the broken {venv} ({exc}). Close wan-local, delete it by hand, and run this again."
            ) from exc
    print(f"Creating the virtual environment {venv} with Python {sys.version.split()[0]} ...", flush=True)
    import venv as venv_module

    hint = (
        "On Debian/Ubuntu install the venv module first: sudo apt install python3-venv"
        if (platform == "linux")
        else "Reinstall Python from https://www.python.org/downloads/ (with pip)."
    )
    try:
        venv_module.EnvBuilder(with_pip=True).create(venv)
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        raise SetupError(f"Could not create {venv}: {exc}. {hint}") from exc
    if _venv_state(python) != "ok":
        shutil.rmtree(venv, ignore_errors=True)
        raise SetupError(f"The new {venv} has no working pip. {hint}")
    return f"created the virtual environment {venv}"
