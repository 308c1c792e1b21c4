"""The planner against measured peak memory on CPU (the trainer's model code and batch path,
one micro-batch, AdamW): within 25 %, for the demo model and a 23M-parameter Llama config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api, plan
from tests.support.plan_models import larger_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo-model"
# Large allocations straight from mmap and back to the OS when freed: RSS then follows the
# tensors alive, instead of glibc's growing heap keeping freed blocks resident.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def job_spec(model: Path, method: str, batch: int, length: int, checkpointing: bool) -> Any:
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec["model"]["source"] = str(model)
    spec["method"] = (
        {"type": "full"}
        if method == "full"
        else {"type": method, "lora": {"r": 16, "targetModules": ["all-linear"]}}
    )
    spec["training"].update(batchSize=batch, gradientCheckpointing=checkpointing)
    spec["dataset"]["maxSeqLength"] = length
    return api.FineTuneJobSpec.model_validate(spec)


def measure(model: Path, spec: api.FineTuneJobSpec) -> dict[str, int]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.plan_memory",
            str(model),
            spec.model_dump_json(by_alias=True),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **MALLOC},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def larger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return larger_model(tmp_path_factory.mktemp("larger"))


CASES = [
    ("demo", "full", 8, 256, False),
    ("demo", "lora", 4, 512, True),
    ("demo", "qlora", 4, 256, False),
    ("larger", "full", 2, 256, False),
    ("larger", "lora", 2, 256, True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "method", "batch", "length", "checkpointing"), CASES)
def test_estimate_is_within_25_percent_of_measured_peak(
    larger: Path, model: str, method: str, batch: int, length: int, checkpointing: bool
) -> None:
    folder = DEMO if model == "demo" else larger
    spec = job_spec(folder, method, batch, length, checkpointing)
    config, tensors = plan.read_model(folder)
    estimate = plan.estimate(config, tensors, spec, device_memory=None, on_gpu=False)
    chosen = estimate.get(plan.requested_method(spec))
    measured = measure(folder, spec)
    assert chosen.trainable == measured["trainable"]  # parameter counts: exact
    if method != "qlora":  # torch counts a 4-bit weight's packed bytes, not its values
        assert chosen.parameters == measured["total"]
    ratio = chosen.memory.total / measured["peakBytes"]
    assert 0.75 <= ratio <= 1.25, (
        f"estimate {plan.gib(chosen.memory.total)} vs measured "
        f"{plan.gib(measured['peakBytes'])} (ratio {ratio:.2f})"
    )
