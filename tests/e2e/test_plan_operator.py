"""The operator's plan on the real control plane: with planning on (KUBETUNE_PLAN_MODELS, the
operator's own S3 identity), a FineTuneJob gets `status.plan` from the demo model's headers in
a moto S3 server, and one whose estimate exceeds its memory is refused with DoesNotFit (a
condition and an Event) before any Job exists. No training runs: the job that fits is
suspended."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubetune import plan
from tests.e2e.test_operator_e2e import manifest
from tests.support import s3 as s3_support
from tests.support.cluster import DEMO_MODEL, Cluster

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture
def planning(cluster: Cluster, s3_server: str) -> Iterator[tuple[Cluster, str]]:
    """The operator restarted with planning on and read-only S3 credentials of its own (what
    the chart's planCredentialsSecret gives it); back to the session's operator afterwards."""
    bucket = s3_support.new_bucket(s3_server)
    client = s3_support.client(s3_server)
    for path in DEMO_MODEL.iterdir():
        if path.is_file():
            client.upload_file(str(path), bucket, f"model/{path.name}")
    cluster.session.restart_operator(
        KUBETUNE_PLAN_MODELS="true",
        AWS_ACCESS_KEY_ID=s3_support.TEST_KEY_ID,
        AWS_SECRET_ACCESS_KEY=s3_support.TEST_SECRET,
    )
    try:
        yield cluster, bucket
    finally:
        cluster.session.restart_operator()


def job(name: str, bucket: str, endpoint: str, memory: str, **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        manifest(name, bucket, endpoint, resources={"gpus": 0, "memory": memory})
    )
    doc["spec"].update(spec)
    return doc


def test_status_plan_and_does_not_fit(planning: tuple[Cluster, str], s3_server: str) -> None:
    cluster, bucket = planning
    cluster.apply(job("too-big", bucket, s3_server, "32Mi"))
    refused = cluster.wait_phase("too-big", "Failed", timeout=60)
    validated = next(c for c in refused["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "False" and validated["reason"] == "DoesNotFit"
    assert "lora needs about" in validated["message"] and "32.0 MiB" in validated["message"]
    assert refused["plan"]["deviceMemoryBytes"] == 32 * 2**20
    assert refused["plan"]["deviceMemoryFrom"] == "resources.memory"
    assert cluster.jobs() == []  # refused before any Job
    reasons = [e["reason"] for e in cluster.events("too-big")]
    assert "DoesNotFit" in reasons

    cluster.apply(job("fits", bucket, s3_server, "2Gi", suspend=True))
    planned = cluster.wait_for(
        "status.plan on the job that fits",
        lambda: (s := cluster.status("fits")).get("plan") and s,
        timeout=60,
    )
    _, tensors = plan.read_model(DEMO_MODEL)
    assert planned["plan"]["parameters"] == sum(t.numel for t in tensors)
    lora = next(m for m in planned["plan"]["methods"] if m["method"] == "lora")
    assert lora["fits"] is True and planned["plan"]["requested"] == "lora"
    assert planned["phase"] == "Suspended"
    assert [j["metadata"]["name"] for j in cluster.jobs()] == ["fits-trainer"]
