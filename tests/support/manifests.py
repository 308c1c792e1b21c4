"""The one factory of FineTuneJob documents for tests."""

from __future__ import annotations

import copy
from typing import Any

from kubetune import api

# The smallest valid spec: S3 locations that are never read (schema, render and status tests).
MINIMAL_SPEC: dict[str, Any] = {
    "model": {"source": "s3://models/base"},
    "dataset": {
        "source": "s3://data/train.jsonl",
        "license": {"name": "CC-BY-4.0", "usage": "research"},
    },
    "training": {"epochs": 1},
    "output": {"destination": "s3://out/demo"},
}


def document(
    spec: dict[str, Any], *, name: str = "demo", namespace: str | None = None
) -> dict[str, Any]:
    """A FineTuneJob manifest around ``spec`` (copied)."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": metadata,
        "spec": copy.deepcopy(spec),
    }


def minimal() -> dict[str, Any]:
    return document(MINIMAL_SPEC)


def with_spec(**changes: Any) -> dict[str, Any]:
    """minimal() with spec fields set; `a__b=v` sets spec.a.b = v."""
    result = minimal()
    for dotted, value in changes.items():
        node = result["spec"]
        *parents, leaf = dotted.split("__")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return result
