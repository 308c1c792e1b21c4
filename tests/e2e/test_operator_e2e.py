"""End to end: kubectl applies a FineTuneJob to the emulated API server, the real operator
creates the Job, the kubelet fixture runs the real trainer (`python -m kubetune_trainer`) as a
local process reading the demo model and data from a moto S3 server, and the status goes
Pending -> Running (with progress) -> Succeeded with metrics and artifacts that exist in S3.

Also: a trainer user error, a pod killed mid-run that resumes, suspend/resume, delete mid-run,
an operator restart mid-run. Each run is a few optimizer steps of the tiny demo model.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import manifests
from tests.support import s3 as s3_support
from tests.support.crd_schema import schema_errors
from tests.support.operator_harness import ROOT, Cluster, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

DEMO_MODEL = ROOT / "examples" / "demo-model"
DATASET = ROOT / "examples" / "data" / "quickstart.jsonl"


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    """A bucket with the demo model under model/ and the quickstart data under data/."""
    name = s3_support.new_bucket(s3_server)
    client = s3_support.client(s3_server)
    for path in DEMO_MODEL.iterdir():
        if path.is_file():
            client.upload_file(str(path), name, f"model/{path.name}")
    client.upload_file(str(DATASET), name, "data/train.jsonl")
    rows = DATASET.read_text().splitlines()
    client.put_object(
        Bucket=name,
        Key="data/bad.jsonl",
        Body="\n".join([*rows[:5], '{"instruction": "no output"}', *rows[5:40]]),
    )
    return name


@pytest.fixture
def cluster(tmp_path: Path, s3_server: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, progress_interval=0.5, crd_via_kubectl=True)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials", "namespace": "default"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": s3_support.TEST_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": s3_support.TEST_SECRET,
        },
    }
    c.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(secret))
    c.start_operator()
    c.start_kubelet()
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def manifest(name: str, bucket: str, endpoint: str, **training: Any) -> str:
    spec = {
        "model": {"source": f"s3://{bucket}/model"},
        "dataset": {
            "source": f"s3://{bucket}/data/{training.pop('data', 'train.jsonl')}",
            "format": "alpaca",
            "license": {"name": "CC0-1.0", "usage": "research"},
            "maxSeqLength": 96,
        },
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "training": {
            "maxSteps": 4,
            "batchSize": 8,
            "evalEverySteps": 2,
            "checkpointEverySteps": 2,
            **training,
        },
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
        "runPolicy": {"backoffLimit": 2},
    }
    return yaml.safe_dump(manifests.document(spec, name=name, namespace="default"))


def keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    client = s3_support.client(endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_key(uri: str, bucket: str) -> str:
    assert uri.startswith(f"s3://{bucket}/"), uri
    return uri[len(f"s3://{bucket}/") :]


def progress_seen(cluster: Cluster, name: str, at_least: int) -> dict[str, Any]:
    return wait_for(
        f"{name} Running with progress step >= {at_least}",
        lambda: (
            (s := cluster.status(name)).get("phase") == "Running"
            and (s.get("progress") or {}).get("step", 0) >= at_least
            and s
        ),
        timeout=120,
        every=0.1,
    )


# --------------------------------------------------------------------------------------------


def test_apply_to_succeeded_with_artifacts_in_s3_across_an_operator_restart(
    cluster: Cluster, bucket: str, s3_server: str
) -> None:
    cluster.kubectl(
        "apply",
        "--validate=false",
        "-f",
        "-",
        input=manifest("e2e-ok", bucket, s3_server, maxSteps=8),
    )
    phases = [cluster.wait_phase("e2e-ok", "Pending", timeout=30)["phase"]]
    running = progress_seen(cluster, "e2e-ok", 1)
    phases.append(running["phase"])
    assert 0 < running["progress"]["percent"] <= 100
    assert running["progress"]["totalSteps"] == 8

    cluster.stop_operator()  # mid-run: the trainer goes on; the status waits
    cluster.start_operator()
    status = cluster.wait_phase("e2e-ok", "Succeeded", timeout=180)
    assert phases == ["Pending", "Running"]
    assert status["progress"]["step"] == 8 and status["progress"]["percent"] == 100.0
    assert set(status["metrics"]["delta"]) == {"loss"}
    assert status["metrics"]["tuned"]["loss"] < 100
    assert next(c for c in status["conditions"] if c["type"] == "GatesPassed")["status"] == "True"
    assert status["reproducibility"]["dataHash"] and status["reproducibility"]["seed"] == 42
    stored = set(keys(s3_server, bucket, "runs/e2e-ok/"))
    adapter = s3_key(status["artifacts"]["adapter"], bucket)
    assert any(k.startswith(adapter + "/") for k in stored), (adapter, sorted(stored))
    assert s3_key(status["artifacts"]["report"], bucket) in stored
    jobs = cluster.kube.list("batch/v1", "jobs", "default")
    assert [j["metadata"]["name"] for j in jobs] == ["e2e-ok-trainer"]  # restart: no duplicate
    reasons = [e["reason"] for e in cluster.events("e2e-ok")]
    assert "JobCreated" in reasons and "TrainingComplete" in reasons
    assert reasons.count("TrainerRunning") == 1  # the restart did not flip Running -> Pending
    out = cluster.kubectl("get", "ftj", "e2e-ok", "-o", "jsonpath={.status.phase}")
    assert out == "Succeeded"
    # The CRD's printer columns read what the operator writes (server-side Table).
    header, row = cluster.kubectl("get", "ftj", "e2e-ok").splitlines()
    assert header.split()[:4] == ["NAME", "PHASE", "PROGRESS", "LOSS"]
    assert row.split()[:3] == ["e2e-ok", "Succeeded", "100"]
    stored = cluster.ftj("e2e-ok")
    assert stored is not None  # and the status is one the real API server's schema accepts:
    assert schema_errors({k: stored[k] for k in ("apiVersion", "kind", "spec", "status")}) == []


def test_bad_spec_is_refused_and_nothing_runs(
    cluster: Cluster, bucket: str, s3_server: str
) -> None:
    # A cluster that enforces the CRD schema refuses this at apply time; the emulator does not,
    # so this is the operator's own check (as on a cluster without the schema).
    bad = yaml.safe_load(manifest("e2e-spec", bucket, s3_server))
    bad["spec"]["method"]["lora"]["r"] = 0
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(bad))
    status = cluster.wait_phase("e2e-spec", "Failed", timeout=30)
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["reason"] == "SpecInvalid" and "spec.method.lora.r" in validated["message"]
    assert "SpecInvalid" in [e["reason"] for e in cluster.events("e2e-spec")]
    assert cluster.kube.list("batch/v1", "jobs", "default") == []
    assert cluster.kubelet is not None and not cluster.kubelet.logs  # no trainer ever ran


def test_trainer_user_error_fails_the_job_at_once(
    cluster: Cluster, bucket: str, s3_server: str
) -> None:
    cluster.kubectl(
        "apply",
        "--validate=false",
        "-f",
        "-",
        input=manifest("e2e-bad", bucket, s3_server, data="bad.jsonl"),
    )
    status = cluster.wait_phase("e2e-bad", "Failed", timeout=120)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "UserError"
    assert "row 6" in failed["message"] or "line 6" in failed["message"], failed["message"]
    assert status["attempts"] == 1  # exit 10 -> FailJob: no retry


def test_killed_pod_resumes_from_checkpoint(cluster: Cluster, bucket: str, s3_server: str) -> None:
    cluster.kubectl(
        "apply",
        "--validate=false",
        "-f",
        "-",
        input=manifest("e2e-kill", bucket, s3_server, maxSteps=12),
    )
    wait_for(
        "a committed checkpoint",
        lambda: any(
            k.endswith("manifest.json")
            for k in keys(s3_server, bucket, "runs/e2e-kill/checkpoints/")
        ),
        timeout=120,
    )
    assert cluster.kubelet is not None
    cluster.kubelet.kill("default", "e2e-kill-trainer", signal.SIGKILL)
    status = cluster.wait_phase("e2e-kill", "Succeeded", timeout=180)
    assert status["attempts"] == 2
    assert "Retrying" in [e["reason"] for e in cluster.events("e2e-kill")]
    logs = [p.read_text() for p in cluster.kubelet.logs if "e2e-kill" in str(p)]
    assert len(logs) == 2
    assert "resum" in logs[1].lower(), logs[1][-2000:]


def test_suspend_resume_then_delete_mid_run(cluster: Cluster, bucket: str, s3_server: str) -> None:
    cluster.kubectl(
        "apply",
        "--validate=false",
        "-f",
        "-",
        input=manifest("e2e-sus", bucket, s3_server, maxSteps=200),
    )
    progress_seen(cluster, "e2e-sus", 1)
    cluster.kubectl("patch", "ftj", "e2e-sus", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    cluster.wait_phase("e2e-sus", "Suspended", timeout=60)
    wait_for("the pod removed", lambda: not cluster.kube.list("v1", "pods", "default"))
    cluster.kubectl("patch", "ftj", "e2e-sus", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    progress_seen(cluster, "e2e-sus", 1)

    cluster.kubectl("delete", "ftj", "e2e-sus", "--wait=false")
    wait_for("the FineTuneJob gone", lambda: cluster.ftj("e2e-sus") is None, timeout=30)
    wait_for(
        "its Job, pods and ConfigMap gone",
        lambda: (
            not cluster.kube.list("batch/v1", "jobs", "default")
            and not cluster.kube.list("v1", "pods", "default")
            and cluster.kube.get("v1", "configmaps", "default", "e2e-sus-config") is None
        ),
    )
    assert cluster.kubelet is not None
    wait_for("the trainer process stopped", lambda: not cluster.kubelet.runs)  # type: ignore[union-attr]
    # Artifacts stay: deleting the resource never deletes what the trainer wrote.
    assert keys(s3_server, bucket, "runs/e2e-sus/checkpoints/")
