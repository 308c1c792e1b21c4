"""Operator metrics: phase counts, transitions, durations, bounded per-job series."""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune import api, metrics
from kubetune.metrics import OperatorMetrics
from kubetune_trainer import report

T0 = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def value(m: OperatorMetrics, metric: str, /, **labels: str) -> float | None:
    return m.registry.get_sample_value(metric, labels)


def moved(m: OperatorMetrics, source: str, target: str) -> float | None:
    labels = {"from": source, "to": target}
    return m.registry.get_sample_value("kubetune_finetunejob_phase_transitions_total", labels)


def phase_counts(m: OperatorMetrics) -> dict[str, float]:
    return {p: value(m, "kubetune_finetunejobs", phase=p) or 0.0 for p in metrics.PHASES}


def series_names(m: OperatorMetrics) -> set[str]:
    text = m.exposition().decode()
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("name")
    }


PROGRESS = api.Progress(step=5, totalSteps=50, loss=1.25, evalLoss=1.5, tokensPerSecond=900.0)


def test_phase_gauge_counts_jobs_and_follows_changes() -> None:
    m = OperatorMetrics()
    assert phase_counts(m) == dict.fromkeys(metrics.PHASES, 0.0)  # every phase exists at 0
    for name in ("a", "b", "c"):
        m.job_state("ns", name, "Pending", None, T0, at(1))
    m.job_state("ns", "a", "Running", PROGRESS, T0, at(20))
    m.job_state("ns", "a", "Running", PROGRESS, T0, at(30))  # same phase again: no change
    m.job_state("ns", "b", "Failed", None, T0, at(40))
    assert phase_counts(m) == {
        "Pending": 1.0,
        "Suspended": 0.0,
        "Running": 1.0,
        "Succeeded": 0.0,
        "Failed": 1.0,
    }
    assert moved(m, "Pending", "Running") == 1.0
    assert moved(m, "Pending", "Failed") == 1.0
    assert moved(m, "Running", "Failed") == 0.0


def test_a_job_with_no_phase_yet_is_known_but_not_counted() -> None:
    m = OperatorMetrics()
    m.job_state("ns", "a", None, None, T0, at(0))
    assert sum(phase_counts(m).values()) == 0.0
    m.job_state("ns", "a", "Pending", None, T0, at(1))
    assert phase_counts(m)["Pending"] == 1.0
    # None -> Pending is a job being born, not a transition between phases.
    total = sum(
        s.value
        for f in text_string_to_metric_families(m.exposition().decode())
        if f.name == "kubetune_finetunejob_phase_transitions"
        for s in f.samples
        if s.name.endswith("_total")
    )
    assert total == 0.0


def test_durations_are_observed_once_from_creation() -> None:
    m = OperatorMetrics()
    m.job_state("ns", "a", "Pending", None, T0, at(2))
    m.job_state("ns", "a", "Running", PROGRESS, T0, at(42))
    m.job_state("ns", "a", "Pending", None, T0, at(100))  # pod lost, retried
    m.job_state("ns", "a", "Running", PROGRESS, T0, at(160))  # not a second time-to-running
    m.job_state("ns", "a", "Succeeded", None, T0, at(1000))
    m.job_state("ns", "a", "Succeeded", None, T0, at(1500))
    assert value(m, "kubetune_finetunejob_time_to_running_seconds_count") == 1.0
    assert value(m, "kubetune_finetunejob_time_to_running_seconds_sum") == 42.0
    labels = {"phase": "Succeeded"}
    assert value(m, "kubetune_finetunejob_time_to_completion_seconds_count", **labels) == 1.0
    assert value(m, "kubetune_finetunejob_time_to_completion_seconds_sum", **labels) == 1000.0


def test_first_sighting_after_restart_invents_no_transition_or_duration() -> None:
    m = OperatorMetrics()
    # A fresh operator process lists jobs that have been running or done for a long time.
    m.job_state("ns", "old-done", "Succeeded", None, T0, at(86400))
    m.job_state("ns", "old-running", "Running", PROGRESS, T0, at(86400))
    assert value(m, "kubetune_finetunejob_time_to_running_seconds_count") == 0.0
    completion = "kubetune_finetunejob_time_to_completion_seconds"
    assert value(m, completion + "_count", phase="Succeeded") is None
    # ...but a change seen afterwards counts, with the duration since creation.
    m.job_state("ns", "old-running", "Failed", None, T0, at(90000))
    assert moved(m, "Running", "Failed") == 1.0
    assert value(m, completion + "_sum", phase="Failed") == 90000.0


