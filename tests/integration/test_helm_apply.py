"""The rendered chart applies with the real kubectl, with validation, to a real kube-apiserver
(a fresh control plane per test: tests/support/controlplane.py): every object is admitted and
stored as rendered (plus the server's defaults), the chart's CRD serves FineTuneJobs with its
printer columns, and a second apply is a no-op — what a GitOps tool does on every sync.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import established, wait_for
from tests.support.controlplane import ControlPlane
from tests.support.helm_chart import CHART, CI_VALUES, NAMESPACE, ROOT, render
from tests.support.kube import Kube
from tests.support.tools import binary

pytestmark = pytest.mark.timeout(120)

# In a real cluster the Prometheus Operator installs these.
# Stubs with an open schema: the fields themselves are checked in test_helm_chart.py.
MONITORING_CRDS = [
    ("servicemonitors", "ServiceMonitor"),
    ("podmonitors", "PodMonitor"),
    ("prometheusrules", "PrometheusRule"),
]


def stub_crd(plural: str, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {
                "plural": plural,
                "singular": kind.lower(),
                "kind": kind,
                "listKind": f"{kind}List",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        self.kube = Kube(kubeconfig)
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.kubectl_bin = binary("kubectl")

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl_bin, *args], input=stdin, capture_output=True, text=True,
            env=self.env, timeout=60,
        )  # fmt: skip

    def apply(self, documents: list[dict[str, Any]]) -> list[str]:
        done = self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()

    def wait_established(self, crds: list[dict[str, Any]]) -> None:
        names = [crd["metadata"]["name"] for crd in crds]
        wait_for("the CRDs Established", lambda: established(self.kube, names), timeout=30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    plane = ControlPlane(tmp_path / "cluster", kueue=False).up()
    try:
        yield Cluster(plane.kubeconfig)
    finally:
        plane.down()


def differences(rendered: Any, stored: Any, path: str = "") -> list[str]:
    """Where what was rendered is not stored unchanged (the server may add defaults)."""
    if isinstance(rendered, dict) and isinstance(stored, dict):
        return [
            d
            for k, v in rendered.items()
            for d in (
                differences(v, stored[k], f"{path}.{k}")
                if k in stored
                else ([] if v == "" else [f"{path}.{k}: gone"])  # "" is stored as absent
            )
        ]
    if isinstance(rendered, list) and isinstance(stored, list) and len(rendered) == len(stored):
        return [
            d
            for i, (a, b) in enumerate(zip(rendered, stored, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if rendered == stored else [f"{path}: {rendered!r} -> {stored!r}"]


def namespaces(*names: str) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]


def api_version_and_plural(obj: dict[str, Any]) -> tuple[str, str]:
    plurals = {
        "CustomResourceDefinition": "customresourcedefinitions",
        "ServiceAccount": "serviceaccounts",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "Role": "roles",
        "RoleBinding": "rolebindings",
        "Service": "services",
        "Deployment": "deployments",
        "ConfigMap": "configmaps",
        "ServiceMonitor": "servicemonitors",
        "PodMonitor": "podmonitors",
        "PrometheusRule": "prometheusrules",
    }
    return obj["apiVersion"], plurals[obj["kind"]]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_chart_applies_and_reapplies_unchanged(cluster: Cluster, values: Path) -> None:
    objects = render(values, include_crds=True)
    extra_namespaces = {o["metadata"].get("namespace") for o in objects} - {None, NAMESPACE}
    cluster.apply(namespaces(NAMESPACE, *sorted(n for n in extra_namespaces if n)))
    if any(o["apiVersion"].startswith("monitoring.coreos.com/") for o in objects):
        cluster.apply([stub_crd(p, k) for p, k in MONITORING_CRDS])

    # CRDs first, as `helm install` does with crds/ (and as docs/operations.md tells).
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    rest = [o for o in objects if o["kind"] != "CustomResourceDefinition"]
    first = cluster.apply(crds)
    cluster.wait_established(crds)
    first += cluster.apply(rest)
    assert len(first) == len(objects)
    assert all(line.endswith(" created") for line in first), first

    for obj in objects:
        api_version, plural = api_version_and_plural(obj)
        stored = cluster.kube.get(
            api_version, plural, obj["metadata"].get("namespace"), obj["metadata"]["name"]
        )
        assert stored is not None, f"{obj['kind']}/{obj['metadata']['name']} was not stored"
        for field in ("spec", "rules", "roleRef", "subjects", "data"):
            if field in obj:
                assert differences(obj[field], stored[field], f"{obj['kind']}.{field}") == []

    again = cluster.apply(crds) + cluster.apply(rest)
    assert all(line.endswith(" unchanged") for line in again), again


def test_the_charts_crd_serves_finetunejobs_to_kubectl(cluster: Cluster) -> None:
    objects = render(CHART / "ci" / "namespaced-values.yaml", include_crds=True)
    cluster.apply(namespaces(NAMESPACE, "ml-team"))
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    cluster.apply(crds)
    # A real API server serves a new CRD only once it is Established.
    cluster.wait_established(crds)
    example = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    example["metadata"]["namespace"] = "ml-team"
    assert cluster.apply([example]) == ["finetunejob.kubetune.io/quickstart created"]
    listed = cluster.kubectl("get", "ftj", "-n", "ml-team", "-o", "name")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["finetunejob.kubetune.io/quickstart"]
    # The printer columns: the API server renders the Table from the CRD.
    header = cluster.kubectl("get", "ftj", "-n", "ml-team").stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "PHASE", "PROGRESS"]
