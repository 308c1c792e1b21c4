"""status.py: Job + pods + trainer metrics + termination message -> FineTuneJob status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune import api, manifests
from kubetune import status as st
from kubetune_trainer.report import Telemetry, failure_status, termination_message
from tests.support.cluster import ROOT

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
SPEC = manifests.load_file(ROOT / "examples" / "lora-s3.yaml").jobs[0].spec


def job(
    *,
    active: int = 0,
    failed: int = 0,
    succeeded: int = 0,
    suspend: bool = False,
    conditions: list[dict[str, Any]] | None = None,
    **status: Any,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "x-trainer"},
        "spec": {"suspend": suspend},
        "status": {
            "active": active,
            "failed": failed,
            "succeeded": succeeded,
            "conditions": conditions or [],
            **status,
        },
    }


def pod(
    phase: str,
    state: dict[str, Any] | None = None,
    *,
    created: str = "2026-11-28T11:00:00Z",
    conditions: list[dict[str, Any]] | None = None,
    ip: str | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"creationTimestamp": created},
        "spec": {
            "containers": [
                {"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9400}]}
            ]
        },
        "status": {
            "phase": phase,
            **({"podIP": ip} if ip else {}),
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state or {}}],
        },
    }


def terminated(code: int, message: str = "", reason: str = "Error") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason, "message": message}}


def compute(
    j: dict[str, Any] | None, pods: list[dict[str, Any]], **kw: Any
) -> api.FineTuneJobStatus:
    previous = kw.pop("previous", api.FineTuneJobStatus(jobName="x-trainer", phase="Pending"))
    return st.compute(
        previous=previous,
        generation=1,
        spec=kw.pop("spec", SPEC),
        job=j,
        pods=pods,
        live=kw.pop("live", None),
        now=kw.pop("now", NOW),
        **kw,
    )


def cond(s: api.FineTuneJobStatus, type_: str) -> api.Condition:
    found = st.condition(s, type_)
    assert found is not None, f"no {type_} condition in {s.conditions}"
    return found


OK_RESULT = termination_message(
    api.FineTuneJobStatus(
        phase="Succeeded",
        message="trained 8 steps; gates passed",
        progress=api.Progress(step=8, totalSteps=8, percent=100.0),
        metrics=api.Metrics(base={"loss": 2.0}, tuned={"loss": 1.5}, delta={"loss": -0.5}),
        gates=[api.GateResult(metric="delta.loss", op="<", value=0, actual=-0.5, passed=True)],
        artifacts=api.Artifacts(adapter="s3://b/run/adapter"),
        reproducibility=api.Reproducibility(seed=42, configHash="c" * 64),
    )
)
GATE_FAILED_RESULT = termination_message(
    api.FineTuneJobStatus(
        phase="Succeeded",
        gates=[api.GateResult(metric="delta.loss", op="<", value=-1, actual=-0.5, passed=False)],
    )
)

# The user asked for suspend (otherwise a suspended Job with a queueName is Kueue's doing).
SPECS = {"suspended": SPEC.model_copy(update={"suspend": True})}

# (case, job, pods) -> (phase, Running reason or the condition that decides, text in message)
TABLE = [
    ("no pod yet", job(), [], "Pending", ("Running", "False", "PodPending"), "waiting"),
    (
        "unschedulable",
        job(active=1),
        [pod("Pending", conditions=[{"type": "PodScheduled", "status": "False",
                                     "reason": "Unschedulable",
                                     "message": "0/3 nodes: insufficient nvidia.com/gpu"}])],
        "Pending", ("Running", "False", "Unschedulable"), "insufficient nvidia.com/gpu",
    ),
    (
        "image pull",
        job(active=1),
        [pod("Pending", {"waiting": {"reason": "ErrImagePull", "message": "not found"}})],
        "Pending", ("Running", "False", "ImagePullBackOff"), "ImagePullBackOff: not found",
    ),
    (
        "missing secret",
        job(active=1),
        [pod("Pending", {"waiting": {"reason": "CreateContainerConfigError",
                                     "message": 'secret "s3-credentials" not found'}})],
        "Pending", ("Running", "False", "CreateContainerConfigError"), "s3-credentials",
    ),
    (
        "running",
        job(active=1),
        [pod("Running", {"running": {}}, ip="10.0.0.7")],
        "Running", ("Running", "True", "TrainerRunning"), "training",
    ),
    (
        "running after an OOM kill",
        job(active=1, failed=1),
        [pod("Failed", terminated(137, reason="OOMKilled"), created="2026-11-28T10:00:00Z"),
         pod("Running", {"running": {}}, ip="10.0.0.8")],
        "Running", ("Running", "True", "Retrying"), "OOMKilled (exit 137)",
    ),
    (
        "between attempts",
        job(failed=1),
        [pod("Failed", terminated(11, "storage unreachable"))],
        "Pending", ("Running", "False", "Retrying"), "exit code 11",
    ),
    (
        "suspended",
        job(suspend=True, conditions=[{"type": "Suspended", "status": "True"}]),
        [],
        "Suspended", ("Suspended", "True", "JobSuspended"), "suspended",
    ),
    (
        "succeeded",
        job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}],
            completionTime="2026-11-28T11:30:00Z"),
        [pod("Succeeded", terminated(0, OK_RESULT, "Completed"))],
        "Succeeded", ("Succeeded", "True", "TrainingComplete"), "gates passed",
    ),
    (
        "succeeded, gate failed",
        job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]),
        [pod("Succeeded", terminated(0, GATE_FAILED_RESULT, "Completed"))],
        "Succeeded", ("GatesPassed", "False", "GateFailed"), "training finished",
    ),
    (
        "user error",
        job(failed=1, conditions=[{"type": "Failed", "status": "True",
                                   "reason": "PodFailurePolicy"}]),
        [pod("Failed", terminated(10, termination_message(failure_status(
            "dataset.license: CC-BY-NC-4.0 does not allow commercial use"))))],
        "Failed", ("Failed", "True", "UserError"), "does not allow commercial use",
    ),
    (
        "backoff limit",
        job(failed=4, conditions=[{"type": "Failed", "status": "True",
                                   "reason": "BackoffLimitExceeded",
                                   "message": "Job has reached the specified backoff limit"}]),
        [pod("Failed", terminated(137, reason="OOMKilled"))],
        "Failed", ("Failed", "True", "BackoffLimitExceeded"), "last pod: OOMKilled (exit 137)",
    ),
    (
        "deadline",
        job(failed=1, conditions=[{"type": "Failed", "status": "True",
                                   "reason": "DeadlineExceeded",
                                   "message": "Job was active longer than specified deadline"}]),
        [],
        "Failed", ("Failed", "True", "DeadlineExceeded"), "longer than specified deadline",
    ),
    (
        "crash with a log tail",
        job(failed=4, conditions=[{"type": "Failed", "status": "True",
                                   "reason": "BackoffLimitExceeded"}]),
        [pod("Failed", terminated(1, "Traceback ...\nRuntimeError: CUDA error"))],
        "Failed", ("Failed", "True", "BackoffLimitExceeded"), "RuntimeError: CUDA error",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "j", "pods", "phase", "decides", "text"), TABLE, ids=[row[0] for row in TABLE]
)
def test_status_table(
    case: str,
    j: dict[str, Any],
    pods: list[dict[str, Any]],
    phase: str,
    decides: tuple[str, str, str],
    text: str,
) -> None:
    new = compute(j, pods, spec=SPECS.get(case, SPEC))
    assert new.phase == phase
    c = cond(new, decides[0])
    assert (c.status, c.reason) == decides[1:]
    assert text in (new.message or "") + " " + c.message
    assert c.observedGeneration == 1 and new.observedGeneration == 1
    assert c.lastTransitionTime == "2026-11-28T12:00:00Z"
    api.FineTuneJobStatus.model_validate(new.to_api())  # what we write is a valid status


def test_success_copies_the_trainer_result() -> None:
    new = compute(TABLE[8][1], TABLE[8][2])
    assert new.metrics is not None and new.metrics.delta == {"loss": -0.5}
    assert new.artifacts is not None and new.artifacts.adapter == "s3://b/run/adapter"
    assert new.reproducibility is not None and new.reproducibility.seed == 42
    assert [g.passed for g in new.gates] == [True]
    assert cond(new, "GatesPassed").reason == "AllGatesPassed"
    assert new.completionTime == "2026-11-28T11:30:00Z"
    assert new.progress is not None and new.progress.step == 8 and new.progress.etaSeconds == 0


def test_success_without_a_readable_result_uses_report_json_else_unknown() -> None:
    j = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    lost = [pod("Succeeded", terminated(0, "", "Completed"))]
    unknown = compute(j, lost)
    assert cond(unknown, "GatesPassed").status == "Unknown"
    assert unknown.artifacts is not None
    assert unknown.artifacts.report == "s3://models/tuned/support-bot/report.json"
    assert "s3://models/tuned/support-bot/report.json" in (unknown.message or "")
    report = {"metrics": {"tuned": {"loss": 1.0}}, "gates": [], "message": "from report.json"}
    new = compute(j, lost, report=report)
    assert new.metrics is not None and new.metrics.tuned == {"loss": 1.0}
    assert new.message == "from report.json"


def test_kueue_holding_the_job_is_pending_not_suspended() -> None:
    held = job(suspend=True)  # Kueue's webhook suspended it; the user did not
    new = compute(held, [])
    assert new.phase == "Pending"
    running = cond(new, "Running")
    assert running.reason == "Queued" and "LocalQueue ml-team" in running.message
    assert cond(new, "Suspended").status == "False"
    user_suspended = SPEC.model_copy(update={"suspend": True})
    assert compute(held, [], spec=user_suspended).phase == "Suspended"


def test_terminal_status_is_final() -> None:
    done = compute(TABLE[8][1], TABLE[8][2])
    again = compute(None, [], previous=done, now=NOW + timedelta(hours=1))
    assert again == done


def test_missing_job_is_reported() -> None:
    new = compute(None, [])
    assert new.phase == "Pending" and cond(new, "Running").reason == "JobMissing"


def test_attempts_count_pods_not_only_counters() -> None:
    # An Ignore'd failure (preemption) is not in the Job's counters; its pod still shows it.
    pods = [
        pod("Failed", terminated(12), created="2026-11-28T10:00:00Z"),
        pod("Running", {"running": {}}, ip="10.0.0.9"),
    ]
    assert compute(job(active=1), pods).attempts == 2


def test_live_progress_and_eta() -> None:
    live = api.Progress(step=25, totalSteps=100, percent=25.0, loss=1.0, updatedAt="x")
    j = job(active=1, startTime="2026-11-28T11:50:00Z")
    previous = api.FineTuneJobStatus(
        jobName="x-trainer", phase="Running", startTime="2026-11-28T11:50:00Z"
    )
    new = compute(j, [pod("Running", {"running": {}}, ip="1.2.3.4")], live=live, previous=previous)
    assert new.progress is not None
    assert new.progress.etaSeconds == 1800  # 10 min for 25 steps -> 30 min for the other 75
    kept = compute(j, [pod("Running", {"running": {}}, ip="1.2.3.4")], previous=new)
    assert kept.progress == new.progress  # no new reading: progress stays


def test_parse_the_trainers_real_metrics_page() -> None:
    telemetry = Telemetry(port=0)
    telemetry.update(
        step=30,
        total_steps=120,
        loss=0.75,
        eval_loss=0.9,
        learning_rate=1e-4,
        tokens_per_second=1234.5,
        epoch=0.5,
        eta_seconds=600,
    )
    p = st.parse_trainer_metrics(telemetry.exposition(), now=NOW)
    assert p == api.Progress(
        step=30,
        totalSteps=120,
        percent=25.0,
        etaSeconds=600,
        epoch=0.5,
        loss=0.75,
        evalLoss=0.9,
        learningRate=1e-4,
        tokensPerSecond=1234.5,
        updatedAt="2026-11-28T12:00:00Z",
    )


def test_no_eval_loss_before_the_first_evaluation() -> None:
    telemetry = Telemetry(port=0)
    telemetry.update(step=3, total_steps=120, loss=0.75)
    assert "kubetune_trainer_eval_loss NaN" in telemetry.exposition()
    p = st.parse_trainer_metrics(telemetry.exposition(), now=NOW)
    assert p is not None and p.step == 3 and p.evalLoss is None
    telemetry.update(step=10, eval_loss=0.9)
    p = st.parse_trainer_metrics(telemetry.exposition(), now=NOW)
    assert p is not None and p.evalLoss == 0.9


@pytest.mark.parametrize("text", ["", "garbage {", "# only comments\n", "other_metric 1\n"])
def test_unreadable_metrics_leave_progress_alone(text: str) -> None:
    assert st.parse_trainer_metrics(text, now=NOW) is None


def test_pod_facts_pick_the_metrics_port_and_index_0() -> None:
    p0 = pod("Running", {"running": {}}, ip="10.0.0.1")
    p1 = pod("Running", {"running": {}}, ip="10.0.0.2")
    p0["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": "0"}
    p1["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": "1"}
    p0["spec"]["containers"][0]["ports"][0]["containerPort"] = 9555
    facts = st.pod_facts([p1, p0])
    assert (facts.running, facts.pod_ip, facts.metrics_port) == (True, "10.0.0.1", 9555)
    assert not st.pod_facts([p1]).running


def test_pod_facts_take_the_result_from_index_0_whichever_pod_ends_last() -> None:
    """Only rank 0 writes the result; index 1 succeeding later (no message) must not hide it.
    Seen on the real Job controller with numNodes: 2."""
    result = '{"phase": "Succeeded"}'
    p0 = pod("Succeeded", terminated(0, result, "Completed"), created="2026-11-28T11:00:00Z")
    p1 = pod("Succeeded", terminated(0, "", "Completed"), created="2026-11-28T11:00:01Z")
    p0["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": "0"}
    p1["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": "1"}
    facts = st.pod_facts([p1, p0])
    assert facts.result == st.parse_termination_message(result) and facts.result


def test_invalid_spec_status_names_the_field() -> None:
    doc = (ROOT / "examples" / "lora-s3.yaml").read_text().replace("batchSize: 8", "batchSize: 0")
    import yaml

    with pytest.raises(ValidationError) as error:
        api.parse_job(yaml.safe_load(doc))
    new = st.invalid(api.format_errors(error.value), generation=3, now=NOW)
    assert new.phase == "Failed" and new.observedGeneration == 3
    validated = cond(new, "Validated")
    assert (validated.status, validated.reason) == ("False", "SpecInvalid")
    assert "spec.training.batchSize" in validated.message
    assert cond(new, "Failed").status == "True"


def test_condition_transition_time_moves_only_on_status_change() -> None:
    first = st.set_condition([], "Running", "False", "PodPending", "a", now=NOW, generation=1)
    later = NOW + timedelta(minutes=5)
    same = st.set_condition(
        first, "Running", "False", "Unschedulable", "b", now=later, generation=1
    )
    assert (
        same[0].lastTransitionTime == "2026-11-28T12:00:00Z" and same[0].reason == "Unschedulable"
    )
    flipped = st.set_condition(
        same, "Running", "True", "TrainerRunning", "c", now=later, generation=1
    )
    assert flipped[0].lastTransitionTime == "2026-11-28T12:05:00Z"


def test_progress_patches_are_rate_limited_but_transitions_are_not() -> None:
    running = compute(
        job(active=1),
        [pod("Running", {"running": {}}, ip="1.1.1.1")],
        live=api.Progress(step=1, totalSteps=10, updatedAt="2026-11-28T12:00:00Z"),
    )
    soon = NOW + timedelta(seconds=4)
    newer = running.model_copy(
        update={"progress": api.Progress(step=2, totalSteps=10, updatedAt=st.rfc3339(soon))}
    )
    assert st.patch_for(running, newer, now=soon, min_progress_interval=10) is None
    late = NOW + timedelta(seconds=11)
    patch = st.patch_for(running, newer, now=late, min_progress_interval=10)
    assert patch is not None and set(patch) == {"progress"}
    done = newer.model_copy(update={"phase": "Succeeded"})
    patch = st.patch_for(running, done, now=soon, min_progress_interval=10)
    assert patch is not None and patch["phase"] == "Succeeded" and "progress" in patch
    assert st.patch_for(running, running, now=late, min_progress_interval=10) is None


def test_events_for_transitions() -> None:
    pending = api.FineTuneJobStatus(phase="Pending", attempts=1)
    running = compute(job(active=1), [pod("Running", {"running": {}}, ip="1.1.1.1")])
    events = st.transitions(pending, running)
    assert [(e.type, e.reason) for e in events] == [("Normal", "TrainerRunning")]
    failed = compute(TABLE[10][1], TABLE[10][2])
    assert [(e.type, e.reason) for e in st.transitions(running, failed)] == [
        ("Warning", "UserError")
    ]
    retry = running.model_copy(update={"attempts": 2})
    assert [
        e.reason for e in st.transitions(running.model_copy(update={"attempts": 1}), retry)
    ] == ["Retrying"]
    assert st.transitions(running, running) == []


def test_gates_dropped_from_an_oversized_result_are_not_read_as_passed() -> None:
    # The trainer drops fields to fit 4 KB; a spec with gates and a result without them is
    # Unknown, never "no gates declared".
    j = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    without_gates = termination_message(
        api.FineTuneJobStatus(phase="Succeeded", message="trained", metrics=api.Metrics())
    )
    new = compute(j, [pod("Succeeded", terminated(0, without_gates, "Completed"))])
    assert len(SPEC.evaluation.gates) == 1
    gates = cond(new, "GatesPassed")
    assert (gates.status, gates.reason) == ("Unknown", "NotEvaluated")
    assert "1 of 1 gate result(s) missing" in gates.message


def test_an_oversized_result_keeps_its_gates_and_they_decide() -> None:
    big = {f"metric{i:03d}": 1.0 / (i + 3) for i in range(120)}
    failing = [
        api.GateResult(metric="tuned.loss", op="<", value=0.1 * i, actual=9.0, passed=False)
        for i in range(20)
    ]
    text = termination_message(
        api.FineTuneJobStatus(
            phase="Succeeded",
            message="trained",
            metrics=api.Metrics(base=big, tuned=big, delta=big),
            gates=failing,
        )
    )
    assert len(text.encode()) < 4096
    j = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    new = compute(j, [pod("Succeeded", terminated(0, text, "Completed"))])
    assert len(new.gates) == 20
    gates = cond(new, "GatesPassed")
    assert (gates.status, gates.reason) == ("False", "GateFailed")


def test_live_reads_build_the_eval_history_a_sweep_prunes_on() -> None:
    progress = None
    reads = [(3, None), (4, 0.0), (10, 2.0), (12, 2.0), (21, 1.5), (25, 1.5), (31, 1.2)]
    for step, eval_loss in reads:
        live = api.Progress(step=step, evalLoss=eval_loss)
        progress = st.with_eval_point(live, progress, every=10)
    assert progress is not None
    assert [(p.step, p.evalLoss) for p in progress.evalHistory] == [(10, 2.0), (20, 1.5), (30, 1.2)]


def test_does_not_fit_is_terminal_with_the_reason_and_the_plan() -> None:
    planned = api.JobPlan(
        requested="full",
        parameters=10,
        recommended="lora",
        recommendedGpus=1,
        recommendation="full does not fit one GPU; lora does",
    )
    s = st.does_not_fit("full needs about 9 GiB", planned, generation=1, now=NOW)
    assert s.phase == "Failed" and s.plan == planned and s.jobName is None
    by_type = {c.type: c for c in s.conditions}
    assert by_type["Validated"].status == "False" and by_type["Validated"].reason == "DoesNotFit"
    assert by_type["Failed"].reason == "DoesNotFit" and "9 GiB" in (s.message or "")
