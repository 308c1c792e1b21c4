"""Job + pods + trainer metrics + termination message -> FineTuneJob status (pure).

No clock, env or API in here: callers pass ``now`` and the objects they read. Conditions follow
the Kubernetes API conventions (type, status, reason, message, lastTransitionTime,
observedGeneration); reasons are the constants below.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from kubetune import api, promotion, render

Phase = api.Phase
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})

# Condition types.
VALIDATED = "Validated"
SUSPENDED = "Suspended"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
GATES_PASSED = "GatesPassed"
STAGED = "Staged"
PROMOTED = "Promoted"
SPEC_CHANGE_IGNORED = "SpecChangeIgnored"

# Reasons (CamelCase, stable: alerts and scripts match on them).
SPEC_VALID = "SpecValid"
SPEC_INVALID = "SpecInvalid"
JOB_CREATED = "JobCreated"
JOB_SUSPENDED = "JobSuspended"
JOB_RESUMED = "JobResumed"
NOT_SUSPENDED = "NotSuspended"
POD_PENDING = "PodPending"
QUEUED = "Queued"
UNSCHEDULABLE = "Unschedulable"
IMAGE_PULL_FAILED = "ImagePullBackOff"
CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
TRAINER_RUNNING = "TrainerRunning"
RETRYING = "Retrying"
TRAINING_COMPLETE = "TrainingComplete"
FINISHED = "Finished"
USER_ERROR = "UserError"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"
JOB_FAILED = "JobFailed"
JOB_MISSING = "JobMissing"
ALL_GATES_PASSED = "AllGatesPassed"
GATE_FAILED = "GateFailed"
NO_GATES = "NoGates"
NOT_EVALUATED = "NotEvaluated"
SPEC_IMMUTABLE = "SpecImmutable"
DOES_NOT_FIT = "DoesNotFit"
STAGING_PENDING = "StagingPending"
STAGING_DEPLOYING = "StagingDeploying"
STAGING_LOAD_TESTING = "StagingLoadTesting"
STAGING_COMPLETE = "StagingComplete"
STAGING_FAILED = "StagingFailed"
PROMOTION_COMPLETE = "PromotionComplete"
PROMOTING = "Promoting"
NOT_PROMOTED = "NotPromoted"
PROMOTION_FAILED = "PromotionFailed"


@dataclass(frozen=True)
class Reason:
    """A reason a condition can carry, and when; docs/operator.md's table is generated from
    :data:`CONDITION_REASONS` (`make generate`)."""

    name: str
    when: str = ""


_FAILURES = (
    Reason(USER_ERROR, "exit 10"),
    Reason(BACKOFF_LIMIT_EXCEEDED),
    Reason(DEADLINE_EXCEEDED),
    Reason(JOB_FAILED),
)

# Condition type -> (reasons with status True, reasons with status False or Unknown).
CONDITION_REASONS: dict[str, tuple[tuple[Reason, ...], tuple[Reason, ...]]] = {
    VALIDATED: (
        (Reason(SPEC_VALID),),
        (
            Reason(SPEC_INVALID, "message names each field: `spec.training.learningRate: ...`"),
            Reason(DOES_NOT_FIT, "the plan's estimate exceeds the job's device memory"),
        ),
    ),
    SUSPENDED: ((Reason(JOB_SUSPENDED),), (Reason(NOT_SUSPENDED),)),
    RUNNING: (
        (Reason(TRAINER_RUNNING), Reason(RETRYING, "attempt > 1")),
        (
            Reason(POD_PENDING),
            Reason(QUEUED, "Kueue has not admitted the Job yet; phase Pending"),
            Reason(UNSCHEDULABLE),
            Reason(IMAGE_PULL_FAILED),
            Reason(CONTAINER_CONFIG_ERROR, "e.g. a missing Secret"),
            Reason(RETRYING, "between attempts"),
            Reason(JOB_SUSPENDED),
            Reason(JOB_MISSING),
            Reason(FINISHED),
            *_FAILURES,
        ),
    ),
    SUCCEEDED: ((Reason(TRAINING_COMPLETE),), _FAILURES),
    FAILED: (
        (*_FAILURES, Reason(SPEC_INVALID), Reason(DOES_NOT_FIT)),
        (Reason(FINISHED),),
    ),
    GATES_PASSED: (
        (Reason(ALL_GATES_PASSED), Reason(NO_GATES)),
        (
            Reason(GATE_FAILED, "each failed gate with its value"),
            Reason(NOT_EVALUATED, "Unknown: the trainer's result or some gate results missing"),
            Reason(STAGING_PENDING, "Unknown: evaluation gates passed, staging not finished"),
            Reason(STAGING_FAILED, "spec.staging could not measure: its gates cannot pass"),
        ),
    ),
    STAGED: (
        (Reason(STAGING_COMPLETE, "the load test ran; status.staging has the results"),),
        (
            Reason(STAGING_PENDING, "Unknown: training not finished"),
            Reason(STAGING_DEPLOYING, "Unknown: waiting for the engine"),
            Reason(STAGING_LOAD_TESTING, "Unknown: the load Job runs"),
            Reason(
                STAGING_FAILED,
                "engine never ready (its reason, log tail) or load test failed; training's "
                "results stay",
            ),
        ),
    ),
    PROMOTED: (
        (Reason(PROMOTION_COMPLETE, "every gate passed; with a registry, alias production"),),
        (
            Reason(STAGING_PENDING, "Unknown: evaluation gates passed, staging not finished"),
            Reason(PROMOTING, "Unknown: the promote Job is moving alias production"),
            Reason(NOT_PROMOTED, "a gate failed; a registered version keeps alias staging"),
            Reason(
                PROMOTION_FAILED,
                "the registry step or the promote Job failed (its termination message); "
                "training's results stay",
            ),
        ),
    ),
    SPEC_CHANGE_IGNORED: ((Reason(SPEC_IMMUTABLE, "which fields"),), ()),
}
# Reasons that only Events carry.
EVENT_REASONS = (JOB_CREATED, JOB_RESUMED)

# Container waiting reasons worth surfacing while a job is Pending.
_WAITING_REASONS = {
    "ImagePullBackOff": IMAGE_PULL_FAILED,
    "ErrImagePull": IMAGE_PULL_FAILED,
    "InvalidImageName": IMAGE_PULL_FAILED,
    "CreateContainerConfigError": CONTAINER_CONFIG_ERROR,
    "CreateContainerError": CONTAINER_CONFIG_ERROR,
}

# Trainer Prometheus gauges -> Progress fields.
_TRAINER_GAUGES = {
    "kubetune_trainer_step": "step",
    "kubetune_trainer_total_steps": "totalSteps",
    "kubetune_trainer_loss": "loss",
    "kubetune_trainer_eval_loss": "evalLoss",
    "kubetune_trainer_learning_rate": "learningRate",
    "kubetune_trainer_tokens_per_second": "tokensPerSecond",
    "kubetune_trainer_epoch": "epoch",
    "kubetune_trainer_eta_seconds": "etaSeconds",
}
_INT_FIELDS = {"step", "totalSteps", "etaSeconds"}

MAX_MESSAGE = 1024


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


# --------------------------------------------------------------------------------------------
# conditions


def set_condition(
    conditions: list[api.Condition],
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> list[api.Condition]:
    """A new list with ``type_`` set; lastTransitionTime moves only when the status changes."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.lastTransitionTime if old is not None and old.status == status else None
    new = api.Condition(
        type=type_,
        status=status,
        reason=reason,
        message=_clip(message),
        lastTransitionTime=since or rfc3339(now),
        observedGeneration=generation,
    )
    out = [c for c in conditions if c.type != type_]
    out.append(new)
    return sorted(out, key=lambda c: _ORDER.get(c.type, len(_ORDER)))


