"""The operator (real `kubetune operator` as the chart's ServiceAccount) on the real control
plane (tests/support/cluster.py): what it makes of a FineTuneJob before any trainer runs.

The pods here never start a process: the FineTuneJobs reference an S3 credentials Secret that
does not exist, so the process kubelet reports `CreateContainerConfigError` (as a kubelet does)
and the job waits in Pending. What a running trainer gives (live progress, the termination
message's metrics and artifacts, exit codes) is in tests/e2e/test_operator_e2e.py, with real
training runs.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from kubetune import api
from tests.support.cluster import FTJ, ROOT, Cluster
from tests.support.kube import ApiStatus

pytestmark = pytest.mark.timeout(180)

BASE: dict[str, Any] = {
    "apiVersion": FTJ,
    "kind": "FineTuneJob",
    "metadata": {},
    "spec": {
        "model": {"source": "s3://models/tiny"},
        "dataset": {
            "source": "s3://data/train.jsonl",
            "license": {"name": "CC0-1.0", "usage": "research"},
        },
        "training": {"maxSteps": 10},
        "output": {"destination": "s3://out/run"},
        "storage": {"s3": {"credentialsSecret": "s3-credentials"}},  # never created
        "resources": {"gpus": 0},
    },
}


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = name
    doc["spec"].update(spec)
    return doc


def create(cluster: Cluster, doc: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = cluster.kube.create(FTJ, "finetunejobs", namespace or cluster.ns, doc)
    return result


def trainer_job(cluster: Cluster, name: str, namespace: str | None = None) -> dict[str, Any]:
    ns = namespace or cluster.ns
    return cluster.wait_for(
        f"Job {name}-trainer", lambda: cluster.kube.get("batch/v1", "jobs", ns, f"{name}-trainer")
    )


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def operator_creates(cluster: Cluster, resource: str, since: str) -> list[str]:
    """Names the operator created (201) in the test's namespace since audit time ``since``."""
    return [
        e["objectRef"].get("name", "")
        for e in cluster.session.audit()
        if e["verb"] == "create"
        and e["objectRef"].get("resource") == resource
        and e["objectRef"].get("namespace") == cluster.ns
        and e.get("responseStatus", {}).get("code") == 201
        and e["stageTimestamp"] >= since
    ]


