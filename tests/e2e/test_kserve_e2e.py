"""spec.staging's KServe path on the real control plane, with KServe's real InferenceService CRD
(github.com/kserve/kserve v0.17.0, its full structural schema; scripts/get-kserve-crd.sh).

The CRD is installed into the session's cluster for this module (and removed afterwards, so
the other staging tests see no KServe); the operator runs as the chart's ServiceAccount with the
chart's RBAC. After a real training run (demo model, moto S3) the operator finds the
serving.kserve.io group by API discovery (no RBAC needed, so no forbidden request) and creates
the InferenceService `<name>-serve` with `fieldValidation=Strict`: the real API server accepts
it against KServe's schema (the proof that our rendered object fits it; an unknown or mistyped
field is refused, which the test also shows with two altered copies).

What is NOT here: KServe's controller and its admission webhooks. Nothing makes the engine's
pods, and nothing writes the InferenceService's status, so staging must time out saying so
(naming the InferenceService), keep the training results, and tear the InferenceService down.
The status is not faked: reading a KServe-written status is unit-tested only
(tests/unit/test_staging.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import manifests
from tests.support.cluster import ROOT, Cluster, Session, demo_bucket, established, wait_for
from tests.support.kube import ApiStatus

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

ISVC = "serving.kserve.io/v1beta1"
CRD_NAME = "inferenceservices.serving.kserve.io"
READY_TIMEOUT = 15


def kserve_crd() -> Path:
    """The pinned CRD (scripts/get-kserve-crd.sh: cached; a module download the first time)."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "get-kserve-crd.sh")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"error: scripts/get-kserve-crd.sh: {result.stderr.strip()}", False)
    return Path(result.stdout.strip())


def discovered(session: Session) -> bool:
    try:
        group = session.admin.request("GET", f"/apis/{ISVC}")
    except ApiStatus:
        return False
    return "inferenceservices" in [r["name"] for r in group.get("resources") or []]


@pytest.fixture(scope="module")
def kserve(kube_session: Session) -> Iterator[dict[str, Any]]:
    """KServe's CRD installed (Established, served by discovery, its storage ready)."""
    path = kserve_crd()
    crd = yaml.safe_load(path.read_text())
    # Server-side: the CRD (1.1 MB) is over client-side apply's annotation limit.
    kube_session.kubectl("apply", "--server-side", "-f", str(path))
    try:
        wait_for("KServe's CRD Established", lambda: established(kube_session.admin, [CRD_NAME]))
        wait_for("serving.kserve.io/v1beta1 in discovery", lambda: discovered(kube_session))
        wait_for(
            "inferenceservices served",
            lambda: _listable(kube_session),
            timeout=60,
            every=0.5,
        )
        yield crd
    finally:
        kube_session.admin.delete(
            "apiextensions.k8s.io/v1", "customresourcedefinitions", None, CRD_NAME
        )
        wait_for(
            "serving.kserve.io gone from discovery",
            lambda: not discovered(kube_session),
            timeout=120,
        )


def _listable(session: Session) -> bool:
    try:
        session.admin.request("GET", f"/apis/{ISVC}/inferenceservices?limit=1")
    except ApiStatus:  # 429 while the new CRD's storage initializes
        return False
    return True


@pytest.fixture
def ns(cluster: Cluster, kserve: dict[str, Any]) -> Iterator[Cluster]:
    cluster.s3_credentials()
    yield cluster


def manifest(name: str, bucket: str, endpoint: str) -> str:
    doc = manifests.cluster_run(
        name,
        bucket,
        endpoint,
        method={"lora": {"r": 8, "alpha": 16}},
        evaluation={"gates": []},
        staging={
            "gpus": 0,
            "replicas": 2,
            "artifact": "adapter",
            "readyTimeoutSeconds": READY_TIMEOUT,
            "load": {"type": "poisson", "rate": 1, "durationSeconds": 10, "maxPrompts": 4},
            "gates": {"p95TtftMs": 60000},
        },
    )
    return yaml.safe_dump(doc)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def received(event: dict[str, Any]) -> datetime:
    """When the API server received an audited request."""
    return datetime.fromisoformat(event["requestReceivedTimestamp"])


def strict_dry_run(ns: Cluster, obj: dict[str, Any]) -> None:
    """Create ``obj`` as the admin, validated as the operator's create is, but not stored."""
    path = ns.kube.path(ISVC, "inferenceservices", ns.ns) + "?fieldValidation=Strict&dryRun=All"
    ns.kube.request("POST", path, obj)


