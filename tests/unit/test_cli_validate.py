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
    kinds = [yaml.safe_load(p.read_text())["kind"] for p in EXAMPLES]
    assert f"{kinds.count('FineTuneJob')} FineTuneJob(s) valid" in out


def test_broken_manifest_exits_1_with_file_name_and_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    good = minimal()
    good["metadata"]["name"] = "good"
    broken = with_spec(method={"lora": {"r": 0}})
    bad.write_text(yaml.safe_dump_all([good, broken]))
    code, _, err = run(capsys, str(bad))
    assert code == 10
    assert err.splitlines() == [f"{bad}: demo: spec.method.lora.r: Input should be greater than 0"]


def test_a_lora_rank_vllm_cannot_serve_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "rank.yaml"
    bad.write_text(yaml.safe_dump(with_spec(method={"lora": {"r": 1024}})))
    code, _, err = run(capsys, str(bad))
    assert code == 10
    assert err.splitlines() == [
        f"{bad}: demo: spec.method.lora.r: rank 1024 is above 512, the largest LoRA rank vLLM "
        "serves (every adapter is exported for vLLM and checked against its rules): use "
        "r <= 512, or method.type full"
    ]


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
    assert code == 10
    assert expected in err
    assert "Traceback" not in err


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "/nonexistent/job.yaml")
    assert code == 10 and "cannot read" in err


def test_console_script_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", str(EXAMPLES[0])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("packing", "yes", "spec.training.packing: Input should be a valid boolean"),
        ("learningRate", "0.002", "spec.training.learningRate: Input should be a valid number"),
        ("batchSize", "8", "spec.training.batchSize: Input should be a valid integer"),
    ],
)
def test_quoted_scalars_are_refused_like_the_api_server_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: str, expected: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(with_spec(**{f"training__{field}": value})))
    code, _, err = run(capsys, str(path))
    assert code == 10
    assert err.splitlines() == [f"{path}: demo: {expected}"]


def test_unquoted_numbers_and_booleans_still_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    # An integer where a number is expected is fine (JSON has one number type).
    document = with_spec(training__packing=True, training__learningRate=1, training__batchSize=8)
    path.write_text(yaml.safe_dump(document))
    code, _, err = run(capsys, str(path))
    assert (code, err) == (0, "")


def test_annotations_over_256_kib_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    document = minimal()
    document["metadata"]["annotations"] = {"example.com/notes": "x" * (300 * 1024)}
    path.write_text(yaml.safe_dump(document))
    code, _, err = run(capsys, str(path))
    assert code == 10
    assert err.startswith(f"{path}: demo: metadata.annotations: total size ")
    assert "262144 bytes (256 KiB)" in err
    # Just under the limit (keys + values, in bytes) passes.
    key = "example.com/notes"
    document["metadata"]["annotations"] = {key: "x" * (256 * 1024 - len(key))}
    path.write_text(yaml.safe_dump(document))
    assert run(capsys, str(path))[0] == 0


def test_a_spec_whose_configmap_exceeds_1_mib_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    # Within the CRD's limits (nodeSelector has no maxProperties), too big for a ConfigMap.
    selector = {f"example.com/{i:04}-" + "k" * 290: "v" * 63 for i in range(3_000)}
    path.write_text(yaml.safe_dump(with_spec(resources__nodeSelector=selector)))
    code, _, err = run(capsys, str(path))
    assert code == 10
    (line,) = err.splitlines()
    assert line.startswith(f"{path}: demo: spec: the trainer's ConfigMap would be ")
    assert "limit of 1048576 bytes (1 MiB); the largest part is spec.resources" in line


def test_duplicate_keys_are_refused_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    text = yaml.safe_dump(minimal(), sort_keys=False)
    path.write_text(text.replace("  training:\n", "  training:\n    epochs: 3\n"))
    code, _, err = run(capsys, str(path))
    assert code == 10
    lines = path.read_text().splitlines()
    second = next(i for i, line in enumerate(lines, 1) if line == "    epochs: 1")
    assert err.splitlines() == [
        f"{path}: invalid YAML at line {second}, column 5: "
        f"duplicate key 'epochs' (first at line {second - 1})"
    ]


def test_dates_stay_strings_as_on_the_api_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    text = yaml.safe_dump(minimal(), sort_keys=False)
    path.write_text(text.replace("  model:\n", "  model:\n    revision: 2026-01-31\n"))
    code, _, err = run(capsys, str(path))
    assert (code, err) == (0, "")


def test_a_gguf_model_source_is_noted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gguf.yaml"
    path.write_text(yaml.safe_dump(with_spec(model__source="s3://models/smol.Q4_1.gguf")))
    code, out, err = run(capsys, str(path))
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == (
        f"note: {path}: spec.model.source is a GGUF file: it is dequantized to fp32 before "
        "training, so quality is that of its quantized weights; artifacts are exported as "
        "safetensors, and the dequantized base too (artifact base, which the adapter names as "
        "its base: servers load a LoRA on safetensors weights, not on the .gguf)"
    )
    path.write_text(yaml.safe_dump(minimal()))
    assert run(capsys, str(path))[1].splitlines()[1:] == []
