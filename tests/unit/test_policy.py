"""The license policy lives in the operator's package: the operator never imports the trainer
(its image does not ship torch & co.)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kubetune import api
from kubetune.policy import license_problem

OPERATOR = Path(__file__).resolve().parents[2] / "operator" / "kubetune"
# Local commands of the CLI run the trainer in-process; they import it inside the command.
LOCAL_COMMANDS = {"cli.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_operator_never_imports_the_trainer() -> None:
    offenders = {
        path.name: sorted(n for n in _imports(path) if n.split(".")[0] == "kubetune_trainer")
        for path in sorted(OPERATOR.glob("*.py"))
        if path.name not in LOCAL_COMMANDS
    }
    assert {name: found for name, found in offenders.items() if found} == {}


@pytest.mark.parametrize(
    ("name", "usage", "allowed", "problem"),
    [
        ("CC-BY-4.0", "commercial", None, None),
        ("unknown", "research", None, "spec.dataset.license.name: 'unknown' is not a license"),
        ("MIT", "research", ["CC-BY-4.0"], "license 'MIT' is not allowed by the platform policy"),
        ("CC-BY-NC-4.0", "commercial", None, "'CC-BY-NC-4.0' does not allow commercial use"),
    ],
)
def test_license_problem(name: str, usage: str, allowed: list[str] | None, problem: str) -> None:
    license = api.LicenseSpec.model_validate({"name": name, "usage": usage})
    found = license_problem(license, api.Policy(allowedLicenses=allowed))
    assert (found is None) if problem is None else (found is not None and problem in found)
