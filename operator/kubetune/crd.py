"""Generate the CustomResourceDefinition and the manifest reference from kubetune.api.

Never hand-edit crds/ or docs/api.md: run `kubetune crd > crds/...` and `kubetune docs`.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from kubetune import api

CRD_FILENAME = f"{api.PLURAL}.{api.GROUP}.yaml"

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Progress",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of optimizer steps done",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.progress.evalLoss"},
    {
        "name": "ETA",
        "type": "integer",
        "jsonPath": ".status.progress.etaSeconds",
        "description": "Seconds left",
    },
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "priority": 1},
    {
        "name": "Tuned-EM",
        "type": "number",
        "jsonPath": ".status.metrics.tuned.exactMatch",
        "description": "Exact match of the tuned model on the test split",
        "priority": 1,
    },
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

# JSON-Schema keywords a CRD's structural schema accepts (plus x-kubernetes-*).
_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "format",
}


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Pydantic JSON Schema (2020-12) -> Kubernetes structural OpenAPI v3 schema."""
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unsupported union in schema: {node}")
        merged = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        if merged.get("default", 0) is None:
            del merged["default"]
        return _convert(merged, defs)
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
        node.pop("const")
        node.setdefault("type", "string")

    out: dict[str, Any] = {
        k: v for k, v in node.items() if k in _KEEP or k.startswith("x-kubernetes")
    }
    if "enum" in node and "type" not in out:
        out["type"] = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
    for key, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            out[flag] = node[key]
            out[key] = True
    if out.get("default") == {} or out.get("default") == []:
        del out["default"]

    kind = out.get("type")
    if kind == "object":
        props = node.get("properties")
        if props:
            out["properties"] = {name: _convert(p, defs) for name, p in props.items()}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra, defs)
        elif not props:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _convert(node["items"], defs)
    elif kind is None and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise ValueError(f"untyped schema node: {node}")
    return out


def openapi_schema(model: type[api.ApiModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(schema, schema.get("$defs", {}))


def spec_and_status_schema() -> dict[str, Any]:
    spec = openapi_schema(api.FineTuneJobSpec)
    status = openapi_schema(api.FineTuneJobStatus)
    return {
        "type": "object",
        "description": "A fine-tuning run: base model + data + method -> tuned model, with "
        "base-vs-tuned results.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {api.MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters",
            }
        ],
    }


def definition(
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    printer_columns: list[dict[str, Any]],
    schema: dict[str, Any],
) -> dict[str, Any]:
    """A namespaced kubetune.io CustomResourceDefinition with a status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": api.CATEGORIES,
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    return definition(
        api.KIND,
        api.PLURAL,
        api.SINGULAR,
        api.SHORT_NAMES,
        PRINTER_COLUMNS,
        spec_and_status_schema(),
    )


def crd_yaml() -> str:
    header = "# Generated by `kubetune crd` from kubetune/api.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


# --------------------------------------------------------------------------------------------
# docs/api.md


def _doc_rows(schema: dict[str, Any], path: str, rows: list[str]) -> None:
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        full = f"{path}.{name}" if path else name
        kind = prop.get("type", "")
        if kind == "array":
            kind = f"[]{prop['items'].get('type', '')}"
        constraints = []
        if "enum" in prop:
            constraints.append("one of " + ", ".join(f"`{v}`" for v in prop["enum"]))
        for key, label in (("minimum", ">="), ("maximum", "<=")):
            if key in prop:
                exclusive = prop.get(f"exclusive{key.capitalize()}")
                constraints.append(f"{label.rstrip('=') if exclusive else label} {prop[key]}")
        if "pattern" in prop and len(prop["pattern"]) < 60:
            constraints.append(f"pattern `{prop['pattern']}`")
        if "maxLength" in prop:
            constraints.append(f"max length {prop['maxLength']}")
        default = f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        description = prop.get("description", "").replace("|", "\\|").replace("\n", " ")
        req = "yes" if name in required else ""
        rows.append(
            f"| `{full}` | {kind} | {req} | {default} | {description} "
            f"{'(' + '; '.join(constraints) + ')' if constraints else ''} |"
        )
        if prop.get("type") == "object" and "properties" in prop:
            _doc_rows(prop, full, rows)
        if prop.get("type") == "array" and "properties" in prop["items"]:
            _doc_rows(prop["items"], f"{full}[]", rows)


def api_reference() -> str:
    schema = spec_and_status_schema()
    lines = [
        "# FineTuneJob manifest reference",
        "",
        f"`apiVersion: {api.API_VERSION}`, `kind: {api.KIND}`, short name "
        f"`{api.SHORT_NAMES[0]}`. Generated by `kubetune docs`; do not edit.",
        "",
        "Cross-field rules (checked by `kubetune validate`, the operator and the CRD's CEL rules):",
        "",
        "- `spec.training`: set `epochs` or `maxSteps`.",
        "- `spec.dataset.split`: validation + test must leave at least 10% of rows for training.",
        "- `spec.method`: `quantization` only with `qlora` (defaults to 4-bit nf4); no `lora` "
        "block with `full`.",
        "- `spec.resources`: `numNodes > 1` needs `gpus > 0`.",
        "- `spec.model`, `dataset`, `method`, `training`, `evaluation`, `output` are immutable "
        "once created; `suspend` stays mutable.",
        f"- `metadata.name` is at most {api.MAX_NAME_LENGTH} characters.",
        "",
        "`kubetune validate` also refuses what the API server would: a quoted scalar where a "
        'number or boolean belongs (`batchSize: "8"`), a repeated YAML key, annotations over '
        "256 KiB in total, and a spec whose rendered ConfigMap would exceed 1 MiB.",
        "",
    ]
    for section in ("spec", "status"):
        lines += [
            f"## {section}",
            "",
            "| field | type | required | default | description |",
            "|---|---|---|---|---|",
        ]
        rows: list[str] = []
        _doc_rows(schema["properties"][section], section, rows)
        lines += [*rows, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# docs/operator.md: the conditions table, between these two lines

CONDITIONS_BEGIN = "<!-- conditions table: generated from kubetune/status.py by `make generate` -->"
CONDITIONS_END = "<!-- end of the generated conditions table -->"


def conditions_table() -> str:
    """Every condition type and its reasons, from status.CONDITION_REASONS."""
    from kubetune import status

    def cell(reasons: tuple[status.Reason, ...]) -> str:
        return ", ".join(f"`{r.name}`" + (f" ({r.when})" if r.when else "") for r in reasons)

    lines = ["| type | True | False / Unknown |", "|---|---|---|"]
    for type_, (true, other) in status.CONDITION_REASONS.items():
        lines.append(f"| `{type_}` | {cell(true)} | {cell(other)} |")
    return "\n".join(lines) + "\n"


def with_conditions_table(text: str) -> str:
    """``text`` (docs/operator.md) with the generated table between the markers brought up to
    date; raises ValueError when the markers are missing."""
    head, found, rest = text.partition(CONDITIONS_BEGIN + "\n")
    _, found_end, tail = rest.partition(CONDITIONS_END)
    if not (found and found_end):
        raise ValueError(f"markers {CONDITIONS_BEGIN!r} ... {CONDITIONS_END!r} not found")
    return head + CONDITIONS_BEGIN + "\n" + conditions_table() + CONDITIONS_END + tail
