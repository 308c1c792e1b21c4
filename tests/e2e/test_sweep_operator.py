"""A FineTuneSweep on the real control plane (tests/support/controlplane.py): the operator, as
the chart's ServiceAccount, makes the trials (FineTuneJobs), the real Job controller makes their
pods and the process kubelet runs each trial's real trainer on the demo model from a moto S3
server; median pruning suspends a trial that falls behind, an operator restart mid-sweep
changes nothing, the operator's per-sweep metrics match the status, and deleting the sweep
deletes its trials and their Jobs (owner references, the real garbage collector).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubetune import sweep, sweep_api
from tests.e2e.test_operator_e2e import manifest
from tests.support.cluster import Cluster, demo_bucket

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

FTS = "kubetune.io/v1alpha1"
BAD_LR = 1e-7  # learns nothing: behind the median at its first evaluation
LONG = 60  # steps of the trials that run long enough to be seen mid-run


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    return demo_bucket(s3_server)


def sweep_manifest(bucket: str, endpoint: str, namespace: str) -> dict[str, Any]:
    template = yaml.safe_load(manifest("t", bucket, endpoint))["spec"]
    template["output"]["destination"] = f"s3://{bucket}/sweeps/s"
    template["training"]["checkpointEverySteps"] = 1000
    document: dict[str, Any] = {
        "apiVersion": FTS,
        "kind": "FineTuneSweep",
        "metadata": {"name": "s", "namespace": namespace},
        "spec": {
            "template": template,
            "parameters": [
                {"path": "training.learningRate", "type": "categorical", "choices": [5e-3, BAD_LR]},
                {"path": "training.maxSteps", "type": "categorical", "choices": [4, 6, LONG]},
            ],
            "objective": {"metric": "evalLoss", "direction": "minimize"},
            "algorithm": {"sampler": "grid", "seed": 0},
            "maxTrials": 6,
            "parallelism": 2,
            "earlyStopping": {"startupTrials": 2},
        },
    }

    # The grid's order follows the seed: take one that runs both short good trials first and
    # the long bad one after them, so it is pruned mid-run.
    def order(seed: int) -> list[tuple[float, int]]:
        spec = {**document["spec"], "algorithm": {"sampler": "grid", "seed": seed}}
        parsed = sweep_api.parse_sweep({**document, "spec": spec}).spec
        return [(c["training.learningRate"], c["training.maxSteps"]) for c in sweep._grid(parsed)]

    document["spec"]["algorithm"]["seed"] = next(
        s
        for s in range(200)
        if set(order(s)[:2]) == {(5e-3, 4), (5e-3, 6)} and order(s)[2] == (BAD_LR, LONG)
    )
    return document


def trials(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.kube.list(FTS, "finetunejobs", cluster.ns, "kubetune.io/finetunesweep=s")


def sweep_status(cluster: Cluster) -> dict[str, Any]:
    obj = cluster.kube.get(FTS, "finetunesweeps", cluster.ns, "s") or {}
    return dict(obj.get("status") or {})


def sweep_series(cluster: Cluster) -> dict[tuple[str, str], float]:
    """This sweep's series on the operator's /metrics: ("trials", phase) and ("best", metric)."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{cluster.session.metrics_port}/metrics", timeout=5
    ) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("namespace") != cluster.ns or sample.labels.get("name") != "s":
                continue
            if sample.name == "kubetune_finetunesweep_trials":
                out[("trials", sample.labels["phase"])] = sample.value
            elif sample.name == "kubetune_finetunesweep_best_objective":
                out[("best", sample.labels["metric"])] = sample.value
    return out


def test_sweep_runs_prunes_survives_a_restart_and_deletes_its_trials(
    cluster: Cluster, bucket: str, s3_server: str
) -> None:
    cluster.s3_credentials()
    cluster.apply(sweep_manifest(bucket, s3_server, cluster.ns))
    cluster.wait_for("two trials", lambda: len(trials(cluster)) == 2, timeout=60)
    cluster.wait_for("the status", lambda: sweep_status(cluster).get("running") == 2, timeout=30)
    assert len(trials(cluster)) == 2  # parallelism 2

    cluster.session.restart_operator()  # mid-sweep: the trials are the whole state

    def finished() -> dict[str, Any] | None:
        s = sweep_status(cluster)
        seen = {
            j["metadata"]["name"]: (
                (j.get("status") or {}).get("phase"),
                j["spec"].get("suspend"),
                ((j.get("status") or {}).get("progress") or {}).get("evalHistory"),
            )
            for j in trials(cluster)
        }
        print(s.get("phase"), s.get("message"), seen, flush=True)
        return s if s.get("phase") in ("Succeeded", "Failed") else None

    done = cluster.wait_for("the sweep to finish", finished, timeout=420, every=5.0)
    jobs = {j["metadata"]["name"]: j for j in trials(cluster)}
    assert sorted(jobs) == [f"s-t{n:03d}" for n in range(6)], sorted(jobs)  # no more, no less
    combos = {
        json.dumps(
            json.loads(j["metadata"]["annotations"]["kubetune.io/trial-params"]), sort_keys=True
        )
        for j in jobs.values()
    }
    assert len(combos) == 6  # each grid point once
    assert done["phase"] == "Succeeded", done.get("message")

    rows = {r["name"]: r for r in done["trials"]}
    pruned = [n for n, r in rows.items() if r["phase"] == "Pruned"]
    assert pruned, rows
    bad_long = next(
        n
        for n, j in jobs.items()
        if j["spec"]["training"]["learningRate"] == BAD_LR
        and j["spec"]["training"]["maxSteps"] == LONG
    )
    assert bad_long in pruned and jobs[bad_long]["spec"]["suspend"] is True
    # the best trial: the lowest evalLoss among the trials' own (FineTuneJob) statuses
    finished = {
        n: j["status"]["progress"]["evalLoss"]
        for n, j in jobs.items()
        if j.get("status", {}).get("phase") == "Succeeded" and n not in pruned
    }
    best = min(finished, key=finished.__getitem__)
    assert done["best"]["name"] == best and done["bestObjective"] == finished[best]
    assert done["best"]["artifacts"]["adapter"].startswith(f"s3://{bucket}/sweeps/s/{best}")
    # measured by the trainer, carried by its termination message into the trial's status
    usage = jobs[best]["status"]["usage"]
    assert 0 < usage["trainableParameters"] < usage["parameters"] and usage["peakMemoryBytes"] > 0
    assert done.get("tradeoff", []) == []  # no method.type parameter: no trade-off table

    # The operator's per-sweep metrics, scraped from its /metrics endpoint.
    counts = {r["phase"]: 0 for r in rows.values()}
    for r in rows.values():
        counts[r["phase"]] += 1
    scraped = sweep_series(cluster)
    assert {k[1]: v for k, v in scraped.items() if k[0] == "trials"} == {
        p: float(counts.get(p, 0)) for p in ("Pending", "Running", "Succeeded", "Failed", "Pruned")
    }
    assert scraped[("best", "evalLoss")] == done["bestObjective"]

    assert len(cluster.jobs()) == 6  # one batch/v1 Job per trial
    cluster.kube.delete(FTS, "finetunesweeps", cluster.ns, "s")  # background propagation
    cluster.wait_for(
        "the trials and their Jobs deleted with the sweep (garbage collection)",
        lambda: trials(cluster) == [] and cluster.jobs() == [],
        timeout=120,
    )
    assert sweep_series(cluster) == {}  # its series went with it
