"""Pure sweep logic: trial records -> Optuna study -> next trials, pruning, best trial, table.

Nothing here keeps state between calls. Every decision starts from the trials that exist (the
child FineTuneJobs in a cluster, the finished runs locally): the study is rebuilt with
``add_trial`` and the next parameters come from a sampler seeded with the sweep's seed and the
trial number, so the same trials always give the same next trial. That is what lets an operator
restart create no duplicate and lose none.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from kubetune import api
from kubetune.sweep_api import (
    ANNOTATION_PARAMS,
    ANNOTATION_PRUNED,
    KIND,
    LABEL_SWEEP,
    BestTrial,
    FineTuneSweep,
    FineTuneSweepSpec,
    FineTuneSweepStatus,
    ParameterSpec,
    TradeoffRow,
    TrialPhase,
    TrialRow,
    planned_trials,
    trial_name,
    trial_number,
    trial_spec,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

ACTIVE: tuple[TrialPhase, ...] = ("Pending", "Running")
FINISHED: tuple[TrialPhase, ...] = ("Succeeded", "Failed", "Pruned")


@dataclass(frozen=True)
class TrialRecord:
    """What a sweep knows about one trial, read from its FineTuneJob (or a local run)."""

    number: int
    name: str
    params: Mapping[str, Any]
    phase: TrialPhase
    objective: float | None = None
    curve: Mapping[int, float] = field(default_factory=dict)  # step -> validation loss
    step: int | None = None
    message: str | None = None
    artifacts: api.Artifacts | None = None
    result: api.FineTuneJobStatus | None = None  # the trial's own status (trade-off table)


# --------------------------------------------------------------------------------------------
# search space


def distribution(parameter: ParameterSpec) -> BaseDistribution:
    if parameter.type == "categorical":
        return CategoricalDistribution(list(parameter.choices or []))
    assert parameter.low is not None and parameter.high is not None
    if parameter.type == "int":
        return IntDistribution(
            int(parameter.low),
            int(parameter.high),
            log=parameter.log,
            step=int(parameter.step or 1),
        )
    return FloatDistribution(parameter.low, parameter.high, log=parameter.log, step=parameter.step)


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    return {p.path: distribution(p) for p in spec.parameters}


# --------------------------------------------------------------------------------------------
# reading a trial's result


def objective_value(metric: str, status: api.FineTuneJobStatus) -> float | None:
    """The objective as the trial's status reports it (None: not reported)."""
    if metric in ("evalLoss", "loss"):
        progress = status.progress
        value = getattr(progress, metric) if progress is not None else None
    else:
        group, _, name = metric.partition(".")
        metrics = status.metrics or api.Metrics()
        value = getattr(metrics, group).get(name)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def record_from_status(
    number: int,
    name: str,
    params: Mapping[str, Any],
    status: api.FineTuneJobStatus,
    metric: str,
    *,
    pruned: bool = False,
) -> TrialRecord:
    """One trial's record from its FineTuneJob status (and whether the sweep pruned it)."""
    progress = status.progress or api.Progress()
    curve = {p.step: p.evalLoss for p in progress.evalHistory}
    common = dict(
        number=number,
        name=name,
        params=dict(params),
        curve=curve,
        step=progress.step,
        artifacts=status.artifacts,
        result=status,
    )
    if pruned:
        return TrialRecord(phase="Pruned", message=_pruned_message(curve), **common)  # type: ignore[arg-type]
    if status.phase == "Succeeded":
        value = objective_value(metric, status)
        if value is None:
            return TrialRecord(
                phase="Failed",
                message=f"finished without reporting {metric}",
                **common,  # type: ignore[arg-type]
            )
        return TrialRecord(phase="Succeeded", objective=value, **common)  # type: ignore[arg-type]
    if status.phase == "Failed":
        return TrialRecord(phase="Failed", message=status.message or "failed", **common)  # type: ignore[arg-type]
    phase: TrialPhase = "Running" if status.phase == "Running" else "Pending"
    return TrialRecord(phase=phase, **common)  # type: ignore[arg-type]


def _pruned_message(curve: Mapping[int, float]) -> str:
    if not curve:
        return "pruned by median early stopping"
    step = max(curve)
    return f"pruned at step {step}: validation loss {curve[step]:.4g} behind the median"


# --------------------------------------------------------------------------------------------
# the study


def _state(record: TrialRecord) -> TrialState:
    if record.phase == "Succeeded" and record.objective is not None:
        return TrialState.COMPLETE
    if record.phase == "Pruned":
        return TrialState.PRUNED
    if record.phase in ACTIVE:
        return TrialState.RUNNING
    return TrialState.FAIL


