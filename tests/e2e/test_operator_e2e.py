"""End to end on the real control plane: kubectl applies a FineTuneJob, the operator (as the
chart's ServiceAccount) creates the Job, the real Job controller makes the pods, the process
kubelet runs the real trainer (`python -m kubetune_trainer`) reading the demo model and data
from a moto S3 server, and the status goes Pending -> Running (with progress) -> Succeeded with
metrics and artifacts that exist in S3.

Also on the real Job controller and garbage collector: exit 10 fails the Job at once (FailJob);
a SIGKILLed pod is replaced and resumes from the last checkpoint; exit 12 (SIGTERM) and an
eviction (DisruptionTarget) are not counted against backoffLimit; suspend and resume; deletion
with foreground and background propagation; an operator restart mid-run. Each run is a few
optimizer steps of the tiny demo model.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support import manifests
from tests.support import s3 as s3_support
from tests.support.cluster import DATASET, Cluster, demo_bucket
from tests.support.crd_schema import schema_errors

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    """demo_bucket, plus data/bad.jsonl: the quickstart rows with one that has no output."""
    name = demo_bucket(s3_server)
    client = s3_support.client(s3_server)
    rows = DATASET.read_text().splitlines()
    client.put_object(
        Bucket=name,
        Key="data/bad.jsonl",
        Body="\n".join([*rows[:5], '{"instruction": "no output"}', *rows[5:40]]),
    )
    return name


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[Cluster]:
    """The test's namespace with the S3 credentials Secret the FineTuneJobs reference."""
    cluster.s3_credentials()
    yield cluster


def manifest(name: str, bucket: str, endpoint: str, **training: Any) -> str:
    data = training.pop("data", "train.jsonl")
    resources = training.pop("resources", {"gpus": 0})
    run_policy = training.pop("runPolicy", {"backoffLimit": 2})
    doc = manifests.cluster_run(
        name,
        bucket,
        endpoint,
        dataset={"source": f"s3://{bucket}/data/{data}"},
        training={"maxSteps": 4, "checkpointEverySteps": 2, **training},
        resources=resources,
        runPolicy=run_policy,
    )
    return yaml.safe_dump(doc)


def keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    client = s3_support.client(endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_key(uri: str, bucket: str) -> str:
    assert uri.startswith(f"s3://{bucket}/"), uri
    return uri[len(f"s3://{bucket}/") :]


def progress_seen(cluster: Cluster, name: str, at_least: int) -> dict[str, Any]:
    return cluster.wait_for(
        f"{name} Running with progress step >= {at_least}",
        lambda: (
            (s := cluster.status(name)).get("phase") == "Running"
            and (s.get("progress") or {}).get("step", 0) >= at_least
            and s
        ),
        timeout=180,
        every=0.1,
    )


def checkpoint_committed(cluster: Cluster, s3: str, bucket: str, name: str) -> None:
    cluster.wait_for(
        "a committed checkpoint",
        lambda: any(
            k.endswith("manifest.json") for k in keys(s3, bucket, f"runs/{name}/checkpoints/")
        ),
        timeout=180,
    )


def operator_writes(cluster: Cluster, since: float) -> list[str]:
    """The operator's successful writes in this namespace since ``since`` (audit log)."""
    out = []
    for event in cluster.session.audit():
        ref = event.get("objectRef", {})
        stamp = event.get("stageTimestamp", "")
        if ref.get("namespace") != cluster.ns or event["verb"] not in ("create", "patch", "update"):
            continue
        if event.get("responseStatus", {}).get("code", 0) >= 300:  # e.g. 409: already there
            continue
        if time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone < since:
            continue
        out.append(f"{event['verb']} {ref.get('resource')}/{ref.get('subresource', '')}")
    return out


# --------------------------------------------------------------------------------------------


def test_quickstart_on_s3_succeeds_with_artifacts_across_an_operator_restart(
    ns: Cluster, bucket: str, s3_server: str
) -> None:
    ns.apply(manifest("e2e-ok", bucket, s3_server, maxSteps=8))
    phases = [ns.wait_phase("e2e-ok", "Pending", timeout=30)["phase"]]
    running = progress_seen(ns, "e2e-ok", 1)
    phases.append(running["phase"])
    assert 0 < running["progress"]["percent"] <= 100
    assert running["progress"]["totalSteps"] == 8

    restarted = time.time()
    ns.session.restart_operator()  # mid-run: the trainer goes on; the status waits
    ns.kubectl("wait", "--for=condition=Succeeded", "ftj/e2e-ok", "--timeout=240s")
    status = ns.status("e2e-ok")
    assert phases == ["Pending", "Running"]
    assert status["phase"] == "Succeeded"
    assert status["progress"]["step"] == 8 and status["progress"]["percent"] == 100.0
    assert set(status["metrics"]["delta"]) == {"loss"}
    assert status["metrics"]["tuned"]["loss"] < 100
    assert next(c for c in status["conditions"] if c["type"] == "GatesPassed")["status"] == "True"
    assert status["reproducibility"]["dataHash"] and status["reproducibility"]["seed"] == 42
    stored = set(keys(s3_server, bucket, "runs/e2e-ok/"))
    adapter = s3_key(status["artifacts"]["adapter"], bucket)
    assert any(k.startswith(adapter + "/") for k in stored), (adapter, sorted(stored))
    assert s3_key(status["artifacts"]["report"], bucket) in stored
    # The restart: one Job, no Running -> Pending flip, and no write storm.
    assert [j["metadata"]["name"] for j in ns.jobs()] == ["e2e-ok-trainer"]
    reasons = [e["reason"] for e in ns.events("e2e-ok")]
    assert "JobCreated" in reasons and "TrainingComplete" in reasons
    assert reasons.count("TrainerRunning") == 1
    writes = operator_writes(ns, restarted)
    elapsed = time.time() - restarted
    created = [w for w in writes if w.startswith("create") and "events" not in w]
    assert created == [], writes  # nothing made twice
    status_patches = writes.count("patch finetunejobs/status")
    # Progress patches are at most one per KUBETUNE_PROGRESS_MIN_INTERVAL (1 s here).
    assert status_patches <= elapsed + 5, (elapsed, writes)
    # The real Job controller's view agrees.
    job = ns.jobs()[0]
    assert job["status"]["succeeded"] == 1
    assert any(c["type"] == "Complete" for c in job["status"]["conditions"])
    # The CRD's printer columns read what the operator writes (server-side Table).
    header, row = ns.kubectl("get", "ftj", "e2e-ok").splitlines()
    assert header.split()[:4] == ["NAME", "PHASE", "PROGRESS", "LOSS"]
    assert row.split()[:3] == ["e2e-ok", "Succeeded", "100"]
    stored_obj = ns.ftj("e2e-ok")
    assert stored_obj is not None
    assert schema_errors({k: stored_obj[k] for k in ("apiVersion", "kind", "spec", "status")}) == []


def test_trainer_user_error_fails_the_job_at_once(ns: Cluster, bucket: str, s3_server: str) -> None:
    ns.apply(manifest("e2e-bad", bucket, s3_server, data="bad.jsonl"))
    status = ns.wait_phase("e2e-bad", "Failed", timeout=180)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "UserError"
    assert "row 6" in failed["message"] or "line 6" in failed["message"], failed["message"]
    assert status["attempts"] == 1  # exit 10 -> FailJob: no retry
    job = ns.jobs()[0]
    job_failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert job_failed["reason"] == "PodFailurePolicy", job_failed
    assert len(ns.pods("e2e-bad-trainer")) == 1


def test_killed_pod_is_replaced_and_resumes_from_checkpoint(
    ns: Cluster, bucket: str, s3_server: str
) -> None:
    ns.apply(manifest("e2e-kill", bucket, s3_server, maxSteps=12))
    checkpoint_committed(ns, s3_server, bucket, "e2e-kill")
    first = ns.running_pod("e2e-kill-trainer")["metadata"]["name"]
    ns.kill(first, signal.SIGKILL)
    status = ns.wait_phase("e2e-kill", "Succeeded", timeout=240)
    assert status["attempts"] == 2
    assert "Retrying" in [e["reason"] for e in ns.events("e2e-kill")]
    logs = ns.pod_logs("e2e-kill-trainer")
    assert len(logs) == 2 and first in logs
    second = next(text for name, text in logs.items() if name != first)
    assert "resum" in second.lower(), second[-2000:]
    job = ns.jobs()[0]
    assert job["status"].get("failed") == 1 and job["status"]["succeeded"] == 1


def test_sigterm_exit_12_and_eviction_do_not_count_against_backoff(
    ns: Cluster, bucket: str, s3_server: str
) -> None:
    # backoffLimit 0: one counted failure would fail the Job.
    ns.apply(manifest("e2e-pre", bucket, s3_server, maxSteps=200, runPolicy={"backoffLimit": 0}))
    progress_seen(ns, "e2e-pre", 1)
    first = ns.running_pod("e2e-pre-trainer")["metadata"]["name"]
    ns.kill(first, signal.SIGTERM)  # preemption: checkpoint, exit 12
    second = ns.wait_for(
        "a replacement pod",
        lambda: next(
            (
                p
                for p in ns.pods("e2e-pre-trainer")
                if p["metadata"]["name"] != first and p.get("status", {}).get("phase") == "Running"
            ),
            None,
        ),
        timeout=90,
    )["metadata"]["name"]
    terminated = ns.kube.get("v1", "pods", ns.ns, first)
    if terminated is not None:  # the Job controller may have let it go already
        state = terminated["status"]["containerStatuses"][0]["state"]["terminated"]
        assert state["exitCode"] == 12
    ns.evict(second)  # the API server marks it DisruptionTarget and deletes it
    ns.wait_for(
        "a third pod",
        lambda: [
            p
            for p in ns.pods("e2e-pre-trainer")
            if p["metadata"]["name"] not in (first, second)
            and p.get("status", {}).get("phase") == "Running"
        ],
        timeout=90,
    )
    job = ns.jobs()[0]
    assert not job["status"].get("failed"), job["status"]
    assert not any(c["type"] == "Failed" for c in job["status"].get("conditions") or [])
    status = ns.status("e2e-pre")
    assert status["phase"] in ("Running", "Pending"), status
    assert "Failed" not in [
        c["type"] for c in status.get("conditions") or [] if c["status"] == "True"
    ]
    logs = ns.pod_logs("e2e-pre-trainer")
    assert len(logs) == 3


def test_suspend_and_resume(ns: Cluster, bucket: str, s3_server: str) -> None:
    ns.apply(manifest("e2e-sus", bucket, s3_server, maxSteps=200))
    progress_seen(ns, "e2e-sus", 1)
    ns.kubectl("patch", "ftj", "e2e-sus", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    ns.wait_phase("e2e-sus", "Suspended", timeout=90)
    ns.wait_for("the pod removed", lambda: not ns.pods("e2e-sus-trainer"), timeout=90)
    job = ns.jobs()[0]
    assert job["spec"]["suspend"] is True
    ns.kubectl("patch", "ftj", "e2e-sus", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    progress_seen(ns, "e2e-sus", 1)


@pytest.mark.parametrize("cascade", ["foreground", "background"])
def test_delete_mid_run_the_garbage_collector_removes_the_children(
    ns: Cluster, bucket: str, s3_server: str, cascade: str
) -> None:
    name = f"e2e-del-{cascade[:4]}"
    ns.apply(manifest(name, bucket, s3_server, maxSteps=200))
    progress_seen(ns, name, 1)
    assert ns.kube.get("v1", "configmaps", ns.ns, f"{name}-config") is not None
    ns.kubectl("delete", "ftj", name, f"--cascade={cascade}", "--wait=false")
    ns.wait_for("the FineTuneJob gone", lambda: ns.ftj(name) is None, timeout=120)
    ns.wait_for(
        "its Job, pods and ConfigMap gone",
        lambda: (
            not ns.jobs()
            and not ns.pods()
            and ns.kube.get("v1", "configmaps", ns.ns, f"{name}-config") is None
        ),
        timeout=120,
    )
    # Artifacts stay: deleting the resource never deletes what the trainer wrote.
    assert keys(s3_server, bucket, f"runs/{name}/")


def test_two_nodes_rendezvous_through_the_headless_service_and_train_ddp(
    ns: Cluster, bucket: str, s3_server: str
) -> None:
    """numNodes: 2 -> an Indexed Job of two pods; torchrun (gloo) on each finds rank 0 at
    <job>-0.<service> (the kubelet resolves it as cluster DNS would); only rank 0 writes."""
    ns.apply(
        manifest("e2e-ddp", bucket, s3_server, maxSteps=4, resources={"gpus": 1, "numNodes": 2})
    )
    status = ns.wait_phase("e2e-ddp", "Succeeded", timeout=280)
    job = ns.jobs()[0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["status"]["succeeded"] == 2
    service = ns.kube.get("v1", "services", ns.ns, "e2e-ddp-nodes")
    assert service is not None and service["spec"]["clusterIP"] == "None"
    pods = {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
        for p in ns.pods("e2e-ddp-trainer")
    }
    assert sorted(pods) == ["0", "1"]
    rank0_ip = pods["0"]["status"]["podIP"]
    commands = {
        i: (ns.workdir / p["metadata"]["name"] / "command").read_text() for i, p in pods.items()
    }
    for index, command in commands.items():
        assert f"--master-addr={rank0_ip}" in command, command
        assert f"--node-rank={index}" in command, command
    logs = {i: (ns.workdir / p["metadata"]["name"] / "log").read_text() for i, p in pods.items()}
    assert logs["0"].count("[evaluate]") == 1 and "[evaluate]" not in logs["1"], logs["1"][-2000:]
    assert "artifacts" in status, status
    report = s3_key(status["artifacts"]["report"], bucket)
    body = s3_support.client(s3_server).get_object(Bucket=bucket, Key=report)["Body"].read()
    assert yaml.safe_load(body)["training"]["worldSize"] == 2


def _phase_and_reason(cluster: Cluster, name: str) -> tuple[str | None, str | None]:
    status = cluster.status(name)
    running = next((c for c in status.get("conditions") or [] if c["type"] == "Running"), {})
    return status.get("phase"), running.get("reason")


def test_kueue_admits_one_gpu_job_at_a_time(ns: Cluster, bucket: str, s3_server: str) -> None:
    """A ClusterQueue with nvidia.com/gpu: 1: of two 1-GPU FineTuneJobs the second waits
    (Pending, reason Queued) until the first finishes, then runs."""
    queue = f"cq-{ns.ns}"
    ns.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": "default-flavor"},
        }
    )
    ns.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": queue},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": ["nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": "default-flavor",
                                "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 1}],
                            }
                        ],
                    }
                ],
            },
        }
    )
    ns.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "team", "namespace": ns.ns},
            "spec": {"clusterQueue": queue},
        }
    )
    try:
        for name in ("kq-first", "kq-second"):
            doc = yaml.safe_load(
                manifest(name, bucket, s3_server, maxSteps=6, resources={"gpus": 1})
            )
            doc["spec"]["scheduling"] = {"queueName": "team"}
            ns.apply(doc)
            if name == "kq-first":
                progress_seen(ns, name, 1)
        assert ns.wait_for(
            "kq-second queued",
            lambda: _phase_and_reason(ns, "kq-second") == ("Pending", "Queued"),
            timeout=60,
        )
        assert not ns.pods("kq-second-trainer")  # Kueue keeps its Job suspended
        ns.wait_phase("kq-first", "Succeeded", timeout=240)
        progress_seen(ns, "kq-second", 1)  # admitted once the GPU is free
        ns.wait_phase("kq-second", "Succeeded", timeout=240)
        workloads = ns.kube.list("kueue.x-k8s.io/v1beta2", "workloads", ns.ns)
        assert len(workloads) == 2
    finally:
        ns.kubectl("delete", "clusterqueue", queue, "--wait=false", check=False)
