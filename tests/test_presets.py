"""Presets: the shipped files load, every kind of mistake is reported precisely, the picker and admission."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import wan_local.presets as presets_mod
from wan_local.machine import GIB, MachineInfo
from wan_local.memory.options import OFFLOAD_MODES, QUANT_MODES, MemoryOptions
from wan_local.presets import (
    BUILTIN_PRESETS_DIR,
    Preset,
    PresetError,
    admit,
    fallback_chain,
    load_presets,
    pick_preset,
    ram_safety_margin_bytes,
    tomllib,
)

SHIPPED = ("cpu", "gpu16-ram32", "gpu16-ram64", "gpu24-ram32", "gpu24-ram64", "gpu48-ram64")


@pytest.fixture(scope="module")
def shipped() -> dict[str, Preset]:
    return load_presets(BUILTIN_PRESETS_DIR)


def _machine(vram_gib: float | None, ram_gib: float, available_gib: float | None = None) -> MachineInfo:
    """A machine as detect_machine reports it; vram_gib=None means no CUDA GPU."""
    vram = 0 if vram_gib is None else int(vram_gib * GIB)
    return MachineInfo(
        gpu_name=None if vram_gib is None else "Test GPU",
        vram_total_bytes=vram,
        vram_free_bytes=vram,
        cuda_capability=None if vram_gib is None else (8, 9),
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=int((ram_gib * 0.8 if available_gib is None else available_gib) * GIB),
        disk_free_bytes=500 * GIB,
    )


# ----------------------------------------------------------------------------------------------- shipped data


def test_every_shipped_preset_loads(shipped: dict[str, Preset]) -> None:
    assert set(SHIPPED) <= set(shipped)
    assert len(list(BUILTIN_PRESETS_DIR.glob("*.toml"))) == len(shipped)
    ranks = [p.rank for p in shipped.values()]
    assert ranks == sorted(ranks, reverse=True), "load_presets returns the highest rank first"
    for preset in shipped.values():
        assert isinstance(preset.memory, MemoryOptions)
        assert preset.label and len(preset.description) > 100, f"{preset.name}: the description must say why"
        assert preset.source is not None and preset.source.parent == BUILTIN_PRESETS_DIR


def test_shipped_presets_set_every_knob_explicitly() -> None:
    knobs = set(MemoryOptions.field_names()) - {"vram_budget_gb"}  # the budget is measured, never fixed
    for path in BUILTIN_PRESETS_DIR.glob("*.toml"):
        memory = tomllib.loads(path.read_text(encoding="utf-8"))["memory"]
        unset = knobs - set(memory)
        # The CPU preset leaves pinned_ram_cap_gb unset: nothing is transferred to a card.
        assert unset <= ({"pinned_ram_cap_gb"} if path.stem == "cpu" else set()), f"{path.name}: {unset}"


def test_shipped_fallbacks_never_need_more_memory(shipped: dict[str, Preset]) -> None:
    assert shipped["cpu"].fallback is None and shipped["gpu16-ram32"].fallback is None
    for preset in shipped.values():
        chain = fallback_chain(preset, shipped)
        assert chain[-1].name == ("cpu" if preset.cpu_only else "gpu16-ram32")
        for higher, lower in itertools.pairwise(chain):
            assert lower.rank < higher.rank
            assert lower.vram_min_gb <= higher.vram_min_gb and lower.ram_min_gb <= higher.ram_min_gb
    assert [p.name for p in fallback_chain(shipped["gpu48-ram64"], shipped)] == [
        "gpu48-ram64",
        "gpu24-ram64",
        "gpu24-ram32",
        "gpu16-ram32",
    ]


def test_shipped_presets_follow_the_budget_arithmetic(shipped: dict[str, Preset]) -> None:
    # budgets.md "What fits": 8-bit blocks below 48 GB; two 8-bit experts (28.6 GB) only with 64 GB of RAM.
    for name in ("gpu16-ram32", "gpu16-ram64", "gpu24-ram32", "gpu24-ram64"):
        assert shipped[name].memory.quant == "int8"
    assert shipped["gpu48-ram64"].memory.quant == "none" and shipped["gpu48-ram64"].memory.offload == "none"
    for name, preset in shipped.items():
        if name != "cpu":
            expected = "keep" if preset.ram_min_gb >= 56 else "drop"
            assert preset.memory.keep_idle_expert == expected, name
    assert shipped["gpu16-ram32"].memory.vae_tiling == "on"
    assert shipped["gpu16-ram32"].memory.offload == "blocks"


# ----------------------------------------------------------------------------------------------- validation


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _write(folder: Path, stem: str, data: dict[str, Any]) -> Path:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _valid(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "mine",
        "label": "Mine",
        "description": "A test preset.",
        "vram_min_gb": 14,
        "vram_max_gb": 20.0,
        "ram_min_gb": 28,
        "ram_max_gb": 56,
        "rank": 10,
        "memory": {"quant": "int8", "offload": "blocks", "vram_reserve_gb": 1.5},
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def _memory(**changes: Any) -> dict[str, Any]:
    return {"quant": "int8", "offload": "blocks", **changes}


def test_a_valid_file_loads_with_defaults_for_unset_knobs(tmp_path: Path) -> None:
    _write(tmp_path, "mine", _valid(vram_max_gb=None))
    preset = load_presets(tmp_path)["mine"]
    assert preset.vram_max_gb is None and preset.fallback is None and preset.source == tmp_path / "mine.toml"
    assert preset.memory == MemoryOptions(quant="int8", offload="blocks", vram_reserve_gb=1.5)
    assert preset.contains(100.0, 30.0) and not preset.contains(100.0, 60.0) and not preset.contains(13.9, 30.0)


CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown key", {"colour": "red"}, ["'colour'", "not a preset field", "vram_min_gb", "fallback"]),
    ("missing key", {"rank": None}, ["'rank'", "is missing", "every preset sets"]),
    ("rank is a string", {"rank": "high"}, ["'rank'", "'high'", "whole number from 0 to 1000"]),
    ("rank is a bool", {"rank": True}, ["'rank'", "whole number from 0 to 1000"]),
    ("rank is a float", {"rank": 1.5}, ["'rank'", "whole number"]),
    ("vram is a string", {"vram_min_gb": "16"}, ["'vram_min_gb'", "'16'", "number of GiB from 0 up to 4096"]),
    ("negative ram", {"ram_min_gb": -1}, ["'ram_min_gb'", "-1", "from 0 up to 4096"]),
    ("megabytes typed as GB", {"vram_min_gb": 16000}, ["'vram_min_gb'", "16000", "up to 4096"]),
    ("vram min > max", {"vram_min_gb": 24, "vram_max_gb": 16}, ["'vram_max_gb'", "below vram_min_gb = 24", "from 24"]),
    ("ram min > max", {"ram_min_gb": 64, "ram_max_gb": 32}, ["'ram_max_gb'", "below ram_min_gb = 64", "no upper"]),
    ("label empty", {"label": "  "}, ["'label'", "non-empty string"]),
    ("description not a string", {"description": 3}, ["'description'", "non-empty string"]),
    ("bad name", {"name": "My Preset"}, ["'name'", "'My Preset'", "a-z, 0-9"]),
    ("memory not a table", {"memory": "int8"}, ["'memory'", "not a table", "quant_scope"]),
    (
        "unknown memory key",
        {"memory": _memory(colour="red")},
        ["'memory.colour'", "not a MemoryOptions field", "keep_idle_expert", "pinned_ram_cap_gb"],
    ),
    (
        "unknown quant",
        {"memory": _memory(quant="int4")},
        ["'memory.quant'", "'int4'", ", ".join(map(repr, QUANT_MODES))],
    ),
    (
        "unknown offload",
        {"memory": _memory(offload="partial")},
        ["'memory.offload'", "'partial'", ", ".join(map(repr, OFFLOAD_MODES))],
    ),
    ("quant is a number", {"memory": _memory(quant=8)}, ["'memory.quant'", "8", "'int8'"]),
    ("negative reserve", {"memory": _memory(vram_reserve_gb=-1)}, ["'memory.vram_reserve_gb'", "from 0 up to 64"]),
    ("zero pinned cap", {"memory": _memory(pinned_ram_cap_gb=0)}, ["'memory.pinned_ram_cap_gb'", "above 0"]),
    ("pinned cap string", {"memory": _memory(pinned_ram_cap_gb="6")}, ["'memory.pinned_ram_cap_gb'", "'6'"]),
    ("fallback unknown", {"fallback": "nope"}, ["'fallback'", "'nope'", "names no loaded preset", "lower-ranked"]),
    ("fallback empty", {"fallback": ""}, ["'fallback'", "non-empty string"]),
]


@pytest.mark.parametrize(("changes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_mistake_names_file_field_and_accepted_values(
    tmp_path: Path, changes: dict[str, Any], expected: list[str]
) -> None:
    path = _write(tmp_path, "broken", _valid(**changes))
    with pytest.raises(PresetError) as err:
        load_presets(tmp_path)
    message = str(err.value)
    assert str(path) in message and "accepted:" in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_fallback_must_have_a_lower_rank(tmp_path: Path) -> None:
    _write(tmp_path, "low", _valid(name="low", rank=5))
    path = _write(tmp_path, "high", _valid(name="high", rank=9, fallback="top"))
    _write(tmp_path, "top", _valid(name="top", rank=20))
    with pytest.raises(PresetError) as err:
        load_presets(tmp_path)
    message = str(err.value)
    assert str(path) in message and "'fallback'" in message and "rank 20, not below 9" in message
    assert "(low)" in message  # the accepted names: only lower-ranked presets


def test_duplicate_names_name_both_files(tmp_path: Path) -> None:
    first = _write(tmp_path, "a", _valid(name="same"))
    second = _write(tmp_path, "b", _valid(name="same"))
    with pytest.raises(PresetError) as err:
        load_presets(tmp_path)
    message = str(err.value)
    assert str(second) in message and str(first) in message and "'name'" in message and "'same'" in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nrank = \n', encoding="utf-8")
    with pytest.raises(PresetError, match="not valid TOML") as err:
        load_presets(tmp_path)
    assert str(path) in str(err.value)


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="preset folder not found"):
        load_presets(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("not a preset", encoding="utf-8")
    with pytest.raises(PresetError, match=r"no preset files \(\*\.toml\)"):
        load_presets(tmp_path)


def test_user_folder_overrides_same_named_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "user"
    override = _valid(name="gpu24-ram64", rank=40, vram_min_gb=20, vram_max_gb=40, ram_min_gb=56, ram_max_gb=None)
    override["fallback"] = "gpu24-ram32"  # a user preset may fall back to a shipped one
    override["memory"] = {"quant": "fp8", "quant_scope": "ffn"}
    _write(user, "my-4090", override)
    _write(user, "extra", _valid(name="extra", rank=45, vram_min_gb=20, fallback="gpu16-ram32"))
    monkeypatch.setattr(presets_mod, "user_presets_dir", lambda: user)
    loaded = load_presets()
    assert set(SHIPPED) | {"extra"} == set(loaded)
    assert loaded["gpu24-ram64"].memory.quant == "fp8" and loaded["gpu24-ram64"].source == user / "my-4090.toml"
    assert loaded["gpu24-ram32"].source == BUILTIN_PRESETS_DIR / "gpu24-ram32.toml"
    # An explicit folder gets no user overrides unless asked for.
    assert load_presets(BUILTIN_PRESETS_DIR)["gpu24-ram64"].memory.quant == "int8"
    assert load_presets(BUILTIN_PRESETS_DIR, user_folder=user)["gpu24-ram64"].memory.quant == "fp8"


def test_missing_user_folder_is_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(presets_mod, "user_presets_dir", lambda: tmp_path / "absent")
    assert set(load_presets()) == set(SHIPPED)


def test_broken_user_preset_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _write(tmp_path, "mine", _valid(fallback="gpu99"))
    monkeypatch.setattr(presets_mod, "user_presets_dir", lambda: tmp_path)
    with pytest.raises(PresetError, match="'fallback'") as err:
        load_presets()
    assert str(path) in str(err.value) and "gpu16-ram32" not in str(err.value)  # rank 10: nothing is lower


# ----------------------------------------------------------------------------------------------- picker

# Totals as the driver and the OS report them: a "16 GB" card 15.7 GiB, a 4090 23.6, an RTX 6000 Ada 47.5,
# an H100 79.1; 32 GB of RAM 31.3 GiB, 64 GB 62.7, 128 GB 125.7.
PICKS: list[tuple[float | None, float, str, bool]] = [
    (None, 15.6, "cpu", False),
    (None, 4.0, "cpu", True),
    (15.7, 31.3, "gpu16-ram32", False),
    (15.7, 46.9, "gpu16-ram32", False),  # 48 GB kits count as the 32 GB class
    (15.7, 62.7, "gpu16-ram64", False),
    (23.6, 31.3, "gpu24-ram32", False),
    (23.6, 62.7, "gpu24-ram64", False),
    (31.4, 94.0, "gpu24-ram64", False),  # RTX 5090, 96 GB: int8 resident
    (47.5, 125.7, "gpu48-ram64", False),
    (79.1, 125.7, "gpu48-ram64", False),
    (47.5, 31.3, "gpu24-ram32", False),  # no preset targets it: best one whose minimums it meets
    (11.8, 15.6, "gpu16-ram32", True),  # below every preset: the lowest GPU preset, with a warning
    (23.6, 15.6, "gpu16-ram32", True),
]


@pytest.mark.parametrize(("vram", "ram", "expected", "warning"), PICKS)
def test_picker_table(shipped: dict[str, Preset], vram: float | None, ram: float, expected: str, warning: bool) -> None:
    pick = pick_preset(_machine(vram, ram), shipped)
    assert (pick.preset.name, pick.warning) == (expected, warning), pick.reason
    assert f"{ram:.1f} GiB RAM" in pick.reason and pick.preset.label in pick.reason
    assert (f"{vram:.1f} GiB VRAM" if vram else "no CUDA GPU") in pick.reason


def test_picker_reasons_say_why(shipped: dict[str, Preset]) -> None:
    assert "fits this machine" in pick_preset(_machine(23.6, 62.7), shipped).reason
    assert "No preset targets exactly" in pick_preset(_machine(47.5, 31.3), shipped).reason
    low = pick_preset(_machine(11.8, 15.6), shipped).reason
    assert "less than even the smallest preset" in low and "VRAM 14-20 GiB, RAM 28-56 GiB" in low


def test_picker_without_presets_of_the_machines_kind(shipped: dict[str, Preset]) -> None:
    only_cpu = {"cpu": shipped["cpu"]}
    pick = pick_preset(_machine(23.6, 62.7), only_cpu)
    assert pick.preset.name == "cpu" and pick.warning and "no preset of its kind" in pick.reason
    with pytest.raises(PresetError, match="no presets"):
        pick_preset(_machine(23.6, 62.7), {})


# ----------------------------------------------------------------------------------------------- admission


def _fake_estimate(presets: dict[str, Preset], peaks: dict[str, tuple[int, int]], calls: list[str]) -> Callable:
    """An estimate that answers per preset (looked up by its MemoryOptions) and records what it was asked."""
    by_options = {p.memory: name for name, p in presets.items()}
    assert len(by_options) == len(presets), "shipped presets must differ in their MemoryOptions"

    def estimate(options: MemoryOptions) -> tuple[int, int]:
        name = by_options[options]
        calls.append(name)
        return peaks[name]

    return estimate


def _gib(value: float) -> int:
    return int(value * GIB)


def test_admitted_when_it_fits(shipped: dict[str, Preset]) -> None:
    calls: list[str] = []
    estimate = _fake_estimate(shipped, {"gpu24-ram64": (_gib(18), _gib(30))}, calls)
    result = admit(estimate, _machine(23.6, 62.7, available_gib=50), shipped["gpu24-ram64"], shipped)
    assert result.admitted and not result.degraded and result.preset is shipped["gpu24-ram64"]
    assert calls == ["gpu24-ram64"] and (result.peak_vram_bytes, result.peak_ram_bytes) == (_gib(18), _gib(30))
    assert result.message.startswith("Fits with '24 GB VRAM · 64 GB RAM'")


def test_ram_overrun_degrades_to_the_fallback(shipped: dict[str, Preset]) -> None:
    calls: list[str] = []
    peaks = {"gpu24-ram64": (_gib(18), _gib(45)), "gpu24-ram32": (_gib(18), _gib(25))}
    result = admit(_fake_estimate(shipped, peaks, calls), _machine(23.6, 62.7, 50), shipped["gpu24-ram64"], shipped)
    assert result.degraded and result.preset is shipped["gpu24-ram32"] and calls == ["gpu24-ram64", "gpu24-ram32"]
    assert result.peak_ram_bytes == _gib(25)
    labels = "'24 GB VRAM · 32 GB RAM' instead of '24 GB VRAM · 64 GB RAM'"
    for fragment in (labels, "would need 45.0 GiB RAM, more than the", "page to disk"):
        assert fragment in result.message


def test_vram_overrun_degrades_down_the_chain(shipped: dict[str, Preset]) -> None:
    calls: list[str] = []
    peaks = {
        "gpu24-ram64": (_gib(25), _gib(30)),
        "gpu24-ram32": (_gib(24), _gib(20)),
        "gpu16-ram32": (_gib(14), _gib(20)),
    }
    result = admit(_fake_estimate(shipped, peaks, calls), _machine(23.6, 62.7, 50), shipped["gpu24-ram64"], shipped)
    assert result.preset is shipped["gpu16-ram32"] and calls == ["gpu24-ram64", "gpu24-ram32", "gpu16-ram32"]
    assert "25.0 GiB VRAM, more than the card's 23.6 GiB" in result.message
    assert "24.0 GiB VRAM" in result.message


def test_refused_when_no_fallback_fits(shipped: dict[str, Preset]) -> None:
    calls: list[str] = []
    peaks = {name: (_gib(30), _gib(70)) for name in shipped}
    peaks["gpu16-ram32"] = (_gib(15), _gib(60))
    result = admit(_fake_estimate(shipped, peaks, calls), _machine(23.6, 62.7, 50), shipped["gpu24-ram64"], shipped)
    assert not result.admitted and not result.degraded and result.preset is None
    assert calls == ["gpu24-ram64", "gpu24-ram32", "gpu16-ram32"]
    assert (result.peak_vram_bytes, result.peak_ram_bytes) == (_gib(15), _gib(60))  # the leanest one tried
    assert result.message.startswith("Not started") and "60.0 GiB RAM" in result.message
    for preset in ("gpu24-ram64", "gpu24-ram32", "gpu16-ram32"):
        assert f"'{shipped[preset].label}'" in result.message


def test_lowest_preset_is_refused_without_retry(shipped: dict[str, Preset]) -> None:
    calls: list[str] = []
    peaks = {"gpu16-ram32": (_gib(10), _gib(30))}
    machine = _machine(15.7, 31.3, available_gib=24)
    result = admit(_fake_estimate(shipped, peaks, calls), machine, shipped["gpu16-ram32"], shipped)
    assert not result.admitted and calls == ["gpu16-ram32"]


def test_ram_margin_boundary(shipped: dict[str, Preset]) -> None:
    machine = _machine(23.6, 62.7, available_gib=50)
    limit = machine.ram_available_bytes - _gib(4)
    for peak_ram, expected in ((limit, "gpu24-ram64"), (limit + 1, "gpu24-ram32")):
        peaks = {"gpu24-ram64": (_gib(18), peak_ram), "gpu24-ram32": (_gib(18), _gib(10))}
        estimate = _fake_estimate(shipped, peaks, [])
        result = admit(estimate, machine, shipped["gpu24-ram64"], shipped, ram_margin_bytes=_gib(4))
        assert result.preset is not None and result.preset.name == expected


def test_default_ram_margin() -> None:
    # 10 % of the total, never less than 2 GiB.
    assert ram_safety_margin_bytes(_machine(23.6, 64.0)) == _gib(64) // 10
    assert ram_safety_margin_bytes(_machine(23.6, 16.0)) == 2 * GIB


def test_cpu_preset_skips_the_vram_check_and_gpu_presets_need_a_gpu(shipped: dict[str, Preset]) -> None:
    machine = _machine(None, 31.3, available_gib=25)
    peaks = {"cpu": (_gib(4), _gib(10)), "gpu16-ram32": (_gib(10), _gib(10))}
    result = admit(_fake_estimate(shipped, peaks, []), machine, shipped["cpu"], shipped)
    assert result.admitted and result.preset is shipped["cpu"]
    refused = admit(_fake_estimate(shipped, peaks, []), machine, shipped["gpu16-ram32"], shipped)
    assert not refused.admitted and "needs a CUDA GPU" in refused.message
