"""Small, fast trainer configs on the demo model and a slice of the quickstart data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetune import api

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "examples" / "demo-model"
QUICKSTART = ROOT / "examples" / "data" / "quickstart.jsonl"


def write_rows(path: Path, rows: int = 96) -> Path:
    """The first `rows` quickstart rows (alpaca)."""
    lines = QUICKSTART.read_text().splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def spec_dict(data: Path, output: Path, **training: Any) -> dict[str, Any]:
    """A small LoRA job: few steps, loss-only evaluation on a few test rows."""
    return {
        "model": {"source": str(DEMO_MODEL), "revision": "demo-v1"},
        "dataset": {
            "source": str(data),
            "format": "alpaca",
            "license": {"name": "CC0-1.0", "usage": "research"},
            "split": {"validation": 0.1, "test": 0.1, "seed": 0},
            "maxSeqLength": 128,
        },
        "method": {
            "type": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
        },
        "training": {
            "maxSteps": 6,
            "learningRate": 0.002,
            "batchSize": 8,
            "evalEverySteps": 3,
            "checkpointEverySteps": 2,
            "seed": 7,
            **training,
        },
        "evaluation": {"metrics": ["loss", "exactMatch"], "maxSamples": 4, "maxNewTokens": 4},
        "output": {"destination": str(output)},
        "resources": {"gpus": 0},
    }


def config(data: Path, output: Path, **training: Any) -> api.TrainerConfig:
    return api.TrainerConfig(
        name="test", spec=api.FineTuneJobSpec.model_validate(spec_dict(data, output, **training))
    )


def write_config(path: Path, cfg: api.TrainerConfig | dict[str, Any]) -> Path:
    body = cfg.to_api() if isinstance(cfg, api.TrainerConfig) else cfg
    path.write_text(json.dumps(body))
    return path


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: the CI machine is small and shared.
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def start_trainer(config_path: Path, termination: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune_trainer",
            "--config",
            str(config_path),
            "--metrics-port",
            "0",
            "--termination-log",
            str(termination),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=trainer_env(),
    )


def run_trainer(config_path: Path, termination: Path, timeout: float = 240) -> tuple[int, str]:
    proc = start_trainer(config_path, termination)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def torchrun(config: Path, termination: Path, *, timeout: int) -> subprocess.CompletedProcess[str]:
    """The trainer in 2 CPU processes (gloo) under torchrun, as a multi-GPU Job runs it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free rendezvous port on loopback (--master-port 0 hangs here)
            "--nproc-per-node",
            "2",
            "-m",
            "kubetune_trainer",
            "--config",
            str(config),
            "--metrics-port",
            "0",
            "--termination-log",
            str(termination),
        ],
        capture_output=True,
        text=True,
        env=trainer_env(),
        timeout=timeout,
    )
