"""render.py: FineTuneJob -> ConfigMap, Job (and headless Service): golden YAML, schema
validation with kubernetes-validate --strict, and the properties the design asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune import api, manifests, render

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = ["quickstart", "lora-s3", "multi-gpu", "qlora-gpu", "full-finetune"]
UID = "0b0b2c1e-4a6f-4d2b-9a7e-5e2f0d1c3b4a"
IMAGE = "registry.example.com/kubetune/trainer:1.2.3"
POLICY = api.Policy(allowedLicenses=["CC0-1.0", "CC-BY-4.0"])
K8S_VERSION = "1.33.0"  # the oldest release whose Job API has every field we set


def load(name: str) -> api.FineTuneJob:
    loaded = manifests.load_file(ROOT / "examples" / f"{name}.yaml")
    assert not loaded.problems, loaded.problems
    return loaded.jobs[0]


def children(name: str, **changes: Any) -> render.Children:
    job = load(name)
    if changes:
        data = job.to_api()
        for dotted, value in changes.items():
            node = data["spec"]
            *parents, last = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        job = api.parse_job(data)
    return render.render(job, uid=UID, default_image=IMAGE, policy=POLICY)


@pytest.mark.parametrize("name", EXAMPLES)
def test_golden(name: str) -> None:
    text = render.to_yaml(children(name).all())
    golden = GOLDEN / f"{name}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"re-run with KUBETUNE_UPDATE_GOLDEN=1 to review {golden}"


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("version", [K8S_VERSION, "1.37.0"])
def test_every_object_passes_strict_schema_validation(name: str, version: str) -> None:
    for obj in children(name).all():
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_would_catch_a_typo() -> None:
    # The check above can fail: an unknown field is refused.
    job = children("lora-s3").job
    job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolcy"] = "File"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def pod_of(c: render.Children) -> dict[str, Any]:
    spec: dict[str, Any] = c.job["spec"]["template"]["spec"]
    return spec


def test_single_node_job_shape() -> None:
    c = children("lora-s3")
    assert c.service is None and [o["kind"] for o in c.all()] == ["ConfigMap", "Job"]
    spec = c.job["spec"]
    assert "completionMode" not in spec and spec["completions"] == spec["parallelism"] == 1
    assert spec["backoffLimit"] == 3 and spec["activeDeadlineSeconds"] == 86400
    assert spec["ttlSecondsAfterFinished"] == 604800 and spec["suspend"] is False
    assert c.job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-team"
    (container,) = pod_of(c)["containers"]
    assert container["command"] == [
        "python",
        "-m",
        "kubetune_trainer",
        "--config",
        "/etc/kubetune/config.json",
    ]
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi"},
        "limits": {"nvidia.com/gpu": "1", "memory": "64Gi"},
    }
    assert pod_of(c)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod_of(c)["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_multi_node_is_indexed_with_headless_service_and_torchrun_on_index_0() -> None:
    c = children("multi-gpu")
    assert c.service is not None
    assert [o["kind"] for o in c.all()] == ["ConfigMap", "Service", "Job"]
    spec = c.job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    pod = pod_of(c)
    assert pod["subdomain"] == c.service["metadata"]["name"] == "chat-70b-lora-nodes"
    assert c.service["spec"]["clusterIP"] == "None"
    assert c.service["spec"]["publishNotReadyAddresses"] is True
    command = pod["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=8"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert "--master-addr=chat-70b-lora-trainer-0.chat-70b-lora-nodes" in command
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "JOB_COMPLETION_INDEX" in env
    assert pod["priorityClassName"] == "training-high"


def test_single_node_multi_gpu_uses_standalone_torchrun() -> None:
    command = pod_of(children("lora-s3", **{"resources.gpus": 4}))["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--standalone", "--nproc-per-node=4"]


def test_pod_is_hardened() -> None:
    pod = pod_of(children("lora-s3"))
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["terminationMessagePath"] == api.TERMINATION_LOG
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/cache", "/dev/shm", "/etc/kubetune"} <= mounts
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_s3_credentials_only_as_secret_references() -> None:
    c = children("lora-s3")
    env = {e["name"]: e for e in pod_of(c)["containers"][0]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "s3-credentials" and ref["key"] == key and "value" not in env[key]
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "optional" not in env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    # No credentials at all without a secret (the pod's identity is used).
    plain = pod_of(children("multi-gpu", **{"storage.s3.credentialsSecret": None}))
    assert not {e["name"] for e in plain["containers"][0]["env"]} & {"AWS_ACCESS_KEY_ID"}


def test_pod_failure_policy_matches_the_trainer_exit_codes() -> None:
    rules = children("lora-s3").job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    by_code = {r["onExitCodes"]["values"][0]: r["action"] for r in rules[1:]}
    assert by_code == {api.EXIT_USER_ERROR: "FailJob", api.EXIT_PREEMPTED: "Ignore"}
    assert api.EXIT_INFRA_ERROR not in by_code  # infra errors count against backoffLimit


def test_owner_references_labels_and_deterministic_names() -> None:
    c = children("lora-s3")
    for obj in c.all():
        meta = obj["metadata"]
        assert meta["namespace"] == "ml-team"
        assert meta["ownerReferences"] == [render.owner_reference("support-bot-lora", UID)]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == render.MANAGED_BY
        assert meta["labels"]["kubetune.io/finetunejob"] == "support-bot-lora"
    assert c.job["spec"]["template"]["metadata"]["labels"]["kubetune.io/finetunejob"] == (
        "support-bot-lora"
    )
    assert c.job["metadata"]["name"] == "support-bot-lora-trainer"
    assert c.config_map["metadata"]["name"] == "support-bot-lora-config"
    again = children("lora-s3")
    assert again.all() == c.all()  # pure: same input, same output
    no_owner = render.render(load("lora-s3"), uid=None, default_image=IMAGE)
    assert all("ownerReferences" not in o["metadata"] for o in no_owner.all())


def test_config_map_is_the_trainer_config() -> None:
    c = children("lora-s3")
    config = api.TrainerConfig.model_validate_json(c.config_map["data"][api.CONFIG_FILE])
    assert config.name == "support-bot-lora" and config.namespace == "ml-team"
    assert config.uid == UID and config.image == IMAGE
    assert config.policy.allowedLicenses == ["CC0-1.0", "CC-BY-4.0"]
    assert config.spec == load("lora-s3").spec
    digest = c.job["spec"]["template"]["metadata"]["annotations"][render.ANNOTATION_CONFIG_HASH]
    other = children("lora-s3", **{"training.seed": 7})
    assert (
        other.job["spec"]["template"]["metadata"]["annotations"][render.ANNOTATION_CONFIG_HASH]
        != digest
    )


def test_spec_image_wins_over_the_default_and_suspend_passes_through() -> None:
    c = children("lora-s3", **{"resources.image": "mine:1", "suspend": True})
    assert pod_of(c)["containers"][0]["image"] == "mine:1"
    assert c.job["spec"]["suspend"] is True
    assert pod_of(children("lora-s3"))["containers"][0]["image"] == IMAGE


def test_no_secret_material_anywhere(tmp_path: Path) -> None:
    text = render.to_yaml(children("lora-s3").all())
    assert "secretKeyRef" in text
    for word in ("AKIA", "aws_secret_access_key:", "password"):
        assert word not in text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_cli_render_prints_valid_children() -> None:
    result = run_cli(
        "render",
        str(ROOT / "examples" / "multi-gpu.yaml"),
        "--uid",
        UID,
        env={"KUBETUNE_TRAINER_IMAGE": "from-env:2"},
    )
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert docs[2]["spec"]["template"]["spec"]["containers"][0]["image"] == "from-env:2"
    config = json.loads(docs[0]["data"]["config.json"])
    assert config["uid"] == UID


def test_cli_render_refuses_a_bad_manifest_naming_the_field(tmp_path: Path) -> None:
    bad = yaml.safe_load((ROOT / "examples" / "lora-s3.yaml").read_text())
    bad["spec"]["training"]["batchSize"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = run_cli("render", str(path))
    assert result.returncode == 10
    assert "spec.training.batchSize" in result.stderr
    assert result.stdout == ""


def test_the_operator_refuses_a_spec_whose_configmap_the_api_server_would_refuse() -> None:
    from kubetune.handlers import Operator
    from kubetune.settings import Settings

    data = load("quickstart").to_api()
    operator = Operator(Settings())
    assert operator.problems(api.parse_job(data)) == []
    # Within the CRD's limits (nodeSelector has no maxProperties) but too big for a ConfigMap.
    selector = {f"{i:04}" + "k" * 300: "v" * 63 for i in range(3_000)}
    data["spec"]["resources"]["nodeSelector"] = selector
    (problem,) = operator.problems(api.parse_job(data))
    assert problem.startswith("spec: the trainer's ConfigMap would be ")
    assert problem.endswith("limit of 1048576 bytes (1 MiB); the largest part is spec.resources")
