"""Promotion decisions and the ``status.promotion`` record (pure: no clock, env or network).

Who decides: the evaluation gates (``spec.evaluation.gates``, checked by the trainer) and, when
the spec has a staging section, the staging gates too. Without staging every gate is known when
training ends, so the trainer registers the model version and promotes it in one step (it holds
the registry credentials; the operator never needs to read a Secret). With staging the trainer
registers the version with alias ``staging`` and leaves ``state: Pending``; the staging gates'
result then goes through :func:`after_staging` (the single hook for the staging step), and the
alias ``production`` follows when both sets of gates passed. In a cluster the operator holds no
registry credentials: a Job (``render.promote_job``) moves the alias, the promotion reads
``Promoting`` meanwhile and follows the Job's outcome (:func:`after_promote_job`): ``Promoted``
when it completed, ``Failed`` with its pod's termination message when it failed. The training's
results (artifacts, metrics, phase Succeeded) never depend on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubetune import api

PROMOTE_CONTAINER = "promote"  # render.promote_job's container


def has_staging(spec: api.FineTuneJobSpec) -> bool:
    """Whether promotion also waits for staging gates (``spec.staging``)."""
    return spec.staging is not None


def promoted_artifact(artifacts: api.Artifacts | None) -> str | None:
    """What a server would load: merged weights, else a full fine-tune, else the adapter."""
    if artifacts is None:
        return None
    return artifacts.merged or artifacts.model or artifacts.adapter


def decide(
    spec: api.FineTuneJobSpec,
    gates: list[api.GateResult],
    staging_gates: list[api.GateResult] | None = None,
) -> tuple[api.PromotionState, str]:
    """(state, message) from the evaluation gates and, with staging, the staging gates
    (``None``: staging has not reported yet)."""
    if len(gates) < len(spec.evaluation.gates):
        missing = len(spec.evaluation.gates) - len(gates)
        return "NotPromoted", f"{missing} evaluation gate result(s) missing"
    failed = [g.describe() for g in gates if not g.passed]
    if failed:
        return "NotPromoted", "evaluation gate failed: " + "; ".join(failed)
    if has_staging(spec):
        if staging_gates is None:
            return "Pending", "evaluation gates passed; waiting for the staging gates"
        failed = [g.describe() for g in staging_gates if not g.passed]
        if failed:
            return "NotPromoted", "staging gate failed: " + "; ".join(failed)
        return (
            "Promoted",
            f"{len(gates)} evaluation and {len(staging_gates)} staging gate(s) passed",
        )
    if not gates:
        return "Promoted", "no gates declared"
    return "Promoted", f"{len(gates)} evaluation gate(s) passed"


def record(
    *,
    state: api.PromotionState,
    message: str,
    gates: list[api.GateResult],
    artifacts: api.Artifacts | None,
    now: str,
    registry: api.RegistryRecord | None = None,
    staging_gates: list[api.GateResult] | None = None,
) -> api.Promotion:
    """The ``status.promotion`` object: what was (or would be) promoted, by which gates, when."""
    checked = [g.describe() for g in gates] + [
        "staging " + g.describe() for g in staging_gates or []
    ]
    return api.Promotion(
        state=state,
        message=message[:4096],
        artifact=promoted_artifact(artifacts),
        artifacts=artifacts,
        gates=checked[:128],
        registry=registry,
        registeredAt=now if registry is not None and registry.version else None,
        promotedAt=now if state == "Promoted" else None,
    )


def failed(previous: api.Promotion | None, message: str) -> api.Promotion:
    """The registry step failed: keep what was decided, say why, state Failed."""
    base = previous or api.Promotion(state="Failed")
    return base.model_copy(
        update={"state": "Failed", "message": message[:4096], "promotedAt": None}
    )


def after_staging(
    spec: api.FineTuneJobSpec,
    status: api.FineTuneJobStatus,
    staging_gates: list[api.GateResult],
    now: str,
) -> tuple[api.Promotion, bool]:
    """The staging step's hook: (new status.promotion, whether to move alias production to the
    registered version). Call it once the staging gates are known."""
    state, message = decide(spec, status.gates, staging_gates)
    previous = status.promotion
    registry = previous.registry if previous else None
    move = state == "Promoted" and registry is not None and registry.version is not None
    if move and registry is not None:
        registry = registry.model_copy(
            update={"aliases": sorted({*registry.aliases, "production"})}
        )
    promotion = record(
        state=state,
        message=message,
        gates=status.gates,
        artifacts=status.artifacts,
        now=now,
        registry=registry,
        staging_gates=staging_gates,
    )
    if previous and previous.registeredAt:
        promotion.registeredAt = previous.registeredAt
    return promotion, move


def moves_production(old: api.Promotion | None, new: api.Promotion | None) -> bool:
    """Whether this status change promotes a registered version (so alias production must be
    moved now): the new promotion is Promoted with a registered version, the old one was not."""
    if new is None or new.state != "Promoted" or new.registry is None or not new.registry.version:
        return False
    return old is None or old.state != "Promoted"


def promoting(done: api.Promotion, job_name: str) -> api.Promotion:
    """The promotion while the promote Job moves alias production: the gates passed, the alias
    has not moved yet (so it is not listed and there is no promotedAt)."""
    registry = done.registry
    if registry is not None:
        registry = registry.model_copy(
            update={"aliases": [a for a in registry.aliases if a != "production"]}
        )
    version = registry.version if registry is not None else None
    note = f"; moving alias production to version {version} (Job {job_name})"
    return done.model_copy(
        update={
            "state": "Promoting",
            "message": (done.message + note)[:4096],
            "registry": registry,
            "promotedAt": None,
        }
    )


def _job_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _termination_message(pods: Iterable[Mapping[str, Any]]) -> str:
    """The last failed promote container's termination message (the CLI's ``error:`` line, or
    its log tail), as one line."""
    found: list[tuple[str, str]] = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != PROMOTE_CONTAINER:
                continue
            for state in (container.get("state") or {}, container.get("lastState") or {}):
                ended = state.get("terminated") or {}
                if ended and ended.get("exitCode") not in (None, 0):
                    text = str(ended.get("message") or "").strip()
                    code = f"exit {ended.get('exitCode')}"
                    found.append((str(ended.get("finishedAt") or ""), text or code))
    if not found:
        return ""
    text = max(found)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    line = (errors or lines)[-1] if lines else text
    return line.removeprefix("error:").strip()


def after_promote_job(
    current: api.Promotion,
    job: Mapping[str, Any] | None,
    pods: Iterable[Mapping[str, Any]],
    now: str,
) -> api.Promotion:
    """status.promotion from the promote Job (``current`` is the Promoting record): Promoted with
    alias production once the Job completed; Failed, with the pod's termination message, when it
    failed or is gone; unchanged while it runs."""
    if current.state != "Promoting":
        return current
    name = job.get("metadata", {}).get("name") if job else None
    base = current.message.split("; moving alias production", 1)[0]
    if job is None:
        return failed(
            current,
            "the promote Job is gone before it finished: alias production was not confirmed; "
            f"{base}",
        )
    if _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet"):
        registry = current.registry
        if registry is not None:
            registry = registry.model_copy(
                update={"aliases": sorted({*registry.aliases, "production"})}
            )
        version = registry.version if registry is not None else None
        return current.model_copy(
            update={
                "state": "Promoted",
                "message": f"{base}; alias production moved to version {version} by Job {name}"[
                    :4096
                ],
                "registry": registry,
                "promotedAt": now,
            }
        )
    ended = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if ended:
        reason = _termination_message(pods) or str(
            ended.get("message") or ended.get("reason") or "the Job failed"
        )
        return failed(
            current,
            f"promote Job {name} failed: {reason}; alias production not moved; {base}",
        )
    return current


def summary_lines(promotion: api.Promotion | None) -> list[str]:
    """Lines for the local results table."""
    if promotion is None:
        return []
    lines = [f"promotion: {promotion.state}: {promotion.message}"]
    reg = promotion.registry
    if reg is not None:
        where: list[Any] = [f"  registry    {reg.trackingUri} model {reg.model}"]
        if reg.version:
            aliases = ", ".join(reg.aliases) or "none"
            where.append(f"  version     {reg.version} (aliases: {aliases}; run {reg.runId})")
        if reg.source:
            where.append(f"  source      {reg.source}")
        lines += [str(w) for w in where]
    return lines
