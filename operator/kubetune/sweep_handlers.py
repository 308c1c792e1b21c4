"""kopf handlers for FineTuneSweep: glue around the pure study logic in kubetune.sweep.

One reconcile (on create, on resume and on a timer while the sweep runs) does everything, from
nothing but what exists: the sweep's trials (FineTuneJobs labelled with its name, fed by a
watch into an index), rebuilt into a study; pruned trials are suspended; at most parallelism -
running new trials are created with deterministic names (409 = already there); the status is
the summary of the trials. An operator restart therefore changes nothing.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import kopf

from kubetune import api, k8s, metrics, sweep_api
from kubetune import status as st

RESOURCE = (api.GROUP, api.VERSION, sweep_api.PLURAL)
TRIALS = (api.GROUP, api.VERSION, api.PLURAL)
VALIDATED, COMPLETE = "Validated", "Complete"


def _conditions(
    old: list[api.Condition], phase: str | None, message: str, generation: int | None
) -> list[api.Condition]:
    conds = st.Conditions(old, now=datetime.now(UTC), generation=generation)
    conds.set(VALIDATED, "True", "Valid", "spec accepted")
    if phase in ("Succeeded", "Failed"):
        conds.set(COMPLETE, "True", "Sweep" + phase, message)
    else:
        conds.set(COMPLETE, "False", "TrialsRunning", message)
    return conds.items


def register(registry: kopf.OperatorRegistry, client: k8s.Client, interval: float) -> None:
    @kopf.index(
        *TRIALS,
        id="sweep_trials",
        labels={sweep_api.LABEL_SWEEP: kopf.PRESENT},
        registry=registry,
    )
    async def sweep_trials(
        *, body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
    ) -> Any:
        plain = {k: copy.deepcopy(dict(body.get(k) or {})) for k in ("metadata", "spec", "status")}
        return {(namespace, labels[sweep_api.LABEL_SWEEP]): plain}

    async def reconcile(
        *,
        body: kopf.Body,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        uid: str,
        name: str,
        namespace: str | None,
        **indexes: Any,
    ) -> None:
        # Optuna and numpy (~16 MB) load with the first sweep, not with every operator.
        from kubetune import sweep

        namespace, generation = namespace or "default", meta.get("generation")
        document = {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": {"name": name, "namespace": namespace},
            "spec": copy.deepcopy(dict(body.get("spec") or {})),
        }
        try:
            sweep_obj = sweep_api.parse_sweep(document)
        except sweep_api.SweepInvalid as error:
            message = "; ".join(error.lines)[:4000]
            patch["status"] = {
                "phase": "Failed",
                "message": message,
                "conditions": [
                    api.Condition(
                        type=VALIDATED,
                        status="False",
                        reason=st.SPEC_INVALID,
                        message=message,
                        observedGeneration=generation,
                    ).to_api()
                ],
            }
            return
        spec = sweep_obj.spec
        trials: kopf.Index[Any, Any] = indexes["sweep_trials"]
        records = sweep.records_from_jobs(spec, list(trials.get((namespace, name), [])))
        for record in records:
            if sweep.should_prune(spec, records, record):
                await client.patch_finetunejob(namespace, record.name, sweep.prune_patch())
        for new in sweep.plan_new_trials(spec, name, records):
            await client.create(sweep.trial_job(sweep_obj, uid, new))  # False: 409, exists
            records.append(sweep.TrialRecord(new.number, new.name, new.params, "Pending"))
        summary = sweep.summarize(spec, records)
        old = [api.Condition.model_validate(c) for c in (status.get("conditions") or [])]
        summary.conditions = _conditions(old, summary.phase, summary.message or "", generation)
        summary.observedGeneration = generation
        patch["status"] = summary.to_api()
        metrics.sweep_state(
            namespace,
            name,
            summary.phase,
            sweep.trials_by_phase(records),
            summary.bestObjective,
            spec.objective.metric,
            spec.objective.direction,
        )

    def running(status: kopf.Status, **_: Any) -> bool:
        return status.get("phase") not in ("Succeeded", "Failed")

    @kopf.on.delete(*RESOURCE, id="sweep-deleted", registry=registry)
    async def deleted(*, namespace: str | None, name: str, **_: Any) -> None:
        # Trials go by owner reference (the garbage collector); the operator forgets its series.
        metrics.sweep_deleted(namespace or "default", name)

    kopf.on.create(*RESOURCE, id="sweep", registry=registry)(reconcile)
    kopf.on.resume(*RESOURCE, id="sweep", registry=registry)(reconcile)
    kopf.timer(*RESOURCE, id="sweep-refresh", interval=interval, when=running, registry=registry)(
        reconcile
    )
