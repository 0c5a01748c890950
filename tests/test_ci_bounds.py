"""The low-end CI environment tests exactly the minimums pyproject.toml declares.

`.ci/run` installs the project once at the newest releases and once with `-c .ci/constraints-lowest.txt`; that second
run only proves the declared lower bounds work if each `>=` bound in pyproject.toml is the version pinned there.
"""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def declared_minimums() -> dict[str, str]:
    """{package: minimum} over the dependencies and every extra (the project's own extras excluded)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    minimums = {}
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(project["name"]):
            continue
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{line!r}: every dependency declares one '>=' lower bound"
        assert minimums.setdefault(name, lower[0]) == lower[0], f"{name}: different minimums in different extras"
    return minimums


def lowest_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line!r}: the low end pins exact versions"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_lowest_constraints_pin_every_declared_minimum():
    """Every declared minimum is pinned at exactly that version in the low-end constraints, and nothing else is."""
    assert lowest_pins() == declared_minimums()
