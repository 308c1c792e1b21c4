"""output.registry (api), promotion.py (decisions, status.promotion), registry.py's pure parts,
the rendered credentials and the promotion's trip through the termination message."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kubetune import api, manifests, promotion, registry, render
from kubetune import status as st
from kubetune_trainer.report import termination_message
from tests.support import trainer_pod, trainer_runs
from tests.support.cluster import ROOT

NOW = "2026-12-01T12:00:00Z"


def spec(**registry_fields: Any) -> api.FineTuneJobSpec:
    body = trainer_runs.spec_dict(Path("/data.jsonl"), Path("/out"))
    if registry_fields:
        body["output"]["registry"] = {"mlflow": registry_fields}
    return api.FineTuneJobSpec.model_validate(body)


def errors(**registry_fields: Any) -> list[str]:
    job = manifests.load_file(ROOT / "examples" / "lora-s3.yaml").jobs[0].to_api()
    job["spec"]["output"]["registry"] = {"mlflow": registry_fields}
    try:
        api.parse_job(job)
    except api.ValidationError as exc:
        return api.format_errors(exc)
    return []


def gate(passed: bool, metric: str = "delta.loss") -> api.GateResult:
    return api.GateResult(
        metric=metric, op="<", value=0, actual=-0.5 if passed else 0.5, passed=passed
    )


# --------------------------------------------------------------------------------------------
# the spec


def test_registry_spec_accepts_http_and_https() -> None:
    for uri in ("http://mlflow.mlflow.svc:5000", "https://mlflow.example.com/prefix/"):
        assert errors(trackingUri=uri, model="support-bot") == []
    s = spec(trackingUri="http://127.0.0.1:5000", model="catalog.schema.bot_1")
    assert s.output.registry and s.output.registry.mlflow
    assert s.output.registry.mlflow.experiment == "kubetune"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///tmp/mlruns", "is not an http:// or https:// URL"),
        ("sqlite:///mlflow.db", "is not an http:// or https:// URL"),
        ("databricks", "is not an http:// or https:// URL"),
        ("https://user:secret@mlflow.example.com", "credentials do not go in the URL"),
    ],
)
def test_bad_tracking_uri_names_the_field(uri: str, expected: str) -> None:
    found = errors(trackingUri=uri, model="m")
    assert len(found) == 1 and found[0].startswith("spec.output.registry.mlflow.trackingUri: ")
    assert expected in found[0]
    assert "secret" not in found[0] or "credentials do not go" in found[0]


@pytest.mark.parametrize("name", ["", "-bot", "my model", "a/b", "x" * 300])
def test_bad_model_name_names_the_field(name: str) -> None:
    found = errors(trackingUri="http://m:5000", model=name)
    assert found and all(e.startswith("spec.output.registry.mlflow.model: ") for e in found)


def test_unknown_registry_field_is_refused() -> None:
    found = errors(trackingUri="http://m:5000", model="m", token="abc")
    assert found == [
        "spec.output.registry.mlflow.token: unknown field "
        "(check the spelling; fields are camelCase)"
    ]


def test_crd_schema_has_the_same_patterns() -> None:
    from kubetune import crd

    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    mlflow = schema["properties"]["spec"]["properties"]["output"]["properties"]["registry"][
        "properties"
    ]["mlflow"]
    assert mlflow["properties"]["trackingUri"]["pattern"] == api.TRACKING_URI_PATTERN
    assert mlflow["properties"]["model"]["pattern"] == api.MLFLOW_MODEL_PATTERN
    assert set(mlflow["required"]) == {"trackingUri", "model"}


# --------------------------------------------------------------------------------------------
# credentials: Secret references only


def test_mlflow_credentials_only_as_optional_secret_references() -> None:
    job = manifests.load_file(ROOT / "examples" / "lora-s3.yaml").jobs[0].to_api()
    job["spec"]["output"]["registry"] = {
        "mlflow": {"trackingUri": "http://m:5000", "model": "m", "credentialsSecret": "mlflow-auth"}
    }
    children = render.render(api.parse_job(job), uid="u", default_image="img:1", policy=None)
    env = {e["name"]: e for e in children.job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in registry.CREDENTIAL_ENVS:
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": key, "optional": True}},
        }
    config = json.loads(children.config_map["data"]["config.json"])
    assert config["spec"]["output"]["registry"]["mlflow"]["credentialsSecret"] == "mlflow-auth"
    # Without a Secret there is nothing to reference.
    job["spec"]["output"]["registry"]["mlflow"].pop("credentialsSecret")
    plain = render.render(api.parse_job(job), uid="u", default_image="img:1", policy=None)
    names = {e["name"] for e in plain.job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not names & set(registry.CREDENTIAL_ENVS)


def test_credentials_header_from_env() -> None:
    assert registry.Credentials.from_env({}).header() is None
    token = registry.Credentials.from_env({"MLFLOW_TRACKING_TOKEN": "t0k"})
    assert token.header() == "Bearer t0k"
    basic = registry.Credentials.from_env(
        {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "pw"}
    )
    assert basic.header() == "Basic YW5uOnB3"  # base64("ann:pw")


# --------------------------------------------------------------------------------------------
# decisions and status.promotion


def test_decide_by_evaluation_gates_without_staging() -> None:
    s = spec()
    assert promotion.decide(s, []) == ("Promoted", "no gates declared")
    assert promotion.decide(s, [gate(True)]) == ("Promoted", "1 evaluation gate(s) passed")
    state, message = promotion.decide(s, [gate(True), gate(False, "tuned.loss")])
    assert state == "NotPromoted" and "tuned.loss < 0: FAILED" in message


def test_missing_gate_results_never_promote() -> None:
    body = trainer_runs.spec_dict(Path("/d.jsonl"), Path("/o"))
    body["evaluation"]["gates"] = [{"metric": "delta.loss", "op": "<", "value": 0}] * 2
    s = api.FineTuneJobSpec.model_validate(body)
    assert promotion.decide(s, [gate(True)])[0] == "NotPromoted"


def test_record_says_what_and_when() -> None:
    artifacts = api.Artifacts(adapter="s3://b/a", merged="s3://b/m", tokenizer="s3://b/t")
    done = promotion.record(
        state="Promoted", message="ok", gates=[gate(True)], artifacts=artifacts, now=NOW
    )
    assert done.artifact == "s3://b/m"  # merged beats the adapter
    assert done.gates == ["delta.loss < 0: passed (actual -0.5)"]
    assert done.promotedAt == NOW and done.registeredAt is None
    held = promotion.record(
        state="NotPromoted",
        message="no",
        gates=[gate(False)],
        artifacts=artifacts,
        now=NOW,
        registry=api.RegistryRecord(trackingUri="http://m", model="m", version="3"),
    )
    assert held.promotedAt is None and held.registeredAt == NOW
    assert promotion.promoted_artifact(api.Artifacts(adapter="a", model="full")) == "full"
    assert promotion.promoted_artifact(None) is None


def test_failed_keeps_the_record_and_drops_the_promotion_time() -> None:
    done = promotion.record(state="Promoted", message="ok", gates=[], artifacts=None, now=NOW)
    failed = promotion.failed(done, "output.registry.mlflow: MLflow at http://x: unreachable")
    assert failed.state == "Failed" and failed.promotedAt is None
    assert "http://x" in failed.message


def test_after_staging_hook() -> None:
    status = api.FineTuneJobStatus(
        gates=[gate(True)],
        artifacts=api.Artifacts(adapter="s3://b/a"),
        promotion=api.Promotion(
            state="Pending",
            registry=api.RegistryRecord(
                trackingUri="http://m", model="m", version="2", aliases=["staging"]
            ),
            registeredAt="2026-12-01T00:00:00Z",
        ),
    )
    ok, move = promotion.after_staging(spec(), status, [gate(True, "p95TtftMs")], NOW)
    assert move and ok.state == "Promoted" and ok.promotedAt == NOW
    assert ok.registry is not None and ok.registry.aliases == ["production", "staging"]
    assert ok.registeredAt == "2026-12-01T00:00:00Z"
    eval_failed = status.model_copy(update={"gates": [gate(False)]})
    held, move = promotion.after_staging(spec(), eval_failed, [gate(True, "p95TtftMs")], NOW)
    assert not move and held.state == "NotPromoted"
    assert held.registry is not None and held.registry.aliases == ["staging"]


def test_summary_lines() -> None:
    done = api.Promotion(
        state="Promoted",
        message="1 evaluation gate(s) passed",
        registry=api.RegistryRecord(
            trackingUri="http://m:5000",
            model="bot",
            version="4",
            runId="r1",
            source="s3://b/m",
            aliases=["staging", "production"],
        ),
    )
    assert promotion.summary_lines(done) == [
        "promotion: Promoted: 1 evaluation gate(s) passed",
        "  registry    http://m:5000 model bot",
        "  version     4 (aliases: staging, production; run r1)",
        "  source      s3://b/m",
    ]
    assert promotion.summary_lines(None) == []


# --------------------------------------------------------------------------------------------
# what a run logs


def test_run_params_are_the_spec_training_fields() -> None:
    params = registry.run_params(spec())
    assert params["training.learningRate"] == "0.002"
    assert params["training.maxSteps"] == "6"
    assert params["method.type"] == "lora"
    assert params["method.lora.r"] == "4"
    assert params["method.lora.targetModules"] == '["q_proj","v_proj"]'
    assert params["model.revision"] == "demo-v1"
    assert params["dataset.split.seed"] == "0"
    assert all(len(v) <= registry.MAX_PARAM_VALUE for v in params.values())


def test_run_metrics_use_gate_names() -> None:
    metrics = api.Metrics(base={"loss": 2.0}, tuned={"loss": 1.5}, delta={"loss": -0.5})
    assert registry.run_metrics(metrics) == {
        "base.loss": 2.0,
        "tuned.loss": 1.5,
        "delta.loss": -0.5,
    }


def test_local_folder() -> None:
    assert registry.local_folder("file:///tmp/out/adapter") == Path("/tmp/out/adapter")
    assert registry.local_folder("/tmp/out/adapter") == Path("/tmp/out/adapter")
    assert registry.local_folder("s3://bucket/adapter") is None


# --------------------------------------------------------------------------------------------
# through the termination message into status


def test_promotion_travels_compact_and_the_operator_fills_it_back() -> None:
    artifacts = api.Artifacts(adapter="s3://b/run/adapter")
    gates = [gate(True)]
    done = promotion.record(
        state="Promoted",
        message="1 evaluation gate(s) passed",
        gates=gates,
        artifacts=artifacts,
        now=NOW,
        registry=api.RegistryRecord(
            trackingUri="http://m", model="m", version="1", aliases=["staging", "production"]
        ),
    )
    text = termination_message(
        api.FineTuneJobStatus(
            phase="Succeeded",
            gates=gates,
            artifacts=artifacts,
            promotion=done,
            metrics=api.Metrics(tuned={"loss": 1.0}),
        )
    )
    sent = json.loads(text)["promotion"]
    assert "artifacts" not in sent and "gates" not in sent
    job, pods = trainer_pod.ended(text)
    status = st.compute(
        previous=api.FineTuneJobStatus(jobName="x-trainer", phase="Running"),
        generation=1,
        spec=spec(),
        job=job,
        pods=pods,
        live=None,
        now=datetime(2026, 12, 1, 12, tzinfo=UTC),
    )
    assert status.promotion is not None
    assert status.promotion == done


# --------------------------------------------------------------------------------------------
# the promote Job (the staging step's way to move alias production)


def _job_with_registry(**mlflow: Any) -> api.FineTuneJob:
    job = manifests.load_file(ROOT / "examples" / "lora-s3.yaml").jobs[0].to_api()
    job["spec"]["output"]["registry"] = {
        "mlflow": {"trackingUri": "http://m:5000", "model": "bot", **mlflow}
    }
    return api.parse_job(job)


def test_promote_job_moves_an_alias_with_secret_references_only() -> None:
    import kubernetes_validate

    job = _job_with_registry(credentialsSecret="mlflow-auth")
    rendered = render.promote_job(
        job, uid="u-1", default_image="img:1", version="7", alias="production"
    )
    assert rendered is not None
    kubernetes_validate.validate(rendered, "1.35.0", strict=True)
    pod = rendered["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "python", "-m", "kubetune_trainer.promote", "--tracking-uri", "http://m:5000",
        "--model", "bot", "--version", "7", "--alias", "production", "--timeout", "30",
    ]  # fmt: skip
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(refs) == set(registry.CREDENTIAL_ENVS)
    assert all(r["name"] == "mlflow-auth" and r["optional"] for r in refs.values())
    assert pod["automountServiceAccountToken"] is False
    # Not mistaken for a trainer pod: no kubetune.io/finetunejob label.
    for labels in (
        rendered["metadata"]["labels"],
        rendered["spec"]["template"]["metadata"]["labels"],
    ):
        assert render.LABEL_JOB not in labels and labels[render.LABEL_PROMOTE] == job.metadata.name
    assert rendered["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    lora = manifests.load_file(ROOT / "examples" / "lora-s3.yaml").jobs[0]
    assert render.promote_job(lora, uid=None, default_image="i", version="1", alias="x") is None


def test_moves_production_once_when_a_registered_version_is_promoted() -> None:
    reg = api.RegistryRecord(trackingUri="http://m", model="m", version="3", aliases=["staging"])
    pending = api.Promotion(state="Pending", registry=reg)
    promoted = api.Promotion(state="Promoted", registry=reg)
    assert promotion.moves_production(pending, promoted)
    assert promotion.moves_production(None, promoted)
    assert not promotion.moves_production(promoted, promoted)  # already done: no second Job
    assert not promotion.moves_production(pending, api.Promotion(state="NotPromoted", registry=reg))
    assert not promotion.moves_production(pending, api.Promotion(state="Promoted"))  # no registry


# --------------------------------------------------------------------------------------------
# status follows the promote Job (what the operator's promote timer computes)

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 12, 1, 12, 1, tzinfo=UTC)


def staged_status() -> api.FineTuneJobStatus:
    """What the staging step leaves: training Succeeded with artifacts, gates passed, version 3
    registered with alias staging and now decided Promoted (alias production still to move)."""
    reg = api.RegistryRecord(
        trackingUri="http://m:5000", model="bot", version="3", aliases=["production", "staging"]
    )
    artifacts = api.Artifacts(adapter="s3://b/run/adapter", report="s3://b/run/report.json")
    return api.FineTuneJobStatus(
        phase="Succeeded",
        artifacts=artifacts,
        metrics=api.Metrics(tuned={"loss": 1.5}),
        promotion=api.Promotion(
            state="Promoted",
            message="1 evaluation and 2 staging gate(s) passed",
            artifact=artifacts.adapter,
            registry=reg,
            promotedAt=NOW,
        ),
    )


def promote_job(*conditions: tuple[str, str], message: str = "") -> dict[str, Any]:
    return {
        "metadata": {"name": "bot-promote"},
        "status": {
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": message}
                for t, r in conditions
            ]
        },
    }


def promote_pod(exit_code: int, message: str, finished: str) -> dict[str, Any]:
    return {
        "metadata": {"name": f"bot-promote-{finished[-3:-1]}"},
        "status": {
            "phase": "Failed" if exit_code else "Succeeded",
            "containerStatuses": [
                {
                    "name": "promote",
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "message": message,
                            "finishedAt": finished,
                        }
                    },
                }
            ],
        },
    }


def test_creating_the_promote_job_makes_the_promotion_promoting() -> None:
    new = st.promoting(staged_status(), "bot-promote", generation=1, now=T0)
    done = new.promotion
    assert done is not None and done.state == "Promoting" and done.promotedAt is None
    assert done.registry is not None and done.registry.aliases == ["staging"]  # not moved yet
    assert done.message.endswith("; moving alias production to version 3 (Job bot-promote)")
    cond = st.condition(new, st.PROMOTED)
    assert cond is not None and (cond.status, cond.reason) == ("Unknown", st.PROMOTING)
    events = st.transitions(staged_status(), new)
    assert [(e.type, e.reason) for e in events] == [("Normal", st.PROMOTING)]


def test_a_running_promote_job_changes_nothing() -> None:
    promoting = st.promoting(staged_status(), "bot-promote", generation=1, now=T0)
    for job in (promote_job(), promote_job(("Suspended", "JobSuspended"))):
        again = st.with_promote_job(promoting, job, [], generation=1, now=T1)
        assert again == promoting


def test_a_completed_promote_job_promotes_with_alias_production() -> None:
    promoting = st.promoting(staged_status(), "bot-promote", generation=1, now=T0)
    job = promote_job(("SuccessCriteriaMet", "CompletionsReached"), ("Complete", "Done"))
    new = st.with_promote_job(promoting, job, [], generation=1, now=T1)
    done = new.promotion
    assert (
        done is not None and done.state == "Promoted" and done.promotedAt == "2026-12-01T12:01:00Z"
    )
    assert done.registry is not None and done.registry.aliases == ["production", "staging"]
    assert done.message == (
        "1 evaluation and 2 staging gate(s) passed; alias production moved to version 3 by "
        "Job bot-promote"
    )
    cond = st.condition(new, st.PROMOTED)
    assert cond is not None and (cond.status, cond.reason) == ("True", st.PROMOTION_COMPLETE)
    assert new.phase == "Succeeded" and new.artifacts == promoting.artifacts
    events = st.transitions(promoting, new)
    assert [(e.type, e.reason) for e in events] == [("Normal", st.PROMOTION_COMPLETE)]
    # Final: a later tick (the timer stops on a state other than Promoting) changes nothing.
    assert st.with_promote_job(new, None, [], generation=1, now=T1) == new


def test_a_failed_promote_job_says_why_and_keeps_the_training_results() -> None:
    promoting = st.promoting(staged_status(), "bot-promote", generation=1, now=T0)
    unreachable = (
        "error: MLflow at http://m:5000 (POST /api/2.0/mlflow/registered-models/alias): "
        "unreachable: [Errno 111] Connection refused\n"
    )
    pods = [
        promote_pod(11, "error: an older attempt\n", "2026-12-01T12:00:10Z"),
        promote_pod(11, unreachable, "2026-12-01T12:00:40Z"),
    ]
    job = promote_job(("FailureTarget", "BackoffLimitExceeded"), ("Failed", "BackoffLimitExceeded"))
    new = st.with_promote_job(promoting, job, pods, generation=1, now=T1)
    done = new.promotion
    assert done is not None and done.state == "Failed" and done.promotedAt is None
    assert done.message.startswith(
        "promote Job bot-promote failed: MLflow at http://m:5000 (POST "
        "/api/2.0/mlflow/registered-models/alias): unreachable: [Errno 111] Connection refused; "
        "alias production not moved; 1 evaluation and 2 staging gate(s) passed"
    ), done.message
    assert done.registry is not None and done.registry.aliases == ["staging"]
    assert done.artifacts == promoting.promotion.artifacts  # type: ignore[union-attr]
    # Training's outcome is untouched: phase, artifacts, metrics.
    assert (new.phase, new.artifacts, new.metrics) == (
        "Succeeded",
        promoting.artifacts,
        promoting.metrics,
    )
    cond = st.condition(new, st.PROMOTED)
    assert cond is not None and (cond.status, cond.reason) == ("False", st.PROMOTION_FAILED)
    assert "Connection refused" in cond.message
    events = st.transitions(promoting, new)
    assert [(e.type, e.reason) for e in events] == [("Warning", st.PROMOTION_FAILED)]


def test_a_failed_promote_job_without_a_pod_message_uses_the_jobs_reason() -> None:
    promoting = st.promoting(staged_status(), "bot-promote", generation=1, now=T0)
    job = promote_job(("Failed", "PodFailurePolicy"), message="Container promote exited 10")
    new = st.with_promote_job(promoting, job, [], generation=1, now=T1)
    assert new.promotion is not None and new.promotion.state == "Failed"
    assert new.promotion.message.startswith(
        "promote Job bot-promote failed: Container promote exited 10;"
    )


def test_a_promote_job_gone_before_it_finished_fails_the_promotion() -> None:
    promoting = st.promoting(staged_status(), "bot-promote", generation=1, now=T0)
    new = st.with_promote_job(promoting, None, [], generation=1, now=T1)
    assert new.promotion is not None and new.promotion.state == "Failed"
    assert new.promotion.message.startswith("the promote Job is gone before it finished")
    assert new.phase == "Succeeded" and new.artifacts == promoting.artifacts


def test_staging_spec_makes_promotion_wait() -> None:
    example = manifests.load_file(ROOT / "examples" / "staging-s3.yaml").jobs[0].spec
    assert promotion.has_staging(example)
    state, message = promotion.decide(example, [gate(True)] * len(example.evaluation.gates))
    assert state == "Pending" and "waiting for the staging gates" in message


def test_a_failed_registry_step_keeps_the_trained_results_in_the_status() -> None:
    from kubetune_trainer.promote import failed_status

    artifacts = api.Artifacts(adapter="s3://b/run/adapter", report="s3://b/run/report.json")
    trained = api.FineTuneJobStatus(
        phase="Succeeded",
        message="trained 2 steps; gates passed",
        metrics=api.Metrics(tuned={"loss": 1.0}),
        gates=[gate(True)],
        artifacts=artifacts,
    )
    error = registry.RegistryError("MLflow at http://m:5000 (GET x): unreachable", transient=True)
    decided = promotion.record(
        state="Promoted", message="ok", gates=trained.gates, artifacts=artifacts, now=NOW
    )
    done = promotion.failed(decided, f"output.registry.mlflow: {error}")
    final = failed_status(trained.model_copy(update={"promotion": done}), error)
    job, pods = trainer_pod.ended(termination_message(final), exit_code=11)
    status = st.compute(
        previous=api.FineTuneJobStatus(jobName="x-trainer", phase="Running"),
        generation=1,
        spec=spec(),
        job=job,
        pods=pods,
        live=None,
        now=datetime(2026, 12, 1, 12, tzinfo=UTC),
    )
    assert status.phase == "Failed"
    assert status.artifacts == artifacts and status.metrics is not None
    assert status.promotion is not None and status.promotion.state == "Failed"
    assert "http://m:5000" in status.promotion.message and status.promotion.promotedAt is None
    assert status.message is not None and "artifacts committed" in status.message
