"""Read Dockerfiles without a Docker daemon (none runs on these machines)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_DOCKERFILE = ROOT / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer-image" / "Dockerfile"

Steps = list[tuple[str, str]]


def instructions(path: Path) -> Steps:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def args_of(steps: Steps, instruction: str) -> list[str]:
    return [arguments for name, arguments in steps if name == instruction]


def final_stage(steps: Steps) -> Steps:
    starts = [i for i, (name, _) in enumerate(steps) if name == "FROM"]
    return steps[starts[-1] :]


def env_of(steps: Steps) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in args_of(steps, "ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", arguments):
            env[key] = value
    return env


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"use the exec (JSON) form: {arguments}"
    return [str(v) for v in value]


def entrypoint(path: Path, venv_bin: Path) -> list[str]:
    """The image's ENTRYPOINT with its program taken from this venv (same package, same
    console scripts as the image installs)."""
    program, *rest = exec_form(args_of(final_stage(instructions(path)), "ENTRYPOINT")[0])
    return [str(venv_bin / program), *rest]
