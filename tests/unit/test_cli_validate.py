"""`kubetune validate`: exit codes and one line per problem, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune import cli
from tests.support.manifests import minimal, with_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["validate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_examples_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *map(str, EXAMPLES))
    assert (code, err) == (0, "")
    assert f"{len(EXAMPLES)} FineTuneJob(s) valid" in out


def test_broken_manifest_exits_1_with_file_name_and_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    good = minimal()
    good["metadata"]["name"] = "good"
    broken = with_spec(method={"lora": {"r": 0}})
    bad.write_text(yaml.safe_dump_all([good, broken]))
    code, _, err = run(capsys, str(bad))
    assert code == 1
    assert err.splitlines() == [f"{bad}: demo: spec.method.lora.r: Input should be greater than 0"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("spec: [unclosed", "invalid YAML at line 1"),
        ("- just\n- a list\n", "<document>: expected a mapping, got list"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "no FineTuneJob found"),
        ("kind: FineTuneJob\nmetadata: {name: y}\n", "y: apiVersion: Field required"),
    ],
)
def test_malformed_files_give_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(content)
    code, _, err = run(capsys, str(path))
    assert code == 1
    assert expected in err
    assert "Traceback" not in err


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "/nonexistent/job.yaml")
    assert code == 1 and "cannot read" in err


def test_console_script_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", str(EXAMPLES[0])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
