"""The study, rebuilt from trial records: deterministic next trials, pruning, best trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune import api, sweep, sweep_api
from kubetune.sweep import TrialRecord

ROOT = Path(__file__).resolve().parents[2]


def spec(**changes: Any) -> sweep_api.FineTuneSweepSpec:
    document = yaml.safe_load((ROOT / "examples" / "lr-sweep.yaml").read_text())
    document["spec"].update(changes)
    return sweep_api.parse_sweep(document).spec


def finished(new: sweep.NewTrial, objective: float, curve: dict[int, float]) -> TrialRecord:
    return TrialRecord(new.number, new.name, new.params, "Succeeded", objective, curve)


def test_the_same_trials_give_the_same_next_trials() -> None:
    s = spec()
    first = sweep.plan_new_trials(s, "lr", [])
    assert [t.name for t in first] == ["lr-t000", "lr-t001"]  # parallelism 2
    assert sweep.plan_new_trials(s, "lr", []) == first
    assert first[0].params != first[1].params
    done = [finished(t, 1.0 + t.number, {10: 2.0}) for t in first]
    second = sweep.plan_new_trials(s, "lr", done)
    assert second == sweep.plan_new_trials(s, "lr", list(reversed(done)))
    assert [t.number for t in second] == [2, 3]


def test_a_restart_with_one_trial_running_creates_only_the_missing_one() -> None:
    s = spec()
    first = sweep.plan_new_trials(s, "lr", [])
    running = [TrialRecord(first[0].number, first[0].name, first[0].params, "Running")]
    again = sweep.plan_new_trials(s, "lr", running)
    assert [t.name for t in again] == ["lr-t001"]  # never t000 twice, never two new ones


def test_no_trial_past_max_trials_or_after_too_many_failures() -> None:
    s = spec(maxTrials=3, parallelism=2, maxFailedTrials=1)
    records = [
        TrialRecord(0, "lr-t000", {}, "Succeeded", 1.0),
        TrialRecord(1, "lr-t001", {}, "Succeeded", 2.0),
    ]
    assert [t.number for t in sweep.plan_new_trials(s, "lr", records)] == [2]
    records.append(TrialRecord(2, "lr-t002", {}, "Failed", message="boom"))
    assert sweep.plan_new_trials(s, "lr", records) == []
    assert sweep.is_done(s, records)
    failed = [TrialRecord(i, f"lr-t00{i}", {}, "Failed") for i in range(2)]
    assert sweep.failed_too_often(s, failed) and sweep.plan_new_trials(s, "lr", failed) == []


def test_grid_walks_every_combination_once() -> None:
    s = spec(
        parameters=[
            {"path": "method.type", "type": "categorical", "choices": ["full", "lora", "qlora"]}
        ],
        algorithm={"sampler": "grid"},
        maxTrials=10,
        parallelism=1,
    )
    assert sweep_api.planned_trials(s) == 3
    records: list[TrialRecord] = []
    while new := sweep.plan_new_trials(s, "g", records):
        records += [finished(t, 1.0, {}) for t in new]
    assert sorted(r.params["method.type"] for r in records) == ["full", "lora", "qlora"]
    assert sweep.is_done(s, records)


def test_tpe_samples_inside_the_bounds_and_choices() -> None:
    s = spec(maxTrials=12, parallelism=1)
    records: list[TrialRecord] = []
    for _ in range(8):
        (new,) = sweep.plan_new_trials(s, "lr", records)
        lr = new.params["training.learningRate"]
        assert 1e-4 <= lr <= 1e-2 and new.params["method.lora.r"] in (4, 8, 16)
        records.append(finished(new, abs(lr - 0.002) * 100, {}))  # best near 0.002


def test_median_pruning_on_eval_loss_at_the_same_step() -> None:
    s = spec()
    done = [
        TrialRecord(
            0,
            "a",
            {"training.learningRate": 1e-3, "method.lora.r": 4},
            "Succeeded",
            1.0,
            {10: 2.0, 20: 1.0},
        ),
        TrialRecord(
            1,
            "b",
            {"training.learningRate": 2e-3, "method.lora.r": 8},
            "Succeeded",
            1.2,
            {10: 2.2, 20: 1.2},
        ),
    ]
    params = {"training.learningRate": 5e-3, "method.lora.r": 16}
    behind = TrialRecord(2, "c", params, "Running", curve={10: 3.0})
    ahead = TrialRecord(2, "c", params, "Running", curve={10: 1.5})
    assert sweep.should_prune(s, done, behind)
    assert not sweep.should_prune(s, done, ahead)
    assert not sweep.should_prune(s, done[:1], behind)  # startupTrials: 2 finished needed
    assert not sweep.should_prune(spec(earlyStopping=None), done, behind)


def test_best_trial_follows_the_direction() -> None:
    records = [
        TrialRecord(0, "a", {}, "Succeeded", 0.5),
        TrialRecord(1, "b", {}, "Succeeded", 0.7),
        TrialRecord(2, "c", {}, "Failed"),
        TrialRecord(3, "d", {}, "Pruned"),
    ]
    assert sweep.best_trial(spec(), records).name == "a"  # type: ignore[union-attr]
    maximize = spec(objective={"metric": "tuned.exactMatch", "direction": "maximize"})
    assert sweep.best_trial(maximize, records).name == "b"  # type: ignore[union-attr]
    assert [r.name for r in sweep.ranked(maximize, records)] == ["b", "a", "c", "d"]


def test_record_from_status_reads_the_objective_and_curve() -> None:
    status = api.FineTuneJobStatus(
        phase="Succeeded",
        progress=api.Progress(
            step=40,
            evalLoss=1.25,
            evalHistory=[
                api.EvalPoint(step=20, evalLoss=1.5),
                api.EvalPoint(step=40, evalLoss=1.25),
            ],
        ),
        metrics=api.Metrics(tuned={"exactMatch": 0.5}),
    )
    record = sweep.record_from_status(0, "lr-t000", {}, status, "evalLoss")
    assert (record.phase, record.objective, dict(record.curve)) == (
        "Succeeded",
        1.25,
        {20: 1.5, 40: 1.25},
    )
    missing = sweep.record_from_status(0, "lr-t000", {}, status, "tuned.rougeL")
    assert missing.phase == "Failed" and "tuned.rougeL" in (missing.message or "")
    pruned = sweep.record_from_status(0, "x", {}, status, "evalLoss", pruned=True)
    assert pruned.phase == "Pruned" and "step 40" in (pruned.message or "")


def test_table_lists_the_best_first() -> None:
    s = spec()
    records = [
        TrialRecord(
            0, "lr-t000", {"training.learningRate": 0.001, "method.lora.r": 4}, "Succeeded", 2.0
        ),
        TrialRecord(
            1, "lr-t001", {"training.learningRate": 0.002, "method.lora.r": 8}, "Succeeded", 1.0
        ),
    ]
    lines = sweep.format_table(s, records).splitlines()
    assert lines[0].split()[:3] == ["#", "trial", "phase"]
    assert lines[1].split()[:2] == ["1", "lr-t001"]


def test_tradeoff_rows_put_results_next_to_the_plan() -> None:
    from kubetune_trainer.sweep_local import format_tradeoff, tradeoff_rows

    rows = [
        {
            "name": "t-t000",
            "phase": "Succeeded",
            "objective": 0.6,
            "params": {"method.type": "lora"},
            "metrics": {
                "tuned": {"loss": 0.6, "exactMatch": 0.5},
                "delta": {"oodPerplexityRatio": 1.1},
            },
            "trainableParameters": 74752,
            "planTrainableParameters": 74752,
            "peakMemoryBytes": 900 * 2**20,
            "planMemoryBytes": 100 * 2**20,
            "wallSeconds": 60.0,
            "artifactBytes": 2**20,
        },
        {
            "name": "t-t001",
            "phase": "Failed",
            "params": {"method.type": "qlora"},
            "message": "internal error: RuntimeError: shape '[128, 5]' is invalid",
        },
    ]
    table = tradeoff_rows(spec(), rows)
    assert table[0]["method"] == "lora" and table[0]["oodPerplexityRatio"] == 1.1
    assert table[1]["objective"] is None and table[1]["tuned"] == {}
    lines = format_tradeoff(table).splitlines()
    assert lines[1].split()[:5] == ["lora", "0.6", "0.6", "0.5", "1.1"]
    assert "900" in lines[1] and "100" in lines[1] and lines[2].split() == ["qlora"]
    # a method that failed says why, under the table
    assert lines[3].strip() == (
        "qlora (t-t001): Failed: internal error: RuntimeError: shape '[128, 5]' is invalid"
    )


def test_sweep_status_carries_the_tradeoff_from_the_trials_statuses() -> None:
    s = spec(
        parameters=[{"path": "method.type", "type": "categorical", "choices": ["full", "lora"]}],
        algorithm={"sampler": "grid", "seed": 0},
        maxTrials=2,
        parallelism=1,
        earlyStopping=None,
    )
    done = api.FineTuneJobStatus(
        phase="Succeeded",
        startTime="2026-12-01T10:00:00Z",
        completionTime="2026-12-01T10:02:30Z",
        progress=api.Progress(step=4, evalLoss=0.8),
        metrics=api.Metrics(tuned={"loss": 0.8}, delta={"oodPerplexityRatio": 1.2}),
        usage=api.Usage(trainableParameters=74752, peakMemoryBytes=900 * 2**20),
        plan=api.JobPlan(
            requested="lora",
            parameters=586880,
            methods=[
                api.PlannedMethod(method="full", trainableParameters=586880, memoryBytes=9),
                api.PlannedMethod(method="lora", trainableParameters=74752, memoryBytes=7),
            ],
            recommended="lora",
            recommendedGpus=1,
            recommendation="lora fits",
        ),
    )
    failed = api.FineTuneJobStatus(phase="Failed", message="exit 1: out of memory")
    records = [
        sweep.record_from_status(0, "t-t000", {"method.type": "lora"}, done, "evalLoss"),
        sweep.record_from_status(1, "t-t001", {"method.type": "full"}, failed, "evalLoss"),
    ]
    status = sweep.summarize(s, records)
    lora, full = status.tradeoff
    assert (lora.method, lora.objective, lora.tuned) == ("lora", 0.8, {"loss": 0.8})
    assert lora.oodPerplexityRatio == 1.2 and lora.wallSeconds == 150.0
    assert (lora.trainableParameters, lora.planTrainableParameters) == (74752, 74752)
    assert (lora.peakMemoryBytes, lora.planMemoryBytes) == (900 * 2**20, 7)
    assert full.phase == "Failed" and full.message == "exit 1: out of memory"
    assert full.objective is None and full.peakMemoryBytes is None
    # without a method.type parameter there is no table
    assert sweep.summarize(spec(), records).tradeoff == []


def test_trial_jobs_round_trip_through_the_api_form() -> None:
    document = yaml.safe_load((ROOT / "examples" / "lr-sweep.yaml").read_text())
    document["metadata"]["namespace"] = "ml"
    sweep_obj = sweep_api.parse_sweep(document)
    (first, second) = sweep.plan_new_trials(sweep_obj.spec, "lr-sweep", [])
    jobs = [sweep.trial_job(sweep_obj, "uid-1", t) for t in (first, second)]
    job = jobs[0]
    assert job["metadata"]["name"] == "lr-sweep-t000" and job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "name": "lr-sweep",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert job["spec"]["output"]["destination"].endswith("/out/lr-sweep/lr-sweep-t000")
    assert job["spec"]["method"]["lora"]["r"] == first.params["method.lora.r"]
    api.parse_job(job)  # a valid FineTuneJob as the API server would read it
    # as listed back: one running with an eval curve, one finished and pruned after the fact
    jobs[0]["status"] = {
        "phase": "Running",
        "progress": {"step": 10, "evalHistory": [{"step": 10, "evalLoss": 2.0}]},
    }
    jobs[1]["status"] = {"phase": "Succeeded", "progress": {"evalLoss": 1.5}}
    jobs[1]["metadata"]["annotations"][sweep.ANNOTATION_PRUNED] = "true"
    records = sweep.records_from_jobs(sweep_obj.spec, [jobs[1], jobs[0], {"metadata": {}}])
    assert [(r.name, r.phase) for r in records] == [
        ("lr-sweep-t000", "Running"),
        ("lr-sweep-t001", "Succeeded"),
    ]
    assert records[0].params == first.params and dict(records[0].curve) == {10: 2.0}
    assert records[1].objective == 1.5
    # the next round from what is listed: exactly the trials a fresh planner would make
    again = sweep.plan_new_trials(sweep_obj.spec, "lr-sweep", records)
    assert [t.name for t in again] == ["lr-sweep-t002"]
    jobs[0]["metadata"]["annotations"][sweep.ANNOTATION_PRUNED] = "true"
    jobs[0]["status"]["phase"] = "Suspended"
    (pruned, _) = sweep.records_from_jobs(sweep_obj.spec, jobs)
    assert pruned.phase == "Pruned" and "step 10" in (pruned.message or "")


def test_pruning_compares_with_shorter_finished_runs_at_their_last_loss() -> None:
    s = spec()
    params = {"training.learningRate": 1e-3, "method.lora.r": 4}
    done = [
        TrialRecord(0, "a", params, "Succeeded", 1.0, {2: 2.0, 4: 1.0}),
        TrialRecord(1, "b", params, "Succeeded", 1.2, {2: 2.2, 4: 1.2, 6: 1.1}),
    ]
    # seen only at step 36 (a periodic read): still compared, with a's 1.0 and b's 1.1
    assert sweep.should_prune(s, done, TrialRecord(2, "c", params, "Running", curve={36: 5.0}))
    assert not sweep.should_prune(s, done, TrialRecord(2, "c", params, "Running", curve={36: 0.9}))


def test_too_many_failed_trials_fail_the_sweep_naming_each_trial_and_why() -> None:
    s = spec(maxTrials=6, parallelism=2, maxFailedTrials=1)
    records = [
        TrialRecord(0, "lr-t000", {}, "Succeeded", 1.0),
        TrialRecord(1, "lr-t001", {}, "Failed", message="UserError: row 3: missing field"),
        TrialRecord(2, "lr-t002", {}, "Pruned", message="pruned at step 10"),
    ]
    ongoing = sweep.summarize(s, records)
    assert ongoing.phase == "Running" and ongoing.failed == 1  # one allowed; pruned: not failed
    records.append(TrialRecord(3, "lr-t003", {}, "Failed", message="finished without evalLoss"))
    status = sweep.summarize(s, records)
    assert status.phase == "Failed" and status.failed == 2 and status.pruned == 1
    assert status.message == (
        "2 trials failed (maxFailedTrials 1): lr-t001: UserError: row 3: missing field; "
        "lr-t003: finished without evalLoss"
    )
    assert [r.message for r in status.trials if r.phase == "Failed"] == [
        "UserError: row 3: missing field",
        "finished without evalLoss",
    ]
