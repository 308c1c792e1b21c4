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


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, dicts key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def cluster_run(name: str, bucket: str, endpoint: str, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob that really runs on the test cluster in seconds: a small LoRA of the demo
    model, model, data and output in ``bucket`` of the S3 server at ``endpoint`` (credentials in
    the Secret ``s3-credentials``, see Cluster.s3_credentials). ``spec`` is merged into it,
    section by section."""
    base: dict[str, Any] = {
        "model": {"source": f"s3://{bucket}/model"},
        "dataset": {
            "source": f"s3://{bucket}/data/train.jsonl",
            "format": "alpaca",
            "license": {"name": "CC0-1.0", "usage": "research"},
            "maxSeqLength": 96,
        },
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "training": {"maxSteps": 2, "batchSize": 8, "evalEverySteps": 2},
        "evaluation": {
            "maxSamples": 4,
            "maxNewTokens": 2,
            "metrics": ["loss"],
            "gates": [{"metric": "tuned.loss", "op": "<", "value": 100}],
        },
        "output": {"destination": f"s3://{bucket}/runs/{name}"},
        "storage": {
            "s3": {
                "endpoint": endpoint,
                "region": "us-east-1",
                "credentialsSecret": "s3-credentials",
            }
        },
        "resources": {"gpus": 0},
    }
    return document(_merged(base, spec), name=name)
