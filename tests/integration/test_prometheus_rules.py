"""The chart's alert rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helm_chart import CHART, CI_VALUES, NAMESPACE, RELEASE, rules_file

pytestmark = pytest.mark.timeout(60)

MONITORING = CHART / "ci" / "monitoring-values.yaml"  # pendingSeconds: 3600
OPERATOR = f'job="{RELEASE}-kubetune-metrics", namespace="{NAMESPACE}"'


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=30)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_promtool_check_rules(values: Path, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules_file(values)))
    result = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules_catches_a_broken_expression(tmp_path: Path) -> None:
    rules = rules_file(MONITORING)
    rules["groups"][0]["rules"][0]["expr"] = "sum by (namespace (increase(x[10m]))"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode != 0


def alert(name: str, /, **labels: str) -> dict[str, Any]:
    severity = "critical" if name == "KubetuneOperatorDown" else "warning"
    return {"exp_labels": {**labels, "severity": severity}}


def _without_annotations(rules: dict[str, Any]) -> dict[str, Any]:
    # promtool compares annotations exactly; their templates are checked by `check rules`,
    # here only when and with which labels each alert fires matters.
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return rules


def test_alerts_fire_when_and_only_when_they_should(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump(_without_annotations(rules_file(MONITORING)))
    )
    ns = {"namespace": NAMESPACE}
    job = {"job": f"{RELEASE}-kubetune-metrics"}
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # A job Pending since t=0 (the unix epoch in promtool's clock).
                    {
                        "series": 'kubetune_finetunejob_pending_since_timestamp_seconds{namespace="team-a", name="queued", job="x"}',  # noqa: E501
                        "values": "0x90",
                    },
                    # One job fails at minute 3.
                    {
                        "series": f'kubetune_finetunejob_phase_transitions_total{{from="Running", to="Failed", {OPERATOR}}}',  # noqa: E501
                        "values": "0 0 0 1x60",
                    },
                    # A transition to Succeeded is no failure.
                    {
                        "series": f'kubetune_finetunejob_phase_transitions_total{{from="Running", to="Succeeded", {OPERATOR}}}',  # noqa: E501
                        "values": "0+1x60",
                    },
                    # The operator is up for 10 minutes, then down.
                    {"series": f"up{{{OPERATOR}}}", "values": "1x10 0x60"},
                    # A handler failing 6 times a minute (0.1/s > 0.05/s) from minute 0.
                    {
                        "series": f'kubetune_reconcile_errors_total{{handler="timer", {OPERATOR}}}',
                        "values": "0+6x60",
                    },
                    # A handler failing once every 10 minutes: below the threshold.
                    {
                        "series": f'kubetune_reconcile_errors_total{{handler="create", {OPERATOR}}}',  # noqa: E501
                        "values": "0+0.1x60",
                    },
                    {
                        "series": f'kubetune_api_errors_total{{operation="create_job", reason="Forbidden", {OPERATOR}}}',  # noqa: E501
                        "values": "0+12x60",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "KubetuneFineTuneJobFailed",
                        "exp_alerts": [alert("KubetuneFineTuneJobFailed", **ns)],
                    },
                    {
                        "eval_time": "20m",
                        "alertname": "KubetuneFineTuneJobFailed",
                        "exp_alerts": [],
                    },
                    # pendingSeconds 3600 + for 5m: quiet at 62m, firing at 66m.
                    {
                        "eval_time": "62m",
                        "alertname": "KubetuneFineTuneJobStuckPending",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "66m",
                        "alertname": "KubetuneFineTuneJobStuckPending",
                        "exp_alerts": [
                            alert(
                                "KubetuneFineTuneJobStuckPending",
                                namespace="team-a",
                                name="queued",
                                job="x",
                            )
                        ],
                    },
                    {"eval_time": "9m", "alertname": "KubetuneOperatorDown", "exp_alerts": []},
                    {"eval_time": "13m", "alertname": "KubetuneOperatorDown", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "KubetuneOperatorDown",
                        "exp_alerts": [alert("KubetuneOperatorDown", **job, **ns)],
                    },
                    {"eval_time": "10m", "alertname": "KubetuneReconcileErrors", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "KubetuneReconcileErrors",
                        "exp_alerts": [alert("KubetuneReconcileErrors", handler="timer", **ns)],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "KubetuneAPIErrors",
                        "exp_alerts": [
                            alert(
                                "KubetuneAPIErrors",
                                operation="create_job",
                                reason="Forbidden",
                                **ns,
                            )
                        ],
                    },
                ],
            },
            {
                # No target at all (the operator's Service is gone): absent() fires, labelled.
                "interval": "1m",
                "input_series": [
                    {"series": 'kubetune_finetunejobs{phase="Running"}', "values": "1x10"}
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "KubetuneOperatorDown", "exp_alerts": []},
                    {
                        "eval_time": "6m",
                        "alertname": "KubetuneOperatorDown",
                        "exp_alerts": [alert("KubetuneOperatorDown", **job, **ns)],
                    },
                ],
            },
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_operator_down_alert_only_when_the_operator_is_scraped() -> None:
    # Without a ServiceMonitor Prometheus has no target for it: absent() would fire forever.
    default = rules_file(CHART / "ci" / "default-values.yaml")
    names = {r["alert"] for g in default["groups"] for r in g["rules"]}
    assert "KubetuneOperatorDown" not in names
    assert {"KubetuneFineTuneJobFailed", "KubetuneFineTuneJobStuckPending"} <= names
    monitored = rules_file(MONITORING)
    assert "KubetuneOperatorDown" in {r["alert"] for g in monitored["groups"] for r in g["rules"]}
