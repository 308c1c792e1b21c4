"""The real kubectl and helm binaries the tests drive."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def binary(name: str) -> str:
    """kubectl or helm: from .tools/bin (scripts/install-tools.sh), else from PATH."""
    local = ROOT / ".tools" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: run scripts/install-tools.sh .tools/bin")
    return found
