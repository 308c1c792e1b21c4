"""Property-based: any YAML/JSON document either validates or yields field-path errors,
never another exception."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune import api, manifests
from tests.support.manifests import minimal

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)

FIELD_PATHS = [
    ("model", "source"),
    ("model", "trustRemoteCode"),
    ("dataset", "split"),
    ("dataset", "split", "validation"),
    ("dataset", "license"),
    ("dataset", "fieldMap"),
    ("method",),
    ("method", "type"),
    ("method", "lora"),
    ("method", "lora", "r"),
    ("method", "quantization"),
    ("training",),
    ("training", "epochs"),
    ("training", "maxSteps"),
    ("training", "earlyStopping"),
    ("evaluation", "gates"),
    ("resources", "tolerations"),
    ("resources", "numNodes"),
    ("output",),
    ("suspend",),
    ("scheduling", "queueName"),
]


def _check(document: Any) -> None:
    try:
        api.parse_job(document)
    except ValidationError as error:
        lines = api.format_errors(error)
        assert lines
        for line in lines:
            path, _, message = line.partition(": ")
            assert path and message, line


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(document=json_values)
@example(document={": ": None})  # a key that looks like the separator once printed a blank path
@example(document={"spec": {"": 1}})
def test_any_document_validates_or_names_fields(document: Any) -> None:
    _check(document)
    manifests.check_documents([document], "f.yaml")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(where=st.sampled_from(FIELD_PATHS), value=json_values)
def test_any_value_at_any_field(where: tuple[str, ...], value: Any) -> None:
    document = copy.deepcopy(minimal())
    node = document["spec"]
    for key in where[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return
    node[where[-1]] = value
    _check(document)


# Health checks time data generation: under a parallel run on shared cores they misfire.
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(name=st.text(min_size=1, max_size=12).filter(lambda s: s.isidentifier()))
def test_unknown_fields_are_errors_naming_the_field(name: str) -> None:
    document = copy.deepcopy(minimal())
    if name in api.TrainingSpec.model_fields or any(
        f.alias == name for f in api.TrainingSpec.model_fields.values()
    ):
        return
    document["spec"]["training"][name] = 1
    try:
        api.parse_job(document)
    except ValidationError as error:
        assert f"spec.training.{name}: unknown field" in "\n".join(api.format_errors(error))
    else:
        raise AssertionError(f"unknown field {name!r} was accepted")
