"""The FineTuneJob model: defaults, constraints, cross-field rules and error paths."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune import api
from tests.support.manifests import minimal, with_spec


def errors_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        api.parse_job(document)
    return api.format_errors(caught.value)


def test_minimal_manifest_gets_documented_defaults() -> None:
    job = api.parse_job(minimal())
    assert job.spec.method.type == "lora"
    assert job.spec.method.lora is not None
    assert (job.spec.method.lora.r, job.spec.method.lora.alpha) == (16, 32)
    assert job.spec.method.lora.targetModules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert job.spec.method.quantization is None
    assert job.spec.model.trustRemoteCode is False
    assert job.spec.training.packing is True
    assert job.spec.dataset.split.validation == 0.1
    assert job.spec.suspend is False


def test_qlora_defaults_to_4bit_nf4_double_quant() -> None:
    job = api.parse_job(with_spec(method={"type": "qlora"}))
    quant = job.spec.method.quantization
    assert quant is not None
    assert (quant.bits, quant.type, quant.doubleQuant) == (4, "nf4", True)


def test_round_trip_through_api_form_is_stable() -> None:
    job = api.parse_job(with_spec(method={"type": "qlora"}))
    again = api.parse_job({**minimal(), "spec": job.spec.to_api()})
    assert again.spec == job.spec


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            with_spec(method={"lora": {"r": 0}}),
            "spec.method.lora.r: Input should be greater than 0",
        ),
        (
            # vLLM serves ranks up to 512 and every adapter is exported for vLLM: a larger rank
            # would train for hours and then fail at export.
            with_spec(method={"lora": {"r": 513}}),
            "spec.method.lora.r: rank 513 is above 512, the largest LoRA rank vLLM serves",
        ),
        (with_spec(training={"learningRate": 0.1}), "spec.training.epochs: set training.epochs"),
        (
            with_spec(method={"type": "lora", "quantization": {"bits": 4}}),
            "spec.method.quantization: only applies to type qlora",
        ),
        (with_spec(method={"type": "full", "lora": {}}), "spec.method.lora: does not apply"),
        (
            with_spec(dataset__split={"validation": 0.5, "test": 0.45}),
            "spec.dataset.split.validation: validation + test = 0.95",
        ),
        (with_spec(model={"source": "s3://m", "trust": True}), "spec.model.source"),
        (
            with_spec(model={"source": "s3://models/x", "trust": True}),
            "spec.model.trust: unknown field",
        ),
        (with_spec(resources={"numNodes": 2, "gpus": 0}), "spec.resources.gpus: numNodes > 1"),
        (
            with_spec(method={"type": "qlora"}, training={"epochs": 1, "precision": "fp16"}),
            "spec.training.precision: qlora supports",
        ),
        (
            with_spec(evaluation={"gates": [{"metric": "tuned.accuracy", "op": ">", "value": 1}]}),
            "spec.evaluation.gates[0].metric: unknown metric 'tuned.accuracy'",
        ),
        (
            with_spec(dataset__fieldMap={"question": "q"}),
            "spec.dataset.fieldMap: unknown target field(s) ['question']",
        ),
        (with_spec(dataset__license={"name": "MIT"}), "spec.dataset.license.usage: Field required"),
    ],
)
def test_bad_input_names_the_field(document: dict[str, Any], expected: str) -> None:
    lines = errors_of(document)
    assert any(line.startswith(expected) for line in lines), lines


def test_missing_license_is_refused() -> None:
    document = minimal()
    del document["spec"]["dataset"]["license"]
    assert "spec.dataset.license: Field required" in errors_of(document)


def test_every_gate_metric_the_evaluator_reports_is_accepted() -> None:
    for metric in api.EVAL_METRICS + api.SAFETY_METRICS:
        for side in ("base", "tuned", "delta"):
            gate = {"metric": f"{side}.{metric}", "op": "<=", "value": 1.0}
            api.parse_job(with_spec(evaluation={"safety": {}, "gates": [gate]}))
    gate = {"metric": "delta.oodPerplexityRatio", "op": "<=", "value": 1.1}
    api.parse_job(with_spec(evaluation={"safety": {}, "gates": [gate]}))
    gate = {"metric": "tuned.oodPerplexityRatio", "op": "<=", "value": 1.1}
    assert errors_of(with_spec(evaluation={"safety": {}, "gates": [gate]}))


@pytest.mark.parametrize(
    ("evaluation", "reason"),
    [
        (
            {"gates": [{"metric": "tuned.refusalRate", "op": ">", "value": 0}]},
            "add evaluation.safety",
        ),
        (
            {"compareToBase": False, "gates": [{"metric": "delta.loss", "op": "<", "value": 0}]},
            "compareToBase is false",
        ),
        (
            {"metrics": ["loss"], "gates": [{"metric": "tuned.exactMatch", "op": ">", "value": 0}]},
            "add exactMatch to evaluation.metrics",
        ),
        (
            {
                "safety": {"latency": {"enabled": False}},
                "gates": [{"metric": "tuned.latencyP95Ms", "op": "<", "value": 100}],
            },
            "evaluation.safety.latency.enabled is false",
        ),
    ],
)
def test_gate_on_a_metric_never_measured_is_refused(
    evaluation: dict[str, Any], reason: str
) -> None:
    lines = errors_of(with_spec(evaluation=evaluation))
    assert any(line.startswith("spec.evaluation.gates: ") and reason in line for line in lines), (
        lines
    )


def test_name_longer_than_children_allow_is_refused() -> None:
    document = copy.deepcopy(minimal())
    document["metadata"]["name"] = "x" * (api.MAX_NAME_LENGTH + 1)
    assert any(line.startswith("metadata.name:") for line in errors_of(document))


def test_wrong_kind_and_version_are_named() -> None:
    document = minimal()
    document["apiVersion"] = "kubetune.io/v1"
    assert any(line.startswith("apiVersion:") for line in errors_of(document))


def test_snake_case_is_not_silently_accepted_in_manifests() -> None:
    # populate_by_name lets code use python names, but a manifest must use camelCase.
    document = with_spec(training={"epochs": 1, "learning_rate": 0.1})
    lines = errors_of(document)
    assert "spec.training.learning_rate: unknown field" in lines[0], lines


def test_lora_rank_limit_is_vllms_and_in_the_crd_schema() -> None:
    from kubetune import crd

    assert api.parse_job(with_spec(method={"lora": {"r": 512}})).spec.method.lora.r == 512  # type: ignore[union-attr]
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lora = schema["properties"]["spec"]["properties"]["method"]["properties"]["lora"]
    assert lora["properties"]["r"]["maximum"] == api.MAX_LORA_RANK == 512
