"""FineTuneSweep: the model, its rules across fields, the generated CRD and docs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune import cli, sweep_api, sweep_crd
from tests.support.crd_schema import _rules
from tests.unit.test_generated import _walk

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lr-sweep.yaml"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def refused(mutate: Any) -> list[str]:
    document = example()
    mutate(document["spec"])
    with pytest.raises(sweep_api.SweepInvalid) as error:
        sweep_api.parse_sweep(document)
    return error.value.lines


def add(parameter: dict[str, Any]) -> Any:
    return lambda spec: spec["parameters"].append(parameter)


def test_example_is_valid() -> None:
    sweep = sweep_api.parse_sweep(example())
    assert [p.path for p in sweep.spec.parameters] == ["training.learningRate", "method.lora.r"]
    assert sweep.spec.parameters[1].choices == [4, 8, 16]  # ints stay ints


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            add({"path": "training.learnRate", "type": "float", "low": 1e-4, "high": 1e-3}),
            "spec.parameters[2].path: training.learnRate is not a field of the FineTuneJob spec",
        ),
        (
            add({"path": "method.lora", "type": "int", "low": 1, "high": 2}),
            "spec.parameters[2].path: method.lora is not a single value",
        ),
        (
            add({"path": "training.batchSize", "type": "int", "low": 8, "high": 2}),
            "spec.parameters[2].low: 8 is above high 2",
        ),
        (
            add({"path": "method.type", "type": "categorical", "choices": []}),
            "spec.parameters[2].choices: a categorical parameter needs at least one choice",
        ),
        (
            add({"path": "training.batchSize", "type": "int", "low": 0, "high": 4}),
            "spec.parameters[2]: the value 0 gives an invalid trial: "
            "spec.template.training.batchSize: Input should be greater than or equal to 1",
        ),
        (
            add({"path": "method.type", "type": "categorical", "choices": ["lora", "lorra"]}),
            "spec.parameters[2]: the value 'lorra' gives an invalid trial",
        ),
        (
            lambda s: s.update(objective={"metric": "tuned.refusalRate", "direction": "minimize"}),
            "spec.objective.metric: tuned.refusalRate is never measured by the template: "
            "add evaluation.safety",
        ),
        (
            lambda s: (
                s["template"]["evaluation"].update(metrics=["loss"])
                or s.update(objective={"metric": "tuned.exactMatch", "direction": "maximize"})
            ),
            "spec.objective.metric: tuned.exactMatch is never measured by the template: "
            "add exactMatch to evaluation.metrics",
        ),
        (lambda s: s.update(parallelism=7), "spec.parallelism: 7 is above maxTrials 6"),
        (
            lambda s: s["algorithm"].update(sampler="grid"),
            "spec.parameters[0].step: the grid sampler needs a finite set of values",
        ),
        (
            lambda s: s["algorithm"].update(sampler="cmaes"),
            "spec.parameters[1].type: the cmaes sampler searches float and int parameters only",
        ),
        (
            add({"path": "training.learningRate", "type": "float", "low": 1e-4, "high": 1e-3}),
            "spec.parameters[2].path: training.learningRate is searched twice",
        ),
    ],
)
def test_bad_sweeps_are_refused_with_the_field_path(mutate: Any, expected: str) -> None:
    lines = refused(mutate)
    assert any(line.startswith(expected) for line in lines), lines


def test_validate_cli_exits_nonzero_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = example()
    document["spec"]["parameters"][0]["path"] = "training.lr"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    assert cli.main(["validate", str(path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr-sweep: spec.parameters[0].path: training.lr" in err[0]


def test_a_method_type_grid_drops_sections_the_type_does_not_use() -> None:
    spec = sweep_api.parse_sweep(example()).spec
    full = sweep_api.trial_spec(spec, {"method.type": "full"})
    assert full.method.type == "full" and full.method.lora is None
    qlora = sweep_api.trial_spec(spec, {"method.type": "qlora", "method.lora.r": 4})
    assert qlora.method.quantization is not None and qlora.method.lora
    assert qlora.method.lora.r == 4 and qlora.method.lora.targetModules == ["all-linear"]


def test_values_of_a_stepped_range() -> None:
    p = sweep_api.ParameterSpec(
        path="training.learningRate", type="float", low=0.1, high=0.3, step=0.1
    )
    assert p.values() == [0.1, 0.2, 0.3]
    assert sweep_api.ParameterSpec(path="a.b", type="int", low=2, high=6, step=2).values() == [
        2,
        4,
        6,
    ]


def test_trial_names_round_trip() -> None:
    assert sweep_api.trial_name("lr-sweep", 7) == "lr-sweep-t007"
    assert sweep_api.trial_number("lr-sweep-t007") == 7
    assert sweep_api.trial_number("lr-sweep") is None


# --------------------------------------------------------------------------------------------
# generated files


def test_checked_in_sweep_crd_matches_generator() -> None:
    for folder in ("crds", "helm/kubetune/crds"):
        checked_in = (ROOT / folder / sweep_crd.CRD_FILENAME).read_text()
        assert checked_in == sweep_crd.crd_yaml(), f"{folder} drifted: run `make generate`"


def _typed_or_preserved(node: dict[str, Any], path: str) -> list[str]:
    # Kubernetes allows a node without a type when it preserves unknown fields (any JSON).
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
        return []
    problems = _walk({**node, "properties": {}, "items": {"type": "string"}}, path)
    for name, child in node.get("properties", {}).items():
        problems += _typed_or_preserved(child, f"{path}.{name}")
    if node.get("type") == "array":
        problems += _typed_or_preserved(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _typed_or_preserved(node["additionalProperties"], f"{path}.*")
    return problems


def test_sweep_crd_is_structural_and_names_the_columns() -> None:
    crd = sweep_crd.sweep_crd()
    version = crd["spec"]["versions"][0]
    assert _typed_or_preserved(version["schema"]["openAPIV3Schema"], "") == []
    assert crd["spec"]["names"]["shortNames"] == ["fts"]
    assert crd["spec"]["names"]["categories"] == ["kubetune"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Trials", "Running", "Best"} <= set(columns)


def test_example_passes_the_crd_schema_and_cel() -> None:
    schema = sweep_crd.schema()
    document = example()
    assert list(jsonschema.Draft4Validator(schema).iter_errors(document)) == []
    assert _rules(schema, document, None, "") == []
    # the CRD refuses what it can say: a sampler it does not know, a reversed template field
    bad = copy.deepcopy(document)
    bad["spec"]["algorithm"]["sampler"] = "bayes"
    assert list(jsonschema.Draft4Validator(schema).iter_errors(bad)) != []
    changed = copy.deepcopy(document)
    changed["spec"]["template"]["training"]["maxSteps"] = 41
    assert _rules(schema, changed, document, "") != []  # the template is immutable