_ORDER = {
    t: i
    for i, t in enumerate(
        (
            VALIDATED,
            SUSPENDED,
            RUNNING,
            SUCCEEDED,
            FAILED,
            STAGED,
            GATES_PASSED,
            PROMOTED,
            SPEC_CHANGE_IGNORED,
        )
    )
}


class Conditions:
    """The conditions of one status being built: ``now`` and ``generation`` said once."""

    def __init__(
        self, current: Iterable[api.Condition], *, now: datetime, generation: int | None
    ) -> None:
        self.items = list(current)
        self.now = now
        self.generation = generation

    def set(
        self,
        type_: str,
        status: Literal["True", "False", "Unknown"],
        reason: str,
        message: str,
    ) -> Conditions:
        self.items = set_condition(
            self.items, type_, status, reason, message, now=self.now, generation=self.generation
        )
        return self


def condition(status: api.FineTuneJobStatus, type_: str) -> api.Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


_PROMOTED_CONDITION: dict[str, tuple[Literal["True", "False", "Unknown"], str]] = {
    "Promoted": ("True", PROMOTION_COMPLETE),
    "Promoting": ("Unknown", PROMOTING),
    "Pending": ("Unknown", STAGING_PENDING),
    "NotPromoted": ("False", NOT_PROMOTED),
    "Failed": ("False", PROMOTION_FAILED),
}


