"""The model registry round trip against a real `mlflow server` (SQLite, local artifacts).

Tiny training runs (demo model, 2 steps; the trainer's entry point and `kubetune run`) log
their params and metrics to MLflow and register a model version: alias staging always,
production only when the gates pass. Everything is read back through MLflow's REST API by the
test's own requests, not kubetune's client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune import api, promotion, registry
from tests.support import trainer_runs
from tests.support.mlflow_server import MlflowServer, free_port, mlflow_server

pytestmark = pytest.mark.slow

MODEL = "support-bot"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


def _config(tmp: Path, name: str, uri: str, gates: list[dict[str, Any]]) -> Path:
    data = trainer_runs.write_rows(tmp / "data.jsonl", rows=48)
    spec = trainer_runs.spec_dict(data, tmp / "out", maxSteps=2, evalEverySteps=2)
    spec["evaluation"]["gates"] = gates
    spec["output"]["registry"] = {"mlflow": {"trackingUri": uri, "model": MODEL}}
    cfg = api.TrainerConfig(name=name, spec=api.FineTuneJobSpec.model_validate(spec))
    return trainer_runs.write_config(tmp / "config.json", cfg)


def _kubetune_run(tmp: Path, name: str, uri: str, gates: list[dict[str, Any]]) -> tuple[int, str]:
    """`kubetune run` on a manifest: the local mode does training and the registry in one go."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = json.loads(_config(tmp, name, uri, gates).read_text())
    manifest = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": config["spec"],
    }
    path = tmp / "job.yaml"
    path.write_text(json.dumps(manifest))  # JSON is YAML
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(path)],
        capture_output=True,
        text=True,
        env=trainer_runs.trainer_env(),
        timeout=600,
    )
    return done.returncode, done.stdout + done.stderr


