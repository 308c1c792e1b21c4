"""Data-parallel training under torchrun: 2 CPU processes (gloo), only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import trainer_runs as tr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_processes_train_and_resume(tmp_path: Path) -> None:
    data = tr.write_rows(tmp_path / "rows.jsonl", 120)
    output = tmp_path / "out"
    config = tr.write_config(tmp_path / "c.json", tr.config(data, output, maxSteps=4))

    result = tr.torchrun(config, tmp_path / "term", timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["training"]["worldSize"] == 2
    assert report["training"]["steps"] == 4
    # Rank 0 alone wrote: one stage log, one final checkpoint, one adapter.
    assert result.stdout.count("[evaluate]") == 1
    assert sorted(p.parent.name for p in (output / "checkpoints").glob("*/manifest.json")) == [
        "step-2",
        "step-4",
    ]
    adapter = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert json.loads((tmp_path / "term").read_text())["phase"] == "Succeeded"

    # Both ranks restore the newest checkpoint: nothing left to train, same adapter again.
    again = tr.torchrun(config, tmp_path / "term", timeout=280)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step-4" in again.stdout
    assert json.loads((output / "report.json").read_text())["training"]["steps"] == 4
    for name, tensor in load_file(str(output / "adapter" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(tensor, adapter[name])
