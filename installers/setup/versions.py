"""Version numbers and simple requirements, read without `packaging` (nothing is installed yet when this runs)."""

from __future__ import annotations

import re
from pathlib import Path


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading dotted numbers of a version: "560.35.03" -> (560, 35, 3); "2.13.0+cu126" -> (2, 13, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def compare_versions(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """-1, 0 or 1 as `a` is older than, equal to or newer than `b`; missing parts count as 0 (12.6 == 12.6.0)."""
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def requirement_allows(requirement: str, version: str) -> bool:
    """Does `version` satisfy a simple requirement such as "torch>=2.4,<2.15" or "torch==2.13.0"?

    Handles ==, !=, >=, <=, >, <, ~= and trailing ".*" on release numbers; a local label ("+cu126") and
    pre-release suffixes are ignored, as pip does for a specifier without them. Markers and extras are not
    expected here (this only reads torch requirements).
    """
    spec = re.sub(r"^\s*[A-Za-z0-9_.\-]+\s*", "", requirement.split(";")[0])
    have = version_tuple(version.split("+")[0])
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = re.fullmatch(r"(==|!=|>=|<=|~=|>|<)\s*([0-9][0-9.]*)(\.\*)?", clause)
        if match is None:
            raise ValueError(f"cannot read the version clause {clause!r} of {requirement!r}")
        op, text, wildcard = match.groups()
        want = version_tuple(text)
        if wildcard:
            equal = have[: len(want)] == want
            ok = equal if op == "==" else not equal
        elif op == "~=":
            ok = compare_versions(have, want) >= 0 and have[: len(want) - 1] == want[:-1]
        else:
            c = compare_versions(have, want)
            ok = {"==": c == 0, "!=": c != 0, ">=": c >= 0, "<=": c <= 0, ">": c > 0, "<": c < 0}[op]
        if not ok:
            return False
    return True


def torch_requirement(pyproject: Path) -> str:
    """The torch requirement of pyproject.toml's dependencies (e.g. "torch>=2.4,<2.15"); "torch" if none."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the one line we need
        match = re.search(r"""["'](torch\s*(?:[<>=!~][^"']*)?)["']""", text)
        return match.group(1).replace(" ", "") if match else "torch"
    for dep in tomllib.loads(text).get("project", {}).get("dependencies", []):
        if re.match(r"torch\s*(?:[<>=!~;]|$)", dep):
            return dep.split(";")[0].replace(" ", "")
    return "torch"