def _frozen(
    record: TrialRecord, dists: Mapping[str, BaseDistribution], state: TrialState | None = None
) -> FrozenTrial | None:
    """The record as an Optuna trial; None when its params do not fit the search space."""
    params = {k: v for k, v in record.params.items() if k in dists}
    if set(params) != set(dists):
        return None
    try:
        for key, value in params.items():
            dists[key].to_internal_repr(value)
            if isinstance(dists[key], CategoricalDistribution) and value not in dists[key].choices:  # type: ignore[attr-defined]
                return None
        state = state or _state(record)
        return optuna.trial.create_trial(
            state=state,
            value=record.objective if state == TrialState.COMPLETE else None,
            params=params,
            distributions={k: dists[k] for k in params},
            intermediate_values=dict(record.curve),
            user_attrs={"name": record.name},
        )
    except ValueError:
        return None


def _sampler(spec: FineTuneSweepSpec, number: int) -> optuna.samplers.BaseSampler:
    seed = _seed(spec.algorithm.seed, number)
    if spec.algorithm.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.algorithm.startupTrials, constant_liar=True
        )
    if spec.algorithm.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            n_startup_trials=spec.algorithm.startupTrials,
            warn_independent_sampling=False,
        )
    return optuna.samplers.RandomSampler(seed=seed)


def _seed(seed: int, number: int) -> int:
    digest = hashlib.sha256(f"{seed}/{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def build_study(
    spec: FineTuneSweepSpec, records: Iterable[TrialRecord], *, number: int = 0
) -> optuna.Study:
    """An in-memory study holding every record (sampler seeded for trial ``number``)."""
    study = optuna.create_study(direction=spec.objective.direction, sampler=_sampler(spec, number))
    dists = distributions(spec)
    for record in sorted(records, key=lambda r: r.number):
        frozen = _frozen(record, dists)
        if frozen is not None:
            study.add_trial(frozen)
    return study


def _grid(spec: FineTuneSweepSpec) -> list[dict[str, Any]]:
    """Every combination, in an order shuffled by the seed (a grid is walked in that order)."""
    combos: list[dict[str, Any]] = [{}]
    for parameter in spec.parameters:
        values = parameter.values() or []
        combos = [{**c, parameter.path: v} for c in combos for v in values]
    random.Random(spec.algorithm.seed).shuffle(combos)
    return combos


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True)


def next_params(
    spec: FineTuneSweepSpec, records: Sequence[TrialRecord], number: int
) -> dict[str, Any] | None:
    """Parameters of trial ``number`` given the trials so far (None: the grid is exhausted)."""
    if spec.algorithm.sampler == "grid":
        used = {_key(r.params) for r in records}
        for combo in _grid(spec):
            if _key(combo) not in used:
                return combo
        return None
    study = build_study(spec, records, number=number)
    trial = study.ask(distributions(spec))
    return dict(trial.params)


@dataclass(frozen=True)
class NewTrial:
    number: int
    name: str
    params: dict[str, Any]


def plan_new_trials(
    spec: FineTuneSweepSpec, sweep_name: str, records: Sequence[TrialRecord]
) -> list[NewTrial]:
    """Trials to create now: at most parallelism - active, never past maxTrials, and none
    once the sweep has failed. Numbers continue after the highest existing one."""
    if failed_too_often(spec, records):
        return []
    active = sum(r.phase in ACTIVE for r in records)
    room = min(spec.parallelism - active, planned_trials(spec) - len(records))
    out: list[NewTrial] = []
    known = list(records)
    number = max((r.number for r in records), default=-1) + 1
    for _ in range(max(0, room)):
        params = next_params(spec, known, number)
        if params is None:
            break
        name = trial_name(sweep_name, number)
        out.append(NewTrial(number, name, params))
        # The next ask in this round sees this one as running (TPE's constant liar).
        known.append(TrialRecord(number=number, name=name, params=params, phase="Pending"))
        number += 1
    return out


# --------------------------------------------------------------------------------------------
# pruning


