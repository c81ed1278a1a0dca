"""Shared fixtures: the tiny Wan2.2 checkpoints with golden outputs of the official code."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
#: budgets.md's reference jobs: task, width, height, frames.
REFERENCE_JOBS = {
    "a14b-480p": ("t2v-A14B", 832, 480, 81),
    "a14b-720p": ("t2v-A14B", 1280, 720, 81),
    "5b-720p": ("ti2v-5B", 1280, 704, 121),
}

# Everything the code under test writes to "user" folders (queue, settings, caches) goes to a scratch folder,
# never to the developer's real ones. Subprocesses inherit it.
if "WAN_LOCAL_HOME" not in os.environ:
    os.environ["WAN_LOCAL_HOME"] = tempfile.mkdtemp(prefix="wan-local-tests-")


def _find_fixtures() -> Path | None:
    candidates = []
    if env := os.environ.get("WAN_LOCAL_FIXTURES"):
        candidates.append(Path(env))
    candidates += [
        REPO_ROOT.parent / "shared" / "fixtures" / "wan22-tiny",
        REPO_ROOT / "shared" / "fixtures" / "wan22-tiny",
    ]
    for path in candidates:
        if (path / "golden" / "cases.json").is_file():
            return path
    return None


FIXTURES = _find_fixtures()


@pytest.fixture(scope="session")
def tiny() -> Path:
    """Root of the wan22-tiny fixture tree (task folders + golden/)."""
    if FIXTURES is None:
        pytest.skip("wan22-tiny fixtures not found (set WAN_LOCAL_FIXTURES or place them at ../shared/fixtures)")
    return FIXTURES


@pytest.fixture(scope="session")
def cases(tiny: Path) -> dict:
    """golden/cases.json: arguments and metadata of every golden case."""
    return json.loads((tiny / "golden" / "cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def golden(tiny: Path):
    """golden(name) -> dict of tensors stored in golden/<name>.safetensors."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = load_file(str(tiny / "golden" / f"{name}.safetensors"))
        return cache[name]

    return load


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ||a - e|| / ||e|| in float64."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def golden_settings(case: dict, tiny: Path):
    """The GenerationSettings of a golden pipeline case (cases.json `args`), image path resolved under golden/."""
    from wan_local.engine.request import GenerationSettings

    a = case["args"]
    if "image" in a:
        side = int(a["max_area"] ** 0.5)
        # Any W*H with the case's area works: the image gives the aspect. Prefer a square when it is exact.
        size = (side, side) if side * side == a["max_area"] else (a["max_area"] // 48, 48)
    else:
        size = tuple(int(v) for v in a["size"].split("*"))
    guide = a["guide_scale"]
    guide = tuple(guide) if isinstance(guide, list) else (guide, guide)
    return GenerationSettings(
        task=a["task"],
        prompt=a["prompt"],
        negative_prompt=a["n_prompt"],
        image=str(tiny / "golden" / a["image"]) if "image" in a else None,
        size=size,
        frames=a["frame_num"],
        steps=a["sampling_steps"],
        shift=a["shift"],
        guide_scale=guide,
        solver=a["sample_solver"],
        seed=a["seed"],
    )
