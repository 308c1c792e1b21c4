"""FineTuneJob -> the Kubernetes objects that run it (pure: no API, no env, no clock).

Children, all named deterministically from the FineTuneJob so that a restarted operator finds
(409) instead of duplicating them:

- ConfigMap ``<name>-config`` with ``config.json`` (the resolved :class:`api.TrainerConfig`),
- Job ``<name>-trainer`` (batch/v1; Indexed with one pod per node when ``numNodes > 1``),
- Service ``<name>-nodes`` (headless, only when ``numNodes > 1``): stable DNS names
  ``<job>-<index>.<service>`` for the torchrun rendezvous on index 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune import api, registry

CONTAINER = "trainer"
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/{api.CONFIG_FILE}"
RENDEZVOUS_PORT = 29500
_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
RUN_AS = 1000  # the trainer image's non-root user

MANAGED_BY = "kubetune-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PROMOTE = "kubetune.io/promote"  # the promote Job's FineTuneJob (render.promote_job)
LABEL_JOB = "kubetune.io/finetunejob"  # the owning FineTuneJob's name, on every child and pod
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_CONFIG_HASH = "kubetune.io/config-hash"
# Server-side selector for the operator's watches of Jobs and Pods.
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

# podFailurePolicy: how a failed pod is counted (first matching rule wins).
POD_FAILURE_RULES: list[dict[str, Any]] = [
    # Preemption, eviction, node drain: not the job's fault; the pod is replaced, not counted.
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    # Bad spec or data: retrying cannot help.
    {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": CONTAINER,
            "operator": "In",
            "values": [api.EXIT_USER_ERROR],
        },
    },
    # The trainer caught SIGTERM and committed a checkpoint: resume without counting.
    {
        "action": "Ignore",
        "onExitCodes": {
            "containerName": CONTAINER,
            "operator": "In",
            "values": [api.EXIT_PREEMPTED],
        },
    },
]


def config_map_name(name: str) -> str:
    return f"{name}-config"


def job_name(name: str) -> str:
    return f"{name}-trainer"


def service_name(name: str) -> str:
    return f"{name}-nodes"


@dataclass(frozen=True)
class Children:
    """What the operator creates for one FineTuneJob, in creation order."""

    config_map: dict[str, Any]
    job: dict[str, Any]
    service: dict[str, Any] | None = None

    def all(self) -> list[dict[str, Any]]:
        # The ConfigMap first: a pod that starts before its config exists would wait.
        return [self.config_map, *([self.service] if self.service else []), self.job]


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "kubetune",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: name,
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        # Foreground deletion of the FineTuneJob waits for its children.
        "blockOwnerDeletion": True,
    }


def trainer_config(
    job: api.FineTuneJob, *, uid: str | None, image: str, policy: api.Policy
) -> api.TrainerConfig:
    return api.TrainerConfig(
        name=job.metadata.name,
        namespace=job.metadata.namespace or "default",
        uid=uid,
        image=image,
        spec=job.spec,
        policy=policy,
    )


def config_json(config: api.TrainerConfig) -> str:
    return json.dumps(config.to_api(), indent=2, sort_keys=True) + "\n"


# The API server refuses a ConfigMap whose data (keys + values, in bytes) exceeds 1 MiB.
MAX_CONFIG_MAP_BYTES = 1024 * 1024


def size_problems(
    job: api.FineTuneJob, *, default_image: str, policy: api.Policy | None = None
) -> list[str]:
    """The child the API server would refuse for its size: config.json over 1 MiB."""
    image = job.spec.resources.image or default_image
    config = trainer_config(job, uid=None, image=image, policy=policy or api.Policy())
    size = len(api.CONFIG_FILE.encode()) + len(config_json(config).encode())
    if size <= MAX_CONFIG_MAP_BYTES:
        return []
    spec = job.spec.to_api()
    largest = max(spec, key=lambda key: len(json.dumps(spec[key])))
    return [
        f"spec: the trainer's ConfigMap would be {size} bytes, over the API server's limit of "
        f"{MAX_CONFIG_MAP_BYTES} bytes (1 MiB); the largest part is spec.{largest}"
    ]


def _metadata(
    child: str, owner: str, namespace: str, uid: str | None, extra: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child,
        "namespace": namespace,
        "labels": {**labels(owner), **(extra or {})},
    }
    if uid:
        meta["ownerReferences"] = [owner_reference(owner, uid)]
    return meta


def _command(spec: api.FineTuneJobSpec, job: str, service: str) -> list[str]:
    trainer = ["-m", "kubetune_trainer", "--config", CONFIG_PATH]
    nodes, gpus = spec.resources.numNodes, spec.resources.gpus
    if nodes == 1 and gpus <= 1:
        return ["python", *trainer]
    if nodes == 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", *trainer]
    # Static rendezvous on index 0: node ranks equal completion indexes, so rank 0 (the process
    # that serves /metrics and writes the report) always runs in pod <job>-0.
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={gpus}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={job}-0.{service}",
        f"--master-port={RENDEZVOUS_PORT}",
        *trainer,
    ]


def s3_credentials_env(spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    """The S3 credentials as env from storage.s3.credentialsSecret (the trainer's and the
    staging containers'); only references: the values stay in the Secret, never in the Job
    or the ConfigMap."""
    secret = spec.storage.s3.credentialsSecret
    if not secret:
        return []
    env: list[dict[str, Any]] = []
    for key, optional in (
        ("AWS_ACCESS_KEY_ID", False),
        ("AWS_SECRET_ACCESS_KEY", False),
        ("AWS_SESSION_TOKEN", True),
    ):
        ref: dict[str, Any] = {"name": secret, "key": key}
        if optional:
            ref["optional"] = True
        env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _env(spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The root filesystem is read-only: every cache goes to the emptyDir at /cache.
        {"name": "HOME", "value": "/cache"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "MPLCONFIGDIR", "value": "/cache/matplotlib"},
        {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.resources.numNodes > 1:
        env.append(
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": _INDEX_FIELD}},
            }
        )
    return env + s3_credentials_env(spec) + _mlflow_env(spec)


def _mlflow_env(spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    mlflow = spec.output.registry.mlflow if spec.output.registry else None
    if not (mlflow and mlflow.credentialsSecret):
        return []
    # A token or a username and password: every key optional, the Secret holds one kind.
    return [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {"name": mlflow.credentialsSecret, "key": key, "optional": True}
            },
        }
        for key in registry.CREDENTIAL_ENVS
    ]


def container_security() -> dict[str, Any]:
    """Every container we render: non-root, read-only root filesystem, no capabilities."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security(user: int, *, fs_group: bool = True) -> dict[str, Any]:
    """A pod's securityContext: ``user`` for uid and gid (and the volumes' group, unless the
    pod mounts nothing it must share)."""
    out: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": user, "runAsGroup": user}
    if fs_group:
        out["fsGroup"] = user
    out["seccompProfile"] = {"type": "RuntimeDefault"}
    return out


def resources(gpus: int, cpu: str | None, memory: str | None, gpu_resource: str) -> dict[str, Any]:
    """A container's requests and limits (the trainer's and the staging engine's)."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if gpus:
        # Extended resources: request and limit must be equal.
        requests[gpu_resource] = limits[gpu_resource] = str(gpus)
    if cpu:
        requests["cpu"] = cpu
    if memory:
        # A memory limit equal to the request: an OOM kill names this pod, not a neighbour.
        requests["memory"] = limits["memory"] = memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_spec(spec: api.FineTuneJobSpec, name: str, image: str) -> dict[str, Any]:
    res = spec.resources
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": _command(spec, job_name(name), service_name(name)),
        "env": _env(spec),
        "ports": [{"name": "metrics", "containerPort": api.TRAINER_METRICS_PORT}],
        "resources": resources(res.gpus, res.cpu, res.memory, res.gpuResourceName),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": container_security(),
        # The trainer writes its final result there; on a crash the log tail is used instead.
        "terminationMessagePath": api.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if res.numNodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job makes new pods
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "enableServiceLinks": False,
        "securityContext": pod_security(RUN_AS),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(name)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.sharedMemory}},
        ],
        # Time for the trainer's SIGTERM checkpoint before SIGKILL.
        "terminationGracePeriodSeconds": 120,
    }
    if res.serviceAccountName:
        pod["serviceAccountName"] = res.serviceAccountName
    if res.nodeSelector:
        pod["nodeSelector"] = dict(res.nodeSelector)
    if res.tolerations:
        pod["tolerations"] = [t.to_api() for t in res.tolerations]
    if res.affinity:
        pod["affinity"] = res.affinity
    if spec.scheduling.priorityClassName:
        pod["priorityClassName"] = spec.scheduling.priorityClassName
    if res.numNodes > 1:
        pod["subdomain"] = service_name(name)
    return pod


def render(
    job: api.FineTuneJob,
    *,
    uid: str | None,
    default_image: str,
    policy: api.Policy | None = None,
) -> Children:
    """The children of a FineTuneJob; without ``uid`` they carry no owner reference."""
    name = job.metadata.name
    namespace = job.metadata.namespace or "default"
    spec = job.spec
    image = spec.resources.image or default_image
    config = config_json(trainer_config(job, uid=uid, image=image, policy=policy or api.Policy()))
    config_hash = hashlib.sha256(config.encode()).hexdigest()[:16]

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(name), name, namespace, uid),
        "data": {api.CONFIG_FILE: config},
    }

    job_labels: dict[str, str] = {}
    if spec.scheduling.queueName:
        job_labels[LABEL_QUEUE] = spec.scheduling.queueName
    nodes = spec.resources.numNodes
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.runPolicy.backoffLimit,
        "completions": nodes,
        "parallelism": nodes,
        "podFailurePolicy": {"rules": POD_FAILURE_RULES},
        # A replacement pod starts only once the old one is gone, so two trainers never write
        # checkpoints to the same destination at once.
        "podReplacementPolicy": "Failed",
        "suspend": spec.suspend,
        "template": {
            "metadata": {
                "labels": labels(name),
                "annotations": {ANNOTATION_CONFIG_HASH: config_hash},
            },
            "spec": _pod_spec(spec, name, image),
        },
    }
    if nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if spec.runPolicy.activeDeadlineSeconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.runPolicy.activeDeadlineSeconds
    if spec.runPolicy.ttlSecondsAfterFinished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.runPolicy.ttlSecondsAfterFinished
    batch_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **_metadata(job_name(name), name, namespace, uid, job_labels),
            "annotations": {ANNOTATION_CONFIG_HASH: config_hash},
        },
        "spec": job_spec,
    }

    service = None
    if nodes > 1:
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(service_name(name), name, namespace, uid),
            "spec": {
                "clusterIP": "None",
                # Rendezvous happens before any pod is Ready.
                "publishNotReadyAddresses": True,
                "selector": {LABEL_JOB: name, LABEL_MANAGED_BY: MANAGED_BY},
                "ports": [
                    {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}
                ],
            },
        }
    return Children(config_map=config_map, job=batch_job, service=service)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so config.json reads as JSON inside the YAML."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def promote_job_name(name: str) -> str:
    return f"{name}-promote"


def promote_job(
    job: api.FineTuneJob, *, uid: str | None, default_image: str, version: str, alias: str
) -> dict[str, Any] | None:
    """A one-pod Job that moves a registry alias to a model version (the staging step's way
    to promote: the operator never holds registry credentials, the pod gets them from the
    job's Secret like the trainer). None without ``output.registry.mlflow``."""
    spec = job.spec
    mlflow = spec.output.registry.mlflow if spec.output.registry else None
    if mlflow is None:
        return None
    name, namespace = job.metadata.name, job.metadata.namespace or "default"
    command = [
        "python",
        "-m",
        "kubetune_trainer.promote",
        "--tracking-uri",
        mlflow.trackingUri,
        "--model",
        mlflow.model,
        "--version",
        version,
        "--alias",
        alias,
        "--timeout",
        str(mlflow.timeoutSeconds),
    ]
    container = {
        "name": "promote",
        "image": spec.resources.image or default_image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [{"name": "HOME", "value": "/tmp"}, *_mlflow_env(spec)],
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(RUN_AS, fs_group=False),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if spec.resources.serviceAccountName:
        pod["serviceAccountName"] = spec.resources.serviceAccountName
    # Not the trainer's labels: the operator reads every pod labelled LABEL_JOB as a trainer.
    promote_labels = {
        "app.kubernetes.io/name": "kubetune-promote",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "promote",
        "app.kubernetes.io/part-of": "kubetune",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PROMOTE: name,
    }
    metadata: dict[str, Any] = {
        "name": promote_job_name(name),
        "namespace": namespace,
        "labels": promote_labels,
    }
    if uid:
        metadata["ownerReferences"] = [owner_reference(name, uid)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            # Exit 11 (unreachable registry) is worth a few retries; exit 10 (refused) is not.
            "backoffLimit": 3,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "promote",
                            "operator": "In",
                            "values": [api.EXIT_USER_ERROR],
                        },
                    }
                ]
            },
            "template": {"metadata": {"labels": promote_labels}, "spec": pod},
        },
    }