def audit_now() -> str:
    """Now, as the audit log writes its timestamps (they compare as strings)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------


def test_children_created_with_owner_references_and_status(cluster: Cluster) -> None:
    obj = create(cluster, manifest("alpha"))
    status = cluster.wait_phase("alpha", "Pending")
    assert status["jobName"] == "alpha-trainer"
    assert condition(status, "Validated")["status"] == "True"
    assert status["observedGeneration"] == 1
    job = trainer_job(cluster, "alpha")
    cm = cluster.kube.get("v1", "configmaps", cluster.ns, "alpha-config")
    for child in (job, cm):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == obj["metadata"]["uid"] and owner["kind"] == "FineTuneJob"
    config = api.TrainerConfig.model_validate_json(cm["data"]["config.json"])
    assert config.name == "alpha" and config.uid == obj["metadata"]["uid"]
    assert config.image == "kubetune-trainer:test"  # the operator's default from its env
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    ftj = cluster.ftj("alpha")
    assert ftj is not None
    assert "kubetune.io/finalizer" in ftj["metadata"]["finalizers"]
    reasons = cluster.wait_for(
        "a JobCreated event", lambda: [e["reason"] for e in cluster.events("alpha")]
    )
    assert "JobCreated" in reasons


def test_a_child_the_server_refuses_fails_the_job_with_its_reason(cluster: Cluster) -> None:
    # affinity is passed through to the pod unchecked; the API server refuses the typo
    # (fieldValidation=Strict): the job fails at once, naming it, instead of retrying forever.
    resources = {"gpus": 0, "affinity": {"nodeAfinity": {}}}
    create(cluster, manifest("refused", resources=resources))
    status = cluster.wait_phase("refused", "Failed")
    assert condition(status, "Validated")["reason"] == "SpecInvalid"
    assert "the API server refused Job refused-trainer" in status["message"]
    assert "nodeAfinity" in status["message"]
    assert cluster.kube.get("batch/v1", "jobs", cluster.ns, "refused-trainer") is None


def test_pending_says_why_the_pod_cannot_start(cluster: Cluster) -> None:
    # The real Job controller makes the pod; the kubelet cannot start it without its Secret.
    create(cluster, manifest("beta"))
    trainer_job(cluster, "beta")
    status = cluster.wait_for(
        "CreateContainerConfigError in the message",
        lambda: (
            "CreateContainerConfigError" in (s := cluster.status("beta")).get("message", "") and s
        ),
    )
    assert status["phase"] == "Pending"
    running = condition(status, "Running")
    assert running["status"] == "False" and running["reason"] == "CreateContainerConfigError"
    assert "s3-credentials" in status["message"]  # names what is missing
    (pod,) = cluster.pods("beta-trainer")
    assert pod["spec"]["nodeName"]  # scheduled: the wait is the container's, not the node's


def finish_pod(cluster: Cluster, name: str, phase: str, code: int, message: str) -> None:
    """The kubelet's report of a finished trainer, written by hand: the pod's terminal status
    with the trainer's own termination message (the real kubelet here cannot start it)."""
    (pod,) = cluster.wait_for(f"{name}'s pod", lambda: cluster.pods(f"{name}-trainer"))
    terminated = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "message": message,
    }
    status = {
        "phase": phase,
        "containerStatuses": [
            {
                "name": "trainer",
                "image": "kubetune-trainer:test",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    cluster.kube.patch(
        "v1",
        "pods",
        cluster.ns,
        pod["metadata"]["name"],
        {"status": status},
        sub="status",
        ctype="application/strategic-merge-patch+json",
    )


def test_success_carries_metrics_gates_artifacts_and_promotion(cluster: Cluster) -> None:
    from kubetune_trainer.report import termination_message

    create(cluster, manifest("gamma"))
    trainer_job(cluster, "gamma")
    result = api.FineTuneJobStatus(
        phase="Succeeded",
        message="training finished: 10 steps",
        metrics=api.Metrics(base={"loss": 2.0}, tuned={"loss": 1.2}, delta={"loss": -0.8}),
        gates=[api.GateResult(metric="delta.loss", op="<", value=0, actual=-0.8, passed=True)],
        artifacts=api.Artifacts(adapter="s3://out/run/adapter", report="s3://out/run/report.json"),
        reproducibility=api.Reproducibility(dataHash="ab" * 32, seed=42),
        promotion=api.Promotion(
            state="Promoted",
            message="1 evaluation gate(s) passed",
            artifact="s3://out/run/adapter",
            registry=api.RegistryRecord(
                trackingUri="http://mlflow:5000",
                model="gamma",
                runId="r1",
                version="4",
                source="s3://out/run/adapter",
                aliases=["staging", "production"],
            ),
            registeredAt="2026-01-01T01:00:00Z",
            promotedAt="2026-01-01T01:00:00Z",
        ),
    )
    finish_pod(cluster, "gamma", "Succeeded", 0, termination_message(result))
    # The real Job controller completes the Job; the operator reads the message.
    status = cluster.wait_phase("gamma", "Succeeded", timeout=60)
    assert status["metrics"]["delta"]["loss"] == -0.8
    assert status["artifacts"]["adapter"] == "s3://out/run/adapter"
    assert status["reproducibility"]["seed"] == 42
    # status.promotion travels compact and comes back whole (artifacts and gates refilled),
    # and the API server's schema takes it (the write succeeded).
    promoted = status["promotion"]
    assert promoted["registry"]["version"] == "4" and promoted["state"] == "Promoted"
    assert promoted["artifacts"]["adapter"] == "s3://out/run/adapter"
    assert promoted["gates"] == ["delta.loss < 0: passed (actual -0.8)"]
    assert condition(status, "GatesPassed")["status"] == "True"
    assert condition(status, "Succeeded")["reason"] == "TrainingComplete"
    job = cluster.kube.get("batch/v1", "jobs", cluster.ns, "gamma-trainer")
    assert status["completionTime"] == job["status"]["completionTime"]
    cluster.wait_for(
        "a TrainingComplete event",
        lambda: "TrainingComplete" in [e["reason"] for e in cluster.events("gamma")],
    )


def test_user_error_fails_the_job_at_once_with_the_trainers_message(cluster: Cluster) -> None:
    from kubetune_trainer.report import failure_status, termination_message

    create(cluster, manifest("delta"))
    trainer_job(cluster, "delta")
    text = termination_message(failure_status("dataset.source: row 3: missing field 'output'"))
    finish_pod(cluster, "delta", "Failed", api.EXIT_USER_ERROR, text)
    status = cluster.wait_phase("delta", "Failed", timeout=60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "UserError"
    assert "row 3: missing field 'output'" in failed["message"]
    assert status["attempts"] == 1
    # The real Job controller's podFailurePolicy: exit 10 fails the Job, no retry.
    job = cluster.kube.get("batch/v1", "jobs", cluster.ns, "delta-trainer")
    reasons = [c.get("reason") for c in job["status"].get("conditions", [])]
    assert "PodFailurePolicy" in reasons, job["status"]
    assert len(cluster.pods("delta-trainer")) == 1


def test_suspend_and_spec_changes(cluster: Cluster) -> None:
    create(cluster, manifest("eps"))
    trainer_job(cluster, "eps")
    patch = cluster.kube.patch

    def job_suspend() -> Any:
        return cluster.kube.get("batch/v1", "jobs", cluster.ns, "eps-trainer")["spec"]["suspend"]

    patch(FTJ, "finetunejobs", cluster.ns, "eps", {"spec": {"suspend": True}})
    cluster.wait_for("Job suspended", lambda: job_suspend() is True)
    cluster.wait_phase("eps", "Suspended")
    cluster.wait_for(
        "the pod removed by the Job controller", lambda: not cluster.pods("eps-trainer")
    )
    patch(FTJ, "finetunejobs", cluster.ns, "eps", {"spec": {"suspend": False}})
    cluster.wait_for("Job resumed", lambda: job_suspend() is False)
    cluster.wait_phase("eps", "Pending")

    # What training reads is immutable: the API server refuses the change (CEL) ...
    with pytest.raises(ApiStatus) as refused:
        patch(FTJ, "finetunejobs", cluster.ns, "eps", {"spec": {"training": {"maxSteps": 99}}})
    assert refused.value.code == 422
    assert "spec.training is immutable" in refused.value.message
    # ... and a mutable field's change is taken by the server and ignored by the running job.
    patch(FTJ, "finetunejobs", cluster.ns, "eps", {"spec": {"resources": {"gpus": 0, "cpu": "3"}}})

    def ignored_condition() -> dict[str, Any] | None:
        status = cluster.status("eps")
        return next(
            (c for c in status.get("conditions", []) if c["type"] == "SpecChangeIgnored"), None
        )

    ignored = cluster.wait_for("SpecChangeIgnored", ignored_condition, timeout=90)
    assert ignored["status"] == "True" and "spec.resources.cpu" in ignored["message"]
    cm = cluster.kube.get("v1", "configmaps", cluster.ns, "eps-config")
    assert '"maxSteps": 10' in cm["data"]["config.json"]  # the running config did not change
    job = cluster.kube.get("batch/v1", "jobs", cluster.ns, "eps-trainer")
    assert "cpu" not in json.dumps(job["spec"]["template"]["spec"]["containers"][0]["resources"])


def test_restart_keeps_children_unique_and_delete_collects_them(cluster: Cluster) -> None:
    session = cluster.session
    create(cluster, manifest("zeta"))
    trainer_job(cluster, "zeta")
    cluster.wait_phase("zeta", "Pending")
    since = audit_now()
    try:
        session.stop_operator()
        create(cluster, manifest("eta"))  # created while the operator is down
    finally:
        session.start_operator()
    trainer_job(cluster, "eta")
    cluster.wait_phase("eta", "Pending")
    names = [j["metadata"]["name"] for j in cluster.jobs()]
    assert sorted(names) == ["eta-trainer", "zeta-trainer"]
    # After the restart only eta's children are new; zeta's were found in the watch.
    assert operator_creates(cluster, "jobs", since) == ["eta-trainer"]
    assert operator_creates(cluster, "configmaps", since) == ["eta-config"]

    cluster.kube.delete(FTJ, "finetunejobs", cluster.ns, "zeta")
    cluster.wait_for("zeta gone", lambda: cluster.ftj("zeta") is None)
    cluster.wait_for(
        "the garbage collector removing zeta's Job, pods and ConfigMap",
        lambda: (
            cluster.kube.get("batch/v1", "jobs", cluster.ns, "zeta-trainer") is None
            and cluster.kube.get("v1", "configmaps", cluster.ns, "zeta-config") is None
            and not cluster.pods("zeta-trainer")
        ),
    )
    assert cluster.kube.get("batch/v1", "jobs", cluster.ns, "eta-trainer") is not None


def test_liveness_and_operator_metrics_endpoints(cluster: Cluster) -> None:
    session = cluster.session
    create(cluster, manifest("theta"))
    cluster.wait_phase("theta", "Pending")
    with urllib.request.urlopen(f"http://127.0.0.1:{session.health_port}/healthz") as r:
        assert r.status == 200

    def page() -> str:
        url = f"http://127.0.0.1:{session.metrics_port}/metrics"
        with urllib.request.urlopen(url) as answer:
            return str(answer.read().decode())

    text = cluster.wait_for(
        "theta counted in the operator metrics",
        lambda: (
            'kubetune_reconcile_duration_seconds_count{handler="create"}' in (t := page()) and t
        ),
    )
    pending = [
        line
        for line in text.splitlines()
        if line.startswith('kubetune_finetunejobs{phase="Pending"}')
    ]
    assert pending and float(pending[0].split()[-1]) >= 1
    waiting = [
        line
        for line in text.splitlines()
        if line.startswith("kubetune_finetunejob_pending_since_timestamp_seconds")
        and f'namespace="{cluster.ns}"' in line
    ]
    assert len(waiting) == 1 and 'name="theta"' in waiting[0]
    log = session.operator_logs[-1].read_text()
    assert "Timer 'refresh' succeeded." not in log  # per-tick noise is filtered


def test_namespaced_operator_ignores_other_namespaces_and_enforces_the_license_policy(
    cluster: Cluster,
) -> None:
    session = cluster.session
    other = f"{cluster.ns}-other"
    cluster.kube.create("v1", "namespaces", None, {"metadata": {"name": other}})
    try:
        session.restart_operator(
            KUBETUNE_NAMESPACE=cluster.ns,
            KUBETUNE_LOG_FORMAT="json",
            KUBETUNE_LICENSE_ALLOWLIST="CC0-1.0, Apache-2.0",
        )
        for ns in (other, cluster.ns):
            create(cluster, manifest("iota"), ns)
        trainer_job(cluster, "iota")
        time.sleep(1.5)  # several ticks: the other namespace stays untouched
        untouched = cluster.kube.get(FTJ, "finetunejobs", other, "iota")
        assert "status" not in untouched and not untouched["metadata"].get("finalizers")
        assert cluster.kube.get("batch/v1", "jobs", other, "iota-trainer") is None

        # The platform's license allow-list is enforced before any pod is scheduled: a spec the
        # CRD schema accepts and the operator refuses, once, without children or retries.
        refused = manifest("kappa")
        refused["spec"]["dataset"]["license"] = {"name": "CC-BY-NC-4.0", "usage": "research"}
        create(cluster, refused)
        status = cluster.wait_phase("kappa", "Failed")
        validated = condition(status, "Validated")
        assert validated["status"] == "False" and validated["reason"] == "SpecInvalid"
        assert "spec.dataset.license.name" in validated["message"]
        assert "CC0-1.0" in validated["message"]  # says what is allowed
        version = cluster.ftj("kappa")["metadata"]["resourceVersion"]  # type: ignore[index]
        time.sleep(1.5)  # several timer intervals: nothing may be retried or rewritten
        assert cluster.ftj("kappa")["metadata"]["resourceVersion"] == version  # type: ignore[index]
        assert cluster.kube.get("batch/v1", "jobs", cluster.ns, "kappa-trainer") is None
        assert cluster.kube.get("v1", "configmaps", cluster.ns, "kappa-config") is None
        assert "SpecInvalid" in [e["reason"] for e in cluster.events("kappa")]

        config = cluster.kube.get("v1", "configmaps", cluster.ns, "iota-config")
        assert json.loads(config["data"]["config.json"])["policy"]["allowedLicenses"] == [
            "CC0-1.0",
            "Apache-2.0",
        ]
        text = session.operator_logs[-1].read_text().splitlines()
        lines = [ln for ln in text if ln.startswith("{")]
        assert lines and all("message" in json.loads(ln) for ln in lines)  # KUBETUNE_LOG_FORMAT
    finally:
        session.restart_operator()
        cluster.kube.delete("v1", "namespaces", None, other)


@pytest.mark.parametrize("example", ["lora-s3", "multi-gpu", "qlora-gpu", "full-finetune"])
def test_the_examples_render_their_jobs(cluster: Cluster, example: str) -> None:
    # Suspended: the Job's shape is the point here, not a trainer run.
    doc = yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text())
    doc["metadata"].pop("namespace", None)
    doc["spec"]["suspend"] = True
    name = doc["metadata"]["name"]
    cluster.apply(doc)
    status = cluster.wait_for(
        f"{example} reconciled", lambda: (s := cluster.status(name)).get("jobName") and s
    )
    assert status["phase"] == "Suspended"
    job = cluster.kube.get("batch/v1", "jobs", cluster.ns, f"{name}-trainer")
    nodes = doc["spec"].get("resources", {}).get("numNodes", 1)
    assert job["spec"]["completions"] == nodes and job["spec"]["suspend"] is True
    assert job["spec"].get("completionMode", "NonIndexed") == (
        "Indexed" if nodes > 1 else "NonIndexed"
    )
    service = cluster.kube.get("v1", "services", cluster.ns, f"{name}-nodes")
    assert (service is not None) == (nodes > 1)
    queue = doc["spec"].get("scheduling", {}).get("queueName")
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == queue


def test_a_deleted_job_is_made_again(cluster: Cluster) -> None:
    create(cluster, manifest("lam"))
    first = trainer_job(cluster, "lam")
    cluster.wait_phase("lam", "Pending")
    cluster.kube.delete("batch/v1", "jobs", cluster.ns, "lam-trainer", propagation="Background")
    again = cluster.wait_for(
        "a new lam-trainer Job",
        lambda: (
            (j := cluster.kube.get("batch/v1", "jobs", cluster.ns, "lam-trainer"))
            and j["metadata"]["uid"] != first["metadata"]["uid"]
            and j
        ),
    )
    assert again["spec"]["template"]["spec"] == first["spec"]["template"]["spec"]
    assert again["metadata"]["ownerReferences"] == first["metadata"]["ownerReferences"]


def _errors(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "[ERROR" in ln or '"levelname": "ERROR"' in ln]


def test_a_normal_run_logs_no_errors(cluster: Cluster) -> None:
    session = cluster.session
    # The session's operator started right after the CRDs were established (as with
    # `helm install`): its start logged no error, e.g. no 429 retries of its first list while
    # the API server's storage for the fresh CRDs was still initializing.
    first = session.operator_logs[0].read_text(errors="replace").splitlines()
    startup = first[: next((i for i, ln in enumerate(first) if "kopf.objects" in ln), len(first))]
    assert startup and _errors(startup) == [], startup
    assert not [ln for ln in first if "Request attempt" in ln and "429" in ln]
    # A job's life: created, pending, suspended, resumed, deleted.
    log = session.operator_logs[-1]
    offset = len(log.read_text(errors="replace"))
    create(cluster, manifest("mu"))
    cluster.wait_phase("mu", "Pending")
    cluster.kube.patch(FTJ, "finetunejobs", cluster.ns, "mu", {"spec": {"suspend": True}})
    cluster.wait_phase("mu", "Suspended")
    cluster.kube.patch(FTJ, "finetunejobs", cluster.ns, "mu", {"spec": {"suspend": False}})
    cluster.wait_phase("mu", "Pending")
    cluster.kube.delete(FTJ, "finetunejobs", cluster.ns, "mu")
    cluster.wait_for("mu gone", lambda: cluster.ftj("mu") is None)
    lines = log.read_text(errors="replace")[offset:].splitlines()
    assert lines and _errors(lines) == [], lines
