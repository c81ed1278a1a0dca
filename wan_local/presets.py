"""Presets: named MemoryOptions for one class of machine, the picker, and the admission check before a job.

A preset is a TOML file in presets/ (data only) that says which machines it targets (ranges of total VRAM and
total RAM, in GiB as the driver and the OS report them: a "24 GB" card reports about 23.6 GiB) and which
MemoryOptions to run with there. Invariants after `load_presets`:
- every name is unique, lower-case, and every field has been checked against its accepted values;
- a preset's `fallback` names another loaded preset of strictly lower rank, so following fallbacks always ends;
- a CPU preset is one whose VRAM range is [0, 0]; every other preset needs a CUDA GPU.

`pick_preset` chooses from the machine's totals once (what the UI pre-selects); `admit` checks one job against
what is available right now and degrades it along the fallback chain, or refuses it, before anything is loaded,
because running out of RAM does not fail cleanly: the OS pages to disk and the whole PC freezes.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_local import paths
from wan_local.errors import InputError
from wan_local.machine import GIB, MachineInfo
from wan_local.memory.options import (
    ATTENTION_BACKENDS,
    IDLE_EXPERT_POLICIES,
    OFFLOAD_MODES,
    QUANT_MODES,
    QUANT_SCOPES,
    VAE_TILING,
    MemoryOptions,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

log = logging.getLogger(__name__)

BUILTIN_PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
"""The shipped presets: presets/ at the repository root, next to the package."""

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_NAME_RULE = "1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
_MAX_GIB = 4096.0  # a range above 4 TiB is a value typed in MB, not GB
_MAX_RANK = 1000
_REQUIRED = ("name", "label", "description", "vram_min_gb", "ram_min_gb", "rank", "memory")
_OPTIONAL = ("vram_max_gb", "ram_max_gb", "fallback")
_MEMORY_CHOICES: dict[str, tuple[str, ...]] = {
    "quant": QUANT_MODES,
    "quant_scope": QUANT_SCOPES,
    "offload": OFFLOAD_MODES,
    "keep_idle_expert": IDLE_EXPERT_POLICIES,
    "vae_tiling": VAE_TILING,
    "attention": ATTENTION_BACKENDS,
}
# GiB-valued knobs: (lowest accepted, whether the lowest itself is accepted, highest accepted)
_MEMORY_GIB: dict[str, tuple[float, bool, float]] = {
    "vram_budget_gb": (0.0, False, _MAX_GIB),
    "vram_reserve_gb": (0.0, True, 64.0),
    "pinned_ram_cap_gb": (0.0, False, _MAX_GIB),
}

Estimate = Callable[[MemoryOptions], tuple[int, int]]
"""Predicts (peak_vram_bytes, peak_ram_bytes) of the job at hand when run with the given MemoryOptions."""


class PresetError(InputError):
    """A preset file (or set of files) is invalid; the message names the file, the field and what is accepted."""


@dataclass(frozen=True)
class Preset:
    """One validated preset. Ranges are closed intervals in GiB; a max of None means unbounded.

    `source` is the file it was loaded from (None for presets built in code); `fallback` is the name of the
    preset to retry with after an out-of-memory failure, always of lower rank, None for the lowest.
    """

    name: str
    label: str
    description: str
    vram_min_gb: float
    vram_max_gb: float | None
    ram_min_gb: float
    ram_max_gb: float | None
    rank: int
    memory: MemoryOptions
    fallback: str | None = None
    source: Path | None = None

    @property
    def cpu_only(self) -> bool:
        """True for a preset meant for machines without a CUDA GPU (VRAM range [0, 0])."""
        return self.vram_max_gb == 0

    def contains(self, vram_gib: float, ram_gib: float) -> bool:
        """Whether a machine with these totals (GiB) lies inside both ranges."""
        return _within(vram_gib, self.vram_min_gb, self.vram_max_gb) and _within(
            ram_gib, self.ram_min_gb, self.ram_max_gb
        )

    def meets_minimums(self, vram_gib: float, ram_gib: float) -> bool:
        """Whether a machine with these totals (GiB) has at least the preset's minimum VRAM and RAM."""
        return vram_gib >= self.vram_min_gb and ram_gib >= self.ram_min_gb

    def range_text(self) -> str:
        """The targeted ranges in words, e.g. "VRAM 20-40 GiB, RAM ≥ 56 GiB"."""
        vram = "no GPU" if self.cpu_only else f"VRAM {_span(self.vram_min_gb, self.vram_max_gb)}"
        return f"{vram}, RAM {_span(self.ram_min_gb, self.ram_max_gb)}"


@dataclass(frozen=True)
class Pick:
    """The picker's choice and the sentence the UI shows next to it; `warning` marks a poor fit."""

    preset: Preset
    reason: str
    warning: bool = False


