"""The operator (real `kubetune operator`, kopf over HTTP) against the Kubernetes emulator.

The test plays the Job controller and kubelet by writing Job and Pod status through the API;
the trainer's side of the contract is the trainer's own code (report.Telemetry serves the
real /metrics page, report.termination_message builds the real termination message).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api
from tests.support.crd_schema import schema_errors
from tests.support.kmock_kubelet import free_port
from tests.support.operator_harness import FTJ, Cluster, wait_for

pytestmark = pytest.mark.timeout(120)

BASE: dict[str, Any] = {
    "apiVersion": FTJ,
    "kind": "FineTuneJob",
    "metadata": {"namespace": "default"},
    "spec": {
        "model": {"source": "s3://models/tiny"},
        "dataset": {
            "source": "s3://data/train.jsonl",
            "license": {"name": "CC0-1.0", "usage": "research"},
        },
        "training": {"maxSteps": 10},
        "output": {"destination": "s3://out/run"},
        "storage": {"s3": {"credentialsSecret": "s3-credentials"}},
        "resources": {"gpus": 0},
    },
}


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = name
    doc["spec"].update(spec)
    return doc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("operator"), progress_interval=0.3)
    c.start_operator()
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def create(cluster: Cluster, doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = cluster.kube.create(FTJ, "finetunejobs", "default", doc)
    return result


def trainer_job(cluster: Cluster, name: str) -> dict[str, Any]:
    return wait_for(
        f"Job {name}-trainer",
        lambda: cluster.kube.get("batch/v1", "jobs", "default", f"{name}-trainer"),
    )


def add_pod(cluster: Cluster, job: dict[str, Any], pod: str, status: dict[str, Any]) -> None:
    """A pod as the Job controller makes it, with the status a kubelet would report."""
    template = job["spec"]["template"]
    cluster.kube.create(
        "v1",
        "pods",
        "default",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod,
                "namespace": "default",
                "labels": template["metadata"]["labels"],
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job["metadata"]["name"],
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template["spec"],
        },
    )
    cluster.kube.patch("v1", "pods", "default", pod, {"status": status}, sub="status")


def set_job_status(cluster: Cluster, job: dict[str, Any], status: dict[str, Any]) -> None:
    cluster.kube.patch(
        "batch/v1", "jobs", "default", job["metadata"]["name"], {"status": status}, sub="status"
    )


def running(port: int) -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "containerStatuses": [{"name": "trainer", "state": {"running": {}}}],
    }


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


# --------------------------------------------------------------------------------------------


def test_children_created_with_owner_references_and_status(cluster: Cluster) -> None:
    obj = create(cluster, manifest("alpha"))
    status = cluster.wait_phase("alpha", "Pending")
    assert status["jobName"] == "alpha-trainer"
    assert condition(status, "Validated")["status"] == "True"
    assert status["observedGeneration"] == 1
    job = trainer_job(cluster, "alpha")
    cm = cluster.kube.get("v1", "configmaps", "default", "alpha-config")
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
    reasons = wait_for("a JobCreated event", lambda: [e["reason"] for e in cluster.events("alpha")])
    assert "JobCreated" in reasons


def test_invalid_spec_fails_without_children_or_retries(cluster: Cluster) -> None:
    # The CRD schema would refuse this on a real API server; the operator must hold too.
    doc = manifest("bad", training={"maxSteps": 10, "learningRate": 5.0})
    create(cluster, doc)
    status = cluster.wait_phase("bad", "Failed")
    validated = condition(status, "Validated")
    assert validated["status"] == "False" and validated["reason"] == "SpecInvalid"
    assert "spec.training.learningRate" in validated["message"]
    version = cluster.ftj("bad")["metadata"]["resourceVersion"]  # type: ignore[index]
    time.sleep(1.5)  # several timer intervals: nothing may be retried or rewritten
    assert cluster.ftj("bad")["metadata"]["resourceVersion"] == version  # type: ignore[index]
    assert cluster.kube.get("batch/v1", "jobs", "default", "bad-trainer") is None
    assert cluster.kube.get("v1", "configmaps", "default", "bad-config") is None


def test_pending_reason_then_running_with_live_progress(cluster: Cluster) -> None:
    from kubetune_trainer.report import Telemetry

    create(cluster, manifest("beta"))
    job = trainer_job(cluster, "beta")
    add_pod(
        cluster,
        job,
        "beta-1",
        {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": "Back-off pulling image",
                        }
                    },
                }
            ],
        },
    )
    status = wait_for(
        "ImagePullBackOff in the message",
        lambda: "ImagePullBackOff" in (s := cluster.status("beta")).get("message", "") and s,
    )
    assert condition(status, "Running")["reason"] == "ImagePullBackOff"

    telemetry = Telemetry(port=free_port(), host="127.0.0.1")
    try:
        telemetry.update(step=4, total_steps=10, loss=1.5, eval_loss=1.7, tokens_per_second=900.0)
        cluster.kube.delete("v1", "pods", "default", "beta-1")
        spec = copy.deepcopy(job["spec"]["template"]["spec"])
        spec["containers"][0]["ports"][0]["containerPort"] = telemetry.port
        job_with_port = copy.deepcopy(job)
        job_with_port["spec"]["template"]["spec"] = spec
        add_pod(cluster, job_with_port, "beta-2", running(telemetry.port))
        set_job_status(cluster, job, {"active": 1, "startTime": "2026-01-01T00:00:00Z"})
        status = wait_for(
            "progress at step 4",
            lambda: (s := cluster.status("beta")).get("progress", {}).get("step") == 4 and s,
        )
        assert status["phase"] == "Running"
        assert status["progress"]["percent"] == 40.0
        assert status["progress"]["loss"] == 1.5 and status["progress"]["evalLoss"] == 1.7
        assert status["progress"]["tokensPerSecond"] == 900.0
        assert condition(status, "Running")["status"] == "True"
        telemetry.update(step=9)
        wait_for(
            "progress at step 9",
            lambda: cluster.status("beta").get("progress", {}).get("step") == 9,
            timeout=10,
        )
    finally:
        telemetry.close()


def test_success_carries_metrics_gates_artifacts(cluster: Cluster) -> None:
    from kubetune_trainer.report import termination_message

    create(cluster, manifest("gamma"))
    job = trainer_job(cluster, "gamma")
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
    add_pod(
        cluster,
        job,
        "gamma-1",
        {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "Completed",
                            "message": termination_message(result),
                        }
                    },
                }
            ],
        },
    )
    set_job_status(
        cluster,
        job,
        {
            "succeeded": 1,
            "completionTime": "2026-01-01T01:00:00Z",
            "conditions": [{"type": "Complete", "status": "True"}],
        },
    )
    status = cluster.wait_phase("gamma", "Succeeded")
    stored = cluster.ftj("gamma")
    assert stored is not None
    # What the operator wrote is what the real API server's CRD schema accepts.
    assert schema_errors({k: stored[k] for k in ("apiVersion", "kind", "spec", "status")}) == []
    assert status["metrics"]["delta"]["loss"] == -0.8
    assert status["artifacts"]["adapter"] == "s3://out/run/adapter"
    assert status["reproducibility"]["seed"] == 42
    # status.promotion travels compact and comes back whole (artifacts and gates refilled).
    promoted = status["promotion"]
    assert promoted["registry"]["version"] == "4" and promoted["state"] == "Promoted"
    assert promoted["artifacts"]["adapter"] == "s3://out/run/adapter"
    assert promoted["gates"] == ["delta.loss < 0: passed (actual -0.8)"]
    assert condition(status, "GatesPassed")["status"] == "True"
    assert condition(status, "Succeeded")["reason"] == "TrainingComplete"
    assert status["completionTime"] == "2026-01-01T01:00:00Z"
    wait_for(
        "a TrainingComplete event",
        lambda: "TrainingComplete" in [e["reason"] for e in cluster.events("gamma")],
    )


def test_user_error_fails_with_the_trainers_message(cluster: Cluster) -> None:
    from kubetune_trainer.report import failure_status, termination_message

    create(cluster, manifest("delta"))
    job = trainer_job(cluster, "delta")
    text = termination_message(failure_status("dataset.source: row 3: missing field 'output'"))
    add_pod(
        cluster,
        job,
        "delta-1",
        {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": api.EXIT_USER_ERROR,
                            "reason": "Error",
                            "message": text,
                        }
                    },
                }
            ],
        },
    )
    set_job_status(
        cluster,
        job,
        {
            "failed": 1,
            "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}],
        },
    )
    status = cluster.wait_phase("delta", "Failed")
    stored = cluster.ftj("delta")
    assert stored is not None
    assert schema_errors({k: stored[k] for k in ("apiVersion", "kind", "spec", "status")}) == []
    failed = condition(status, "Failed")
    assert failed["reason"] == "UserError"
    assert "row 3: missing field 'output'" in failed["message"]
    assert status["attempts"] == 1


def test_suspend_and_spec_change(cluster: Cluster) -> None:
    create(cluster, manifest("eps"))
    trainer_job(cluster, "eps")
    cluster.kube.patch(FTJ, "finetunejobs", "default", "eps", {"spec": {"suspend": True}})
    wait_for(
        "Job suspended",
        lambda: (
            cluster.kube.get("batch/v1", "jobs", "default", "eps-trainer")["spec"].get("suspend")
            is True
        ),
    )
    cluster.wait_phase("eps", "Suspended")
    cluster.kube.patch(FTJ, "finetunejobs", "default", "eps", {"spec": {"suspend": False}})
    wait_for(
        "Job resumed",
        lambda: (
            cluster.kube.get("batch/v1", "jobs", "default", "eps-trainer")["spec"].get("suspend")
            is False
        ),
    )
    cluster.wait_phase("eps", "Pending")

    cluster.kube.patch(
        FTJ, "finetunejobs", "default", "eps", {"spec": {"training": {"maxSteps": 99}}}
    )

    def ignored_condition() -> dict[str, Any] | None:
        status = cluster.status("eps")
        return next(
            (c for c in status.get("conditions", []) if c["type"] == "SpecChangeIgnored"), None
        )

    ignored = wait_for("SpecChangeIgnored", ignored_condition)
    assert ignored["status"] == "True" and "spec.training.maxSteps" in ignored["message"]
    cm = cluster.kube.get("v1", "configmaps", "default", "eps-config")
    assert '"maxSteps": 10' in cm["data"]["config.json"]  # the running config did not change


def test_restart_keeps_children_unique_and_delete_collects_them(cluster: Cluster) -> None:
    create(cluster, manifest("zeta"))
    trainer_job(cluster, "zeta")
    counters = cluster.emulator.emulator.counters  # type: ignore[union-attr]
    jobs_before = counters.by_resource[("create", "jobs")]
    cluster.stop_operator()
    create(cluster, manifest("eta"))  # created while the operator is down
    cluster.start_operator()
    trainer_job(cluster, "eta")
    cluster.wait_phase("zeta", "Pending")
    names = [j["metadata"]["name"] for j in cluster.kube.list("batch/v1", "jobs", "default")]
    assert names.count("zeta-trainer") == 1 and names.count("eta-trainer") == 1
    # zeta's Job was found (409) rather than made again; only eta's is new.
    attempted = counters.by_resource[("create", "jobs")] - jobs_before
    assert cluster.kube.get("batch/v1", "jobs", "default", "zeta-trainer") is not None
    assert attempted >= 1

    cluster.kube.delete(FTJ, "finetunejobs", "default", "zeta")
    wait_for("zeta gone", lambda: cluster.ftj("zeta") is None)
    assert cluster.kube.get("batch/v1", "jobs", "default", "zeta-trainer") is None
    assert cluster.kube.get("v1", "configmaps", "default", "zeta-config") is None


def test_liveness_and_operator_metrics_endpoints(cluster: Cluster) -> None:
    import urllib.request

    create(cluster, manifest("theta"))
    cluster.wait_phase("theta", "Pending")
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.health_port}/healthz") as r:
        assert r.status == 200
    page = wait_for(
        "theta counted in the operator metrics",
        lambda: (
            (
                text := urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics")
                .read()
                .decode()
            )
            and 'kubetune_reconcile_duration_seconds_count{handler="create"}' in text
            and text
        ),
    )
    pending = [
        line
        for line in page.splitlines()
        if line.startswith('kubetune_finetunejobs{phase="Pending"}')
    ]
    assert pending and float(pending[0].split()[-1]) >= 1
    log = cluster.operator_logs[-1].read_text()
    assert "Timer 'refresh' succeeded." not in log  # per-tick noise is filtered


def test_namespaced_operator_ignores_other_namespaces(tmp_path: Path) -> None:
    c = Cluster(tmp_path, progress_interval=0.3)
    try:
        for ns in ("team-a", "team-b"):  # kopf waits for a watched namespace to exist
            c.kube.create("v1", "namespaces", None, {"metadata": {"name": ns}})
        c.start_operator(
            "--namespace",
            "team-a",
            KUBETUNE_LOG_FORMAT="json",
            KUBETUNE_LICENSE_ALLOWLIST="CC0-1.0, Apache-2.0",
        )
        for ns in ("team-b", "team-a"):
            doc = manifest("iota")
            doc["metadata"]["namespace"] = ns
            c.kube.create(FTJ, "finetunejobs", ns, doc)
        wait_for("team-a's Job", lambda: c.kube.get("batch/v1", "jobs", "team-a", "iota-trainer"))
        time.sleep(1.0)  # several ticks: team-b stays untouched
        other = c.kube.get(FTJ, "finetunejobs", "team-b", "iota")
        assert "status" not in other and not other["metadata"].get("finalizers")
        assert c.kube.get("batch/v1", "jobs", "team-b", "iota-trainer") is None
        # The platform's license allow-list is enforced before any pod is scheduled.
        refused = manifest("kappa")
        refused["metadata"]["namespace"] = "team-a"
        refused["spec"]["dataset"]["license"] = {"name": "CC-BY-NC-4.0", "usage": "research"}
        c.kube.create(FTJ, "finetunejobs", "team-a", refused)
        status = wait_for(
            "kappa refused",
            lambda: (
                (s := (c.ftj("kappa", "team-a") or {}).get("status") or {}).get("phase") == "Failed"
                and s
            ),
        )
        validated = condition(status, "Validated")
        assert validated["status"] == "False"
        assert "spec.dataset.license.name" in validated["message"]
        assert "CC0-1.0" in validated["message"]  # says what is allowed
        assert c.kube.get("batch/v1", "jobs", "team-a", "kappa-trainer") is None
        config = c.kube.get("v1", "configmaps", "team-a", "iota-config")
        assert json.loads(config["data"]["config.json"])["policy"]["allowedLicenses"] == [
            "CC0-1.0",
            "Apache-2.0",
        ]
        lines = [ln for ln in c.operator_logs[-1].read_text().splitlines() if ln.startswith("{")]
        assert lines and all("message" in json.loads(ln) for ln in lines)  # KUBETUNE_LOG_FORMAT
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


@pytest.mark.parametrize("example", ["lora-s3", "multi-gpu", "qlora-gpu", "full-finetune"])
def test_kubectl_applies_the_examples(cluster: Cluster, example: str) -> None:
    from tests.support.operator_harness import ROOT

    path = ROOT / "examples" / f"{example}.yaml"
    doc = yaml.safe_load(path.read_text())
    name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace", "default")
    cluster.kubectl("apply", "--validate=false", "-f", str(path))
    status = wait_for(
        f"{example} reconciled",
        lambda: (
            (s := (cluster.ftj(name, namespace) or {}).get("status") or {}).get("jobName") and s
        ),
    )
    assert status["phase"] in ("Pending", "Suspended")
    job = cluster.kube.get("batch/v1", "jobs", namespace, f"{name}-trainer")
    nodes = doc["spec"].get("resources", {}).get("numNodes", 1)
    assert job["spec"]["completions"] == nodes
    service = cluster.kube.get("v1", "services", namespace, f"{name}-nodes")
    assert (service is not None) == (nodes > 1)


def test_a_deleted_job_is_made_again(cluster: Cluster) -> None:
    create(cluster, manifest("lam"))
    first = trainer_job(cluster, "lam")
    cluster.wait_phase("lam", "Pending")
    cluster.kube.delete("batch/v1", "jobs", "default", "lam-trainer")
    again = wait_for(
        "a new lam-trainer Job",
        lambda: (
            (j := cluster.kube.get("batch/v1", "jobs", "default", "lam-trainer"))
            and j["metadata"]["uid"] != first["metadata"]["uid"]
            and j
        ),
    )
    assert again["spec"]["template"] == first["spec"]["template"]
