"""The rendered chart applies with the real kubectl to the Kubernetes emulator (kmock + adapter).

kmock is not a real API server (no admission, no controllers): what this proves is that kubectl
accepts every object, the API paths and kinds exist (the CRD from the chart starts serving
FineTuneJobs), and a second apply is a no-op — what a GitOps tool does on every sync.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helm_chart import CHART, CI_VALUES, NAMESPACE, ROOT, render
from tests.support.kmock_adapter import EmulatorThread, Kube
from tests.support.tools import binary

pytestmark = pytest.mark.timeout(120)

# In a real cluster the Prometheus Operator installs these; kmock knows only built-in kinds.
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
    def __init__(self, emulator: EmulatorThread, kubeconfig: Path) -> None:
        self.kube = Kube(emulator.url)
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.kubectl_bin = binary("kubectl")

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl_bin, *args], input=stdin, capture_output=True, text=True,
            env=self.env, timeout=60,
        )  # fmt: skip

    def apply(self, documents: list[dict[str, Any]]) -> list[str]:
        # --validate=false: kubectl's validation downloads the OpenAPI document, which kmock
        # does not serve; kubernetes-validate checks the same objects in test_helm_chart.py.
        done = self.kubectl(
            "apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump_all(documents)
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    emulator = EmulatorThread().start()
    try:
        yield Cluster(emulator, emulator.write_kubeconfig(tmp_path / "kubeconfig"))
    finally:
        emulator.stop()


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
    first = cluster.apply(crds) + cluster.apply(rest)
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
                assert stored[field] == obj[field], f"{obj['kind']}.{field} differs once stored"

    again = cluster.apply(crds) + cluster.apply(rest)
    assert all(line.endswith(" unchanged") for line in again), again


def test_the_charts_crd_serves_finetunejobs_to_kubectl(cluster: Cluster) -> None:
    objects = render(CHART / "ci" / "namespaced-values.yaml", include_crds=True)
    cluster.apply(namespaces(NAMESPACE, "ml-team"))
    cluster.apply([o for o in objects if o["kind"] == "CustomResourceDefinition"])
    example = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    example["metadata"]["namespace"] = "ml-team"
    assert cluster.apply([example]) == ["finetunejob.kubetune.io/quickstart created"]
    listed = cluster.kubectl("get", "ftj", "-n", "ml-team", "-o", "name")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["finetunejob.kubetune.io/quickstart"]
    # The printer columns come from the CRD: kubectl asks for a Table and the emulator may not
    # render one, so check the column definitions kubectl would use.
    crd = cluster.kube.get(
        "apiextensions.k8s.io/v1", "customresourcedefinitions", None, "finetunejobs.kubetune.io"
    )
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[0] == "Phase" and "Progress" in columns
