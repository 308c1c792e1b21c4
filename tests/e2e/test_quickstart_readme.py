"""The README's quickstart table is what `kubetune run examples/quickstart.yaml` prints today.

The CPU run is deterministic (fixed seed, data and split), so every row is compared as printed,
except the latency rows (latencyP50Ms, latencyP95Ms, generationTokensPerSecond): they are
wall-clock measurements of the machine, shown in the README as an example only. When this test
fails, rerun the quickstart and paste its table into README.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMING_ROWS = ("latencyP50Ms", "latencyP95Ms", "generationTokensPerSecond")
START, END = "test split: base vs tuned", "artifacts:"


def table(text: str) -> list[str]:
    """The lines between the table's title and its artifacts, timing rows left out."""
    lines = text.splitlines()
    begin = lines.index(START)
    rows = lines[begin + 1 : lines.index(END, begin)]
    return [r.rstrip() for r in rows if not r.startswith(TIMING_ROWS)]


def readme_table() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    return table(section[: section.index("\n## ")])


def test_the_readme_shows_a_table_with_safety_rows() -> None:
    rows = readme_table()
    names = {row.split()[0] for row in rows}
    assert {"exactMatch", "toxicityRate", "refusalRate", "oodPerplexity"} <= names, rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_quickstart_table_matches_a_fresh_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune.cli",
            "run",
            "examples/quickstart.yaml",
            "--no-progress",
            "--output",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=850,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert table(done.stdout) == readme_table(), done.stdout