def should_prune(
    spec: FineTuneSweepSpec, records: Sequence[TrialRecord], record: TrialRecord
) -> bool:
    """Optuna's median rule on validation loss: ``record``'s best loss so far against the median
    of the succeeded trials' losses at its latest reported step. A succeeded trial that
    stopped before that step counts with its last loss (carried forward), so runs of other
    lengths, and steps seen only by a periodic read of a running trial, still compare."""
    early = spec.earlyStopping
    if early is None or record.phase not in ACTIVE or not record.curve:
        return False
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=early.startupTrials, n_warmup_steps=early.warmupSteps
    )
    study = optuna.create_study(direction="minimize")  # validation loss, whatever the objective
    dists = distributions(spec)
    step = max(record.curve)
    for other in records:
        if other.phase == "Succeeded" and other.curve and other.number != record.number:
            reached = [s for s in other.curve if s <= step]
            curve = dict(other.curve)
            if reached:  # the loss it had at `step`: its last one at or before
                curve[step] = other.curve[max(reached)]
            frozen = _frozen(other, dists)
            if frozen is not None:
                study.add_trial(
                    optuna.trial.create_trial(
                        state=TrialState.COMPLETE,
                        value=other.curve[max(other.curve)],
                        params=frozen.params,
                        distributions=frozen.distributions,
                        intermediate_values=curve,
                    )
                )
    candidate = _frozen(record, dists, TrialState.RUNNING)
    if candidate is None:
        return False
    return bool(pruner.prune(study, candidate))


# --------------------------------------------------------------------------------------------
# results


