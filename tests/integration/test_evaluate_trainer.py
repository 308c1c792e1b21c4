"""The evaluation stage inside the real trainer recipe: base vs tuned with safety evals and
gates end up in report.json, the status and the termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer.__main__ import Options, run
from kubetune_trainer.report import termination_message
from tests.support import trainer_runs


@pytest.mark.timeout(300)
def test_report_status_and_termination_carry_metrics_and_gates(tmp_path: Path) -> None:
    body = trainer_runs.spec_dict(
        trainer_runs.write_rows(tmp_path / "rows.jsonl"), tmp_path / "out", maxSteps=2
    )
    body["evaluation"] = {
        "metrics": ["loss", "rougeL"],
        "maxSamples": 4,
        "maxNewTokens": 4,
        "safety": {"latency": {"samples": 2}},
        "gates": [
            {"metric": "base.loss", "op": ">", "value": 0.0},  # holds for any model
            {"metric": "tuned.refusalRate", "op": ">", "value": 1.0},  # a rate never exceeds 1
            {"metric": "delta.oodPerplexityRatio", "op": ">", "value": 0.0},
        ],
    }
    config = api.TrainerConfig(name="evaltest", spec=api.FineTuneJobSpec.model_validate(body))
    lines: list[str] = []
    result = run(config, Options(metrics_port=0, termination_log=None, log=lines.append))

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    metrics = api.Metrics.model_validate(report["metrics"])
    for side in (metrics.base, metrics.tuned):
        assert set(side) == {"loss", "rougeL", *api.SAFETY_METRICS}
    assert set(metrics.delta) == {"loss", "rougeL", *api.SAFETY_METRICS, "oodPerplexityRatio"}
    assert metrics.delta["oodPerplexityRatio"] == pytest.approx(
        metrics.tuned["oodPerplexity"] / metrics.base["oodPerplexity"]
    )
    gates = [api.GateResult.model_validate(g) for g in report["gates"]]
    assert [g.passed for g in gates] == [True, False, True]
    assert gates[1].actual == metrics.tuned["refusalRate"]
    assert any("word list" in note for note in report["evaluationNotes"])
    assert result.status.gates == gates
    assert result.status.metrics == metrics

    # The operator's copy: the termination message parses into the status model.
    status = api.FineTuneJobStatus.model_validate(json.loads(termination_message(result.status)))
    assert status.metrics is not None and set(status.metrics.tuned) == set(metrics.tuned)
    assert [g.passed for g in status.gates] == [True, False, True]
