"""spec.staging end to end on the real control plane: after a real training run (demo model,
moto S3), the operator creates a vLLM Deployment + Service, the real Deployment and ReplicaSet
controllers make the engine pod, the process kubelet runs its fetch init container (the trainer
image's `kubetune_trainer.staging fetch` from S3) and then real `vllm serve` (CPU) with our
adapter; once its /health answers, the operator starts the load Job, which draws prompts from
the test split and runs real guidellm against the Service name; results and gates land in
status.staging, GatesPassed combines evaluation and staging gates, and the engine is torn down.
The first job also has output.registry.mlflow (a real `mlflow server` on loopback): the trainer
registers the version with alias staging only (promotion Pending); once the staging gates pass,
the operator creates the promote Job, which moves alias production, and status.promotion follows
it: Promoting, then Promoted with condition Promoted True. A second one's registered model is
deleted before staging passes: the promote Job is refused and the promotion says Failed with
the pod's termination message, training's results kept.
Also: an engine that is not ready in time fails staging and keeps the trained artifacts. No
request of the operator is forbidden (the chart's RBAC).

Needs scripts/install-vllm.sh (.tools/vllm) and scripts/install-mlflow.sh (.tools/mlflow); each
test loads vLLM once (~1-3 min on CPU).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support import manifests
from tests.support.cluster import Cluster, demo_bucket
from tests.support.kubelet import VLLM_BIN
from tests.support.mlflow_server import MlflowServer, mlflow_server

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    if not (VLLM_BIN / "vllm").exists():
        pytest.fail(f"error: {VLLM_BIN}/vllm not found: run scripts/install-vllm.sh", False)
    return demo_bucket(s3_server)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[Cluster]:
    cluster.s3_credentials()
    yield cluster


def manifest(
    name: str, bucket: str, endpoint: str, tracking_uri: str | None = None, **staging: Any
) -> str:
    output: dict[str, Any] = {}
    if tracking_uri:
        output["registry"] = {"mlflow": {"trackingUri": tracking_uri, "model": name}}
    doc = manifests.cluster_run(
        name,
        bucket,
        endpoint,
        method={"lora": {"r": 8, "alpha": 16}},
        training={"maxSteps": 4},
        output=output,
        staging={
            "gpus": 0,
            "artifact": "adapter",
            "load": {"type": "poisson", "rate": 2, "durationSeconds": 10, "maxPrompts": 16},
            "costPerGpuHour": 0.5,
            "gates": {"p95TtftMs": 120000, "minOutputTokensPerSecond": 0.01},
            **staging,
        },
    )
    return yaml.safe_dump(doc)


def staging_done(ns: Cluster, name: str, timeout: float) -> dict[str, Any]:
    return ns.wait_for(
        f"{name} status.staging finished",
        lambda: (
            (s := ns.status(name)).get("staging", {}).get("phase") in ("Succeeded", "Failed") and s
        ),
        timeout=timeout,
        every=1,
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def alias(registry: MlflowServer, model: str, name: str) -> str | None:
    """The version the alias points at, by the test's own REST call (None: not set; MLflow
    answers 400 for an alias that does not exist)."""
    if registry.status_of("mlflow/registered-models/alias", name=model, alias=name) != 200:
        return None
    found = registry.get("mlflow/registered-models/alias", name=model, alias=name)
    return str(found["model_version"]["version"])


def test_staging_serves_the_adapter_runs_guidellm_gates_and_promotes(
    ns: Cluster, bucket: str, s3_server: str, registry: MlflowServer
) -> None:
    ns.apply(manifest("stage-ok", bucket, s3_server, registry.uri))
    ns.kubectl("wait", "--for=condition=Succeeded", "ftj/stage-ok", "--timeout=300s")
    trained = ns.status("stage-ok")
    assert condition(trained, "GatesPassed")["status"] in ("Unknown", "True")
    # Registered by the trainer with alias staging only: production waits for the load test.
    pending = trained["promotion"]
    assert pending["state"] == "Pending", pending
    version = pending["registry"]["version"]
    assert pending["registry"]["aliases"] == ["staging"]
    assert alias(registry, "stage-ok", "staging") == version
    assert alias(registry, "stage-ok", "production") is None
    status = staging_done(ns, "stage-ok", timeout=700)
    staging = status["staging"]
    assert staging["phase"] == "Succeeded", (staging, ns.pod_logs("stage-ok"))
    results = staging["results"]
    assert results["requests"] > 0 and results["errors"] == 0
    assert 0 < results["ttftP50Ms"] <= results["ttftP95Ms"]
    assert results["outputTokensPerSecond"] > 0 and results["costPer1MTokens"] > 0
    assert [g["metric"] for g in staging["gates"]] == [
        "staging.ttftP95Ms",
        "staging.outputTokensPerSecond",
    ]
    assert all(g["passed"] for g in staging["gates"])
    assert condition(status, "Staged")["status"] == "True"
    gates = condition(status, "GatesPassed")
    assert gates["status"] == "True" and gates["message"] == "3 gate(s) passed"
    assert status["phase"] == "Succeeded" and status["artifacts"]["adapter"]
    # Torn down: the engine's Deployment and Service are gone, the load Job stays (its log).
    ns.wait_for(
        "the engine torn down",
        lambda: (
            ns.kube.get("apps/v1", "deployments", ns.ns, "stage-ok-serve") is None
            and ns.kube.get("v1", "services", ns.ns, "stage-ok-serve") is None
        ),
        timeout=60,
    )
    assert staging["tornDown"] is True
    assert "stage-ok-load" in [j["metadata"]["name"] for j in ns.jobs()]
    reasons = [e["reason"] for e in ns.events("stage-ok")]
    assert "StagingDeploying" in reasons and "StagingComplete" in reasons
    # Promotion: the operator's promote Job moves alias production; the status follows it.
    promoted = ns.wait_for(
        "status.promotion settled",
        lambda: (
            (s := ns.status("stage-ok")).get("promotion", {}).get("state") in ("Promoted", "Failed")
            and s
        ),
        timeout=120,
        every=1,
    )
    done = promoted["promotion"]
    assert done["state"] == "Promoted", (done, ns.pod_logs("stage-ok-promote"))
    assert done["registry"]["aliases"] == ["production", "staging"] and done["promotedAt"]
    assert done["message"].endswith(
        f"alias production moved to version {version} by Job stage-ok-promote"
    ), done["message"]
    assert alias(registry, "stage-ok", "production") == version
    assert alias(registry, "stage-ok", "staging") == version
    mover = next(j for j in ns.jobs() if j["metadata"]["name"] == "stage-ok-promote")
    assert mover["status"].get("succeeded") == 1
    cond = condition(promoted, "Promoted")
    assert (cond["status"], cond["reason"]) == ("True", "PromotionComplete")
    assert promoted["phase"] == "Succeeded" and promoted["artifacts"] == status["artifacts"]
    reasons = [e["reason"] for e in ns.events("stage-ok")]
    assert "Promoting" in reasons and "PromotionComplete" in reasons


def test_an_engine_not_ready_in_time_fails_staging_with_its_log_and_keeps_training(
    ns: Cluster, bucket: str, s3_server: str
) -> None:
    # vLLM needs far more than 10 s to load on CPU: the timeout path, with a real engine.
    ns.apply(manifest("stage-slow", bucket, s3_server, readyTimeoutSeconds=10))
    ns.kubectl("wait", "--for=condition=Succeeded", "ftj/stage-slow", "--timeout=300s")
    status = staging_done(ns, "stage-slow", timeout=200)
    staging = status["staging"]
    assert staging["phase"] == "Failed"
    assert staging["message"].startswith("vllm not ready after 10s (0/1 replicas)"), staging
    # (The log tail comes from pods/log, which the process kubelet does not serve: the unit
    # tests cover it; here the reason is what the pod status says, or "no reason reported".)
    assert status["phase"] == "Succeeded" and status["artifacts"]["adapter"]
    staged = condition(status, "Staged")
    assert staged["status"] == "False" and staged["reason"] == "StagingFailed"
    assert condition(status, "GatesPassed")["status"] == "False"
    ns.wait_for(
        "the engine torn down",
        lambda: ns.kube.get("apps/v1", "deployments", ns.ns, "stage-slow-serve") is None,
        timeout=60,
    )


def delete_registered_model(registry: MlflowServer, model: str) -> None:
    """The test's own REST call: the registered model (and its versions) removed."""
    request = urllib.request.Request(
        f"{registry.uri}/api/2.0/mlflow/registered-models/delete",
        data=json.dumps({"name": model}).encode(),
        method="DELETE",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def test_a_failed_promote_job_fails_the_promotion_with_its_reason_and_keeps_training(
    ns: Cluster, bucket: str, s3_server: str, registry: MlflowServer
) -> None:
    # The version is registered at the end of training; deleted from the registry (as an admin
    # might) before staging passes, so the promote Job's alias call is refused (exit 10,
    # FailJob at once).
    ns.apply(manifest("stage-gone", bucket, s3_server, registry.uri))
    ns.kubectl("wait", "--for=condition=Succeeded", "ftj/stage-gone", "--timeout=300s")
    trained = ns.status("stage-gone")
    assert trained["promotion"]["state"] == "Pending", trained["promotion"]
    delete_registered_model(registry, "stage-gone")
    status = staging_done(ns, "stage-gone", timeout=700)
    assert status["staging"]["phase"] == "Succeeded", (status["staging"], ns.pod_logs())
    settled = ns.wait_for(
        "status.promotion settled",
        lambda: (
            (s := ns.status("stage-gone")).get("promotion", {}).get("state")
            in ("Promoted", "Failed")
            and s
        ),
        timeout=120,
        every=1,
    )
    done = settled["promotion"]
    assert done["state"] == "Failed", done
    # The reason is the promote pod's termination message (its `error:` line), as the real Job
    # controller and the kubelet reported it.
    assert done["message"].startswith(
        f"promote Job stage-gone-promote failed: MLflow at {registry.uri} (POST "
        "/api/2.0/mlflow/registered-models/alias): HTTP 404: RESOURCE_DOES_NOT_EXIST"
    ), done["message"]
    assert "alias production not moved" in done["message"] and not done.get("promotedAt")
    assert done["registry"]["aliases"] == ["staging"]
    cond = condition(settled, "Promoted")
    assert (cond["status"], cond["reason"]) == ("False", "PromotionFailed")
    # Training's results stay: phase, artifacts, metrics; staging's too.
    assert settled["phase"] == "Succeeded" and settled["artifacts"] == trained["artifacts"]
    assert settled["metrics"] == trained["metrics"] and settled["staging"]["phase"] == "Succeeded"
    mover = next(j for j in ns.jobs() if j["metadata"]["name"] == "stage-gone-promote")
    failed = next(c for c in mover["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy", failed
    warnings = [e for e in ns.events("stage-gone") if e["reason"] == "PromotionFailed"]
    assert warnings and warnings[0]["type"] == "Warning"
