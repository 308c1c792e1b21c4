"""Our API on the real kube-apiserver: the CRD applies server-side (structural schema, CEL
compiled within its cost budget), kubectl explain shows our descriptions, every example applies,
kubectl get shows the printer columns, and one corpus of bad manifests is refused by both
`kubetune validate` and the API server (a case where they disagree fails)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import CRDS, Cluster, Session, wait_for
from tests.support.kube import ApiStatus, Kube
from tests.support.manifests import minimal

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD = yaml.safe_load((CRDS / "finetunejobs.kubetune.io.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_applies_server_side_and_explain_shows_our_descriptions(cluster: Cluster) -> None:
    out = cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    assert "serverside-applied" in out
    crd = cluster.kube.get(
        "apiextensions.k8s.io/v1", "customresourcedefinitions", None, CRD["metadata"]["name"]
    )
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert conditions.get("NonStructuralSchema") is None
    explained = " ".join(cluster.kubectl("explain", "finetunejob.spec.method").split())
    method = SCHEMA["properties"]["spec"]["properties"]["method"]
    assert " ".join(method["description"].split()) in explained
    for field, sub in method["properties"].items():
        assert field in explained
        first = " ".join(sub.get("description", "").split())[:40]
        assert first in explained, (field, first)


def test_every_example_applies_and_get_shows_the_printer_columns(cluster: Cluster) -> None:
    for path in EXAMPLES:  # into the test's namespace
        doc = yaml.safe_load(path.read_text())
        if doc["kind"] != "FineTuneJob":
            continue  # a FineTuneSweep would start trials (tests/e2e/test_sweep_operator.py)
        doc["metadata"].pop("namespace", None)
        cluster.apply(doc)
    docs = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "FineTuneJob"]
    header, *rows = cluster.kubectl("get", "ftj").splitlines()
    columns = CRD["spec"]["versions"][0]["additionalPrinterColumns"]
    expected = ["NAME", *[c["name"].upper() for c in columns if not c.get("priority")]]
    assert header.split() == expected
    listed = {r.split()[0] for r in rows}  # with the FineTuneSweep example's trials
    assert set(names) <= listed, (names, listed)
    # The short name and the category resolve too.
    assert cluster.kubectl("get", "finetunejobs", "-o", "name").count("finetunejob") >= len(names)


# ---- one corpus of bad manifests, two judges


def _doc(**spec: Any) -> dict[str, Any]:
    doc = minimal()
    doc["metadata"]["name"] = "corpus"
    doc["spec"].update(spec)
    return doc


def _yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def _big_annotation() -> str:
    doc = _doc()
    doc["metadata"]["annotations"] = {"example.com/blob": "x" * (5 * 1024 * 1024)}
    return _yaml(doc)


def _big_config_map() -> str:
    # Under the API server's request limit as a FineTuneJob, over 1 MiB as the ConfigMap the
    # operator would write (the config carries the spec).
    doc = _doc()
    doc["metadata"]["annotations"] = {f"example.com/a{i}": "y" * 200_000 for i in range(6)}
    return _yaml(doc)


CORPUS: dict[str, str] = {
    "quoted-batch-size": _yaml(_doc(training={"epochs": 1, "batchSize": "8"})),
    "5mb-annotation": _big_annotation(),
    "configmap-over-1mib": _big_config_map(),
    "duplicate-key": _yaml(_doc()).replace(
        "training:\n", "training:\n    epochs: 2\n", 1
    ),  # training.epochs twice
    "lora-r-zero": _yaml(_doc(method={"type": "lora", "lora": {"r": 0}})),
    "unknown-method": _yaml(_doc(method={"type": "prefix-tuning"})),
    "unknown-field": _yaml(_doc(mystery=True)),
    "no-model": _yaml(
        {**_doc(), "spec": {k: v for k, v in _doc()["spec"].items() if k != "model"}}
    ),
    "neither-epochs-nor-steps": _yaml(_doc(training={"batchSize": 8})),
    "split-leaves-no-training": _yaml(
        _doc(
            dataset={
                **minimal()["spec"]["dataset"],
                "split": {"validation": 0.5, "test": 0.45},
            }
        )
    ),
    "multi-node-without-gpus": _yaml(_doc(resources={"numNodes": 2, "gpus": 0})),
    "lora-with-full": _yaml(_doc(method={"type": "full", "lora": {"r": 8}})),
    "quantization-without-qlora": _yaml(_doc(method={"type": "lora", "quantization": {"bits": 4}})),
    "name-too-long": _yaml({**_doc(), "metadata": {"name": "n" * 60}}),
}


# Refused by validate, taken by the API server, on purpose: a duplicate YAML key silently loses
# one of the values on the way to JSON (kubectl keeps the last).
STRICTER = {"duplicate-key"}


def _validate(path: Path) -> tuple[bool, str]:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode == 0, result.stderr.strip()


def _server(cluster: Cluster, path: Path) -> tuple[bool, str]:
    """Does the API server take it, and what the operator would make of it (dry run)?"""
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", str(path), check=False)
    if "created (server dry run)" not in applied:
        return False, applied.strip()[-500:]
    rendered = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "render", str(path), "--namespace", cluster.ns],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if rendered.returncode != 0:  # `render` judges like validate: not the server's verdict
        return True, f"(render refused: {rendered.stderr.strip()})"
    children = path.with_suffix(".children.yaml")
    children.write_text(rendered.stdout)
    out = cluster.kubectl("apply", "--dry-run=server", "-f", str(children), check=False)
    accepted = "Error" not in out and "error" not in out
    return accepted, out.strip()[-500:]


def test_the_corpus_controls_are_accepted_by_both(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(_yaml(_doc()))
    assert _validate(path) == (True, "")
    assert _server(cluster, path)[0], _server(cluster, path)[1]


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_validate_and_the_api_server_agree_on_bad_manifests(
    cluster: Cluster, tmp_path: Path, case: str
) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(CORPUS[case])
    validate_ok, validate_says = _validate(path)
    server_ok, server_says = _server(cluster, path)
    if case in STRICTER:  # validate refuses on purpose what the server takes
        assert (validate_ok, server_ok) == (False, True), (validate_says, server_says)
        return
    assert (validate_ok, server_ok) == (False, False), (
        f"{case}: validate {'accepts' if validate_ok else 'refuses'} ({validate_says!r}); "
        f"the API server {'accepts' if server_ok else 'refuses'} ({server_says!r})"
    )
    assert "Traceback" not in validate_says


def test_the_forbidden_count_sees_what_the_chart_does_not_grant(kube_session: Session) -> None:
    """The check every cluster test ends with can fail: Secrets are not the operator's."""
    before = len(kube_session.forbidden())
    with pytest.raises(ApiStatus) as refused:
        Kube(kube_session.operator_kubeconfig).list("v1", "secrets", "default")
    assert refused.value.code == 403
    new = wait_for("the refusal in the audit log", lambda: kube_session.forbidden()[before:])
    assert new == ["list /api/v1/namespaces/default/secrets"]