def failed_too_often(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> bool:
    return sum(r.phase == "Failed" for r in records) > spec.maxFailedTrials


def best_trial(spec: FineTuneSweepSpec, records: Iterable[TrialRecord]) -> TrialRecord | None:
    """The succeeded trial with the best objective (ties: the lower trial number)."""
    done = [r for r in records if r.phase == "Succeeded" and r.objective is not None]
    if not done:
        return None
    sign = 1.0 if spec.objective.direction == "minimize" else -1.0
    return min(done, key=lambda r: (sign * (r.objective or 0.0), r.number))


def ranked(spec: FineTuneSweepSpec, records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Succeeded trials best first, then the rest by number."""
    sign = 1.0 if spec.objective.direction == "minimize" else -1.0
    records = list(records)
    done = sorted(
        (r for r in records if r.phase == "Succeeded" and r.objective is not None),
        key=lambda r: (sign * (r.objective or 0.0), r.number),
    )
    rest = sorted((r for r in records if r not in done), key=lambda r: r.number)
    return done + rest


def row(record: TrialRecord) -> TrialRow:
    curve = record.curve
    return TrialRow(
        name=record.name,
        number=record.number,
        params=dict(record.params),
        phase=record.phase,
        objective=record.objective,
        step=record.step,
        evalLoss=curve[max(curve)] if curve else None,
        message=record.message,
    )


def best(spec: FineTuneSweepSpec, records: Iterable[TrialRecord]) -> BestTrial | None:
    top = best_trial(spec, records)
    if top is None or top.objective is None:
        return None
    return BestTrial(
        name=top.name,
        number=top.number,
        params=dict(top.params),
        objective=top.objective,
        artifacts=top.artifacts,
    )


def is_done(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> bool:
    """Every planned trial finished (or the sweep failed and nothing still runs)."""
    if any(r.phase in ACTIVE for r in records):
        return False
    return failed_too_often(spec, records) or len(records) >= planned_trials(spec)


def importances(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> dict[str, float]:
    """optuna.importance (fANOVA) over the succeeded trials; empty below two of them or when
    a parameter never varied."""
    study = build_study(spec, [r for r in records if r.phase == "Succeeded"])
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}


def format_table(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> str:
    """A plain-text table, best first, for the terminal and logs."""
    paths = [p.path for p in spec.parameters]
    header = [
        "#",
        "trial",
        "phase",
        f"objective ({spec.objective.metric})",
        "lastEval",
        "step",
        *paths,
    ]
    lines = [header]
    for record in ranked(spec, records):
        curve = record.curve
        lines.append(
            [
                str(record.number),
                record.name,
                record.phase,
                _num(record.objective),
                _num(curve[max(curve)] if curve else None),
                "" if record.step is None else str(record.step),
                *[_value(record.params.get(p)) for p in paths],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        first = datetime.fromisoformat(start.replace("Z", "+00:00"))
        last = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (last - first).total_seconds())


def tradeoff(spec: FineTuneSweepSpec, records: Iterable[TrialRecord]) -> list[TradeoffRow]:
    """With a method.type parameter: one row per trial (by number), from each trial's own
    status: objective, tuned metrics, OOD perplexity ratio, measured parameters, peak memory
    and wall time, and the plan's estimate when the operator planned the trial."""
    if not any(p.path == "method.type" for p in spec.parameters):
        return []
    rows = []
    for record in sorted(records, key=lambda r: r.number):
        status = record.result or api.FineTuneJobStatus()
        metrics = status.metrics or api.Metrics()
        usage = status.usage or api.Usage()
        planned = None
        if status.plan is not None:
            planned = next(
                (m for m in status.plan.methods if m.method == status.plan.requested), None
            )
        ratio = metrics.delta.get("oodPerplexityRatio")
        rows.append(
            TradeoffRow(
                method=str(record.params.get("method.type")),
                trial=record.name,
                phase=record.phase,
                objective=record.objective,
                tuned=dict(metrics.tuned),
                oodPerplexityRatio=ratio,
                trainableParameters=usage.trainableParameters,
                planTrainableParameters=planned.trainableParameters if planned else None,
                peakMemoryBytes=usage.peakMemoryBytes,
                planMemoryBytes=planned.memoryBytes if planned else None,
                wallSeconds=_seconds_between(status.startTime, status.completionTime),
                message=record.message,
            )
        )
    return rows


def trials_by_phase(records: Iterable[TrialRecord]) -> dict[str, int]:
    """How many trials are in each phase (every phase, zeros included)."""
    records = list(records)
    return {phase: sum(r.phase == phase for r in records) for phase in (*ACTIVE, *FINISHED)}


def summarize(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> FineTuneSweepStatus:
    """The sweep's status from its trials (conditions are the caller's: they need a clock)."""
    top = best(spec, records)
    counts = {phase: sum(r.phase == phase for r in records) for phase in FINISHED}
    running = sum(r.phase in ACTIVE for r in records)
    failures = [r for r in records if r.phase == "Failed"]
    if failed_too_often(spec, records):
        phase = "Failed"
        why = "; ".join(f"{r.name}: {r.message or 'failed'}" for r in failures[-3:])
        message = f"{len(failures)} trials failed (maxFailedTrials {spec.maxFailedTrials}): {why}"
    elif is_done(spec, records):
        phase = "Succeeded" if top is not None else "Failed"
        message = (
            f"{len(records)} trials; best {top.name} {spec.objective.metric}={top.objective:.6g}"
            if top is not None
            else f"{len(records)} trials and none reported {spec.objective.metric}"
        )
    else:
        phase = "Running" if records else "Pending"
        message = f"{len(records)}/{planned_trials(spec)} trials created, {running} running"
    return FineTuneSweepStatus(
        phase=phase,  # type: ignore[arg-type]
        message=message,
        trialCount=len(records),
        running=running,
        succeeded=counts["Succeeded"],
        failed=counts["Failed"],
        pruned=counts["Pruned"],
        bestObjective=top.objective if top is not None else None,
        best=top,
        trials=[row(r) for r in sorted(records, key=lambda r: r.number)],
        tradeoff=tradeoff(spec, records),
    )


# --------------------------------------------------------------------------------------------
# trials as FineTuneJobs (the cluster's side; pure: the caller lists and creates them)


def trial_job(sweep_obj: FineTuneSweep, uid: str, new: NewTrial) -> dict[str, Any]:
    """The FineTuneJob of one new trial: deterministic name, owned by the sweep (the garbage
    collector deletes trials with their sweep), parameters recorded on it."""
    spec = trial_spec(sweep_obj.spec, new.params, new.name)
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": new.name,
            "namespace": sweep_obj.metadata.namespace or "default",
            "labels": {LABEL_SWEEP: sweep_obj.metadata.name},
            "annotations": {ANNOTATION_PARAMS: json.dumps(new.params, sort_keys=True)},
            "ownerReferences": [
                {
                    "apiVersion": api.API_VERSION,
                    "kind": KIND,
                    "name": sweep_obj.metadata.name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec.to_api(),
    }


def records_from_jobs(
    spec: FineTuneSweepSpec, jobs: Iterable[Mapping[str, Any]]
) -> list[TrialRecord]:
    """Trial records from the sweep's FineTuneJobs as the API server returns them; objects
    that are not trials of this sweep (no number or no parameters) are skipped."""
    records = []
    for job in jobs:
        meta = job.get("metadata", {})
        number = trial_number(str(meta.get("name", "")))
        try:
            params = json.loads((meta.get("annotations") or {}).get(ANNOTATION_PARAMS, ""))
        except ValueError:
            continue
        if number is None or not isinstance(params, dict):
            continue
        try:
            status = api.FineTuneJobStatus.model_validate(job.get("status") or {})
        except ValueError:
            status = api.FineTuneJobStatus()
        # A trial that finished before the suspend took effect keeps its result.
        pruned = (meta.get("annotations") or {}).get(ANNOTATION_PRUNED) == "true" and (
            status.phase not in ("Succeeded", "Failed")
        )
        records.append(
            record_from_status(
                number, meta["name"], params, status, spec.objective.metric, pruned=pruned
            )
        )
    return sorted(records, key=lambda r: r.number)


def prune_patch() -> dict[str, Any]:
    """What stops a pruned trial: suspend it (its pods go; it can be inspected and resumed)."""
    return {"metadata": {"annotations": {ANNOTATION_PRUNED: "true"}}, "spec": {"suspend": True}}
