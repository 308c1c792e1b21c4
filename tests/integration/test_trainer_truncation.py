"""Truncation is never silent: the trainer warns above a share of truncated rows and refuses
when no training answer survives whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer.data import IGNORE_INDEX, Encoded, check_truncation
from kubetune_trainer.errors import UserError
from tests.support import trainer_runs as tr


def _run(tmp_path: Path, max_len: int) -> tuple[int, str, Path]:
    data = tr.write_rows(tmp_path / "rows.jsonl", 96)
    output = tmp_path / "out"
    cfg = tr.config(data, output, maxSteps=2)
    cfg.spec.dataset.maxSeqLength = max_len
    code, out = tr.run_trainer(tr.write_config(tmp_path / "c.json", cfg), tmp_path / "term")
    return code, out, output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_answers_cut_in_every_row_is_refused(tmp_path: Path) -> None:
    # 16 tokens: the demo rows' prompts alone are longer, so every answer loses its end.
    code, out, output = _run(tmp_path, 16)
    assert code == api.EXIT_USER_ERROR, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: spec.dataset.maxSeqLength: 16 tokens cut the answer of every one of the 75 "
        "training rows, so the model would never learn where an answer ends; the longest row "
        "has 70 tokens: raise maxSeqLength or shorten the rows"
    ], out
    assert not (output / "checkpoints").exists() and not (output / "adapter").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_many_truncated_rows_warn_in_the_log_and_the_report(tmp_path: Path) -> None:
    code, out, output = _run(tmp_path, 64)
    assert code == 0, out
    warning = (
        "spec.dataset.maxSeqLength: 18 of 75 training rows (24%) are longer than 64 tokens and "
        "were truncated, 0 of them losing the end of their answer; the longest row has 70 tokens"
    )
    assert f"warning: {warning}" in out
    report = json.loads((output / "report.json").read_text())
    assert any(note.startswith(warning) for note in report["notes"])
    assert report["data"]["truncated"]["train"] == 18


def test_no_target_token_left_is_refused() -> None:
    prompt_only = Encoded([1, 2, 3], [IGNORE_INDEX] * 3, truncated=True, full_length=40)
    with pytest.raises(UserError, match="leave no answer token to train on in any row"):
        check_truncation([prompt_only], 16)
    whole = Encoded([1, 2, 3], [IGNORE_INDEX, 2, 3], truncated=False, full_length=3)
    assert check_truncation([whole] * 20 + [prompt_only], 16) == []  # 1 of 21: under 5%