@dataclass(frozen=True)
class Verdict:
    """Whether a job fits: `preset` is what to run with (None: refused); `message` says which and why."""

    requested: Preset
    preset: Preset | None
    message: str

    @property
    def admitted(self) -> bool:
        """True when the job may run (possibly with a lower preset)."""
        return self.preset is not None

    @property
    def degraded(self) -> bool:
        """True when the job runs, but with a lower preset than requested."""
        return self.preset is not None and self.preset.name != self.requested.name


@dataclass(frozen=True)
class Admission(Verdict):
    """The verdict of `admit`. The peaks are the estimate for `preset`, or, when refused, for the last (leanest)
    preset tried."""

    peak_vram_bytes: int = 0
    peak_ram_bytes: int = 0


# ----------------------------------------------------------------------------------------------- loading


def user_presets_dir() -> Path:
    """The per-user preset folder; a file there replaces the shipped preset of the same name."""
    return paths.config_dir() / "presets"


def load_presets(folder: Path | str | None = None, user_folder: Path | str | None = None) -> dict[str, Preset]:
    """Load and validate every *.toml preset in `folder`, then those of `user_folder`, which replace same names.

    With `folder=None` the shipped presets are loaded and `user_folder` defaults to `user_presets_dir()`; an
    explicit `folder` gets no user overrides unless `user_folder` is given. A missing user folder is skipped;
    a missing or empty `folder` is an error. Returns the presets by name, highest rank first.
    Raises PresetError naming the file, the field and the accepted values on any mistake.
    """
    if folder is None:
        folder = BUILTIN_PRESETS_DIR
        if user_folder is None:
            user_folder = user_presets_dir()
    presets = _load_folder(Path(folder))
    if not presets:
        raise PresetError(f"{folder}: no preset files (*.toml) found; the app needs at least one preset")
    if user_folder is not None and Path(user_folder).is_dir():
        for name, preset in _load_folder(Path(user_folder)).items():
            if name in presets:
                log.info("preset %r from %s replaces the one from %s", name, preset.source, presets[name].source)
            presets[name] = preset
    _check_fallbacks(presets)
    return dict(sorted(presets.items(), key=lambda item: (-item[1].rank, item[0])))


def _load_folder(folder: Path) -> dict[str, Preset]:
    if not folder.is_dir():
        raise PresetError(f"{folder}: preset folder not found (expected a folder of *.toml preset files)")
    presets: dict[str, Preset] = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".toml" and p.is_file()):
        preset = _parse_preset(path, _read_toml(path))
        if preset.name in presets:
            raise PresetError(
                f"{path}: field 'name' = {preset.name!r} is already used by {presets[preset.name].source}; "
                "accepted: a name no other file in the folder uses"
            )
        presets[preset.name] = preset
    return presets


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot be read: {exc}") from exc


def _fail(path: Path, field: str, problem: str, accepted: str) -> PresetError:
    return PresetError(f"{path}: field {field!r} {problem}; accepted: {accepted}")


