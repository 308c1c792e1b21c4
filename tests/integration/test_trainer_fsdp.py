"""A full fine-tune under torchrun is sharded with FSDP: 2 CPU processes (gloo), rank 0 alone
writes, a restart resumes from the sharded run's checkpoint, and the result is the same model
a single process trains with the same global batch (2 micro-batches per optimizer step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubetune import api
from tests.support import trainer_runs as tr

STEPS = 4


def _full_config(data: Path, output: Path, path: Path, **training: Any) -> Path:
    spec = tr.spec_dict(data, output, maxSteps=STEPS, learningRate=0.0005, **training)
    spec["method"] = {"type": "full"}
    # 3 validation batches: rank 1 has one fewer to evaluate than rank 0, yet must join every
    # forward of the sharded model.
    spec["dataset"]["split"]["validation"] = 0.15
    config = api.TrainerConfig(name="test", spec=api.FineTuneJobSpec.model_validate(spec))
    return tr.write_config(path, config)


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_fine_tune_is_sharded_resumes_and_matches_one_process(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = tr.write_rows(tmp_path / "rows.jsonl", 120)
    output = tmp_path / "fsdp"
    config = _full_config(data, output, tmp_path / "fsdp.json")

    first = tr.torchrun(config, tmp_path / "term", timeout=150)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["training"]["worldSize"] == 2
    assert report["training"]["parallelism"] == "fsdp"
    assert report["training"]["steps"] == STEPS
    assert "FSDP: 2 decoder layers and the root sharded over 2 ranks" in first.stdout
    assert first.stdout.count("[evaluate]") == 1  # rank 0 alone evaluates and writes
    assert sorted(p.parent.name for p in (output / "checkpoints").glob("*/manifest.json")) == [
        "step-2",
        "step-4",
    ]
    # The checkpoint holds full tensors (gathered from the shards), not one rank's half.
    base = load_file(str(tr.DEMO_MODEL / "model.safetensors"))
    saved = load_file(str(output / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in base.items()
    }
    straight = _weights(output)
    for name, tensor in saved.items():
        torch.testing.assert_close(straight[name], tensor)
    assert max(float((straight[k] - base[k]).abs().max()) for k in base) > 1e-4  # it trained
    assert json.loads((tmp_path / "term").read_text())["phase"] == "Succeeded"

    # A crash after step 2: the newest committed checkpoint is step-2 and no artifact exists.
    shutil.rmtree(output / "checkpoints" / "step-4")
    shutil.rmtree(output / "model")
    (output / "report.json").unlink()
    again = tr.torchrun(config, tmp_path / "term2", timeout=150)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from file://{output}/checkpoints/step-2" in again.stdout
    resumed = json.loads((output / "report.json").read_text())
    assert resumed["training"]["resumedFrom"].endswith("step-2")
    assert [h["step"] for h in resumed["history"]] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in report["history"]]
    after_resume = _weights(output)
    for name, tensor in straight.items():
        torch.testing.assert_close(after_resume[name], tensor, atol=1e-6, rtol=1e-5)

    # One process, two micro-batches per step: the same batches as the two ranks' step, so
    # the sharded run must have computed the same gradients and the same updates.
    single_out = tmp_path / "single"
    single = _full_config(data, single_out, tmp_path / "single.json", gradientAccumulationSteps=2)
    code, out = tr.run_trainer(single, tmp_path / "term3", timeout=150)
    assert code == 0, out
    reference = json.loads((single_out / "report.json").read_text())
    assert reference["training"]["parallelism"] == "none"
    for mine, theirs in zip(resumed["history"], reference["history"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ("evalLoss" in mine) == ("evalLoss" in theirs)
        if "evalLoss" in theirs:
            assert mine["evalLoss"] == pytest.approx(theirs["evalLoss"], rel=1e-5)
    assert sum("evalLoss" in h for h in reference["history"]) == 2
    tuned, expected = resumed["metrics"]["tuned"], reference["metrics"]["tuned"]
    assert tuned["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert tuned["loss"] < resumed["metrics"]["base"]["loss"]

    # The export is a plain transformers model with the single-process weights.
    model = AutoModelForCausalLM.from_pretrained(output / "model", dtype=torch.float32)
    single_weights = _weights(single_out)
    loaded = dict(model.named_parameters())
    for name, tensor in single_weights.items():
        torch.testing.assert_close(loaded[name].detach(), tensor, atol=1e-5, rtol=1e-4)

    # The single process's step-2 checkpoint (optimizer state keyed by position) resumes under
    # FSDP too: a job may come back with another number of GPUs.
    moved = tmp_path / "moved"
    shutil.copytree(single_out / "checkpoints" / "step-2", moved / "checkpoints" / "step-2")
    regrown = _full_config(data, moved, tmp_path / "moved.json")
    grown = tr.torchrun(regrown, tmp_path / "term4", timeout=150)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert f"resumed from file://{moved}/checkpoints/step-2" in grown.stdout
    assert json.loads((moved / "report.json").read_text())["training"]["steps"] == STEPS
