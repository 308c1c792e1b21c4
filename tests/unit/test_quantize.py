"""output.quantize: the spec, the status rows the operator copies, the report section and the
local table (pure parts; tests/integration/test_quantize_exports.py runs the real exports)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune import api, manifests
from kubetune import status as st
from kubetune_trainer.quantize import Measured, Outcome, format_table, report_section, status_rows
from kubetune_trainer.report import termination_message
from tests.support import trainer_pod
from tests.support.cluster import ROOT

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SPEC = manifests.load_file(ROOT / "examples" / "lora-s3.yaml").jobs[0].spec


def output_errors(quantize: Any) -> list[str]:
    try:
        api.OutputSpec.model_validate({"destination": "out", "quantize": quantize})
    except ValidationError as exc:
        return api.format_errors(exc, ["spec", "output"])
    return []


def test_quantize_defaults_to_nothing_and_takes_every_listed_format() -> None:
    assert api.OutputSpec(destination="out").quantize == []
    assert output_errors(list(api.QUANTIZE_FORMATS)) == []


def test_an_unknown_format_names_its_index_and_the_allowed_values() -> None:
    (line,) = output_errors(["int8", "fp8"])
    assert line.startswith("spec.output.quantize[1]: ")
    for allowed in api.QUANTIZE_FORMATS:
        assert f"'{allowed}'" in line


def test_a_format_listed_twice_is_refused() -> None:
    assert output_errors(["nf4", "int8", "nf4"]) == [
        "spec.output.quantize: listed more than once: nf4"
    ]


def test_the_crd_schema_lists_the_formats() -> None:
    from kubetune.crd import crd

    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    quantize = schema["properties"]["spec"]["properties"]["output"]["properties"]["quantize"]
    assert quantize["items"]["enum"] == list(api.QUANTIZE_FORMATS)
    assert quantize["maxItems"] == len(api.QUANTIZE_FORMATS)


REFERENCE = Measured(
    metrics={"loss": 1.0, "exactMatch": 0.5},
    latency={"latencyP50Ms": 10.0, "latencyP95Ms": 12.0, "generationTokensPerSecond": 400.0},
    size_bytes=2_000_000,
)
OUTCOMES = [
    Outcome(
        "int8",
        uri="s3://b/run/quantized/int8",
        measured=Measured(
            {"loss": 1.02, "exactMatch": 0.5},
            {"latencyP50Ms": 30.0, "latencyP95Ms": 35.0, "generationTokensPerSecond": 130.0},
            800_000,
        ),
    ),
    Outcome(
        "nf4",
        uri="s3://b/run/quantized/nf4",
        measured=Measured(
            {"loss": 1.25, "exactMatch": 0.25},
            {"latencyP50Ms": 20.0, "latencyP95Ms": 22.0, "generationTokensPerSecond": 200.0},
            600_000,
        ),
        notes=["2 of 14 linear layers kept in float32"],
    ),
    Outcome("gguf-q4_0", reason="the GGUF export writes Llama-architecture models"),
]


def test_status_rows_are_one_small_row_per_format_with_deltas_against_the_merged_model() -> None:
    rows = status_rows(REFERENCE, OUTCOMES)
    assert [r.format for r in rows] == ["int8", "nf4", "gguf-q4_0"]
    int8, nf4, gguf = rows
    assert int8.uri == "s3://b/run/quantized/int8" and int8.sizeBytes == 800_000
    assert int8.delta == pytest.approx({"loss": 0.02, "exactMatch": 0.0})
    assert (int8.latencyP50Ms, int8.latencyP95Ms, int8.tokensPerSecond) == (30.0, 35.0, 130.0)
    assert int8.reason is None
    assert nf4.delta == pytest.approx({"loss": 0.25, "exactMatch": -0.25})
    assert nf4.reason == "2 of 14 linear layers kept in float32"
    assert gguf.uri is None and gguf.sizeBytes is None and gguf.delta == {}
    assert gguf.reason == "the GGUF export writes Llama-architecture models"


def test_report_section_has_the_reference_and_every_format_in_full() -> None:
    section = report_section(REFERENCE, OUTCOMES)
    assert section["reference"]["metrics"] == REFERENCE.metrics
    assert section["reference"]["sizeBytes"] == 2_000_000
    int8, nf4, gguf = section["exports"]
    assert int8["produced"] and int8["sizeRatio"] == 0.4 and int8["latencyP95Ms"] == 35.0
    assert nf4["notes"] == ["2 of 14 linear layers kept in float32"]
    assert gguf == {
        "format": "gguf-q4_0",
        "produced": False,
        "reason": "the GGUF export writes Llama-architecture models",
    }
    json.dumps(section, allow_nan=False)  # what report.json gets is plain JSON


def test_local_table() -> None:
    table = format_table(report_section(REFERENCE, OUTCOMES))
    lines = table.splitlines()
    assert lines[0].split() == [
        "format", "size", "exactMatch", "delta", "p50", "ms", "p95", "ms", "tokens/s"
    ]  # fmt: skip
    assert lines[1].split() == ["merged", "2.00", "MB", "0.5", "10.0", "12.0", "400.0"]
    assert lines[2].split() == ["int8", "0.80", "MB", "0.5", "+0", "30.0", "35.0", "130.0"]
    assert lines[3].split() == ["nf4", "0.60", "MB", "0.25", "-0.25", "20.0", "22.0", "200.0"]
    assert lines[4].split() == ["gguf-q4_0", "-", "-", "-", "-", "-", "-"]
    assert "  nf4: 2 of 14 linear layers kept in float32" in lines
    assert (
        "  gguf-q4_0: cannot be produced for this model: the GGUF export writes "
        "Llama-architecture models" in lines
    )


def test_the_operator_copies_the_rows_from_the_termination_message() -> None:
    rows = status_rows(REFERENCE, OUTCOMES)
    text = termination_message(
        api.FineTuneJobStatus(phase="Succeeded", message="trained", quantized=rows)
    )
    body = json.loads(text)
    body["quantized"].append({"format": "int8", "sizeBytes": -1})  # malformed: left out
    job, pods = trainer_pod.ended(json.dumps(body))
    new = st.compute(
        previous=api.FineTuneJobStatus(jobName="x-trainer", phase="Running"),
        generation=1,
        spec=SPEC,
        job=job,
        pods=pods,
        live=None,
        now=NOW,
    )
    assert new.phase == "Succeeded"
    assert new.quantized == rows
    api.FineTuneJobStatus.model_validate(new.to_api())


def test_without_test_rows_exports_keep_their_size_and_have_no_figures() -> None:
    reference = Measured({}, {}, 10)
    outcomes = [Outcome("int8", uri="file:///o/quantized/int8", measured=Measured({}, {}, 5))]
    (row,) = status_rows(reference, outcomes)
    assert (row.sizeBytes, row.delta, row.latencyP50Ms, row.tokensPerSecond) == (5, {}, None, None)
    section = report_section(reference, outcomes)
    assert section["exports"][0]["produced"] and section["exports"][0]["sizeRatio"] == 0.5
    assert format_table(section).splitlines()[2].split() == ["int8", "0.00", "MB"] + ["-"] * 5
