"""Promotion decisions and the ``status.promotion`` record (pure: no clock, env or network).

Who decides: the evaluation gates (``spec.evaluation.gates``, checked by the trainer) and, when
the spec has a staging section, the staging gates too. Without staging every gate is known when
training ends, so the trainer registers the model version and promotes it in one step (it holds
the registry credentials; the operator never needs to read a Secret). With staging the trainer
registers the version with alias ``staging`` and leaves ``state: Pending``; the staging gates'
result then goes through :func:`after_staging` (the single hook for the staging step), and the
alias ``production`` follows when both sets of gates passed.
"""

from __future__ import annotations

from typing import Any

from kubetune import api


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


def moved_by_job(done: api.Promotion, job_name: str) -> api.Promotion:
    """In a cluster the operator does not hold registry credentials: a Job moves the alias."""
    note = f"; alias production is moved by Job {job_name}"
    return done.model_copy(update={"message": (done.message + note)[:4096]})


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
