"""Render the Helm chart with the real helm binary (shared by the chart and Prometheus tests)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.support.tools import binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
DASHBOARD = CHART / "files" / "kubetune-dashboard.json"
RELEASE, NAMESPACE = "kt", "kubetune-system"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # No repository or registry config is read; keep helm's caches out of $HOME.
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/kubetune-helm/cache"}
    env["HELM_CONFIG_HOME"] = "/tmp/kubetune-helm/config"
    env["HELM_DATA_HOME"] = "/tmp/kubetune-helm/data"
    return subprocess.run(
        [binary("helm"), *args], capture_output=True, text=True, check=check, env=env, timeout=60
    )


def _set_args(sets: Iterable[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


@cache
def _render(values: str | None, sets: tuple[str, ...], include_crds: bool) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values:
        args += ["-f", values]
    if include_crds:
        args.append("--include-crds")
    return helm(*args, *_set_args(sets)).stdout


def render(
    values: Path | None = None, sets: Iterable[str] = (), include_crds: bool = False
) -> list[dict[str, Any]]:
    """`helm template` -> the rendered objects (a fresh copy each call)."""
    text = _render(str(values) if values else None, tuple(sets), include_crds)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rules_file(values: Path | None = None) -> dict[str, Any]:
    """The PrometheusRule's spec as a Prometheus rule file (what promtool and Prometheus read)."""
    objects = render(values, sets=["metrics.prometheusRule.enabled=true"])
    return {"groups": one(objects, "PrometheusRule")["spec"]["groups"]}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template variable queries."""
    exprs = []
    for panel in board["panels"]:
        exprs += [target["expr"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def rule_exprs(rules: dict[str, Any]) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
