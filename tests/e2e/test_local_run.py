"""`kubetune run`: a manifest in, a tuned adapter, a report and a base-vs-tuned table out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from kubetune import api
from tests.support import manifests
from tests.support import trainer_runs as tr


def _kubetune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=tr.trainer_env(),
        timeout=300,
    )


def _manifest(folder: Path, **spec_changes: object) -> Path:
    """A manifest in `folder` with relative paths (they resolve against the manifest's folder)."""
    data = tr.write_rows(folder / "rows.jsonl", 120)
    spec = tr.spec_dict(Path(data.name), Path("out"), maxSteps=12)
    spec["model"]["source"] = os.path.relpath(tr.DEMO_MODEL, folder)
    spec["evaluation"] = {"metrics": ["loss", "exactMatch"], "maxNewTokens": 8}
    spec["evaluation"]["gates"] = [{"metric": "delta.loss", "op": "<", "value": 0}]
    spec.update(spec_changes)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(manifests.document(spec, name="local")))
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kubetune_run_trains_and_reports(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    manifest = _manifest(folder, output={"destination": "out", "mergeAdapter": True})
    # Run from elsewhere: relative paths must resolve against the manifest, not the cwd.
    result = _kubetune("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = folder / "out"
    assert "test split: base vs tuned" in result.stdout
    assert "delta.loss < 0: passed" in result.stdout
    assert f"adapter     file://{out}/adapter" in result.stdout

    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert metrics["delta"]["loss"] == pytest.approx(
        metrics["tuned"]["loss"] - metrics["base"]["loss"]
    )
    assert report["training"]["steps"] == 12
    assert 0 < report["training"]["trainSeconds"] <= report["timings"]["train"]
    assert len(report["history"]) == 12
    assert report["status"]["reproducibility"]["dataHash"] == report["data"]["sha256"]
    assert set(report["data"]["splits"]) == {"train", "validation", "test"}
    # The distribution's version (a CUDA build's torch.__version__ adds a local tag, +cu130).
    assert report["packages"]["torch"] == metadata.version("torch")
    for name in ("adapter", "tokenizer", "merged", "splits", "checkpoints/step-12"):
        assert (out / name / "manifest.json").is_file(), name
    assert (out / "loss-curve.png").read_bytes()[:4] == b"\x89PNG"

    # The adapter loads on its own onto the base; the merged model loads without peft.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tr.DEMO_MODEL, use_safetensors=True)
    tuned = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", use_safetensors=True).eval()
    ids = torch.tensor([[1, 4, 200, 300, 400]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_invalid_manifest_prints_field_errors_and_exits_10(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, training={"maxSteps": 0, "learningRate": 0.1})
    result = _kubetune("run", str(manifest), cwd=tmp_path)
    assert result.returncode == api.EXIT_USER_ERROR
    assert "spec.training.maxSteps" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"method": {"type": "lora", "lora": {"targetModules": ["c_attn"]}}},
            "spec.method.lora.targetModules: c_attn not found in the model; its linear modules "
            "are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
        ({"dataset_license": "unknown"}, "spec.dataset.license.name: 'unknown' is not a license"),
        ({"dataset_source": "missing.jsonl"}, "spec.dataset.source"),
        (
            {"evaluation": {"safety": {"jailbreak": {"promptsSource": "nope.jsonl"}}}},
            "spec.evaluation.safety.jailbreak.promptsSource",
        ),
    ],
)
def test_user_errors_exit_10_with_one_line_and_no_artifacts(
    tmp_path: Path, change: dict[str, object], expected: str
) -> None:
    manifest = _manifest(tmp_path)
    document = yaml.safe_load(manifest.read_text())
    if "dataset_license" in change:
        document["spec"]["dataset"]["license"]["name"] = change["dataset_license"]
    elif "dataset_source" in change:
        document["spec"]["dataset"]["source"] = change["dataset_source"]
    else:
        document["spec"].update(change)
    manifest.write_text(yaml.safe_dump(document))
    result = _kubetune("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert result.returncode == api.EXIT_USER_ERROR, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    for artifact in ("adapter", "report.json", "checkpoints"):
        assert not (tmp_path / "out" / artifact).exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
        (["--max-steps", "-3"], "argument --max-steps: must be at least 1, got -3"),
        (["--max-steps", "many"], "argument --max-steps: expected a whole number, got 'many'"),
        (["--output", "s3://"], "--output (spec.output.destination: "),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_command_line_is_one_error_line_and_exit_10(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    manifest = _manifest(tmp_path)
    result = _kubetune("run", str(manifest), "--no-progress", *args, cwd=tmp_path)
    assert result.returncode == api.EXIT_USER_ERROR, result.stdout + result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_output_may_be_a_file_or_s3_uri(
    tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support import s3

    s3.s3_env(monkeypatch)
    bucket = s3.new_bucket(s3_server)
    manifest = _manifest(tmp_path, storage={"s3": {"endpoint": s3_server, "region": s3.REGION}})
    into_s3 = _kubetune(
        "run",
        str(manifest),
        "--no-progress",
        "--max-steps",
        "2",
        "--output",
        f"s3://{bucket}/run",
        cwd=tmp_path,
    )
    assert into_s3.returncode == 0, into_s3.stdout + into_s3.stderr
    keys = {o["Key"] for o in s3.client(s3_server).list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"run/report.json", "run/adapter/manifest.json"} <= keys
    assert f"adapter     s3://{bucket}/run/adapter" in into_s3.stdout

    folder = tmp_path / "elsewhere"
    into_file = _kubetune(
        "run",
        str(manifest),
        "--no-progress",
        "--max-steps",
        "2",
        "--output",
        folder.as_uri(),
        cwd=tmp_path,
    )
    assert into_file.returncode == 0, into_file.stdout + into_file.stderr
    assert (folder / "report.json").is_file()
    assert (folder / "adapter" / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_progress_bars_keep_log_lines_and_eval_loss_and_follow_evaluation(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, training={**tr.spec_dict(Path("d"), Path("o"))["training"]})
    # stdout and stderr into one pipe, as on a terminal: where a bar and a log line meet shows.
    shown = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(manifest)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=tr.trainer_env(),
        timeout=300,
    )
    assert shown.returncode == 0, shown.stdout
    text = shown.stdout
    assert text.count("checkpoint step ") == 3  # steps 2, 4, 6
    for at in [i for i in range(len(text)) if text.startswith("checkpoint step ", i)]:
        assert text[at - 1] in "\r\n", text[at - 40 : at + 20]  # on its own line
    renders = [part for part in text.replace("\r", "\n").split("\n") if "loss=" in part]
    first_eval = next(i for i, part in enumerate(renders) if "eval=" in part)
    assert first_eval < len(renders) - 1
    assert all("eval=" in part for part in renders[first_eval:]), renders  # kept between evals
    assert "evaluate tuned" in text and "evaluate base" in text  # evaluation has bars too
    assert "Loading weights" in text

    quiet = _kubetune("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    for bar in ("Loading weights", "evaluate tuned", "step/s", "it/s"):
        assert bar not in quiet.stdout + quiet.stderr
