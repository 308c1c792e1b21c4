"""Small FineTuneJob documents for tests."""

from __future__ import annotations

from typing import Any


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"source": "s3://models/base"},
            "dataset": {
                "source": "s3://data/train.jsonl",
                "license": {"name": "CC-BY-4.0", "usage": "research"},
            },
            "training": {"epochs": 1},
            "output": {"destination": "s3://out/demo"},
        },
    }


def with_spec(**changes: Any) -> dict[str, Any]:
    """minimal() with spec fields set; `a__b=v` sets spec.a.b = v."""
    document = minimal()
    for dotted, value in changes.items():
        node = document["spec"]
        *parents, leaf = dotted.split("__")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return document
