"""output.registry.mlflow end to end on the real control plane: kubectl applies a FineTuneJob,
the operator (as the chart's ServiceAccount) creates the Job, the process kubelet runs the real
trainer on the demo model from moto S3, and the trainer pod talks to a real `mlflow server`
(SQLite, on loopback) started by the test.

- Without spec.staging every gate is known when training ends: the trainer logs the run,
  registers the version (source: the adapter's committed s3:// URI) with aliases staging and
  production, and status.promotion says Promoted. The staging path (the operator's promote Job
  moving production after the load test) is in test_staging_e2e.py.
- An unreachable registry: the trainer exits 11 after committing its artifacts; the FineTuneJob
  fails with a message naming the registry and the cause, status.artifacts keeps the URIs (and
  the objects are in S3), status.promotion is Failed, condition Promoted is PromotionFailed.

Needs scripts/install-mlflow.sh (.tools/mlflow).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import manifests
from tests.support import s3 as s3_support
from tests.support.cluster import Cluster, demo_bucket
from tests.support.mlflow_server import MlflowServer, free_port, mlflow_server

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

MODEL = "e2e-bot"


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    return demo_bucket(s3_server)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[Cluster]:
    cluster.s3_credentials()
    yield cluster


def manifest(name: str, bucket: str, endpoint: str, tracking_uri: str) -> str:
    registry = {"mlflow": {"trackingUri": tracking_uri, "model": MODEL, "timeoutSeconds": 10}}
    doc = manifests.cluster_run(
        name,
        bucket,
        endpoint,
        output={"registry": registry},
        # Exit 11 (registry unreachable) would be retried; once is enough to see it.
        runPolicy={"backoffLimit": 0},
    )
    return yaml.safe_dump(doc)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def committed(endpoint: str, uri: str) -> bool:
    """The artifact's manifest.json (its commit marker) is in S3."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client = s3_support.client(endpoint)
    found = client.list_objects_v2(Bucket=bucket, Prefix=f"{key.rstrip('/')}/manifest.json")
    return bool(found.get("Contents"))


def test_without_staging_the_trainer_registers_and_promotes(
    ns: Cluster, bucket: str, s3_server: str, registry: MlflowServer
) -> None:
    ns.apply(manifest("reg-ok", bucket, s3_server, registry.uri))
    status = ns.wait_phase("reg-ok", "Succeeded", timeout=240)
    promoted = status["promotion"]
    assert promoted["state"] == "Promoted", promoted
    record = promoted["registry"]
    assert record["aliases"] == ["staging", "production"] and record["model"] == MODEL
    adapter = status["artifacts"]["adapter"]
    assert record["source"] == adapter and committed(s3_server, adapter)
    cond = condition(status, "Promoted")
    assert (cond["status"], cond["reason"]) == ("True", "PromotionComplete")
    # What the registry itself says (the test's own REST calls).
    for alias in ("staging", "production"):
        version = registry.get("mlflow/registered-models/alias", name=MODEL, alias=alias)[
            "model_version"
        ]
        assert version["version"] == record["version"] and version["source"] == adapter
    run = registry.get("mlflow/runs/get", run_id=record["runId"])["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["tuned.loss"] == pytest.approx(status["metrics"]["tuned"]["loss"])


def test_an_unreachable_registry_fails_with_its_reason_and_keeps_the_training(
    ns: Cluster, bucket: str, s3_server: str, tmp_path: Path
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # a closed port: connection refused
    ns.apply(manifest("reg-down", bucket, s3_server, nobody))
    status = ns.wait_phase("reg-down", "Failed", timeout=240)
    assert status["attempts"] == 1
    message = status["message"]
    assert "artifacts committed; registry step failed: output.registry.mlflow: MLflow at " in (
        message
    ), message
    assert nobody in message and "unreachable" in message
    # The training's results are all there: URIs in the status, objects committed in S3.
    artifacts = status["artifacts"]
    assert committed(s3_server, artifacts["adapter"]), artifacts
    assert status["metrics"]["tuned"]["loss"] > 0
    promoted = status["promotion"]
    assert promoted["state"] == "Failed" and nobody in promoted["message"]
    assert promoted["artifacts"]["adapter"] == artifacts["adapter"]
    cond = condition(status, "Promoted")
    assert (cond["status"], cond["reason"]) == ("False", "PromotionFailed")
    assert "unreachable" in cond["message"]
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and nobody in failed["message"]
    assert "PromotionFailed" in [e["reason"] for e in ns.events("reg-down")]
