"""Every example manifest is valid for the pydantic model AND the generated CRD (schema + CEL),
so the two can't drift apart; and both refuse the same cross-field mistakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune import api
from tests.support.crd_schema import cel_errors, schema_errors
from tests.support.manifests import minimal, with_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_is_an_example_per_main_use() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "lora-s3", "qlora-gpu", "full-finetune", "multi-gpu"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_for_model_and_crd(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        if document.get("kind") != api.KIND:
            continue
        api.parse_job(document)
        assert schema_errors(document) == []
        assert cel_errors(document) == []


def _pydantic_refuses(document: dict[str, Any]) -> bool:
    try:
        api.parse_job(document)
    except ValidationError:
        return True
    return False


@pytest.mark.parametrize(
    "document",
    [
        with_spec(training={"learningRate": 0.1}),
        with_spec(method={"type": "lora", "quantization": {"bits": 4}}),
        with_spec(method={"type": "full", "lora": {"r": 8}}),
        with_spec(dataset__split={"validation": 0.5, "test": 0.45}),
        with_spec(resources={"numNodes": 2, "gpus": 0}),
    ],
)
def test_cross_field_rules_agree_between_model_and_cel(document: dict[str, Any]) -> None:
    assert _pydantic_refuses(document)
    assert schema_errors(document) == [] and cel_errors(document) != []


def test_valid_document_passes_cel_on_create_and_on_noop_update() -> None:
    document = with_spec(method={"type": "qlora", "quantization": {"bits": 8}})
    assert not _pydantic_refuses(document)
    assert cel_errors(document) == []
    assert cel_errors(document, old=document) == []


def test_changing_training_fields_is_refused_but_suspend_is_not() -> None:
    old = minimal()
    changed = with_spec(training={"epochs": 2})
    assert any("spec.training is immutable" in e for e in cel_errors(changed, old=old))
    suspended = with_spec(suspend=True)
    assert cel_errors(suspended, old=old) == []


def test_schema_refuses_what_the_model_refuses_for_simple_constraints() -> None:
    for document in (
        with_spec(method={"lora": {"r": 0}}),
        with_spec(training={"epochs": 1, "scheduler": "exponential"}),
        with_spec(model={"source": "s3://models/x", "trust": True}),
    ):
        assert _pydantic_refuses(document)
        # unknown fields are pruned by the API server, not refused: the operator refuses them
        if "trust" not in str(document):
            assert schema_errors(document) != []
