"""The trainer on S3 (moto over HTTP): model and data in, checkpoints and artifacts out, live
/metrics, the termination message; a missing object is a user error with nothing written."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer.__main__ import Options, run, run_and_report
from tests.support import s3
from tests.support import trainer_runs as tr


def _upload_model_and_data(endpoint: str, bucket: str, data: Path) -> None:
    client = s3.client(endpoint)
    for path in tr.DEMO_MODEL.iterdir():
        client.upload_file(str(path), bucket, f"models/demo/{path.name}")
    client.upload_file(str(data), bucket, "data/rows.jsonl")


def _s3_config(endpoint: str, bucket: str, data: Path, **training: object) -> api.TrainerConfig:
    spec = tr.spec_dict(data, Path("unused"), **training)
    spec["model"]["source"] = f"s3://{bucket}/models/demo"
    spec["dataset"]["source"] = f"s3://{bucket}/data/rows.jsonl"
    spec["output"] = {"destination": f"s3://{bucket}/runs/one"}
    spec["storage"] = {"s3": {"endpoint": endpoint, "region": s3.REGION}}
    return api.TrainerConfig(name="s3", spec=api.FineTuneJobSpec.model_validate(spec))


@pytest.mark.timeout(300)
def test_trainer_reads_and_writes_s3_and_serves_metrics(
    s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.s3_env(monkeypatch)
    bucket = s3.new_bucket(s3_server)
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    _upload_model_and_data(s3_server, bucket, data)
    config = _s3_config(s3_server, bucket, data, maxSteps=6)

    port = s3.free_port()
    scraped: list[str] = []

    def scrape_while_training(entry: dict[str, object]) -> None:
        if entry["step"] == 3:  # called from the loop: the server must answer meanwhile
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped.append(r.read().decode())

    termination = tmp_path / "termination-log"
    options = Options(
        metrics_port=port,
        termination_log=str(termination),
        progress=scrape_while_training,
        log=lambda line: None,
    )
    assert run_and_report(lambda: run(config, options), options) == 0

    assert scraped, "no /metrics scrape during training"
    assert "kubetune_trainer_step 3.0" in scraped[0]
    assert "kubetune_trainer_total_steps 6.0" in scraped[0]
    assert "kubetune_trainer_tokens_per_second" in scraped[0]

    keys = {
        o["Key"]
        for o in s3.client(s3_server).list_objects_v2(Bucket=bucket, Prefix="runs/one/")["Contents"]
    }
    for folder in ("adapter", "tokenizer", "splits", "checkpoints/step-6"):
        assert f"runs/one/{folder}/manifest.json" in keys, folder
    assert "runs/one/report.json" in keys and "runs/one/loss-curve.png" in keys

    message = json.loads(termination.read_text())
    status = api.FineTuneJobStatus.model_validate(message)
    assert status.phase == "Succeeded"
    assert status.artifacts is not None
    assert status.artifacts.adapter == f"s3://{bucket}/runs/one/adapter"
    assert status.reproducibility is not None and status.reproducibility.modelHash
    assert status.metrics is not None and "loss" in status.metrics.tuned


def test_missing_s3_dataset_is_a_user_error_and_writes_nothing(
    s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.s3_env(monkeypatch)
    bucket = s3.new_bucket(s3_server)
    data = tr.write_rows(tmp_path / "rows.jsonl", 16)
    config = _s3_config(s3_server, bucket, data)  # nothing uploaded
    termination = tmp_path / "termination-log"
    options = Options(metrics_port=0, termination_log=str(termination), log=lambda line: None)
    assert run_and_report(lambda: run(config, options), options) == api.EXIT_USER_ERROR
    message = json.loads(termination.read_text())
    assert message["phase"] == "Failed"
    assert message["message"].startswith("spec.dataset.source")
    listed = s3.client(s3_server).list_objects_v2(Bucket=bucket)
    assert listed.get("KeyCount", 0) == 0


def test_metrics_server_stops_with_the_run(tmp_path: Path) -> None:
    # The /metrics port is released when run() returns (also on failure), so a retry in the
    # same process (kubetune run twice) can bind it again.
    data = tr.write_rows(tmp_path / "rows.jsonl", 16)
    config = tr.config(data, tmp_path / "out")
    config.spec.dataset.license.name = "unknown"  # fails fast, after the server started
    port = s3.free_port()
    options = Options(metrics_port=port, termination_log=None, log=lambda line: None)
    assert run_and_report(lambda: run(config, options), options) == api.EXIT_USER_ERROR
    time.sleep(0.1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
