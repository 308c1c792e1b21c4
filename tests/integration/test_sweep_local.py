"""`kubetune sweep`: trials of the demo model run by the trainer's own recipe in child
processes; median pruning stops a trial with SIGTERM; a rerun continues instead of restarting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import cli, sweep, sweep_api

ROOT = Path(__file__).resolve().parents[2]
BAD_LR = 1e-7  # learns nothing in 2 steps: behind the median at the first evaluation


def tiny_sweep(tmp_path: Path) -> Path:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "lr-sweep.yaml").read_text())
    spec = document["spec"]
    template = spec["template"]
    template["model"]["source"] = str(ROOT / "examples" / "demo-model")
    template["dataset"]["source"] = str(ROOT / "examples" / "data" / "quickstart.jsonl")
    template["output"]["destination"] = str(tmp_path / "out")
    template["training"].update(maxSteps=4, evalEverySteps=2, checkpointEverySteps=1000)
    template["evaluation"].update(maxSamples=2, maxNewTokens=2, metrics=["loss", "exactMatch"])
    spec["parameters"] = [
        {"path": "training.learningRate", "type": "categorical", "choices": [5e-3, 8e-3, BAD_LR]}
    ]
    spec.update(maxTrials=3, parallelism=1, earlyStopping={"startupTrials": 2})
    # A grid is walked in an order shuffled by the seed: pick one that runs the bad rate last.
    seed = next(
        s
        for s in range(100)
        if sweep._grid(_spec(document, s))[-1]["training.learningRate"] == BAD_LR
    )
    spec["algorithm"] = {"sampler": "grid", "seed": seed}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _spec(document: dict[str, Any], seed: int) -> sweep_api.FineTuneSweepSpec:
    spec = {**document["spec"], "algorithm": {"sampler": "grid", "seed": seed}}
    return sweep_api.parse_sweep({**document, "spec": spec}).spec


@pytest.mark.slow
def test_local_sweep_prunes_reports_and_continues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tiny_sweep(tmp_path)
    assert cli.main(["sweep", str(path)]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "sweep-report.json").read_text())
    by_lr = {t["params"]["training.learningRate"]: t for t in report["trials"]}
    assert set(by_lr) == {5e-3, 8e-3, BAD_LR}
    # pruned at its first evaluation (step 2): the trial waits for the verdict there
    assert by_lr[BAD_LR]["phase"] == "Pruned" and by_lr[BAD_LR]["step"] == 2
    good = [by_lr[5e-3], by_lr[8e-3]]
    assert all(t["phase"] == "Succeeded" and t["step"] == 4 for t in good)
    best = min(good, key=lambda t: t["objective"])
    assert report["status"]["best"]["name"] == best["name"] == report["trials"][0]["name"]
    assert report["status"]["phase"] == "Succeeded" and report["status"]["pruned"] == 1
    for t in good:  # measured, per trial process
        assert t["peakMemoryBytes"] > 50e6 and t["wallSeconds"] > 0
        assert t["trainableParameters"] < t["parameters"] and t["artifactBytes"] > 0
    assert (out / "objective.png").stat().st_size > 1000
    assert (out / "importance.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert f"[{by_lr[BAD_LR]['name']}] pruning:" in table

    # the trials on disk are the state: a rerun starts nothing and reports the same trials
    assert cli.main(["sweep", str(path)]) == 0
    again = capsys.readouterr().out
    assert "continuing: 3 trials finished, 0 to resume" in again and "started" not in again
    rerun = json.loads((out / "sweep-report.json").read_text())
    assert [t["name"] for t in rerun["trials"]] == [t["name"] for t in report["trials"]]


def test_bad_sweep_is_one_error_line_and_exit_10(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = yaml.safe_load((ROOT / "examples" / "lr-sweep.yaml").read_text())
    document["spec"]["parameters"][1]["choices"] = []
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    assert cli.main(["sweep", str(path)]) == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "spec.parameters[1].choices: a categorical parameter needs at least one choice" in err[0]


@pytest.mark.slow
def test_local_tradeoff_sweep_puts_the_methods_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/tradeoff-sweep.yaml, cut to 2 steps: full, LoRA and QLoRA in one table, in the
    report and in the status; a method that fails on this machine is a row saying why."""
    document: dict[str, Any] = yaml.safe_load(
        (ROOT / "examples" / "tradeoff-sweep.yaml").read_text()
    )
    template = document["spec"]["template"]
    template["model"]["source"] = str(ROOT / "examples" / "demo-model")
    template["dataset"]["source"] = str(ROOT / "examples" / "data" / "quickstart.jsonl")
    template["dataset"]["maxSeqLength"] = 96
    template["output"]["destination"] = str(tmp_path / "out")
    template["training"].update(maxSteps=2, evalEverySteps=2)
    template["evaluation"].update(maxSamples=2, maxNewTokens=2)
    path = tmp_path / "tradeoff.yaml"
    path.write_text(yaml.safe_dump(document))
    code = cli.main(["sweep", str(path)])
    report = json.loads((tmp_path / "out" / "sweep-report.json").read_text())
    rows = {r["method"]: r for r in report["tradeoff"]}
    assert set(rows) == {"full", "lora", "qlora"}
    for method in ("full", "lora"):
        row = rows[method]
        assert row["phase"] == "Succeeded" and row["objective"] == row["tuned"]["loss"]
        assert row["trainableParameters"] == row["planTrainableParameters"] > 0
        assert row["peakMemoryBytes"] > 0 and row["planMemoryBytes"] > 0
        assert row["wallSeconds"] > 0 and row["artifactBytes"] > 0
        assert row["oodPerplexityRatio"] > 0
    assert rows["full"]["trainableParameters"] > rows["lora"]["trainableParameters"]
    qlora = rows["qlora"]
    if qlora["phase"] != "Succeeded":  # bitsandbytes' CPU kernels and the demo model's shapes
        assert qlora["message"], qlora
        assert f"qlora ({qlora['trial']}): {qlora['phase']}: " in capsys.readouterr().out
    assert code == 0 and report["status"]["phase"] == "Succeeded"
    status_rows = {r["method"]: r for r in report["status"]["tradeoff"]}
    assert status_rows.keys() == rows.keys()
    assert status_rows["lora"]["peakMemoryBytes"] == rows["lora"]["peakMemoryBytes"]
