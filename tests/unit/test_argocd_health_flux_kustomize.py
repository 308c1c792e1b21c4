"""The other GitOps examples: Flux's CEL health checks over the same FineTuneJob cases as the
Argo CD Lua check, and the Kustomize overlay rendered by kubectl's built-in kustomize."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from kubetune import manifests
from tests.support.crd_schema import cel_errors, schema_errors
from tests.support.tools import binary

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "deploy" / "argocd" / "kubetune.io" / "FineTuneJob"
CASES = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
FLUX = ROOT / "deploy" / "flux"
# Flux has no Suspended: a suspended job is not done, so it is in progress.
ARGO_TO_FLUX = {
    "Healthy": "current",
    "Degraded": "failed",
    "Progressing": "inProgress",
    "Suspended": "inProgress",
}


def flux_expressions() -> dict[str, str]:
    docs = list(yaml.safe_load_all((FLUX / "finetunejobs.yaml").read_text()))
    (kustomization,) = [d for d in docs if d["kind"] == "Kustomization"]
    (check,) = kustomization["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == ("kubetune.io/v1alpha1", "FineTuneJob")
    return {k: check[k] for k in ("inProgress", "failed", "current")}


def flux_health(obj: dict[str, Any]) -> str:
    """Which expressions hold; an expression that cannot evaluate (a missing top-level field)
    makes Flux keep waiting, which is in progress too."""
    env = celpy.Environment()
    activation = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    holding = []
    for name, expr in flux_expressions().items():
        result = env.program(env.compile(expr)).evaluate(activation)
        if isinstance(result, celpy.CELEvalError):
            assert "status" not in obj, f"{name} failed on an object with a status: {result}"
            holding.append("inProgress")
        elif bool(result):
            holding.append(name)
    assert len(set(holding)) <= 1, f"expressions overlap: {holding}"
    return holding[0] if holding else "inProgress"


@pytest.mark.parametrize("case", CASES, ids=lambda c: Path(c["inputPath"]).stem)
def test_flux_health_agrees_with_argocd(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    assert flux_health(obj) == ARGO_TO_FLUX[case["healthStatus"]["status"]]


def test_flux_cases_reach_every_flux_state() -> None:
    assert {ARGO_TO_FLUX[c["healthStatus"]["status"]] for c in CASES} == set(flux_expressions())


def test_flux_manifests_reference_each_other() -> None:
    sources = {
        d["metadata"]["name"]
        for path in FLUX.glob("*.yaml")
        for d in yaml.safe_load_all(path.read_text())
        if d["kind"] == "GitRepository"
    }
    (release,) = yaml.safe_load_all((FLUX / "helmrelease.yaml").read_text())
    assert release["spec"]["chart"]["spec"]["sourceRef"]["name"] in sources
    assert (ROOT / release["spec"]["chart"]["spec"]["chart"]).is_dir()
    assert (
        release["spec"]["install"]["crds"] == release["spec"]["upgrade"]["crds"] == "CreateReplace"
    )
    docs = list(yaml.safe_load_all((FLUX / "finetunejobs.yaml").read_text()))
    (kustomization,) = [d for d in docs if d["kind"] == "Kustomization"]
    assert kustomization["spec"]["sourceRef"]["name"] in sources
    assert kustomization["spec"]["dependsOn"] == [{"name": release["metadata"]["name"]}]


def kustomize(path: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [binary("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_kustomize_overlay_renders_a_valid_finetunejob() -> None:
    base = kustomize(ROOT / "deploy" / "kustomize" / "jobs" / "base")
    (job,) = kustomize(ROOT / "deploy" / "kustomize" / "jobs" / "overlays" / "production")
    assert job["metadata"]["namespace"] == "ml-prod"
    assert job["metadata"]["labels"] == {"team": "support"}
    assert job["spec"]["resources"]["gpus"] == 4 and base[0]["spec"]["resources"]["gpus"] == 1
    assert job["spec"]["scheduling"]["queueName"] == "support-gpu"
    for document in (*base, job):
        assert schema_errors(document) == []  # what the API server's schema would say
        assert cel_errors(document) == []
    loaded = manifests.check_documents([job], "overlay")  # what `kubetune validate` says
    assert loaded.problems == [] and len(loaded.jobs) == 1
