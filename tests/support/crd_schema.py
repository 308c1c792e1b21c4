"""Validate custom resources the way the API server would: the generated CRD's OpenAPI schema
(jsonschema, Draft 4 semantics as in Kubernetes) plus its CEL rules (cel-python)."""

from __future__ import annotations

from functools import cache
from typing import Any

import celpy
import jsonschema

from kubetune import crd


@cache
def schema() -> dict[str, Any]:
    return crd.spec_and_status_schema()


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(schema())
    return [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def _rules(node: dict[str, Any], value: Any, old: Any, path: str) -> list[str]:
    """Evaluate x-kubernetes-validations of `node` on `value` and recurse into properties."""
    failures: list[str] = []
    env = celpy.Environment()
    for rule in node.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue  # transition rules only run on update
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = env.program(env.compile(rule["rule"])).evaluate(activation)
        if not bool(result):
            failures.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name in value:
                child_old = old.get(name) if isinstance(old, dict) else None
                failures += _rules(child, value[name], child_old, f"{path}.{name}".lstrip("."))
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            failures += _rules(node["items"], item, None, f"{path}[{i}]")
    return failures


def cel_errors(document: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """CEL rule failures for a create (old=None) or an update from `old`."""
    return _rules(schema(), document, old, "")
