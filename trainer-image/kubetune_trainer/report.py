"""What the trainer tells the world: live metrics, report.json, the loss curve, the termination
message.

- ``/metrics`` (Prometheus, port ``api.TRAINER_METRICS_PORT``): the operator reads these gauge
  names to fill ``status.progress``; keep them stable.
- ``report.json``: everything about the run (complete; in the output location).
- termination message: compact JSON (< 4 KB) shaped like ``api.FineTuneJobStatus`` fields, so
  the operator can copy it into the status even when S3 is unreachable.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from kubetune import api

TERMINATION_LIMIT = 4096
PACKAGES = (
    "kubetune",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "tokenizers",
    "safetensors",
    "boto3",
)

# ---------------------------------------------------------------------------------------------
# live metrics

GAUGES = {
    "step": "Optimizer steps done.",
    "total_steps": "Optimizer steps planned.",
    "loss": "Latest training loss (mean per target token).",
    "eval_loss": "Latest validation loss.",
    "learning_rate": "Current learning rate.",
    "tokens_per_second": "Training throughput in real (non-padding) tokens per second.",
    "epoch": "Epochs done (fractional).",
    "peak_memory_bytes": "Peak memory: GPU allocator peak on GPU, max RSS on CPU.",
    "eta_seconds": "Estimated seconds until training ends.",
}


class Telemetry:
    """The ``kubetune_trainer_*`` gauges and, when ``port`` > 0, an HTTP server for them."""

    def __init__(self, port: int = 0, host: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        self.gauges = {
            name: Gauge(f"kubetune_trainer_{name}", doc, registry=self.registry)
            for name, doc in GAUGES.items()
        }
        # No validation loss until the first evaluation: NaN (absent to the operator, which
        # skips non-finite values), not the 0 a fresh gauge reads.
        self.gauges["eval_loss"].set(math.nan)
        self.server: Any = None
        self.port = 0
        if port > 0:
            from prometheus_client import start_http_server

            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = self.server.server_port

    def update(self, **values: float | None) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.gauges[name].set(value)

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def peak_memory_bytes() -> int:
    """GPU allocator peak when on GPU, else the process's max RSS (Linux reports KiB)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# ---------------------------------------------------------------------------------------------
# reproducibility


def config_hash(config: api.TrainerConfig) -> str:
    """sha256 of the resolved config, canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(config.to_api(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# ---------------------------------------------------------------------------------------------
# files


def loss_curve(history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss per step and validation loss per evaluation, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["evalLoss"]) for h in history if "evalLoss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=1, sort_keys=False, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# the termination message


def termination_message(status: api.FineTuneJobStatus) -> str:
    """Compact JSON of the status fields the trainer knows, within 4 KB.

    The kubelet truncates termination messages at 4 KB, so whole fields are added in order of
    importance while they fit (what is sent stays valid JSON). Gates decide promotion and come
    first; the operator reads gates that did not fit as Unknown, and report.json has it all.
    """
    full = status.to_api()
    if "promotion" in full:
        # Compact: its artifacts and gates repeat status.artifacts and status.gates (the operator
        # fills them back in).
        full["promotion"] = {
            k: v for k, v in full["promotion"].items() if k not in ("artifacts", "gates")
        }
    data: dict[str, Any] = {"phase": status.phase, "message": (status.message or "")[:2000]}
    data = {k: v for k, v in data.items() if v is not None}
    for name in (
        "gates",
        "artifacts",
        "promotion",
        "metrics",
        "usage",
        "reproducibility",
        "quantized",
        "progress",
    ):
        if name in full:
            candidate = {**data, name: full[name]}
            if len(json.dumps(candidate, separators=(",", ":")).encode()) < TERMINATION_LIMIT:
                data = candidate
    return json.dumps(data, separators=(",", ":"))


def write_termination(text: str, path: str | None) -> bool:
    """Write where the kubelet reads it; False (nothing written) when that path is not there,
    as in local runs."""
    if not path:
        return False
    target = Path(path)
    if not target.parent.is_dir():
        return False
    try:
        target.write_text(text)
    except OSError:
        return False
    return True


def failure_status(message: str, *, preempted: bool = False) -> api.FineTuneJobStatus:
    """A preempted pod is not a failed job (it will be retried): no phase then."""
    return api.FineTuneJobStatus(phase=None if preempted else "Failed", message=message[:3000])
