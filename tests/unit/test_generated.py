"""Generated files must match their generator, and the CRD must be a structural schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kubetune import api, crd, sweep_crd

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "run `make generate` (or `kubetune crd > crds/... && kubetune docs > docs/api.md`)"


def test_checked_in_crd_matches_generator() -> None:
    checked_in = (ROOT / "crds" / crd.CRD_FILENAME).read_text()
    assert checked_in == crd.crd_yaml(), f"crds/ drifted from kubetune/api.py: {REGENERATE}"


def test_checked_in_api_reference_matches_generator() -> None:
    generated = crd.api_reference() + sweep_crd.api_reference()
    assert (ROOT / "docs" / "api.md").read_text() == generated, (
        f"docs/api.md drifted from kubetune/api.py: {REGENERATE}"
    )


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Return structural-schema violations under node."""
    problems = []
    if "type" not in node:
        problems.append(f"{path}: no type")
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "not", "additionalItems", "title"):
        if forbidden in node:
            problems.append(f"{path}: {forbidden} is not allowed")
    if node.get("type") == "object":
        open_ended = "properties" not in node and "additionalProperties" not in node
        preserved = node.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata"
        if open_ended and not preserved:
            problems.append(f"{path}: object without properties must preserve unknown fields")
        for name, child in node.get("properties", {}).items():
            problems += _walk(child, f"{path}.{name}")
        if isinstance(node.get("additionalProperties"), dict):
            problems += _walk(node["additionalProperties"], f"{path}.*")
    if node.get("type") == "array":
        problems += _walk(node["items"], f"{path}[]")
    return problems


def test_schema_is_structural() -> None:
    root = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(root, "") == []


def test_every_spec_field_has_a_description() -> None:
    spec = crd.spec_and_status_schema()["properties"]["spec"]
    missing = []

    def visit(node: dict[str, Any], path: str) -> None:
        for name, child in node.get("properties", {}).items():
            if not child.get("description"):
                missing.append(f"{path}.{name}")
            visit(child, f"{path}.{name}")
            if child.get("type") == "array":
                visit(child["items"], f"{path}.{name}[]")

    visit(spec, "spec")
    assert missing == []


def test_crd_names_columns_and_subresources() -> None:
    document = yaml.safe_load((ROOT / "crds" / crd.CRD_FILENAME).read_text())
    version = document["spec"]["versions"][0]
    assert document["spec"]["names"]["shortNames"] == ["ftj"]
    assert document["spec"]["names"]["categories"] == ["kubetune"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "Loss", "Eval-Loss", "Age"} <= columns


def test_immutability_rules_cover_training_defining_fields() -> None:
    rules = crd.spec_and_status_schema()["properties"]["spec"]["x-kubernetes-validations"]
    text = " ".join(rule["rule"] for rule in rules)
    for field in ("model", "dataset", "method", "training", "output"):
        assert f"self.{field} == oldSelf.{field}" in text
    assert "suspend" not in text


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    for kind, generated in (("FineTuneJob", crd.crd()), ("FineTuneSweep", sweep_crd.sweep_crd())):
        schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        status = schema["properties"]["status"]
        conditions = status["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map", kind
        assert conditions["x-kubernetes-list-map-keys"] == ["type"], kind
        assert conditions["maxItems"] == api.MAX_CONDITIONS, kind
        # The API server requires map keys to be required (or defaulted) in the items.
        assert "type" in conditions["items"]["required"], kind


def test_checked_in_conditions_table_matches_generator() -> None:
    text = (ROOT / "docs" / "operator.md").read_text()
    assert text == crd.with_conditions_table(text), f"docs/operator.md drifted: {REGENERATE}"


def test_the_conditions_table_lists_every_reason_the_status_can_carry() -> None:
    from kubetune import status

    constants = {
        value
        for name, value in vars(status).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[A-Z][A-Za-z]+", value)
    }
    types = set(status.CONDITION_REASONS)
    listed = {
        reason.name
        for true, other in status.CONDITION_REASONS.values()
        for reason in (*true, *other)
    }
    assert constants - types - set(status.EVENT_REASONS) == listed
