"""A real Prometheus scrapes the operator's (and a trainer's) metrics on loopback; the chart's
alert rules and dashboard queries run against what it scraped."""

from __future__ import annotations

import re
import subprocess
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune import metrics
from kubetune_trainer import report
from tests.support.helm_chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    dashboard,
    dashboard_exprs,
    one,
    render,
    rule_exprs,
    rules_file,
)
from tests.support.prometheus import Exporter, Prometheus, exporter, prometheus
from tests.support.promql import metric_names

pytestmark = pytest.mark.timeout(180)

OPERATOR_JOB = f"{RELEASE}-kubetune-metrics"  # the job label a ServiceMonitor target gets
# Service discovery's labels for a trainer pod rendered by the operator (FineTuneJob train-a).
TRAINER_POD_META = {
    "__meta_kubernetes_namespace": "team-a",
    "__meta_kubernetes_pod_name": "train-a-0",
    "__meta_kubernetes_pod_label_app_kubernetes_io_name": "kubetune-trainer",
    "__meta_kubernetes_pod_label_app_kubernetes_io_instance": "train-a",
}


def _meta_label(label: str) -> str:
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def pod_monitor_relabel_configs(values: Path) -> list[dict[str, Any]]:
    """What the Prometheus Operator generates for the chart's PodMonitor: keep pods matching
    its selector, namespace and pod target labels, then the PodMonitor's own relabelings."""
    monitor = one(render(values), "PodMonitor")
    configs: list[dict[str, Any]] = [
        {"source_labels": [_meta_label(key)], "regex": value, "action": "keep"}
        for key, value in monitor["spec"]["selector"]["matchLabels"].items()
    ]
    configs += [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    for rule in monitor["spec"]["podMetricsEndpoints"][0].get("relabelings", []):
        configs.append(
            {
                "source_labels": rule["sourceLabels"],
                "target_label": rule["targetLabel"],
                "action": rule.get("action", "replace"),
            }
        )
    return configs


PROGRESS = {"step": 5, "totalSteps": 50, "loss": 1.25, "evalLoss": 1.5, "tokensPerSecond": 900}
TRAINER_VALUES = {
    "step": 5,
    "total_steps": 50,
    "loss": 1.25,
    "eval_loss": 1.5,
    "learning_rate": 2e-4,
    "tokens_per_second": 900.0,
    "epoch": 0.1,
    "peak_memory_bytes": 1.5e9,
    "eta_seconds": 450,
}

TRIALS = {"Pending": 1, "Running": 2, "Succeeded": 3, "Failed": 0, "Pruned": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Exporter, Prometheus]]:
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    values = CHART / "ci" / "monitoring-values.yaml"
    with exporter() as exp:
        scrape = [
            {
                # What the ServiceMonitor produces: job = Service name, namespace target label,
                # honorLabels so per-job series keep the FineTuneJob's namespace.
                "job_name": OPERATOR_JOB,
                "honor_labels": True,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{exp.port}"], "labels": {"namespace": NAMESPACE}}
                ],
            },
            {
                # The trainer pod as Kubernetes service discovery would describe it, relabelled
                # the way the Prometheus Operator turns the chart's PodMonitor into a config.
                "job_name": "kubetune-trainer",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{exp.trainer_port}"], "labels": TRAINER_POD_META}
                ],
                "relabel_configs": pod_monitor_relabel_configs(values),
            },
        ]
        with prometheus(workdir, scrape, rules=rules_file(values)) as prom:
            prom.wait_query("up == 1", lambda r: len(r) == 2)
            # Everything below changes after Prometheus started scraping, so rate() and
            # increase() see it happen.
            exp.send(op="state", namespace="team-a", name="train-a", phase="Pending", age=5)
            exp.send(
                op="state",
                namespace="team-a",
                name="train-a",
                phase="Running",
                age=30,
                progress=PROGRESS,
            )
            exp.send(op="state", namespace="team-b", name="stuck", phase="Pending", age=7200)
            for phase in ("Pending", "Running", "Succeeded"):
                exp.send(op="state", namespace="team-a", name="done", phase=phase, age=60)
            exp.send(op="trainer", values=TRAINER_VALUES)
            exp.send(op="sweep", namespace="team-a", name="lr", phase="Running", trials=TRIALS)
            exp.send(
                op="sweep", namespace="team-a", name="lr", phase="Running", trials=TRIALS, best=0.75
            )
            exp.send(op="reconcile", handler="create")
            exp.send(op="reconcile", handler="timer", fail=True)
            exp.send(op="api_error", operation="create_job", reason="Forbidden")
            yield exp, prom