def _promotion_condition(conds: Conditions, promoted: api.Promotion | None) -> None:
    """Condition Promoted from status.promotion (nothing while there is none)."""
    if promoted is not None:
        status, reason = _PROMOTED_CONDITION[promoted.state]
        conds.set(PROMOTED, status, reason, promoted.message or promoted.state)


# --------------------------------------------------------------------------------------------
# entry points for the handlers


def _refused(
    reason: str, message: str, *, generation: int | None, now: datetime
) -> api.FineTuneJobStatus:
    conditions = Conditions([], now=now, generation=generation)
    conditions.set(VALIDATED, "False", reason, message)
    conditions.set(FAILED, "True", reason, message)
    return api.FineTuneJobStatus(
        phase="Failed",
        observedGeneration=generation,
        conditions=conditions.items,
        completionTime=rfc3339(now),
        message=_clip(message),
    )


def invalid(errors: list[str], *, generation: int | None, now: datetime) -> api.FineTuneJobStatus:
    """Status of a FineTuneJob whose spec the operator refuses: terminal, no children."""
    message = "invalid spec: " + "; ".join(errors)
    return _refused(SPEC_INVALID, message, generation=generation, now=now)


def does_not_fit(
    reason: str, plan: api.JobPlan, *, generation: int | None, now: datetime
) -> api.FineTuneJobStatus:
    """Status of a FineTuneJob refused because its plan exceeds its devices: terminal, no
    children, the plan attached (what would fit is in its recommendation)."""
    refused = _refused(DOES_NOT_FIT, f"does not fit: {reason}", generation=generation, now=now)
    return refused.model_copy(update={"plan": plan})


def created(
    previous: api.FineTuneJobStatus,
    *,
    job_name: str,
    suspended: bool,
    generation: int | None,
    now: datetime,
) -> api.FineTuneJobStatus:
    """Status right after the children were created (or found after a restart)."""
    conditions = Conditions(previous.conditions, now=now, generation=generation)
    conditions.set(VALIDATED, "True", SPEC_VALID, "spec accepted")
    phase: Phase = "Suspended" if suspended else "Pending"
    message = f"Job {job_name} created" + (" (suspended)" if suspended else "")
    if suspended:
        conditions.set(SUSPENDED, "True", JOB_SUSPENDED, message)
        conditions.set(RUNNING, "False", JOB_SUSPENDED, message)
    else:
        conditions.set(SUSPENDED, "False", NOT_SUSPENDED, message)
        conditions.set(RUNNING, "False", POD_PENDING, message)
    return previous.model_copy(
        update={
            "phase": previous.phase if previous.phase in TERMINAL else phase,
            "observedGeneration": generation,
            "conditions": conditions.items,
            "jobName": job_name,
            "message": message if previous.phase not in TERMINAL else previous.message,
        }
    )


def spec_change_ignored(
    previous: api.FineTuneJobStatus, fields: Iterable[str], *, generation: int | None, now: datetime
) -> api.FineTuneJobStatus:
    names = ", ".join(sorted(set(fields))) or "spec"
    message = (
        f"spec change to {names} ignored: the job already started; create a new FineTuneJob "
        "to change it (only spec.suspend can change)"
    )
    conditions = Conditions(previous.conditions, now=now, generation=generation)
    conditions.set(SPEC_CHANGE_IGNORED, "True", SPEC_IMMUTABLE, message)
    return previous.model_copy(update={"conditions": conditions.items, "message": message})


# --------------------------------------------------------------------------------------------
# the trainer's live metrics


