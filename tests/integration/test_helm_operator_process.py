"""The operator container as the chart renders it, run as a local process: the image's
entrypoint with the Deployment's args and env, on the real test cluster as the chart's
ServiceAccount. Its probes and metrics port answer where the Deployment says they are, and no
request of it is forbidden."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Session
from tests.support.dockerfile import OPERATOR_DOCKERFILE, entrypoint
from tests.support.helm_chart import CHART, one, render
from tests.support.prometheus import free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


@pytest.mark.parametrize("variant", ["default", "namespaced"])
def test_operator_runs_with_the_charts_args_env_and_probes(
    tmp_path: Path, variant: str, kube_session: Session
) -> None:
    metrics_port, health_port = free_port(), free_port()
    objects = render(
        CHART / "ci" / f"{variant}-values.yaml",
        sets=[f"operator.metricsPort={metrics_port}", f"operator.healthPort={health_port}"],
    )
    container: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {item["name"]: item["value"] for item in container["env"]}

    forbidden = len(kube_session.forbidden())
    log = (tmp_path / "operator.log").open("wb")
    process = subprocess.Popen(
        [*entrypoint(OPERATOR_DOCKERFILE, Path(sys.executable).parent), *container["args"]],
        env={**os.environ, **env, "KUBECONFIG": str(kube_session.operator_kubeconfig)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for probe in ("livenessProbe", "readinessProbe"):
            http = container[probe]["httpGet"]
            url = f"http://127.0.0.1:{ports[http['port']]}{http['path']}"
            wait_for(f"{probe} {url}", lambda url=url: get(url)[0] == 200, timeout=60)
        status, text = get(f"http://127.0.0.1:{ports['metrics']}/metrics")
        assert status == 200 and 'kubetune_finetunejobs{phase="Pending"}' in text
        assert process.poll() is None, "the operator exited"
        assert kube_session.forbidden()[forbidden:] == []
    except (AssertionError, TimeoutError) as error:
        log.flush()
        raise AssertionError(
            f"{error}\n{(tmp_path / 'operator.log').read_text()[-4000:]}"
        ) from None
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
