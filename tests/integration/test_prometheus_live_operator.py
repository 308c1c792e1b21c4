"""A real Prometheus scrapes the real running operator (`kubetune operator` against the
emulator): the phase series follow the FineTuneJobs that kubectl creates and deletes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.helm_chart import NAMESPACE, RELEASE
from tests.support.operator_harness import ROOT, Cluster
from tests.support.prometheus import Prometheus, free_port, prometheus

pytestmark = pytest.mark.timeout(180)

JOB = f"{RELEASE}-kubetune-metrics"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Prometheus]]:
    tmp = tmp_path_factory.mktemp("live-operator")
    cluster = Cluster(tmp)
    port = free_port()
    try:
        # Started here rather than by cluster.start_operator(): this test must know the port.
        log = tmp / "operator.log"
        cluster.operator_logs.append(log)
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "KUBETUNE_METRICS_PORT": str(port),
            "KUBETUNE_HEALTH_PORT": str(free_port()),
        }
        with log.open("wb") as out:
            cluster.operator = subprocess.Popen(
                [sys.executable, "-m", "kubetune.cli", "operator"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        scrape = [
            {
                "job_name": JOB,
                "honor_labels": True,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE}}
                ],
            }
        ]
        with prometheus(tmp, scrape) as prom:
            try:
                prom.wait_query(f'up{{job="{JOB}"}} == 1', lambda r: len(r) == 1, timeout=60)
            except AssertionError:
                raise AssertionError(
                    f"the operator never served /metrics\n{cluster.logs()}"
                ) from None
            yield cluster, prom
    finally:
        cluster.close()


def phases(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"]["phase"]: float(s["value"][1]) for s in result}


def test_prometheus_sees_jobs_move_through_phases(live: tuple[Cluster, Prometheus]) -> None:
    cluster, prom = live
    good = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "no-training"
    del bad["spec"]["training"]  # the operator refuses it: Failed, Validated=False
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all([good, bad]))

    # No kubelet: the quickstart job gets its Job and waits in Pending.
    result = prom.wait_query(
        "kubetune_finetunejobs",
        lambda r: phases(r).get("Pending") == 1.0 and phases(r).get("Failed") == 1.0,
        timeout=60,
    )
    assert set(phases(result)) == {"Pending", "Suspended", "Running", "Succeeded", "Failed"}
    waiting = prom.wait_query(
        "kubetune_finetunejob_pending_since_timestamp_seconds", lambda r: len(r) == 1
    )
    assert waiting[0]["metric"]["name"] == "quickstart"
    assert waiting[0]["metric"]["namespace"] == "default"  # the job's, kept by honor_labels
    handled = prom.wait_query(
        'kubetune_reconcile_duration_seconds_count{handler="create"}',
        lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 2,
    )
    assert handled
    assert prom.query('kubetune_operator_info{version!=""}')

    cluster.kubectl("delete", "finetunejob", "quickstart", "--wait=false")
    prom.wait_query(
        "kubetune_finetunejobs",
        lambda r: phases(r).get("Pending") == 0.0 and phases(r).get("Failed") == 1.0,
        timeout=60,
    )
    prom.wait_query("kubetune_finetunejob_pending_since_timestamp_seconds", lambda r: r == [])