def test_promtool_accepts_the_operator_and_trainer_metrics(
    stack: tuple[Exporter, Prometheus],
) -> None:
    exp, _ = stack
    for text in (exp.operator_metrics(), exp.trainer_metrics()):
        assert "kubetune_" in text
        lint = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr


def test_prometheus_scrapes_the_phase_series(stack: tuple[Exporter, Prometheus]) -> None:
    _, prom = stack
    expected = {"Pending": 1.0, "Suspended": 0.0, "Running": 1.0, "Succeeded": 1.0, "Failed": 0.0}

    def counts(result: list[dict[str, Any]]) -> dict[str, float]:
        return {s["metric"]["phase"]: float(s["value"][1]) for s in result}

    # Wait for a scrape taken after the fixture's commands (stuck, train-a, done).
    result = prom.wait_query("kubetune_finetunejobs", lambda r: counts(r) == expected)
    assert len(result) == len(metrics.PHASES)
    # The ServiceMonitor's target labels are there; the operator adds no namespace of its own.
    assert {s["metric"]["job"] for s in result} == {OPERATOR_JOB}
    assert {s["metric"]["namespace"] for s in result} == {NAMESPACE}


def test_per_job_series_keep_the_job_namespace_and_go_when_the_job_goes(
    stack: tuple[Exporter, Prometheus],
) -> None:
    exp, prom = stack
    exp.send(op="state", namespace="team-c", name="short", phase="Pending", age=1)
    exp.send(
        op="state", namespace="team-c", name="short", phase="Running", age=2, progress=PROGRESS
    )
    result = prom.wait_query('kubetune_finetunejob_step{name="short"}', lambda r: len(r) == 1)
    assert result[0]["metric"]["namespace"] == "team-c"  # honor_labels: the job's namespace
    assert float(result[0]["value"][1]) == 5.0
    exp.send(op="deleted", namespace="team-c", name="short")
    # Gone from the exposition -> Prometheus marks the series stale at the next scrape.
    prom.wait_query('kubetune_finetunejob_step{name="short"}', lambda r: r == [])


def test_prometheus_scrapes_the_sweep_series_and_drops_them_with_the_sweep(
    stack: tuple[Exporter, Prometheus],
) -> None:
    exp, prom = stack
    result = prom.wait_query(
        'kubetune_finetunesweep_trials{name="lr"}', lambda r: len(r) == len(TRIALS)
    )
    assert {s["metric"]["phase"]: float(s["value"][1]) for s in result} == TRIALS
    assert {s["metric"]["namespace"] for s in result} == {"team-a"}  # the sweep's own
    best = prom.wait_query('kubetune_finetunesweep_best_objective{name="lr"}', lambda r: r)
    assert float(best[0]["value"][1]) == 0.75
    assert best[0]["metric"]["metric"] == "evalLoss"
    assert best[0]["metric"]["direction"] == "minimize"
    running = prom.wait_query('kubetune_finetunesweeps{phase="Running"}', lambda r: r)
    assert float(running[0]["value"][1]) >= 1
    exp.send(op="sweep", namespace="team-c", name="gone", phase="Running", trials=TRIALS, best=2)
    prom.wait_query('kubetune_finetunesweep_trials{name="gone"}', lambda r: len(r) == 5)
    exp.send(op="sweep_deleted", namespace="team-c", name="gone")
    prom.wait_query('kubetune_finetunesweep_trials{name="gone"}', lambda r: r == [])
    prom.wait_query('kubetune_finetunesweep_best_objective{name="gone"}', lambda r: r == [])