def test_progress_series_exist_only_while_running() -> None:
    m = OperatorMetrics()
    m.job_state("team-a", "llama", "Pending", PROGRESS, T0, at(1))
    assert value(m, "kubetune_finetunejob_step", namespace="team-a", name="llama") is None
    m.job_state("team-a", "llama", "Running", PROGRESS, T0, at(10))
    job = {"namespace": "team-a", "name": "llama"}
    assert value(m, "kubetune_finetunejob_step", **job) == 5.0
    assert value(m, "kubetune_finetunejob_total_steps", **job) == 50.0
    assert value(m, "kubetune_finetunejob_loss", **job) == 1.25
    assert value(m, "kubetune_finetunejob_eval_loss", **job) == 1.5
    assert value(m, "kubetune_finetunejob_tokens_per_second", **job) == 900.0
    # A value the trainer no longer reports is dropped, not left stale.
    m.job_state("team-a", "llama", "Running", api.Progress(step=6, totalSteps=50), T0, at(20))
    assert value(m, "kubetune_finetunejob_step", **job) == 6.0
    assert value(m, "kubetune_finetunejob_loss", **job) is None
    # A handler without progress at hand (progress=None) does not wipe the last values.
    m.job_state("team-a", "llama", "Running", None, T0, at(25))
    assert value(m, "kubetune_finetunejob_step", **job) == 6.0
    m.job_state("team-a", "llama", "Succeeded", PROGRESS, T0, at(30))
    assert series_names(m) == set()


def test_pending_since_marks_waiting_jobs_only() -> None:
    m = OperatorMetrics()
    m.job_state("ns", "queued", "Pending", None, T0, at(600))  # first seen: waiting since creation
    m.job_state("ns", "queued", "Pending", None, T0, at(900))
    m.job_state("ns", "new", None, None, at(1000), at(1000))
    m.job_state("ns", "new", "Pending", None, at(1000), at(1001))  # witnessed: since now
    name = "kubetune_finetunejob_pending_since_timestamp_seconds"
    assert value(m, name, namespace="ns", name="queued") == T0.timestamp()
    assert value(m, name, namespace="ns", name="new") == at(1001).timestamp()
    m.job_state("ns", "queued", "Running", None, T0, at(1200))
    assert value(m, name, namespace="ns", name="queued") is None


def test_job_deleted_drops_every_series_of_that_job() -> None:
    m = OperatorMetrics()
    m.job_state("ns", "a", "Pending", None, T0, at(1))
    m.job_state("ns", "a", "Running", PROGRESS, T0, at(2))
    m.job_state("ns", "b", "Pending", None, T0, at(3))
    m.job_deleted("ns", "a")
    m.job_deleted("ns", "never-seen")  # harmless
    assert phase_counts(m)["Running"] == 0.0
    assert phase_counts(m)["Pending"] == 1.0
    assert {n for n in series_names(m)} == {"kubetune_finetunejob_pending_since_timestamp_seconds"}
    # The same name can come back as a new job: it is counted afresh.
    m.job_state("ns", "a", "Pending", None, at(5), at(5))
    assert phase_counts(m)["Pending"] == 2.0


def test_per_job_series_stay_bounded_by_live_jobs() -> None:
    m = OperatorMetrics()
    for i in range(300):
        m.job_state("ns", f"j{i}", "Pending", None, T0, at(i))
        m.job_state("ns", f"j{i}", "Running", PROGRESS, T0, at(i + 1))
        if i >= 3:  # all but three finish
            m.job_state("ns", f"j{i}", "Succeeded", None, T0, at(i + 2))
    per_job = [
        s
        for f in text_string_to_metric_families(m.exposition().decode())
        for s in f.samples
        if "name" in s.labels
    ]
    assert m.live_jobs() == 3
    assert len(per_job) == 3 * 5  # five progress gauges per running job, nothing else
    assert phase_counts(m)["Succeeded"] == 297.0


def test_reconcile_timer_times_and_counts_errors() -> None:
    m = OperatorMetrics()
    with m.reconcile_timer("create"):
        pass
    with pytest.raises(RuntimeError, match="boom"), m.reconcile_timer("create"):
        raise RuntimeError("boom")
    assert value(m, "kubetune_reconcile_duration_seconds_count", handler="create") == 2.0
    assert value(m, "kubetune_reconcile_errors_total", handler="create") == 1.0


def test_api_error_labels_are_cut_to_a_bounded_length() -> None:
    m = OperatorMetrics()
    m.api_error("create_job", "Conflict")
    m.api_error("patch_status", "x" * 500)
    m.api_error("patch_status", "x" * 500 + "different tail")
    assert value(m, "kubetune_api_errors_total", operation="create_job", reason="Conflict") == 1.0
    long = {"operation": "patch_status", "reason": "x" * metrics.MAX_LABEL_LENGTH}
    assert value(m, "kubetune_api_errors_total", **long) == 2.0


