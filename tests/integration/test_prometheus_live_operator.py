"""A real Prometheus scrapes the real running operator (the session's `kubetune operator` on the
real control plane): the phase series follow the FineTuneJobs that kubectl creates and deletes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.cluster import Cluster
from tests.support.helm_chart import NAMESPACE, RELEASE
from tests.support.manifests import minimal
from tests.support.prometheus import Prometheus, prometheus

pytestmark = pytest.mark.timeout(240)

JOB = f"{RELEASE}-kubetune-metrics"


@pytest.fixture
def live(cluster: Cluster) -> Iterator[tuple[Cluster, Prometheus]]:
    session = cluster.session

    # The gauges count every namespace the operator watches: this test's only, and one licence
    # allowed.
    session.restart_operator(KUBETUNE_NAMESPACE=cluster.ns, KUBETUNE_LICENSE_ALLOWLIST="Apache-2.0")
    scrape = [
        {
            "job_name": JOB,
            "honor_labels": True,
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{session.metrics_port}"],
                    "labels": {"namespace": NAMESPACE},
                }
            ],
        }
    ]
    workdir = session.root / f"prometheus-{cluster.ns}"
    workdir.mkdir()
    try:
        with prometheus(workdir, scrape) as prom:
            try:
                prom.wait_query(f'up{{job="{JOB}"}} == 1', lambda r: len(r) == 1, timeout=60)
            except AssertionError:
                raise AssertionError(
                    f"Prometheus never scraped the operator\n{cluster.logs()}"
                ) from None
            yield cluster, prom
    finally:
        session.restart_operator()


def phases(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"]["phase"]: float(s["value"][1]) for s in result}


def test_prometheus_sees_jobs_move_through_phases(live: tuple[Cluster, Prometheus]) -> None:
    cluster, prom = live
    good = minimal()
    good["metadata"]["name"] = "waiting"
    good["spec"]["dataset"]["license"]["name"] = "Apache-2.0"
    # A Secret that does not exist: the pod cannot start (CreateContainerConfigError), so the
    # job waits in Pending as long as this test wants.
    good["spec"]["storage"] = {"s3": {"credentialsSecret": "no-such-secret"}}
    bad = minimal()  # CC-BY-4.0: outside the allow-list, refused by the operator (Failed)
    bad["metadata"]["name"] = "not-allowed"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([good, bad]))

    result = prom.wait_query(
        "kubetune_finetunejobs",
        lambda r: phases(r).get("Pending") == 1.0 and phases(r).get("Failed") == 1.0,
        timeout=60,
    )
    assert set(phases(result)) == {"Pending", "Suspended", "Running", "Succeeded", "Failed"}
    waiting = prom.wait_query(
        "kubetune_finetunejob_pending_since_timestamp_seconds", lambda r: len(r) == 1
    )
    assert waiting[0]["metric"]["name"] == "waiting"
    assert waiting[0]["metric"]["namespace"] == cluster.ns  # the job's, kept by honor_labels
    handled = prom.wait_query(
        'kubetune_reconcile_duration_seconds_count{handler="create"}',
        lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 2,
    )
    assert handled
    assert prom.query('kubetune_operator_info{version!=""}')

    cluster.kubectl("delete", "finetunejob", "waiting", "--wait=false")
    prom.wait_query(
        "kubetune_finetunejobs",
        lambda r: phases(r).get("Pending") == 0.0 and phases(r).get("Failed") == 1.0,
        timeout=60,
    )
    prom.wait_query("kubetune_finetunejob_pending_since_timestamp_seconds", lambda r: r == [])