def test_rules_load_and_alert_expressions_work_on_scraped_data(
    stack: tuple[Exporter, Prometheus],
) -> None:
    exp, prom = stack
    rules = rules_file(CHART / "ci" / "monitoring-values.yaml")
    by_alert = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}

    def loaded(_: object) -> bool:
        groups = prom.api("rules")["groups"]
        found = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        return found.keys() == by_alert.keys() and set(found.values()) == {"ok"}

    prom.wait_query("vector(1)", loaded)  # every rule evaluated at least once, without error

    stuck = prom.wait_query(by_alert["KubetuneFineTuneJobStuckPending"], lambda r: len(r) == 1)
    assert (stuck[0]["metric"]["namespace"], stuck[0]["metric"]["name"]) == ("team-b", "stuck")
    assert float(stuck[0]["value"][1]) >= 7200
    assert prom.query(by_alert["KubetuneOperatorDown"]) == []  # the operator is up

    exp.send(op="state", namespace="team-d", name="doomed", phase="Pending", age=1)
    exp.send(op="state", namespace="team-d", name="doomed", phase="Failed", age=2)
    failed = prom.wait_query(by_alert["KubetuneFineTuneJobFailed"], lambda r: len(r) == 1)
    assert failed[0]["metric"]["namespace"] == NAMESPACE and float(failed[0]["value"][1]) > 0


def _exported_names(exp: Exporter) -> set[str]:
    names = set()
    for text in (exp.operator_metrics(), exp.trainer_metrics()):
        for family in text_string_to_metric_families(text):
            names |= {sample.name for sample in family.samples}
    return names


def _grafana_to_promql(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('"$namespace"', '".*"')
        .replace('"$job"', '".*"')
    )


def test_every_dashboard_and_rule_expression_names_exported_metrics(
    stack: tuple[Exporter, Prometheus],
) -> None:
    exp, _ = stack
    exported = _exported_names(exp)
    # The trainer's documented names and the operator's declared names are really exported.
    assert {f"kubetune_trainer_{n}" for n in report.GAUGES} <= exported
    for name in metrics.OPERATOR_METRICS:
        assert any(s == name or s.startswith(name + "_") for s in exported), name
    exprs = dashboard_exprs(dashboard()) + rule_exprs(
        rules_file(CHART / "ci" / "monitoring-values.yaml")
    )
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        # `up` is the one series Prometheus makes itself for every target.
        unknown = names - exported - {"up"}
        assert not unknown, f"{expr!r} reads metrics nothing exports: {sorted(unknown)}"


def test_every_dashboard_query_runs_and_returns_data(stack: tuple[Exporter, Prometheus]) -> None:
    _, prom = stack
    board = dashboard()
    for expr in dashboard_exprs(board):
        if expr.startswith("label_values("):
            metric = expr.removeprefix("label_values(").rsplit(",", 1)[0]
            query = _grafana_to_promql(metric)
        else:
            query = _grafana_to_promql(expr)
        try:
            result = prom.wait_query(query, lambda r: len(r) > 0, timeout=20)
        except urllib.error.HTTPError as error:
            pytest.fail(f"Prometheus refused {query!r}: {error.read().decode()}")
        assert result, query


def test_an_invalid_expression_is_refused(stack: tuple[Exporter, Prometheus]) -> None:
    _, prom = stack
    with pytest.raises(urllib.error.HTTPError) as refused:
        prom.query("sum by (phase (kubetune_finetunejobs)")
    assert refused.value.code == 400


def test_pod_monitor_relabeling_joins_trainer_and_operator_series(
    stack: tuple[Exporter, Prometheus],
) -> None:
    _, prom = stack
    (loss,) = prom.wait_query("kubetune_trainer_loss", lambda r: len(r) == 1)
    labels = loss["metric"]
    assert (labels["namespace"], labels["name"], labels["pod"]) == (
        "team-a",
        "train-a",
        "train-a-0",
    )
    assert not any(key.startswith("__meta") for key in labels)
    # The same job seen by the trainer and by the operator: one series after the join.
    joined = prom.wait_query(
        "kubetune_trainer_step * on (namespace, name) group_left kubetune_finetunejob_total_steps",
        lambda r: len(r) == 1,
    )
    assert float(joined[0]["value"][1]) == 5 * 50