def _train(tmp: Path, name: str, uri: str, gates: list[dict[str, Any]]) -> tuple[int, str, dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    termination = tmp / "termination.json"
    code, out = trainer_runs.run_trainer(_config(tmp, name, uri, gates), termination)
    message = json.loads(termination.read_text()) if termination.exists() else {}
    return code, out, message


def test_round_trip_staging_then_production(
    tmp_path: Path, server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. A gate that cannot pass: registered with alias staging only. A token in the env (as
    #    the Secret reference puts it there; this server ignores it) is sent, never written.
    marker = "tok-5e3b9c1d-never-written"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", marker)
    code, out, first = _train(
        tmp_path / "a", "job-a", server.uri, [{"metric": "tuned.loss", "op": "<", "value": 0}]
    )
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    assert code == 0, out
    written = [out, json.dumps(first)]
    written += [p.read_text(errors="replace") for p in (tmp_path / "a").rglob("*.json")]
    run_a = server.get("mlflow/runs/get", run_id=first["promotion"]["registry"]["runId"])
    written.append(json.dumps(run_a))
    assert not [w for w in written if marker in w]
    promo = first["promotion"]
    assert promo["state"] == "NotPromoted", promo
    assert promo["registry"]["aliases"] == ["staging"]
    assert "promotedAt" not in promo and promo["registeredAt"]
    version_a = promo["registry"]["version"]
    staged = server.get("mlflow/registered-models/alias", name=MODEL, alias="staging")
    assert staged["model_version"]["version"] == version_a
    assert server.status_of("mlflow/registered-models/alias", name=MODEL, alias="production") in (
        400,
        404,
    )

    # 2. Gates that pass, through `kubetune run`: a new version, staging then production.
    code, out = _kubetune_run(
        tmp_path / "b", "job-b", server.uri, [{"metric": "delta.loss", "op": "<", "value": 0}]
    )
    assert code == 0, out
    report = json.loads((tmp_path / "b" / "out" / "report.json").read_text())
    second = report["status"]
    promo = second["promotion"]
    assert promo["state"] == "Promoted", promo
    assert promo["promotedAt"] and promo["registry"]["aliases"] == ["staging", "production"]
    reg = promo["registry"]
    assert reg["version"] != version_a
    for alias in ("staging", "production"):
        found = server.get("mlflow/registered-models/alias", name=MODEL, alias=alias)
        assert found["model_version"]["version"] == reg["version"]

    # The run: params are the spec's training fields, metrics the report's figures.
    run = server.get("mlflow/runs/get", run_id=reg["runId"])["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.learningRate"] == "0.002"
    assert params["training.maxSteps"] == "2"
    assert params["method.lora.r"] == "4"
    assert params["method.type"] == "lora"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["tuned.loss"] == pytest.approx(second["metrics"]["tuned"]["loss"])
    assert metrics["delta.loss"] == pytest.approx(second["metrics"]["delta"]["loss"])
    assert metrics["base.exactMatch"] == pytest.approx(second["metrics"]["base"]["exactMatch"])
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["kubetune.artifact.adapter"] == second["artifacts"]["adapter"]

    # The version's source: the adapter copied into the run's artifacts (a local output).
    version = server.get("mlflow/model-versions/get", name=MODEL, version=reg["version"])
    source = version["model_version"]["source"]
    assert source == reg["source"] and source.endswith("/adapter")
    assert version["model_version"]["run_id"] == reg["runId"]
    rel = source.split(":", 1)[1].lstrip("/")
    listed = server.get("mlflow-artifacts/artifacts", path=rel)
    names = {f["path"] for f in listed["files"]}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= names
    stored = server.artifacts / rel / "adapter_model.safetensors"
    local = tmp_path / "b" / "out" / "adapter" / "adapter_model.safetensors"
    assert stored.read_bytes() == local.read_bytes()
    run_files = server.get("mlflow-artifacts/artifacts", path=rel.rsplit("/", 1)[0])
    assert {"report.json", "loss-curve.png"} <= {f["path"] for f in run_files["files"]}

    # report.json (committed) and the local table say the same.
    assert report["promotion"] == promo
    assert "promotion: Promoted: 1 evaluation gate(s) passed" in out
    assert f"version     {reg['version']} (aliases: staging, production; run {reg['runId']})" in out


def test_staging_hook_moves_production_after_staging_gates(server: MlflowServer) -> None:
    """With spec.staging the trainer leaves Pending + alias staging; the staging step's hook
    decides, and production moves to that version (here through the same REST client)."""
    client = registry.Client(server.uri)
    exp = client.experiment_id("hook")
    run = client.create_run(exp, "hook", {}, registry.now_ms())
    client.ensure_registered_model("hooked")
    version = client.create_model_version("hooked", "s3://models/tuned/x/merged", run["run_id"], {})
    client.set_alias("hooked", registry.STAGING, version)
    gate = api.GateResult(metric="delta.loss", op="<", value=0, actual=-1.0, passed=True)
    status = api.FineTuneJobStatus(
        gates=[gate],
        artifacts=api.Artifacts(merged="s3://models/tuned/x/merged"),
        promotion=api.Promotion(
            state="Pending",
            registry=api.RegistryRecord(
                trackingUri=server.uri, model="hooked", version=version, aliases=["staging"]
            ),
            registeredAt="2026-12-01T00:00:00Z",
        ),
    )
    spec = api.FineTuneJobSpec.model_validate(
        trainer_runs.spec_dict(Path("/d.jsonl"), Path("/out"))
    )
    staging_gate = api.GateResult(
        metric="p95TimeToFirstTokenMs", op="<=", value=500, actual=120, passed=True
    )
    new, move = promotion.after_staging(spec, status, [staging_gate], "2026-12-01T01:00:00Z")
    assert move and new.state == "Promoted" and new.registry is not None
    # What the promote Job's pod runs (render.promote_job).
    done = _promote_cli(server.uri, "hooked", version)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"hooked: alias production -> version {version} (source s3://models/tuned/x/merged)"
    )
    found = server.get("mlflow/registered-models/alias", name="hooked", alias="production")
    assert found["model_version"]["version"] == version
    assert found["model_version"]["source"] == "s3://models/tuned/x/merged"
    assert new.registry.aliases == ["production", "staging"]
    assert new.registeredAt == "2026-12-01T00:00:00Z"


def _promote_cli(uri: str, model: str, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.promote", "--tracking-uri", uri,
         "--model", model, "--version", version, "--alias", "production", "--timeout", "10"],
        capture_output=True,
        text=True,
        env=trainer_runs.trainer_env(),
        timeout=120,
    )  # fmt: skip


def test_promote_cli_errors(server: MlflowServer) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    done = _promote_cli(down, "hooked", "1")
    assert done.returncode == api.EXIT_INFRA_ERROR
    assert done.stderr.count("error:") == 1 and down in done.stderr
    assert "Traceback" not in done.stderr
    # A model the registry does not know: refused (exit 10), the server's reason in the line.
    done = _promote_cli(server.uri, "no-such-model", "1")
    assert done.returncode == api.EXIT_USER_ERROR, done.stderr
    assert done.stderr.startswith("error: MLflow at " + server.uri)
    assert "RESOURCE_DOES_NOT_EXIST" in done.stderr or "not found" in done.stderr.lower()


def test_unreachable_registry_exits_11_and_keeps_the_training(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, message = _train(tmp_path, "job-c", uri, [])
    assert code == api.EXIT_INFRA_ERROR, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert uri in errors[0] and "unreachable" in errors[0]
    assert "output.registry.mlflow" in errors[0]
    assert "Traceback" not in out
    # Training results are committed and the status says what failed.
    out_dir = tmp_path / "out"
    assert (out_dir / "adapter" / "manifest.json").exists()
    report = json.loads((out_dir / "report.json").read_text())
    assert report["promotion"]["state"] == "Failed"
    assert uri in report["promotion"]["message"]
    assert message["phase"] == "Failed"
    assert message["artifacts"]["adapter"].endswith("/adapter")
    assert message["promotion"]["state"] == "Failed"
    assert "artifacts committed" in message["message"] and uri in message["message"]
    assert message["metrics"]["tuned"]["loss"] > 0


VLLM = trainer_runs.ROOT / ".tools" / "vllm"


@pytest.mark.timeout(900)
def test_with_staging_production_waits_for_the_staging_gates(
    tmp_path: Path, server: MlflowServer
) -> None:
    """`kubetune run` with spec.staging and a registry: the trainer registers the version with
    alias staging only (Pending), real vLLM (CPU) + guidellm stage it, and production moves once
    the staging gates pass."""
    if not (VLLM / "bin" / "python").exists():
        pytest.fail(f"{VLLM} not found: run scripts/install-vllm.sh", pytrace=False)
    data = trainer_runs.write_rows(tmp_path / "data.jsonl", rows=48)
    spec = trainer_runs.spec_dict(data, tmp_path / "out", maxSteps=2, evalEverySteps=2)
    spec["evaluation"] = {"maxSamples": 4, "maxNewTokens": 2, "metrics": ["loss"]}
    spec["output"]["registry"] = {"mlflow": {"trackingUri": server.uri, "model": "staged-bot"}}
    spec["staging"] = {
        "gpus": 0,
        "load": {"type": "poisson", "rate": 2, "durationSeconds": 10, "maxPrompts": 8},
        "costPerGpuHour": 0.1,
        "gates": {"p95TtftMs": 120000, "minOutputTokensPerSecond": 0.01},
    }
    path = tmp_path / "job.yaml"
    job = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "staged"}}
    path.write_text(json.dumps({**job, "spec": spec}))
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(path)],
        capture_output=True,
        text=True,
        env={**trainer_runs.trainer_env(), "KUBETUNE_VLLM": str(VLLM)},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The trainer's record (report.json): registered, waiting for staging.
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["promotion"]["state"] == "Pending"
    assert report["promotion"]["registry"]["aliases"] == ["staging"]
    version = report["promotion"]["registry"]["version"]
    # After staging: production points at that version, and the table says so.
    found = server.get("mlflow/registered-models/alias", name="staged-bot", alias="production")
    assert found["model_version"]["version"] == version
    assert "promotion: Promoted" in done.stdout
    assert "1 staging gate(s)" in done.stdout or "staging gate(s) passed" in done.stdout
