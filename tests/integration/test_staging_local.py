"""`kubetune run` with spec.staging: a short real training run of the demo model, then a real
vLLM CPU server (from .tools/vllm, scripts/install-vllm.sh) serving the adapter on the base,
real guidellm with a 10 s Poisson load of test-split prompts, and the staging table with its
gates. Also: without the vLLM venv the command fails in seconds, before training, naming the
install script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VLLM = ROOT / ".tools" / "vllm"


def manifest(tmp_path: Path, **staging: Any) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["model"]["source"] = str(ROOT / "examples" / "demo-model")
    spec["dataset"]["source"] = str(ROOT / "examples" / "data" / "quickstart.jsonl")
    spec["output"] = {"destination": str(tmp_path / "out")}
    spec["evaluation"] = {"maxSamples": 4, "maxNewTokens": 2, "metrics": ["loss"]}
    spec["staging"] = {
        "gpus": 0,
        "load": {"type": "poisson", "rate": 2, "durationSeconds": 10, "maxPrompts": 16},
        "costPerGpuHour": 0.1,
        "gates": {"p95TtftMs": 120000, "minOutputTokensPerSecond": 0.01},
        **staging,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(
    path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", str(path), "--max-steps", "4", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def test_without_vllm_it_fails_before_training_naming_the_install_script(tmp_path: Path) -> None:
    done = run(manifest(tmp_path), env={"KUBETUNE_VLLM": str(tmp_path / "none")})
    assert done.returncode == 10, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: spec.staging: no vLLM at ") and "install-vllm.sh" in line
    assert not (tmp_path / "out").exists()  # nothing trained


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kubetune_run_stages_the_adapter_on_vllm_with_guidellm(tmp_path: Path) -> None:
    if not (VLLM / "bin" / "vllm").exists():
        pytest.fail(f"error: {VLLM}/bin/vllm not found: run scripts/install-vllm.sh", False)
    done = run(manifest(tmp_path), env={"KUBETUNE_VLLM": str(VLLM)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "staging: adapter on vLLM (CPU), load poisson 2 req/s, 10s per level" in out
    lines = out.split("staging: adapter", 1)[1].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("load"))
    row = lines[header + 1].split()
    assert row[:2] == ["poisson", "2/s"], lines
    requests, errors = int(row[2]), int(row[3])
    assert requests > 0 and errors == 0
    ttft50, ttft95, tok_s, cost = float(row[4]), float(row[5]), float(row[8]), float(row[9])
    assert 0 < ttft50 <= ttft95 and tok_s > 0 and cost > 0
    assert "gate staging.ttftP95Ms <= 120000: passed" in out
    assert "gate staging.outputTokensPerSecond >= 0.01: passed" in out
    assert "promotion: Promoted: 0 evaluation and 2 staging gate(s) passed" in out


@pytest.mark.parametrize("image", [None, "registry.example.com/a-vllm-of-ones-own:1"])
def test_a_quantized_export_vllm_cannot_serve_fails_before_training(
    tmp_path: Path, image: str | None
) -> None:
    """Staging the GGUF export: refused by the spec with the default engine, and with an image
    of one's own by `kubetune run`'s look at its own vLLM (no GGUF loader in vLLM 0.32): one
    error line naming the format and why, in seconds, nothing trained."""
    if not (VLLM / "bin" / "vllm").exists():
        pytest.fail(f"error: {VLLM}/bin/vllm not found: run scripts/install-vllm.sh", False)
    path = manifest(tmp_path, artifact="gguf-q8_0", **({"image": image} if image else {}))
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["output"].update(mergeAdapter=True, quantize=["gguf-q8_0"])
    path.write_text(yaml.safe_dump(doc))
    done = run(path, env={"KUBETUNE_VLLM": str(VLLM)})
    assert done.returncode == 10, done.stderr
    (line,) = done.stderr.strip().splitlines()
    if image is None:
        assert (
            "spec.staging.artifact: gguf-q8_0: the default staging engine cannot serve it" in line
        )
        assert "no GGUF loader" in line
    else:
        assert line.startswith(f"error: spec.staging.artifact: gguf-q8_0: the vLLM at {VLLM}")
        assert "has no gguf loader" in line
    assert not (tmp_path / "out").exists()
