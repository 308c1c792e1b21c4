"""Preemption: SIGTERM after k steps commits a checkpoint and exits 12; the restart resumes from
it and ends exactly like an uninterrupted run (same optimizer steps, same adapter weights)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubetune import api
from tests.support import trainer_runs as tr

STEPS = 24


def _adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_then_restart_matches_uninterrupted_run(tmp_path: Path) -> None:
    data = tr.write_rows(tmp_path / "rows.jsonl", 160)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg_a = tr.write_config(tmp_path / "a.json", tr.config(data, straight, maxSteps=STEPS))
    cfg_b = tr.write_config(tmp_path / "b.json", tr.config(data, resumed, maxSteps=STEPS))

    code, out = tr.run_trainer(cfg_a, tmp_path / "term-a")
    assert code == 0, out

    # Preempt run B as soon as its first checkpoint is committed (manifest present).
    proc = tr.start_trainer(cfg_b, tmp_path / "term-b")
    first = resumed / "checkpoints" / "step-2" / "manifest.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out_b, _ = proc.communicate(timeout=120)
    assert proc.returncode == api.EXIT_PREEMPTED, out_b
    assert "SIGTERM at step" in out_b
    message = json.loads((tmp_path / "term-b").read_text())
    assert "checkpoint committed" in message["message"]
    committed = sorted((resumed / "checkpoints").glob("step-*/manifest.json"))
    stopped_at = max(int(p.parent.name.split("-")[1]) for p in committed)
    assert 2 <= stopped_at < STEPS
    assert not (resumed / "adapter").exists()  # no artifacts from an interrupted run

    code, out_b2 = tr.run_trainer(cfg_b, tmp_path / "term-b2")
    assert code == 0, out_b2
    assert f"resumed from file://{resumed}/checkpoints/step-{stopped_at}" in out_b2

    report_a = json.loads((straight / "report.json").read_text())
    report_b = json.loads((resumed / "report.json").read_text())
    assert report_b["training"]["steps"] == report_a["training"]["steps"] == STEPS
    assert report_b["training"]["resumedFrom"].endswith(f"step-{stopped_at}")
    # The history continues where the checkpoint left off: one entry per step, in order.
    assert [h["step"] for h in report_b["history"]] == list(range(1, STEPS + 1))
    assert report_b["history"][-1]["loss"] == pytest.approx(report_a["history"][-1]["loss"], 1e-4)
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    # keepCheckpoints (2): only the newest survive.
    assert len(list((resumed / "checkpoints").glob("step-*/manifest.json"))) == 2


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_with_another_training_config_refuses_naming_the_fields(tmp_path: Path) -> None:
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    output = tmp_path / "out"
    code, out = tr.run_trainer(
        tr.write_config(tmp_path / "a.json", tr.config(data, output)), tmp_path / "term"
    )
    assert code == 0, out
    report_before = (output / "report.json").read_bytes()
    splits_before = (output / "splits" / "manifest.json").read_bytes()

    changed = tr.config(data, output, learningRate=0.0001, maxSteps=9)
    code, out = tr.run_trainer(tr.write_config(tmp_path / "b.json", changed), tmp_path / "term")
    assert code == api.EXIT_USER_ERROR, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "spec.training.learningRate 0.002 -> 0.0001" in errors[0]
    assert "spec.training.maxSteps 6 -> 9" in errors[0]
    assert "new output destination" in errors[0]
    assert "resumed from" not in out and "Traceback" not in out
    # Refused before anything was written: the finished run's files are untouched.
    assert (output / "report.json").read_bytes() == report_before
    assert (output / "splits" / "manifest.json").read_bytes() == splits_before

    # What cannot change the weights (checkpoint cadence, evaluation) may differ.
    same = tr.config(data, output, checkpointEverySteps=3, keepCheckpoints=3)
    same.spec.evaluation.maxNewTokens = 2
    code, out = tr.run_trainer(tr.write_config(tmp_path / "c.json", same), tmp_path / "term")
    assert code == 0, out
    assert f"resumed from file://{output}/checkpoints/step-6" in out


def _signal_at(proc: subprocess.Popen[str], marker: str, sig: signal.Signals) -> str:
    """Send `sig` as soon as the trainer prints a line containing `marker`; all its output."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=120)
    return "".join(seen) + rest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_before_training_exits_12_with_a_message(tmp_path: Path) -> None:
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    config = tr.write_config(tmp_path / "c.json", tr.config(data, tmp_path / "out"))
    proc = tr.start_trainer(config, tmp_path / "term")
    out = _signal_at(proc, "[model]", signal.SIGTERM)
    assert proc.returncode == api.EXIT_PREEMPTED, out
    assert "error: SIGTERM during the model stage, before training: nothing to save" in out
    assert "Traceback" not in out
    message = json.loads((tmp_path / "term").read_text())
    assert "phase" not in message  # preempted is not failed: the Job retries
    assert "SIGTERM during the model stage" in message["message"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_checkpoints_and_a_signal_after_training_redoes_only_evaluation(
    tmp_path: Path,
) -> None:
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    output = tmp_path / "out"
    cfg = tr.config(data, output)
    cfg.spec.evaluation.maxSamples, cfg.spec.evaluation.maxNewTokens = None, 32
    config = tr.write_config(tmp_path / "c.json", cfg)

    # Ctrl-C during training: the step finishes, a checkpoint is committed, and the message
    # says that rerunning resumes.
    proc = tr.start_trainer(config, tmp_path / "term")
    out = _signal_at(proc, "checkpoint step 2:", signal.SIGINT)
    assert proc.returncode == api.EXIT_PREEMPTED, out
    assert "KeyboardInterrupt" not in out and "Traceback" not in out
    stopped = [line for line in out.splitlines() if line.startswith("error: SIGINT at step ")]
    assert stopped and "checkpoint committed; rerunning resumes from it" in stopped[0], out
    step = int(stopped[0].split("at step ")[1].split("/")[0])
    assert (output / "checkpoints" / f"step-{step}" / "manifest.json").is_file()

    # SIGTERM during evaluation: training is committed, so the rerun only evaluates.
    proc = tr.start_trainer(config, tmp_path / "term")
    out = _signal_at(proc, "[evaluate]", signal.SIGTERM)
    assert proc.returncode == api.EXIT_PREEMPTED, out
    assert f"resumed from file://{output}/checkpoints/step-{step}" in out
    assert (
        "error: SIGTERM during the evaluate stage: training is done and its checkpoint "
        "(step 6) committed; rerunning redoes only evaluation, export and report"
    ) in out
    assert (output / "checkpoints" / "step-6" / "manifest.json").is_file()
    assert not (output / "adapter").exists() and not (output / "report.json").exists()

    code, out = tr.run_trainer(config, tmp_path / "term")
    assert code == 0, out
    assert f"resumed from file://{output}/checkpoints/step-6 (step 6/6)" in out
    report = json.loads((output / "report.json").read_text())
    assert [h["step"] for h in report["history"]] == list(range(1, 7))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_corrupted_newest_checkpoint_falls_back_to_the_newest_that_verifies(
    tmp_path: Path,
) -> None:
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    output = tmp_path / "out"
    config = tr.write_config(tmp_path / "c.json", tr.config(data, output))
    code, out = tr.run_trainer(config, tmp_path / "term")
    assert code == 0, out
    first = json.loads((output / "report.json").read_text())
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-4", "step-6"]

    # One flipped byte in the newest checkpoint: same size, another sha256.
    weights = output / "checkpoints" / "step-6" / "trainable.safetensors"
    corrupted = bytearray(weights.read_bytes())
    corrupted[-1] ^= 0xFF
    weights.write_bytes(bytes(corrupted))

    code, out = tr.run_trainer(config, tmp_path / "term")
    assert code == 0, out
    step6 = f"file://{output}/checkpoints/step-6"
    assert f"{step6}: trainable.safetensors does not match its manifest (sha256 " in out
    assert f"falling back to file://{output}/checkpoints/step-4" in out
    assert f"resumed from file://{output}/checkpoints/step-4 (step 4/6)" in out
    report = json.loads((output / "report.json").read_text())
    assert report["training"]["resumedFrom"].endswith("step-4")
    assert any("sha256" in note and "skipped and deleted" in note for note in report["notes"])
    # Steps 5 and 6 were trained again, to the same result; step-6 is whole again.
    assert [h["step"] for h in report["history"]] == list(range(1, 7))
    assert report["history"][-1]["loss"] == pytest.approx(first["history"][-1]["loss"], 1e-4)
    manifest = json.loads((output / "checkpoints" / "step-6" / "manifest.json").read_text())
    recorded = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert recorded["trainable.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_runs_litter_is_gone_after_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a SIGKILL during a checkpoint leaves - a temp file inside a committed checkpoint, a
    checkpoint folder without its manifest, the run's scratch folder - the next run removes,
    and it leaves nothing of its own. A live run's scratch folder stays."""
    import fcntl

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    output = tmp_path / "out"
    code, out = tr.run_trainer(
        tr.write_config(tmp_path / "a.json", tr.config(data, output)), tmp_path / "term"
    )
    assert code == 0, out
    assert list(temp.glob("kubetune-*")) == []  # a finished run leaves no scratch

    checkpoints = output / "checkpoints"
    shutil.rmtree(checkpoints / "step-6")  # killed after step 4 ...
    (checkpoints / "step-4" / ".kubetune-tmp-k1x2").write_bytes(b"half a file")
    (checkpoints / "step-6").mkdir()  # ... while writing step 6
    (checkpoints / "step-6" / "trainable.safetensors").write_bytes(b"part")
    (checkpoints / "step-6" / ".kubetune-tmp-q9z8").write_bytes(b"part")
    (checkpoints / "step-8").mkdir()
    (checkpoints / "step-8" / ".kubetune-tmp-a1b2").write_bytes(b"")
    dead = temp / "kubetune-run-dead"
    (dead / "model").mkdir(parents=True)
    (dead / "model" / "model.safetensors").write_bytes(b"downloaded weights")
    (dead / ".lock").touch()
    alive = temp / "kubetune-run-alive"
    alive.mkdir()
    with (alive / ".lock").open("wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # keepCheckpoints 1: committing step-6 rotates step-4 (with its temp file) away.
        again = tr.config(data, output, keepCheckpoints=1)
        code, out = tr.run_trainer(tr.write_config(tmp_path / "b.json", again), tmp_path / "t")
        assert code == 0, out
        assert (alive / ".lock").exists()

    assert "removed 2 uncommitted checkpoint folder(s)" in out
    assert f"resumed from file://{checkpoints}/step-4 (step 4/6)" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-6"]
    assert not list(output.rglob(".kubetune-tmp-*"))
    assert [p.name for p in temp.glob("kubetune-*")] == ["kubetune-run-alive"]
