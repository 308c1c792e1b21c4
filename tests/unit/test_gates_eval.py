"""Promotion gates: every operator passing and failing, unmeasured metrics, the table."""

from __future__ import annotations

import math

import pytest

from kubetune import api
from kubetune_trainer.evaluate import (
    check_gates,
    format_table,
)

METRICS = api.Metrics(
    base={"exactMatch": 0.25, "loss": 2.0, "oodPerplexity": 10.0},
    tuned={"exactMatch": 0.75, "loss": 0.5, "oodPerplexity": 10.5, "weird": math.nan},
    delta={"exactMatch": 0.5, "loss": -1.5, "oodPerplexityRatio": 1.05},
)


def gate(metric: str, op: str, value: float) -> api.GateSpec:
    return api.GateSpec.model_validate({"metric": metric, "op": op, "value": value})


@pytest.mark.parametrize(
    ("op", "threshold", "passed"),
    [
        (">=", 0.75, True),
        (">=", 0.76, False),
        (">", 0.74, True),
        (">", 0.75, False),
        ("<=", 0.75, True),
        ("<=", 0.74, False),
        ("<", 0.76, True),
        ("<", 0.75, False),
        ("==", 0.75, True),
        ("==", 0.7, False),
    ],
)
def test_every_operator(op: str, threshold: float, passed: bool) -> None:
    (result,) = check_gates([gate("tuned.exactMatch", op, threshold)], METRICS)
    assert result.passed is passed
    assert result.actual == 0.75
    assert (result.metric, result.op, result.value) == ("tuned.exactMatch", op, threshold)


def test_equality_tolerates_float_rounding() -> None:
    metrics = api.Metrics(tuned={"exactMatch": 0.1 + 0.2})
    assert check_gates([gate("tuned.exactMatch", "==", 0.3)], metrics)[0].passed


def test_base_delta_and_ratio_paths() -> None:
    results = check_gates(
        [
            gate("base.loss", "<=", 2.0),
            gate("delta.loss", "<", 0.0),
            gate("delta.exactMatch", ">", 0.0),
            gate("delta.oodPerplexityRatio", "<=", 1.1),
            gate("delta.oodPerplexityRatio", "<=", 1.0),
        ],
        METRICS,
    )
    assert [r.passed for r in results] == [True, True, True, True, False]
    assert [r.actual for r in results] == [2.0, -1.5, 0.5, 1.05, 1.05]


def test_unmeasured_metric_fails_with_no_actual() -> None:
    results = check_gates(
        [gate("tuned.toxicityRate", "<=", 1.0), gate("delta.refusalRate", ">=", -1.0)], METRICS
    )
    assert [(r.passed, r.actual) for r in results] == [(False, None), (False, None)]
    assert "not measured" in results[0].describe()


def test_gates_passed_needs_every_gate() -> None:
    good = check_gates([gate("tuned.exactMatch", ">=", 0.5), gate("delta.loss", "<", 0)], METRICS)
    assert all(r.passed for r in good)
    mixed = [*good, *check_gates([gate("tuned.exactMatch", ">=", 0.9)], METRICS)]
    failed = [r.describe() for r in mixed if not r.passed]
    assert failed == ["tuned.exactMatch >= 0.9: FAILED (actual 0.75)"]


def test_results_fit_the_status_model() -> None:
    results = check_gates([gate("tuned.loss", "<", 1), gate("tuned.rougeL", ">", 0)], METRICS)
    status = api.FineTuneJobStatus(metrics=METRICS, gates=results)
    dumped = status.to_api()
    assert dumped["gates"][0] == {
        "metric": "tuned.loss",
        "op": "<",
        "value": 1.0,
        "actual": 0.5,
        "passed": True,
    }
    assert "actual" not in dumped["gates"][1]  # unmeasured: absent, not null or NaN


def test_table_shows_every_metric_gate_and_note() -> None:
    results = check_gates([gate("delta.exactMatch", ">", 0.0)], METRICS)
    table = format_table(METRICS, results, ["toxicity: disabled"])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "tuned", "delta"]
    assert lines[1].split() == ["loss", "2", "0.5", "-1.5"]
    assert lines[2].split() == ["exactMatch", "0.25", "0.75", "0.5"]
    assert lines[3].split() == ["oodPerplexity", "10", "10.5", "-"]
    assert lines[4].split() == ["oodPerplexityRatio", "-", "-", "1.05"]
    assert "delta.exactMatch > 0: passed (actual 0.5)" in table
    assert table.endswith("notes:\n  toxicity: disabled")