def test_the_operator_creates_an_inference_service_kserves_schema_accepts(
    ns: Cluster, s3_server: str
) -> None:
    name = "stage-isvc"
    child = f"{name}-serve"
    started = datetime.now(UTC)  # KServe's CRD is served from here on (the kserve fixture)
    ns.apply(manifest(name, demo_bucket(s3_server), s3_server))
    ns.kubectl("wait", "--for=condition=Succeeded", f"ftj/{name}", "--timeout=300s")

    isvc = ns.wait_for(
        f"InferenceService {child}",
        lambda: ns.kube.get(ISVC, "inferenceservices", ns.ns, child),
        timeout=60,
    )
    # What the API server stored after validating it against KServe's schema.
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 2
    (engine,) = predictor["containers"]
    assert engine["name"] == "kserve-container"
    assert engine["command"][:2] == ["vllm", "serve"] and "--enable-lora" in engine["command"]
    assert [c["name"] for c in predictor["initContainers"]] == ["fetch"]
    assert predictor["automountServiceAccountToken"] is False
    assert engine["securityContext"]["readOnlyRootFilesystem"] is True
    owner = isvc["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("FineTuneJob", name)
    assert "status" not in isvc or not isvc["status"].get("conditions")  # no KServe controller

    # The operator's create was strict and accepted (the audit log has its request and answer).
    creates = [
        e
        for e in ns.session.audit()
        if e["verb"] == "create"
        and e["requestURI"].startswith(f"/apis/{ISVC}/namespaces/{ns.ns}/inferenceservices")
    ]
    assert creates and {e["requestURI"].split("?", 1)[-1] for e in creates} == {
        "fieldValidation=Strict"
    }
    assert [e["responseStatus"]["code"] for e in creates].count(201) == 1

    # The schema bites: the same object with an unknown field, or a mistyped one, is refused.
    sent = {k: copy.deepcopy(isvc[k]) for k in ("apiVersion", "kind", "spec")}
    sent["metadata"] = {"name": "probe", "namespace": ns.ns}
    strict_dry_run(ns, sent)  # as stored: accepted
    unknown = copy.deepcopy(sent)
    unknown["spec"]["predictor"]["containers"][0]["bogusField"] = 1
    with pytest.raises(ApiStatus) as refused:
        strict_dry_run(ns, unknown)
    assert (
        refused.value.code == 400
        and 'unknown field "spec.predictor.containers[0].bogusField"' in (refused.value.message)
    ), refused.value.message
    mistyped = copy.deepcopy(sent)
    mistyped["spec"]["predictor"]["minReplicas"] = "two"
    with pytest.raises(ApiStatus) as refused:
        strict_dry_run(ns, mistyped)
    assert refused.value.code == 422 and "spec.predictor.minReplicas" in refused.value.message

    # No KServe controller: staging times out naming the InferenceService; training is kept.
    status = ns.wait_for(
        f"{name} staging finished",
        lambda: (
            (s := ns.status(name)).get("staging", {}).get("phase") in ("Succeeded", "Failed") and s
        ),
        timeout=READY_TIMEOUT + 90,
        every=1,
    )
    staging = status["staging"]
    assert staging["phase"] == "Failed" and staging["kind"] == "InferenceService", staging
    assert staging["message"] == (
        f"vllm not ready after {READY_TIMEOUT}s (0/2 replicas): InferenceService {child} has no "
        "status conditions: no KServe controller has reconciled it (is KServe's controller "
        "running?)"
    ), staging["message"]
    assert status["phase"] == "Succeeded" and status["artifacts"]["adapter"]
    staged = condition(status, "Staged")
    assert staged["status"] == "False" and staged["reason"] == "StagingFailed"
    assert condition(status, "GatesPassed")["status"] == "False"
    # Torn down (keep: false): the InferenceService is gone; no Deployment was ever made.
    ns.wait_for(
        f"InferenceService {child} deleted",
        lambda: ns.kube.get(ISVC, "inferenceservices", ns.ns, child) is None,
        timeout=60,
    )
    assert staging["tornDown"] is True
    assert ns.kube.get("apps/v1", "deployments", ns.ns, child) is None

    # How the operator found KServe: API discovery, allowed (no CRD list, which needs RBAC);
    # and each verb the chart grants on inferenceservices was used, no other.
    operator = ns.session.audit()
    # (This worker's operator also ran the other staging tests, before KServe's CRD: there,
    # discovery's answer was 404. Only this job's lookups count.)
    found = [
        e["responseStatus"]["code"]
        for e in operator
        if e["requestURI"] == f"/apis/{ISVC}" and received(e) >= started
    ]
    assert found and set(found) == {200}, found
    assert not [e for e in operator if "customresourcedefinitions" in e["requestURI"]]
    used = {
        e["verb"]
        for e in operator
        if e["requestURI"].startswith(f"/apis/{ISVC}/namespaces/{ns.ns}/inferenceservices")
    }
    assert used == {"get", "create", "delete"}, used
    assert ns.kube.get("v1", "services", ns.ns, child) is None
    print(json.dumps({"staging": staging["message"]}))