def _parse_preset(path: Path, data: dict[str, Any]) -> Preset:
    allowed = (*_REQUIRED, *_OPTIONAL)
    for key in data:
        if key not in allowed:
            raise _fail(path, key, "is not a preset field", ", ".join(allowed))
    for key in _REQUIRED:
        if key not in data:
            raise _fail(path, key, "is missing", f"every preset sets {', '.join(_REQUIRED)}")
    name = _string(path, data, "name")
    if not _NAME_RE.fullmatch(name):
        raise _fail(path, "name", f"= {name!r} is not a valid name", _NAME_RULE)
    vram_min = _number(path, "vram_min_gb", data["vram_min_gb"], 0.0, _MAX_GIB)
    ram_min = _number(path, "ram_min_gb", data["ram_min_gb"], 0.0, _MAX_GIB)
    vram_max = _maximum(path, data, "vram_max_gb", vram_min)
    ram_max = _maximum(path, data, "ram_max_gb", ram_min)
    rank = data["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= _MAX_RANK:
        raise _fail(path, "rank", f"= {rank!r} is not allowed", f"a whole number from 0 to {_MAX_RANK}")
    fallback = _string(path, data, "fallback") if "fallback" in data else None
    return Preset(
        name=name,
        label=_string(path, data, "label"),
        description=_string(path, data, "description"),
        vram_min_gb=vram_min,
        vram_max_gb=vram_max,
        ram_min_gb=ram_min,
        ram_max_gb=ram_max,
        rank=rank,
        memory=_memory(path, data["memory"]),
        fallback=fallback,
        source=path,
    )


def _string(path: Path, data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, key, f"= {value!r} is not allowed", "a non-empty string in quotes")
    return value.strip()


def _number(path: Path, field: str, value: Any, low: float, high: float, low_inclusive: bool = True) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (low <= value if low_inclusive else low < value) or value > high:
        bound = "from" if low_inclusive else "above"
        raise _fail(path, field, f"= {value!r} is not allowed", f"a number of GiB {bound} {low:g} up to {high:g}")
    return float(value)


def _maximum(path: Path, data: Mapping[str, Any], key: str, minimum: float) -> float | None:
    if key not in data:
        return None
    value = _number(path, key, data[key], 0.0, _MAX_GIB)
    if value < minimum:
        low_key = key.replace("_max_", "_min_")
        raise _fail(
            path,
            key,
            f"= {value:g} is below {low_key} = {minimum:g}",
            f"a number of GiB from {minimum:g} up to {_MAX_GIB:g}, or leave {key} out for no upper bound",
        )
    return value


def _memory(path: Path, table: Any) -> MemoryOptions:
    known = MemoryOptions.field_names()
    if not isinstance(table, dict):
        raise _fail(path, "memory", "is not a table", f"a [memory] table with keys among {', '.join(known)}")
    for key, value in table.items():
        field = f"memory.{key}"
        if key not in known:
            raise _fail(path, field, "is not a MemoryOptions field", ", ".join(known))
        if key in _MEMORY_CHOICES and value not in _MEMORY_CHOICES[key]:
            raise _fail(path, field, f"= {value!r} is not allowed", ", ".join(map(repr, _MEMORY_CHOICES[key])))
        if key in _MEMORY_GIB:
            low, inclusive, high = _MEMORY_GIB[key]
            table = {**table, key: _number(path, field, value, low, high, inclusive)}
    try:
        return MemoryOptions(**table)
    except (InputError, TypeError) as exc:  # a knob added to MemoryOptions that this module does not check
        raise PresetError(f"{path}: [memory] is not accepted by MemoryOptions: {exc}") from exc


def _check_fallbacks(presets: Mapping[str, Preset]) -> None:
    for preset in presets.values():
        if preset.fallback is None:
            continue
        target = presets.get(preset.fallback)
        if target is None or target.rank >= preset.rank:
            lower = sorted(p.name for p in presets.values() if p.rank < preset.rank)
            problem = "names no loaded preset" if target is None else f"has rank {target.rank}, not below {preset.rank}"
            accepted = f"the name of a lower-ranked preset ({', '.join(lower) or 'there is none'})"
            raise _fail(preset.source or Path(preset.name), "fallback", f"= {preset.fallback!r} {problem}", accepted)


def fallback_chain(preset: Preset, presets: Mapping[str, Preset]) -> list[Preset]:
    """`preset` followed by its fallback, the fallback's fallback, ... down to the lowest (ranks strictly fall)."""
    chain = [preset]
    while chain[-1].fallback is not None:
        nxt = presets.get(chain[-1].fallback)
        if nxt is None or nxt.rank >= chain[-1].rank:
            raise PresetError(f"preset {chain[-1].name!r}: fallback {chain[-1].fallback!r} is missing or not lower")
        chain.append(nxt)
    return chain


# ----------------------------------------------------------------------------------------------- picking


def pick_preset(machine: MachineInfo, presets: Mapping[str, Preset]) -> Pick:
    """The preset for this machine, from its total VRAM and RAM (GiB), with the reason shown in the UI.

    1. The highest-ranked preset whose ranges contain the machine (no GPU: only CPU presets count).
    2. Else the highest-ranked one whose minimums the machine meets (it exceeds some maximum).
    3. Else the lowest-ranked one of its kind, with a warning: the machine is below every preset.
    A machine with a GPU but no GPU preset loaded gets a CPU preset (with a warning).
    """
    if not presets:
        raise PresetError("no presets are loaded; cannot pick one")
    vram, ram = machine.vram_total_bytes / GIB, machine.ram_total_bytes / GIB
    have = f"{vram:.1f} GiB VRAM and {ram:.1f} GiB RAM" if machine.has_gpu else f"no CUDA GPU and {ram:.1f} GiB RAM"
    kind = [p for p in presets.values() if p.cpu_only != machine.has_gpu]
    if not kind:
        other = _best(presets.values())
        reason = f"This machine has {have}, but no preset of its kind is loaded; using '{other.label}'."
        return Pick(other, reason, warning=True)
    inside = [p for p in kind if p.contains(vram, ram)]
    if inside:
        best = _best(inside)
        return Pick(best, f"'{best.label}' fits this machine ({have}; it targets {best.range_text()}).")
    below = [p for p in kind if p.meets_minimums(vram, ram)]
    if below:
        best = _best(below)
        return Pick(
            best,
            f"No preset targets exactly {have}; using '{best.label}' ({best.range_text()}), "
            "the best one whose minimums this machine meets.",
        )
    lowest = min(kind, key=lambda p: (p.rank, p.name))
    return Pick(
        lowest,
        f"This machine ({have}) has less than even the smallest preset expects ('{lowest.label}': "
        f"{lowest.range_text()}). Using it anyway: jobs that would not fit are degraded or refused before "
        "they start; try TI2V-5B, a smaller size or fewer frames.",
        warning=True,
    )


def _best(presets: Any) -> Preset:
    return max(presets, key=lambda p: (p.rank, p.vram_min_gb, p.ram_min_gb, p.name))


# ----------------------------------------------------------------------------------------------- admission


def ram_safety_margin_bytes(machine: MachineInfo) -> int:
    """RAM kept free for the OS and other programs: 10 % of the total, at least 2 GiB."""
    return max(2 * GIB, machine.ram_total_bytes // 10)


def admit(
    estimate: Estimate,
    machine: MachineInfo,
    preset: Preset,
    presets: Mapping[str, Preset],
    *,
    ram_margin_bytes: int | None = None,
    refused: str = "Not started",
) -> Admission:
    """Check a job against the machine now; degrade it along `preset`'s fallback chain or refuse it.

    `estimate(options)` returns the job's predicted (peak_vram_bytes, peak_ram_bytes) with those options, or
    raises PlanError when the planner finds they cannot work (that preset then does not fit, for the planner's
    reason). A preset fits when its peak RAM is at most `machine.ram_available_bytes - margin` (default
    `ram_safety_margin_bytes`: going past it makes the OS page and the PC freeze) and its peak VRAM is at most
    the card's total (CPU presets: no VRAM check). The first preset of the chain that fits is returned.
    `refused` starts the message of a refusal ("Not started" in the worker, "Not queued" in the UI).
    """
    from wan_local.memory.plan import PlanError  # imported here: the planner is not needed to load presets

    margin = ram_safety_margin_bytes(machine) if ram_margin_bytes is None else ram_margin_bytes
    ram_limit = machine.ram_available_bytes - margin
    problems: list[str] = []
    vram_peak = ram_peak = 0
    for candidate in fallback_chain(preset, presets):
        try:
            vram_peak, ram_peak = estimate(candidate.memory)
        except PlanError as exc:
            problems.append(f"with '{candidate.label}': {exc}")
            continue
        problem = _overrun(candidate, vram_peak, ram_peak, machine, ram_limit, margin)
        if problem is None:
            fits = f"fits in {_gib(ram_limit)} of usable RAM" + (
                "" if candidate.cpu_only else f" and the card's {_gib(machine.vram_total_bytes)}"
            )
            if candidate is preset:
                message = f"Fits with '{preset.label}': {fits}."
                return Admission(preset, candidate, message, vram_peak, ram_peak)
            message = (
                f"Runs with '{candidate.label}' instead of '{preset.label}' ({'; '.join(problems)}); "
                f"with '{candidate.label}' it {fits}." + _paging_note(problems)
            )
            log.debug("degraded: %s", message)  # a verdict, not an event: predictions ask this on every edit
            return Admission(preset, candidate, message, vram_peak, ram_peak)
        problems.append(f"with '{candidate.label}' it {problem}")
    message = (
        f"{refused}: this job does not fit this machine with any preset it can fall back to "
        f"({'; '.join(problems)}). Try fewer frames, a smaller size or TI2V-5B, or close other programs to free "
        "RAM." + _paging_note(problems)
    )
    log.debug("does not fit: %s", message)  # logged as "job refused" only where a job is refused (engine.admit)
    return Admission(preset, None, message, vram_peak, ram_peak)


def _overrun(
    preset: Preset, vram_peak: int, ram_peak: int, machine: MachineInfo, ram_limit: int, margin: int
) -> str | None:
    if not preset.cpu_only and not machine.has_gpu:
        return "needs a CUDA GPU, and none was found"
    if not preset.cpu_only and vram_peak > machine.vram_total_bytes:
        return f"would need {_gib(vram_peak)} VRAM, more than the card's {_gib(machine.vram_total_bytes)}"
    if ram_peak > ram_limit:
        return (
            f"would need {_gib(ram_peak)} RAM, more than the {_gib(ram_limit)} usable "
            f"({_gib(machine.ram_available_bytes)} available minus {_gib(margin)} kept free)"
        )
    return None


def _paging_note(problems: list[str]) -> str:
    if any(" RAM, more than " in problem or " of RAM " in problem for problem in problems):
        return " (RAM is kept free because going past it makes the OS page to disk and the whole PC freeze.)"
    return ""


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


def _within(value: float, low: float, high: float | None) -> bool:
    return low <= value and (high is None or value <= high)


def _span(low: float, high: float | None) -> str:
    return f"≥ {low:g} GiB" if high is None else f"{low:g}-{high:g} GiB"