def parse_trainer_metrics(text: str, *, now: datetime) -> api.Progress | None:
    """Progress from the trainer's Prometheus exposition; None when nothing useful is in it."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            field = _TRAINER_GAUGES.get(family.name)
            if field is None or not family.samples:
                continue
            value = family.samples[0].value
            if math.isfinite(value):
                values[field] = value
    except (ValueError, TypeError, IndexError):
        return None  # a half-written or foreign page: progress just stays as it was
    if "step" not in values:
        return None
    fields: dict[str, Any] = {
        k: (max(int(v), 0) if k in _INT_FIELDS else v) for k, v in values.items()
    }
    for key in ("tokensPerSecond", "epoch"):
        if key in fields and fields[key] < 0:
            del fields[key]
    total = fields.get("totalSteps")
    if total:
        fields["percent"] = round(min(100.0, 100.0 * fields["step"] / total), 1)
    fields["updatedAt"] = rfc3339(now)
    return api.Progress(**fields)


# --------------------------------------------------------------------------------------------
# the trainer's final result


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """The trainer's compact JSON result, or None for a missing or non-JSON message (a log tail
    from FallbackToLogsOnError, for example)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class PodFacts:
    """What the pods of one Job say, reduced to what the status needs."""

    running: bool = False  # a trainer container is running (index 0 for multi-node)
    pod_ip: str | None = None  # where to scrape /metrics
    metrics_port: int = api.TRAINER_METRICS_PORT
    waiting_reason: str | None = None  # Unschedulable, ImagePullBackOff, ...
    waiting_message: str = ""
    last_failure: str | None = None  # "OOMKilled (exit 137)", "exit code 11", ...
    last_exit_code: int | None = None
    result: dict[str, Any] | None = None  # parsed termination message of the newest finished pod
    result_text: str | None = None  # its raw text when not JSON (a log tail)
    pods: int = 0
    started: int = 0  # pods whose trainer ran (Running, Succeeded or Failed)


