"""The Helm chart, rendered by the real helm binary for every ci/*-values.yaml variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune import crd, k8s, manifests, render, settings, sweep_crd
from tests.support.helm_chart import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    ROOT,
    by_kind,
    dashboard,
    helm,
    one,
)
from tests.support.helm_chart import render as helm_render

pytestmark = pytest.mark.timeout(120)

VARIANTS = pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
KUBE_VERSIONS = ("1.29.0", "1.35.0")  # Chart.yaml's kubeVersion floor and helm 4's default
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def variant(name: str) -> Path:
    path = CHART / "ci" / f"{name}-values.yaml"
    assert path in CI_VALUES
    return path


def deployment_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item["value"] for item in container["env"]}


def test_every_ci_variant_exists() -> None:
    names = {p.name for p in CI_VALUES}
    assert {"default-values.yaml", "namespaced-values.yaml", "monitoring-values.yaml"} <= names


@VARIANTS
def test_helm_lint_strict(values: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@VARIANTS
def test_built_in_objects_pass_strict_kubernetes_validation(values: Path) -> None:
    objects = helm_render(values, include_crds=True)
    built_in = [o for o in objects if o["kind"] not in MONITORING_KINDS]
    assert {"Deployment", "Service", "CustomResourceDefinition"} <= {o["kind"] for o in built_in}
    for obj in built_in:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {error}")


# kubernetes-validate has no schemas for the Prometheus Operator's CRDs, and none can be
# downloaded here: check the fields we use against this subset of monitoring.coreos.com/v1
# (strict: an unknown or misplaced field fails, as the API server's structural schema would).
def _strict(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}
_META = _strict(
    {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
    ["name", "namespace"],
)
_SELECTOR = _strict({"matchLabels": _LABELS}, ["matchLabels"])
_NS_SELECTOR = {
    "oneOf": [
        _strict({"any": {"const": True}}, ["any"]),
        _strict({"matchNames": {"type": "array", "items": {"type": "string"}}}, ["matchNames"]),
    ]
}
_RELABEL = _strict(
    {
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "targetLabel": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
    },
    ["sourceLabels", "targetLabel"],
)
_ENDPOINT = {
    "port": {"type": "string"},
    "path": {"type": "string"},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"},
    "relabelings": {"type": "array", "items": _RELABEL},
}
_RULE = _strict(
    {
        "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]*$"},
        "expr": {"type": "string", "minLength": 1},
        "for": _DURATION,
        "labels": _LABELS,
        "annotations": _strict(
            {"summary": {"type": "string"}, "description": {"type": "string"}}, ["summary"]
        ),
    },
    ["alert", "expr", "labels", "annotations"],
)


def _object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _strict(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


MONITORING_SCHEMAS = {
    "ServiceMonitor": _object(
        "ServiceMonitor",
        _strict(
            {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(_ENDPOINT, ["port"]),
                },
            },
            ["selector", "endpoints"],
        ),
    ),
    "PodMonitor": _object(
        "PodMonitor",
        _strict(
            {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(_ENDPOINT, ["port"]),
                },
            },
            ["selector", "podMetricsEndpoints"],
        ),
    ),
    "PrometheusRule": _object(
        "PrometheusRule",
        _strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "name": {"type": "string"},
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    ),
}


def test_monitoring_objects_match_the_prometheus_operator_fields() -> None:
    objects = helm_render(variant("monitoring"))
    found = [o for o in objects if o["kind"] in MONITORING_KINDS]
    assert {o["kind"] for o in found} == MONITORING_KINDS
    for obj in found:
        errors = list(jsonschema.Draft7Validator(MONITORING_SCHEMAS[obj["kind"]]).iter_errors(obj))
        assert not errors, [f"{obj['kind']}: {e.json_path}: {e.message}" for e in errors]
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # from values


def test_the_subset_schema_can_fail() -> None:
    bad = helm_render(variant("monitoring"))
    monitor = one(bad, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    errors = list(
        jsonschema.Draft7Validator(MONITORING_SCHEMAS["ServiceMonitor"]).iter_errors(monitor)
    )
    assert errors and "intervall" in errors[0].message


def test_no_monitoring_objects_by_default() -> None:
    kinds = {o["kind"] for o in helm_render(variant("default"))}
    assert not kinds & MONITORING_KINDS
    assert "ConfigMap" not in kinds  # no dashboard


def test_chart_crds_are_byte_identical_to_the_generated_crd() -> None:
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (ROOT / "crds").iterdir())
    for name in chart_crds:
        chart_copy = (CHART / "crds" / name).read_bytes()
        assert chart_copy == (ROOT / "crds" / name).read_bytes(), f"run `make generate` ({name})"
    assert (CHART / "crds" / crd.CRD_FILENAME).read_text() == crd.crd_yaml()
    rendered = by_kind(helm_render(include_crds=True), "CustomResourceDefinition")
    names = [c["metadata"]["name"] for c in rendered]
    assert names == ["finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"]
    assert rendered[0] == crd.crd() and rendered[1] == sweep_crd.sweep_crd()


# --------------------------------------------------------------------------------------------
# RBAC: what the operator does, nothing more


def operator_needs() -> dict[tuple[str, str], set[str]]:
    """The verbs table in k8s.py's docstring: the operator's own statement of what it calls."""
    assert k8s.__doc__
    table = k8s.__doc__.split("API verbs the operator uses", 1)[1].split("\n\n", 2)[1]
    needs: dict[tuple[str, str], set[str]] = {}
    for line in table.splitlines():
        group, resource, *verbs = line.split("(")[0].split()
        needs[("" if group == '""' else group, resource)] = set(verbs)
    return needs


def granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


@VARIANTS
def test_rbac_is_least_privilege(values: Path) -> None:
    objects = helm_render(values)
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {field}: {rule}"
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        grants = granted(role)
        needs = operator_needs()
        assert ("kubetune.io", "finetunejobs") in needs and ("batch", "jobs") in needs
        assert grants == needs, f"{role['kind']} grants differ from k8s.py's table"
        assert ("", "secrets") not in grants  # trainer pods reference Secrets; we never read them


def test_optional_crd_watch_is_cluster_wide_only() -> None:
    optional = ("apiextensions.k8s.io", "customresourcedefinitions")
    assert optional[0] in k8s.__doc__ and optional[1] in k8s.__doc__  # documented as optional
    cluster = helm_render(variant("default"), sets=["rbac.watchCRDs=true"])
    grants = granted(one(cluster, "ClusterRole"))
    assert grants.pop(optional) == {"list", "watch"}
    assert grants == operator_needs()
    namespaced = helm_render(variant("namespaced"), sets=["rbac.watchCRDs=true"])
    assert granted(one(namespaced, "Role")) == operator_needs()  # a Role cannot grant it


def test_cluster_mode_uses_a_cluster_role_bound_to_the_service_account() -> None:
    objects = helm_render(variant("default"))
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    role, binding = one(objects, "ClusterRole"), one(objects, "ClusterRoleBinding")
    account = one(objects, "ServiceAccount")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert settings.from_env(deployment_env(objects)).namespace == ""


def test_namespaced_mode_grants_only_in_the_watched_namespace() -> None:
    objects = helm_render(variant("namespaced"))
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ml-team"
    assert binding["roleRef"]["kind"] == "Role"
    # The operator itself still runs in the release namespace.
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert one(objects, "Deployment")["metadata"]["namespace"] == NAMESPACE
    loaded = settings.from_env(deployment_env(objects))
    assert loaded.namespace == "ml-team"
    assert loaded.allowed_licenses == ["Apache-2.0", "MIT", "CC-BY-4.0"]
    assert loaded.progress_interval == 5.0
    assert loaded.log_format == "plain"
    monitor = one(objects, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-team"]}


def test_existing_service_account_and_no_rbac() -> None:
    objects = helm_render(variant("existing-sa"))
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubetune-operator"
    assert pod["priorityClassName"] == "platform-critical"
    assert deployment_env(objects)["KUBETUNE_PROGRESS_MIN_INTERVAL"] == "20"
    assert settings.from_env(deployment_env(objects)).progress_min_interval == 20.0


# --------------------------------------------------------------------------------------------
# the operator Deployment


@VARIANTS
def test_operator_deployment_is_single_hardened_and_probed(values: Path) -> None:
    objects = helm_render(values)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["args"] == ["operator"]  # the image's entrypoint is `kubetune`
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    loaded = settings.from_env(deployment_env(objects))  # the real settings parser accepts it
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": loaded.metrics_port, "health": loaded.health_port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts  # the only writable path on a read-only root


def test_images_default_to_the_app_version_and_can_be_pinned() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    default = helm_render(variant("default"))
    image = one(default, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/kubetune/operator:{chart['appVersion']}"
    trainer = settings.from_env(deployment_env(default)).trainer_image
    assert trainer == f"ghcr.io/kubetune/trainer:{chart['appVersion']}"
    assert trainer == settings.DEFAULT_TRAINER_IMAGE  # chart and operator agree on the default
    pinned = helm_render(variant("monitoring"))
    container = one(pinned, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == (
        "registry.example.com/ml/kubetune-operator@sha256:" + "0123456789abcdef" * 4
    )
    env = deployment_env(pinned)
    assert (
        env["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com/ml/kubetune-trainer:0.1.0-cuda12.8"
    )
    assert one(pinned, "Deployment")["spec"]["template"]["spec"]["imagePullSecrets"] == [
        {"name": "registry-credentials"}
    ]


def test_service_and_service_monitor_reach_the_operator() -> None:
    objects = helm_render(variant("monitoring"))
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # Per-job series carry the FineTuneJob's namespace; without honorLabels it is renamed.
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    # The operator-down alert looks for the job label Prometheus gives this Service's targets.
    rules = one(objects, "PrometheusRule")["spec"]["groups"]
    down = [r for g in rules for r in g["rules"] if r["alert"] == "KubetuneOperatorDown"]
    assert f'job="{service["metadata"]["name"]}"' in down[0]["expr"]


def test_pod_monitor_selects_the_trainer_pods_the_operator_renders() -> None:
    objects = helm_render(variant("monitoring"))
    monitor = one(objects, "PodMonitor")
    (loaded,) = manifests.load_file(ROOT / "examples" / "quickstart.yaml").jobs
    children = render.render(loaded, uid="0000-1111", default_image="trainer:test")
    template = children.job["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {
        p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]
    }
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert container_ports[endpoint["port"]] == 9400
    # The relabeling copies a pod label holding the FineTuneJob's name into `name`.
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "name"
    source = relabel["sourceLabels"][0].removeprefix("__meta_kubernetes_pod_label_")
    matching = [k for k in pod_labels if k.replace(".", "_").replace("/", "_") == source]
    assert len(matching) == 1, f"no pod label becomes {relabel['sourceLabels']}"
    assert pod_labels[matching[0]] == loaded.metadata.name


# --------------------------------------------------------------------------------------------
# values.schema.json is strict


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("watchNamespaces=ml", "watchNamespaces"),  # a typo is an error, not a silent default
        ("operator.logFormat=xml", "logFormat"),
        ("image.digest=latest", "digest"),
        ("watchNamespace=Team_A", "watchNamespace"),
        ("metrics.serviceMonitor.interval=soon", "interval"),
        ("operator.metricsPort=70000", "metricsPort"),
        ("metrics.prometheusRule.pendingSeconds=5", "pendingSeconds"),
    ],
)
def test_values_schema_rejects_bad_values_naming_the_field(setting: str, named: str) -> None:
    result = helm("template", "kt", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert named in result.stderr, result.stderr


def test_values_schema_is_valid_json_schema_and_accepts_the_defaults() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)


# --------------------------------------------------------------------------------------------
# dashboard and notes


def test_dashboard_config_map_carries_the_dashboard_for_the_sidecar() -> None:
    objects = helm_render(variant("monitoring"))
    (config_map,) = [
        o for o in by_kind(objects, "ConfigMap") if "dashboard" in o["metadata"]["name"]
    ]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(config_map["data"]["kubetune.json"])
    assert board == dashboard()
    assert board["uid"] == "kubetune-overview"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"


def test_notes_tell_how_to_upgrade_crds() -> None:
    result = helm(
        "install",
        "kt",
        str(CHART),
        "-n",
        NAMESPACE,
        "--dry-run=client",
        "-f",
        str(variant("namespaced")),
    )
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "namespace ml-team only" in notes
    assert "kubectl apply --server-side -f" in notes and crd.CRD_FILENAME in notes
    assert "kubectl get finetunejobs -n ml-team" in notes
