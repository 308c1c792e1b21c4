"""examples/data/catalogue.jsonl is exactly what scripts/make_catalogue_data.py generates, and
its test split cannot be answered by copying: every answer reorders the input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "catalogue.jsonl"


def test_the_shipped_data_is_what_the_script_generates(tmp_path: Path) -> None:
    out = tmp_path / "catalogue.jsonl"
    script = ROOT / "scripts" / "make_catalogue_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True)
    assert out.read_bytes() == DATA.read_bytes()


def test_rows_are_unique_and_no_answer_appears_in_its_input() -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len(rows) == 800
    assert len({r["input"] for r in rows}) == len(rows)
    assert all(r["output"] not in r["input"] for r in rows)
    assert "CC0-1.0" in (DATA.parent / "LICENSE").read_text().split("catalogue.jsonl")[1]