def _trainer_state(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == render.CONTAINER:
            return cs
    return {}


def _created_at(pod: Mapping[str, Any]) -> str:
    return str(pod.get("metadata", {}).get("creationTimestamp") or "")


def _index(pod: Mapping[str, Any]) -> str:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return str(annotations.get("batch.kubernetes.io/job-completion-index", "0"))


def pod_facts(pods: Iterable[Mapping[str, Any]]) -> PodFacts:
    """Reduce the Job's pods (any order) to the facts the status needs."""
    ordered = sorted(pods, key=_created_at)
    facts: dict[str, Any] = {
        "pods": len(ordered),
        "started": sum(
            1
            for p in ordered
            if p.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")
        ),
    }
    for pod in ordered:  # oldest first: later pods overwrite earlier facts
        phase = pod.get("status", {}).get("phase")
        cs = _trainer_state(pod)
        state = cs.get("state") or {}
        if phase == "Running" and "running" in state and _index(pod) == "0":
            facts["running"] = True
            facts["pod_ip"] = pod.get("status", {}).get("podIP")
            facts["waiting_reason"], facts["waiting_message"] = None, ""
            for c in pod.get("spec", {}).get("containers") or []:
                for port in c.get("ports") or []:
                    if port.get("name") == "metrics":
                        facts["metrics_port"] = int(port.get("containerPort"))
        elif phase == "Pending":
            for cond in pod.get("status", {}).get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                    facts["waiting_reason"] = cond.get("reason") or UNSCHEDULABLE
                    facts["waiting_message"] = cond.get("message") or ""
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in _WAITING_REASONS:
                facts["waiting_reason"] = _WAITING_REASONS[waiting["reason"]]
                facts["waiting_message"] = waiting.get("message") or waiting["reason"]
        terminated = state.get("terminated")
        # Only rank 0 (index 0) writes the result; another index's success says nothing.
        rank0 = _index(pod) == "0"
        if terminated and (phase == "Failed" or (phase == "Succeeded" and rank0)):
            code = terminated.get("exitCode")
            message = terminated.get("message")
            parsed = parse_termination_message(message)
            facts["result"] = parsed
            facts["result_text"] = None if parsed else message
            if phase == "Failed":
                reason = terminated.get("reason") or "Error"
                facts["last_exit_code"] = code
                facts["last_failure"] = (
                    f"{reason} (exit {code})"
                    if reason not in ("Error", "Completed")
                    else f"exit code {code}"
                )
        if phase == "Failed" and not terminated:
            facts["last_failure"] = pod.get("status", {}).get("reason") or "pod failed"
    return PodFacts(**facts)


# --------------------------------------------------------------------------------------------
# the whole status


def _job_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _attempts(job: Mapping[str, Any], facts: PodFacts, nodes: int) -> int:
    """Times the trainer started: a pod still waiting to be scheduled is not an attempt yet."""
    st = job.get("status", {})
    finished = (st.get("failed") or 0) + (st.get("succeeded") or 0)
    counted = math.ceil(finished / nodes) + (1 if facts.running else 0)
    # Ignored failures (preemption) are not in the Job's counters but their pods are visible.
    return max(counted, math.ceil(facts.started / nodes))


def _eta(progress: api.Progress, start: datetime | None, now: datetime) -> int | None:
    if progress.etaSeconds is not None:
        return progress.etaSeconds
    if start is None or not progress.step or not progress.totalSteps:
        return None
    elapsed = (now - start).total_seconds()
    return max(0, int(elapsed * (progress.totalSteps - progress.step) / progress.step))


def _apply_result(
    status: dict[str, Any], result: Mapping[str, Any]
) -> tuple[list[api.GateResult], str | None]:
    """Copy metrics, gates, artifacts, usage, quantized exports and the reproducibility record;
    bad parts are skipped."""
    for key, model in (
        ("metrics", api.Metrics),
        ("artifacts", api.Artifacts),
        ("reproducibility", api.Reproducibility),
        ("usage", api.Usage),
    ):
        if isinstance(result.get(key), dict):
            with contextlib.suppress(ValidationError):  # a malformed part is left out
                status[key] = model.model_validate(result[key])
    gates: list[api.GateResult] = []
    for gate in result.get("gates") or []:
        try:
            gates.append(api.GateResult.model_validate(gate))
        except ValidationError:
            continue
    status["gates"] = gates
    quantized: list[api.QuantizedExport] = []
    for row in result.get("quantized") or []:
        with contextlib.suppress(ValidationError):
            quantized.append(api.QuantizedExport.model_validate(row))
    status["quantized"] = quantized
    if isinstance(result.get("promotion"), dict):
        with contextlib.suppress(ValidationError):
            promoted = api.Promotion.model_validate(result["promotion"])
            # The termination message leaves out what status.artifacts and status.gates hold.
            status["promotion"] = promoted.model_copy(
                update={
                    "artifacts": promoted.artifacts or status.get("artifacts"),
                    "gates": promoted.gates or [g.describe() for g in gates],
                }
            )
    message = result.get("message")
    return gates, message if isinstance(message, str) and message else None


def compute(
    *,
    previous: api.FineTuneJobStatus,
    generation: int | None,
    spec: api.FineTuneJobSpec,
    job: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    live: api.Progress | None,
    now: datetime,
    report: Mapping[str, Any] | None = None,
) -> api.FineTuneJobStatus:
    """The new status from what the operator sees now.

    ``previous`` is the status stored on the object; ``live`` is the progress read from the
    trainer's /metrics (None when not read); ``report`` is report.json when the caller could
    read it (only used when the termination message has no result).
    """
    if previous.phase in TERMINAL:
        return previous  # final: nothing the Job does later (TTL, deletion) changes it
    conds = Conditions(previous.conditions, now=now, generation=generation)
    out: dict[str, Any] = {"observedGeneration": generation}

    if job is None:
        message = "the trainer Job is missing; it will be created again"
        conds.set(RUNNING, "False", JOB_MISSING, message)
        out.update(phase="Pending", conditions=conds.items, message=message)
        return previous.model_copy(update=out)

    facts = pod_facts(pods)
    job_status = job.get("status", {})
    attempts = _attempts(job, facts, spec.resources.numNodes)
    out["attempts"] = attempts
    out["jobName"] = job.get("metadata", {}).get("name", previous.jobName)
    # Training started when a trainer first ran, not when the Job was admitted.
    start = previous.startTime or (
        (job_status.get("startTime") or rfc3339(now)) if attempts else None
    )
    out["startTime"] = start
    out["progress"] = previous.progress
    if live is not None:
        out["progress"] = with_eval_point(
            live.model_copy(update={"etaSeconds": _eta(live, _parse_time(start), now)}),
            previous.progress,
            spec.training.evalEverySteps,
        )

    complete = _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet")
    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    suspended = bool(job.get("spec", {}).get("suspend")) or _job_condition(job, "Suspended")
    result = facts.result or (dict(report) if report else None)

    phase: Phase
    if complete:
        phase = "Succeeded"
        message = _succeeded(out, conds, spec, job_status, result, now)
    elif failed:
        phase = "Failed"
        message = _failed(out, conds, failed, facts, result, now)
    elif suspended and not spec.suspend and spec.scheduling.queueName:
        phase = "Pending"
        message = _queued(conds, spec.scheduling.queueName)
    elif suspended:
        phase = "Suspended"
        message = _suspended(conds)
    elif facts.running:
        phase = "Running"
        message = _running(conds, facts, attempts)
    else:
        phase = "Pending"
        message = _pending(conds, facts)
    out.update(phase=phase, conditions=conds.items, message=_clip(message))
    return previous.model_copy(update=out)


# One function per phase: each sets its conditions (and, when finished, the results in
# ``out``) and returns the status message.


def _succeeded(
    out: dict[str, Any],
    conds: Conditions,
    spec: api.FineTuneJobSpec,
    job_status: Mapping[str, Any],
    result: Mapping[str, Any] | None,
    now: datetime,
) -> str:
    gates, trainer_message = _apply_result(out, result or {})
    message = trainer_message or "training finished"
    if result is None:
        # No termination message (a kubelet that lost it): point at the full report.
        report_uri = spec.output.destination.rstrip("/") + "/report.json"
        out["artifacts"] = api.Artifacts(report=report_uri)
        message += f"; the result could not be read from the pod: see {report_uri}"
    out["completionTime"] = job_status.get("completionTime") or rfc3339(now)
    final = (result or {}).get("progress")
    if isinstance(final, dict):  # the trainer's last word beats the last scrape
        with contextlib.suppress(ValidationError):
            last = api.Progress.model_validate(final)
            seen = out["progress"].evalHistory if out.get("progress") else []
            out["progress"] = last.model_copy(
                update={
                    "etaSeconds": 0,
                    "updatedAt": rfc3339(now),
                    # the termination message may have had no room for the history
                    "evalHistory": last.evalHistory or seen,
                }
            )
    conds.set(RUNNING, "False", FINISHED, message)
    conds.set(SUCCEEDED, "True", TRAINING_COMPLETE, message)
    conds.set(FAILED, "False", FINISHED, message)
    _gates_condition(conds, gates, result, len(spec.evaluation.gates))
    _promotion_condition(conds, out.get("promotion"))
    if spec.staging is not None:
        conds.set(STAGED, "Unknown", STAGING_PENDING, "staging starts after training")
        passed = next((c for c in conds.items if c.type == GATES_PASSED), None)
        if passed is not None and passed.status == "True":
            # Promotion must wait for the staging gates too.
            conds.set(
                GATES_PASSED,
                "Unknown",
                STAGING_PENDING,
                f"evaluation: {passed.message}; waiting for the staging load test",
            )
    return message


def _failed(
    out: dict[str, Any],
    conds: Conditions,
    failed: Mapping[str, Any],
    facts: PodFacts,
    result: Mapping[str, Any] | None,
    now: datetime,
) -> str:
    _, trainer_message = _apply_result(out, result or {})
    reason = _failure_reason(failed, facts)
    parts = [trainer_message or facts.result_text or failed.get("message") or reason]
    if facts.last_failure and facts.last_failure not in parts[0]:
        parts.append(f"last pod: {facts.last_failure}")
    message = "; ".join(p for p in parts if p)
    out["completionTime"] = failed.get("lastTransitionTime") or rfc3339(now)
    conds.set(RUNNING, "False", reason, message)
    conds.set(SUCCEEDED, "False", reason, message)
    conds.set(FAILED, "True", reason, message)
    _promotion_condition(conds, out.get("promotion"))
    return message


def _queued(conds: Conditions, queue: str) -> str:
    # Kueue creates the Job suspended and unsuspends it when the queue admits it.
    message = f"queued in Kueue LocalQueue {queue}: waiting for admission"
    conds.set(SUSPENDED, "False", NOT_SUSPENDED, "not suspended")
    conds.set(RUNNING, "False", QUEUED, message)
    return message


def _suspended(conds: Conditions) -> str:
    message = "suspended: no pods run; set spec.suspend to false to resume"
    conds.set(SUSPENDED, "True", JOB_SUSPENDED, message)
    conds.set(RUNNING, "False", JOB_SUSPENDED, message)
    return message


def _running(conds: Conditions, facts: PodFacts, attempts: int) -> str:
    message = "training"
    if attempts > 1:
        message = f"training (attempt {attempts}, resumed from the last checkpoint)"
        if facts.last_failure:
            message += f"; previous pod: {facts.last_failure}"
    conds.set(SUSPENDED, "False", NOT_SUSPENDED, "not suspended")
    conds.set(RUNNING, "True", RETRYING if attempts > 1 else TRAINER_RUNNING, message)
    return message


def _pending(conds: Conditions, facts: PodFacts) -> str:
    reason = facts.waiting_reason or (RETRYING if facts.last_failure else POD_PENDING)
    if facts.waiting_reason:
        message = f"{facts.waiting_reason}: {facts.waiting_message}".rstrip(": ")
    elif facts.last_failure:
        message = f"pod failed ({facts.last_failure}); the Job starts a new one"
    else:
        message = "waiting for the trainer pod to start"
    conds.set(SUSPENDED, "False", NOT_SUSPENDED, "not suspended")
    conds.set(RUNNING, "False", reason, message)
    return message


def _failure_reason(failed: Mapping[str, Any], facts: PodFacts) -> str:
    if facts.last_exit_code == api.EXIT_USER_ERROR:
        return USER_ERROR
    reason = str(failed.get("reason") or "")
    if reason == "BackoffLimitExceeded":
        return BACKOFF_LIMIT_EXCEEDED
    if reason == "DeadlineExceeded":
        return DEADLINE_EXCEEDED
    return JOB_FAILED


def _gates_condition(
    conds: Conditions,
    gates: list[api.GateResult],
    result: Mapping[str, Any] | None,
    declared: int,
) -> None:
    if result is None:
        conds.set(GATES_PASSED, "Unknown", NOT_EVALUATED, "the trainer's result could not be read")
    elif declared and len(gates) < declared:
        # The trainer drops fields to fit the 4 KB termination message: never read a missing
        # gate as a passed one.
        missing = f"{declared - len(gates)} of {declared} gate result(s) missing from the "
        conds.set(
            GATES_PASSED, "Unknown", NOT_EVALUATED, missing + "trainer's result; see report.json"
        )
    elif not gates:
        conds.set(GATES_PASSED, "True", NO_GATES, "no gates declared")
    elif failed := [g for g in gates if not g.passed]:
        detail = "; ".join(g.describe() for g in failed)
        conds.set(GATES_PASSED, "False", GATE_FAILED, f"failed: {detail}")
    else:
        conds.set(GATES_PASSED, "True", ALL_GATES_PASSED, f"{len(gates)} gate(s) passed")


def staging_gates(staging: api.StagingStatus) -> list[api.GateResult]:
    """The staging gates as promotion judges them: a staging that failed is a failed gate."""
    if staging.phase == "Failed":
        return [
            api.GateResult(metric="staging.completed", op="==", value=1, actual=0, passed=False)
        ]
    return list(staging.gates)


def with_staging(
    previous: api.FineTuneJobStatus,
    staging: api.StagingStatus,
    *,
    spec: api.FineTuneJobSpec,
    generation: int | None,
    now: datetime,
) -> api.FineTuneJobStatus:
    """status.staging plus conditions Staged and GatesPassed (evaluation and staging gates
    together) and, once staging is done, status.promotion (promotion.after_staging). Training's
    outcome (phase Succeeded, artifacts) is never changed by staging."""
    conds = Conditions(previous.conditions, now=now, generation=generation)
    message = staging.message or staging.phase
    reason = {
        "Deploying": STAGING_DEPLOYING,
        "LoadTesting": STAGING_LOAD_TESTING,
        "Succeeded": STAGING_COMPLETE,
        "Failed": STAGING_FAILED,
    }[staging.phase]
    staged = {"Succeeded": "True", "Failed": "False"}.get(staging.phase, "Unknown")
    conds.set(STAGED, staged, reason, message)  # type: ignore[arg-type]
    gates = condition(previous, GATES_PASSED)
    evaluation_failed = gates is not None and gates.status == "False"
    evaluation_unknown = gates is not None and gates.reason == NOT_EVALUATED
    if not evaluation_failed and not evaluation_unknown:
        if staging.phase == "Failed":
            conds.set(GATES_PASSED, "False", STAGING_FAILED, f"staging failed: {message}")
        elif staging.phase == "Succeeded":
            failed = [g for g in staging.gates if not g.passed]
            everything = len(previous.gates) + len(staging.gates)
            if failed:
                detail = "; ".join(g.describe() for g in failed)
                conds.set(GATES_PASSED, "False", GATE_FAILED, f"failed: {detail}")
            elif everything:
                conds.set(GATES_PASSED, "True", ALL_GATES_PASSED, f"{everything} gate(s) passed")
            else:
                conds.set(GATES_PASSED, "True", NO_GATES, "no gates declared")
    update: dict[str, Any] = {"staging": staging, "observedGeneration": generation}
    done = staging.phase in api.STAGING_TERMINAL
    if done and (previous.staging is None or previous.staging.phase != staging.phase):
        update["promotion"], _ = promotion.after_staging(
            spec, previous, staging_gates(staging), rfc3339(now)
        )
        _promotion_condition(conds, update["promotion"])
    update["conditions"] = conds.items
    return previous.model_copy(update=update)


def promoting(
    previous: api.FineTuneJobStatus,
    job_name: str,
    *,
    generation: int | None,
    now: datetime,
) -> api.FineTuneJobStatus:
    """The status once the promote Job is created: promotion Promoting, condition Unknown."""
    assert previous.promotion is not None
    return _with_promotion(
        previous, promotion.promoting(previous.promotion, job_name), generation, now
    )


def with_promote_job(
    previous: api.FineTuneJobStatus,
    job: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    *,
    generation: int | None,
    now: datetime,
) -> api.FineTuneJobStatus:
    """status.promotion and condition Promoted follow the promote Job (phase, artifacts and the
    other results stay as training left them, whatever the Job does)."""
    if previous.promotion is None:
        return previous
    done = promotion.after_promote_job(previous.promotion, job, pods, rfc3339(now))
    return _with_promotion(previous, done, generation, now)


def _with_promotion(
    previous: api.FineTuneJobStatus,
    promoted: api.Promotion,
    generation: int | None,
    now: datetime,
) -> api.FineTuneJobStatus:
    conds = Conditions(previous.conditions, now=now, generation=generation)
    _promotion_condition(conds, promoted)
    return previous.model_copy(update={"promotion": promoted, "conditions": conds.items})


# --------------------------------------------------------------------------------------------
# what to write and what to announce


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def transitions(old: api.FineTuneJobStatus, new: api.FineTuneJobStatus) -> list[Event]:
    """Kubernetes Events for what changed between two statuses (phase and attempts)."""
    events: list[Event] = []
    if new.attempts and old.attempts and new.attempts > old.attempts:
        events.append(Event("Warning", RETRYING, f"attempt {new.attempts}: {new.message or ''}"))
    if new.phase != old.phase and new.phase is not None:
        running = condition(new, RUNNING)
        reason = {
            "Succeeded": TRAINING_COMPLETE,
            "Suspended": JOB_SUSPENDED,
        }.get(new.phase, running.reason if running else new.phase)
        if new.phase == "Failed":
            failed = condition(new, FAILED)
            reason = failed.reason if failed else JOB_FAILED
        kind: Literal["Normal", "Warning"] = "Warning" if new.phase == "Failed" else "Normal"
        events.append(Event(kind, reason, f"{new.phase}: {new.message or ''}".rstrip(": ")))
    gates = condition(new, GATES_PASSED)
    if gates and gates.status == "False" and condition(old, GATES_PASSED) != gates:
        events.append(Event("Warning", gates.reason, gates.message))
    promoted = condition(new, PROMOTED)
    before = condition(old, PROMOTED)
    announced = (PROMOTING, PROMOTION_COMPLETE, PROMOTION_FAILED)
    if (
        promoted
        and promoted.reason in announced
        and (before is None or before.reason != promoted.reason)
    ):
        level: Literal["Normal", "Warning"] = (
            "Warning" if promoted.reason == PROMOTION_FAILED else "Normal"
        )
        events.append(Event(level, promoted.reason, promoted.message))
    return events


def patch_for(
    old: api.FineTuneJobStatus,
    new: api.FineTuneJobStatus,
    *,
    now: datetime,
    min_progress_interval: float,
) -> dict[str, Any] | None:
    """The status merge-patch to send, or None when nothing needs writing.

    Progress alone is written at most once per ``min_progress_interval`` seconds; anything else
    (phase, conditions, attempts, results) is written at once, with the latest progress.
    """
    old_api, new_api = old.to_api(), new.to_api()
    if old_api == new_api:
        return None
    without = {k: v for k, v in new_api.items() if k != "progress"}
    only_progress = without == {k: v for k, v in old_api.items() if k != "progress"}
    if only_progress and old.progress is not None and old.progress.updatedAt:
        last = _parse_time(old.progress.updatedAt)
        if last is not None and (now - last).total_seconds() < min_progress_interval:
            return None
    patch: dict[str, Any] = {k: v for k, v in new_api.items() if old_api.get(k) != v}
    for key in old_api:
        if key not in new_api:
            patch[key] = None
    return patch


def with_eval_point(live: api.Progress, previous: api.Progress | None, every: int) -> api.Progress:
    """``live`` with status.progress.evalHistory carried on from ``previous``, plus a point when
    the validation loss changed since the last one: at the step of that evaluation (the
    trainer evaluates every ``every`` steps; a scrape sees the step after it)."""
    history = list(previous.evalHistory if previous is not None else [])
    if live.evalLoss is not None and live.step:
        step = live.step - live.step % every
        last = history[-1] if history else None
        if step == 0:
            pass  # no evaluation yet (an older trainer's gauge reads 0 until its first)
        elif last is None or (last.evalLoss != live.evalLoss and last.step < step):
            history.append(api.EvalPoint(step=step, evalLoss=live.evalLoss))
    return live.model_copy(update={"evalHistory": history[-api.MAX_EVAL_HISTORY :]})
