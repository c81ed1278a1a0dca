"""Layout detection that explains itself, and the user's choice among several candidate files.

`weights.layout.find_checkpoints` calls these with the folder's inventory (`weights.inventory.scan_folder`):

- `found_summary`: what a folder holds, one entry per model file, appended to every "lacks ..." message, with
  the reason a file was passed over (another task's DiT, an unreadable header, a stray `model_index.json`).
- `resolve_picks`: the files chosen for each role. A role with several candidates (a ComfyUI folder with fp16 and
  fp8_scaled high-noise experts) needs a choice; one that was given must be a usable file of that role, in the
  folder, for this task. Either way the error names every candidate and how to choose (Models tab or `--file`).
- `check_components`: after a layout was recognised, the files it uses must be readable and of this task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from wan_local.errors import CheckpointError
from wan_local.weights.inventory import (
    EXPERT,
    HIGH,
    INDEX,
    LOW,
    PICKABLE,
    ROLE_NAMES,
    SINGLE,
    TEXT_ENCODER,
    VAE,
    FoundFile,
    candidates,
    wrong_task,
)

if TYPE_CHECKING:
    from wan_local.specs import TaskSpec
    from wan_local.weights.layout import CheckpointSet

HOW_TO_CHOOSE = "choose one in the Models tab, or pass --file ROLE=PATH (roles: " + ", ".join(PICKABLE) + ")"


def task_roles(spec: TaskSpec) -> tuple[str, ...]:
    """The pickable roles `spec` needs."""
    return ((HIGH, LOW) if spec.two_experts else (SINGLE,)) + (TEXT_ENCODER, VAE)


def found_summary(root: Path, found: list[FoundFile], spec: TaskSpec, layout: str | None = None) -> str:
    """ "Found: a (what); b (what) ..." plus why files that look relevant were passed over; "" for an empty list."""
    if not found:
        return f"Found no model files in {root}."
    parts = [f.describe(root) for f in found]
    notes = []
    for role in (HIGH, LOW, SINGLE):
        for item in wrong_task(found, role, spec.model_type):
            if role == HIGH or item.role == role:
                notes.append(f"{item.name(root)} is a DiT of {_task_of(item.kind)}, not of {spec.name}")
    for item in found:
        if item.role == EXPERT and item.kind == spec.model_type:
            notes.append(
                f"{item.name(root)} says neither high nor low noise in its name: rename it (…high_noise… / "
                "…low_noise…, as published) so the experts can be told apart"
            )
        if item.role == INDEX and layout == "official":
            notes.append(
                f"{item.name(root)} is ignored: there is no transformer/ folder next to it, the folder holds "
                "official files"
            )
    text = "Found: " + "; ".join(parts) + "."
    return text + (" " + ". ".join(dict.fromkeys(notes)) + "." if notes else "")


def _task_of(kind: str) -> str:
    return {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "ti2v": "ti2v-5B"}.get(kind, kind)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def resolve_picks(
    root: Path, spec: TaskSpec, found: list[FoundFile], choice: Mapping[str, str | Path] | None
) -> dict[str, Path]:
    """The chosen file for each role that has a choice or several candidates; CheckpointError when a given
    choice does not fit, or a role has several candidates and no choice."""
    choice = {role: Path(path).expanduser() for role, path in (choice or {}).items() if path}
    roles = task_roles(spec)
    unknown = sorted(set(choice) - set(PICKABLE))
    if unknown:
        raise CheckpointError(f"unknown file role(s) {', '.join(unknown)}; roles are {', '.join(PICKABLE)}")
    options = candidates(found, roles, spec.model_type, spec.vae)
    picks: dict[str, Path] = {}
    for role in roles:
        wanted = choice.get(role)
        if wanted is not None:
            match = next((f for f in found if _same(f.path, wanted if wanted.is_absolute() else root / wanted)), None)
            if match is None:
                raise CheckpointError(
                    f"the file chosen as {ROLE_NAMES[role]} of {spec.name}, {wanted}, is not a model file of {root}; "
                    f"{_listing(root, options[role], role)}"
                )
            if match not in options[role]:
                why = match.problem or f"it is a {match.what()}"
                if match.role == EXPERT and role in (HIGH, LOW):
                    word = "high" if role == HIGH else "low"
                    why += f" — rename it with the word {word} in its name (e.g. …_{word}_noise_…) and pick it again"
                raise CheckpointError(
                    f"{match.name(root)} cannot be the {ROLE_NAMES[role]} of {spec.name}: {why}; "
                    f"{_listing(root, options[role], role)}"
                )
            picks[role] = match.path
        elif len(options[role]) > 1:
            raise CheckpointError(
                f"{root} holds {len(options[role])} candidates for the {ROLE_NAMES[role]} of {spec.name}: "
                + "; ".join(f.describe(root) for f in options[role])
                + f". {HOW_TO_CHOOSE[0].upper()}{HOW_TO_CHOOSE[1:]}."
            )
    return picks


def _listing(root: Path, options: list[FoundFile], role: str) -> str:
    if not options:
        return f"the folder has no usable {ROLE_NAMES[role]} for it"
    return "candidates: " + "; ".join(f.name(root) for f in options)


def apply_picks(found: CheckpointSet, picks: Mapping[str, Path]) -> CheckpointSet:
    """`found` with the picked files in their roles."""
    dit = {role: picks.get(role, path) for role, path in found.dit.items()}
    return dataclasses.replace(
        found, dit=dit, vae=picks.get(VAE, found.vae), text_encoder=picks.get(TEXT_ENCODER, found.text_encoder)
    )


def check_components(root: Path, spec: TaskSpec, result: CheckpointSet, found: list[FoundFile]) -> None:
    """CheckpointError naming a file the recognised layout uses that is unreadable or of another task."""
    used = [*(result.dit.items()), (VAE, result.vae), (TEXT_ENCODER, result.text_encoder)]
    for role, path in used:
        item = next((f for f in found if _same(f.path, Path(path))), None)
        if item is None:
            continue
        if item.problem:
            raise CheckpointError(f"{item.name(root)} ({ROLE_NAMES[role]} of {spec.name}): {item.problem}")
        if role in (HIGH, LOW, SINGLE) and item.kind and item.kind != spec.model_type:
            raise CheckpointError(
                f"{item.name(root)} holds a DiT of {_task_of(item.kind)} ({item.kind}), but {spec.name} needs a "
                f"{spec.model_type} one: choose the folder of {spec.name}"
            )
        if role == VAE and item.kind and item.kind != spec.vae:
            raise CheckpointError(f"{item.name(root)} is the {item.kind} VAE, but {spec.name} needs the {spec.vae} one")
