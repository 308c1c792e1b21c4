"""Operator settings from the environment: the only place that reads env.

The Helm chart sets these variables; `kubetune operator` flags override some of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


class SettingsError(ValueError):
    """A setting has a value the operator cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    namespace: str = ""  # empty: watch every namespace
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    metrics_port: int = 8080
    health_port: int = 8081
    progress_interval: float = 10.0  # seconds between reads of a running trainer's /metrics
    # At most one progress-only status patch per job per this many seconds; phase changes are
    # written at once. Lowered only by tests that want to see several progress updates.
    progress_min_interval: float = 10.0
    license_allowlist: tuple[str, ...] = field(default_factory=tuple)
    log_format: Literal["plain", "json"] = "plain"

    @property
    def allowed_licenses(self) -> list[str] | None:
        return list(self.license_allowlist) or None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected an integer port, got {raw!r}") from None
    if not 0 < value < 65536:
        raise SettingsError(f"{name}: port {value} is outside 1-65535")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected seconds as a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name}: must be > 0 seconds, got {raw!r}")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read KUBETUNE_* variables; raises SettingsError naming the variable at fault."""
    env = os.environ if env is None else env
    log_format = env.get("KUBETUNE_LOG_FORMAT", "plain").strip() or "plain"
    if log_format not in ("plain", "json"):
        raise SettingsError(f"KUBETUNE_LOG_FORMAT: expected plain or json, got {log_format!r}")
    allow = tuple(
        item.strip()
        for item in env.get("KUBETUNE_LICENSE_ALLOWLIST", "").split(",")
        if item.strip()
    )
    return Settings(
        namespace=env.get("KUBETUNE_NAMESPACE", "").strip(),
        trainer_image=env.get("KUBETUNE_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE,
        metrics_port=_int(env, "KUBETUNE_METRICS_PORT", 8080),
        health_port=_int(env, "KUBETUNE_HEALTH_PORT", 8081),
        progress_interval=_seconds(env, "KUBETUNE_PROGRESS_INTERVAL", 10.0),
        progress_min_interval=_seconds(env, "KUBETUNE_PROGRESS_MIN_INTERVAL", 10.0),
        license_allowlist=allow,
        log_format="json" if log_format == "json" else "plain",
    )