def test_concurrent_updates_keep_counts_consistent() -> None:
    m = OperatorMetrics()

    def churn(worker: int) -> None:
        for i in range(200):
            name = f"w{worker}-{i}"
            m.job_state("ns", name, "Pending", None, T0, at(i))
            m.job_state("ns", name, "Running", PROGRESS, T0, at(i + 1))
            if i % 2:
                m.job_deleted("ns", name)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert phase_counts(m)["Running"] == 4 * 100
    assert phase_counts(m)["Pending"] == 0.0


def test_every_declared_metric_is_exported() -> None:
    m = OperatorMetrics()
    m.job_state("ns", "a", "Pending", None, T0, at(0))
    m.job_state("ns", "a", "Running", PROGRESS, T0, at(1))
    m.job_state("ns", "b", "Pending", None, T0, at(0))
    m.job_state("ns", "c", "Pending", None, T0, at(0))
    m.job_state("ns", "c", "Failed", None, T0, at(3))
    with m.reconcile_timer("timer"):
        pass
    with pytest.raises(ValueError), m.reconcile_timer("timer"):
        raise ValueError
    m.api_error("get_pod", "NotFound")
    trials = {"Pending": 0, "Running": 1, "Succeeded": 1, "Failed": 0, "Pruned": 0}
    m.sweep_state("ns", "s", "Running", trials, 0.5, "evalLoss", "minimize")
    text = m.exposition().decode()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for name in metrics.OPERATOR_METRICS:
        assert any(s == name or s.startswith(name + "_") for s in exported), name
    assert not any(s.endswith("_created") for s in exported)


def test_module_functions_keep_the_interface_handlers_call() -> None:
    # The operator's handlers call these by name and argument; renaming one breaks them.
    expected = {
        "job_state": ["namespace", "name", "phase", "progress", "created", "now"],
        "job_deleted": ["namespace", "name"],
        "reconcile_timer": ["handler"],
        "api_error": ["operation", "reason"],
        "sweep_state": ["namespace", "name", "phase", "trials", "best", "metric", "direction"],
        "sweep_deleted": ["namespace", "name"],
        "start_server": ["port", "addr"],
    }
    for func, params in expected.items():
        assert list(inspect.signature(getattr(metrics, func)).parameters) == params
    before = metrics.METRICS.registry.get_sample_value(
        "kubetune_api_errors_total", {"operation": "probe", "reason": "Test"}
    )
    metrics.api_error("probe", "Test")
    after = metrics.METRICS.registry.get_sample_value(
        "kubetune_api_errors_total", {"operation": "probe", "reason": "Test"}
    )
    assert (after or 0.0) - (before or 0.0) == 1.0


def test_operations_doc_lists_exactly_the_exported_metrics() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    reference = doc.split("## Metrics reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(kubetune_[a-z_]+)`", reference))
    exported = set(metrics.OPERATOR_METRICS) | {f"kubetune_trainer_{n}" for n in report.GAUGES}
    assert documented == exported


def test_a_cancelled_handler_is_timed_but_not_an_error() -> None:
    m = OperatorMetrics()
    with pytest.raises(asyncio.CancelledError), m.reconcile_timer("refresh"):
        raise asyncio.CancelledError
    assert value(m, "kubetune_reconcile_duration_seconds_count", handler="refresh") == 1.0
    assert value(m, "kubetune_reconcile_errors_total", handler="refresh") is None


def test_sweep_series_follow_the_trials_and_go_with_the_sweep() -> None:
    m = OperatorMetrics()
    trials = {"Pending": 0, "Running": 2, "Succeeded": 0, "Failed": 0, "Pruned": 0}
    m.sweep_state("ns", "lr", "Running", trials, None, "evalLoss", "minimize")
    assert value(m, "kubetune_finetunesweeps", phase="Running") == 1.0
    assert (
        value(m, "kubetune_finetunesweep_trials", namespace="ns", name="lr", phase="Running") == 2
    )
    assert value(m, "kubetune_finetunesweep_trials", namespace="ns", name="lr", phase="Pruned") == 0
    best = {"namespace": "ns", "name": "lr", "metric": "evalLoss", "direction": "minimize"}
    assert value(m, "kubetune_finetunesweep_best_objective", **best) is None  # none succeeded
    done = {"Pending": 0, "Running": 0, "Succeeded": 3, "Failed": 1, "Pruned": 2}
    m.sweep_state("ns", "lr", "Succeeded", done, 0.5, "evalLoss", "minimize")
    assert value(m, "kubetune_finetunesweeps", phase="Running") == 0.0
    assert value(m, "kubetune_finetunesweeps", phase="Succeeded") == 1.0
    assert value(m, "kubetune_finetunesweep_trials", namespace="ns", name="lr", phase="Pruned") == 2
    assert value(m, "kubetune_finetunesweep_best_objective", **best) == 0.5
    m.sweep_deleted("ns", "lr")
    assert value(m, "kubetune_finetunesweeps", phase="Succeeded") == 0.0
    assert "lr" not in m.exposition().decode()
