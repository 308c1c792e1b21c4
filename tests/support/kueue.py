"""Kueue on the test cluster (``dev-cluster.sh up DIR kueue``): its CRDs, webhook
configuration and RBAC from the built module version, its internal cert rotation, and its
webhooks reachable on loopback. Kueue runs as its own ServiceAccount
(``kueue-system/kueue-controller-manager``, a TokenRequest token) with the ClusterRole and Role
of its release manifests, not as an admin.

The webhook Service is an ExternalName ``localhost``: the API server then calls
``https://localhost:PORT`` while checking the certificate against
``kueue-webhook-service.kueue-system.svc`` (what Kueue's cert rotation issues). Only the
``batch/job`` integration is on, so only the Job webhooks and Kueue's own are registered (the
others are failurePolicy Fail and would block every pod). VisibilityOnDemand is off: its
APIService would break discovery without a route to it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.support.kube import ApiStatus, Kube

if TYPE_CHECKING:
    from tests.support.controlplane import ControlPlane

NAMESPACE = "kueue-system"
SERVICE = "kueue-webhook-service"
SECRET = "kueue-webhook-server-cert"
CONVERTED = ["localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters"]


def _ours(webhook: dict[str, Any]) -> bool:
    path = webhook["clientConfig"]["service"]["path"]
    return "batch-v1-job" in path or "kueue-x-k8s-io" in path


def _apply(kube: Kube, api_version: str, plural: str, ns: str | None, obj: dict[str, Any]) -> None:
    name = obj["metadata"]["name"]
    path = Kube.path(api_version, plural, ns, name) + "?fieldManager=kubetune-tests&force=true"
    kube.request("PATCH", path, obj, "application/apply-patch+yaml")


# The manager's RBAC from Kueue's release manifests (config/components/rbac), as its kustomization
# names them: everything Kueue itself needs; leader election is off, MultiKueue unused.
RBAC_FILES = [
    "service_account.yaml",
    "role.yaml",
    "role_binding.yaml",
    "manager_secrets_role.yaml",
    "manager_secrets_role_binding.yaml",
]
PREFIX = "kueue-"


def rbac(config_dir: Path) -> list[dict[str, Any]]:
    """The manager's ServiceAccount, ClusterRole, Role and bindings, with the names and
    namespace that Kueue's kustomization (``namePrefix: kueue-``, ``namespace: kueue-system``)
    gives them."""
    docs = []
    for name in RBAC_FILES:
        for doc in yaml.safe_load_all((config_dir / "rbac" / name).read_text()):
            if not doc:
                continue
            meta = doc["metadata"]
            meta["name"] = PREFIX + meta["name"]
            if "namespace" in meta:
                meta["namespace"] = NAMESPACE
            if "roleRef" in doc:
                doc["roleRef"]["name"] = PREFIX + doc["roleRef"]["name"]
            for subject in doc.get("subjects", []):
                subject.update(name=PREFIX + subject["name"], namespace=NAMESPACE)
            docs.append(doc)
    return docs


_PLURAL = {
    "ServiceAccount": ("v1", "serviceaccounts"),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles"),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
}


def _identity(plane: ControlPlane, config_dir: Path, kube: Kube) -> Path:
    """Kueue's own ServiceAccount and roles, and a kubeconfig with a token for it."""
    from tests.support.controlplane import kubeconfig

    account = ""
    for doc in rbac(config_dir):
        api_version, plural = _PLURAL[doc["kind"]]
        _apply(kube, api_version, plural, doc["metadata"].get("namespace"), doc)
        if doc["kind"] == "ServiceAccount":
            account = doc["metadata"]["name"]
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 24 * 3600},
    }
    token = kube.create("v1", "serviceaccounts", NAMESPACE, request, sub=f"{account}/token")
    return kubeconfig(
        plane.dir / "kueue.kubeconfig",
        plane.server,
        plane.dir / "pki" / "ca.crt",
        token=token["status"]["token"],
    )


def start(plane: ControlPlane, bindir: Path, kube: Kube) -> None:
    from tests.support.controlplane import free_port

    config_dir = bindir / "kueue-config"
    port, health, metrics = free_port(), free_port(), free_port()
    plane.ports.update({"kueue-webhook": port, "kueue-health": health})
    service = {"name": SERVICE, "namespace": NAMESPACE, "port": port}
    for path in sorted((config_dir / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"service": {**service, "path": "/convert"}},
                },
            }
        _apply(kube, "apiextensions.k8s.io/v1", "customresourcedefinitions", None, crd)
    _apply(
        kube,
        "v1",
        "namespaces",
        None,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    )
    _apply(
        kube,
        "v1",
        "services",
        NAMESPACE,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "spec": {
                "type": "ExternalName",
                "externalName": "localhost",
                "ports": [{"port": port, "targetPort": port}],
            },
        },
    )
    _apply(
        kube,
        "v1",
        "secrets",
        NAMESPACE,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
        },
    )
    for doc in yaml.safe_load_all((config_dir / "webhooks.yaml").read_text()):
        kind = doc["kind"]
        kind_word = "mutating" if kind.startswith("Mutating") else "validating"
        doc["metadata"] = {"name": f"kueue-{kind_word}-webhook-configuration"}
        doc["webhooks"] = [w for w in doc["webhooks"] if _ours(w)]
        for webhook in doc["webhooks"]:
            webhook["clientConfig"]["service"].update(name=SERVICE, namespace=NAMESPACE, port=port)
        plural = f"{kind_word}webhookconfigurations"
        _apply(kube, "admissionregistration.k8s.io/v1", plural, None, doc)

    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics}"},
        "webhook": {"port": port, "host": "127.0.0.1", "certDir": str(plane.dir / "kueue-certs")},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": SERVICE,
            "webhookSecretName": SECRET,
        },
        "integrations": {"frameworks": ["batch/job"]},
    }
    (plane.dir / "kueue.yaml").write_text(yaml.safe_dump(config))
    kueue_config = _identity(plane, config_dir, kube)
    plane._start(
        "kueue",
        [
            str(bindir / "kueue"),
            f"--config={plane.dir / 'kueue.yaml'}",
            f"--kubeconfig={kueue_config}",
            "--feature-gates=VisibilityOnDemand=false",
        ],
    )

    certs = plane.dir / "kueue-certs"
    certs.mkdir(exist_ok=True)

    def ready() -> bool:
        import base64
        import urllib.request

        # What a kubelet does with the Secret volume in Kueue's Deployment: the cert rotation
        # writes the Secret, and waits for its files in certDir.
        if not (certs / "tls.crt").exists():
            secret = kube.get("v1", "secrets", NAMESPACE, SECRET) or {}
            data = secret.get("data") or {}
            if "tls.crt" not in data:
                return False
            for key, value in data.items():
                (certs / key).write_bytes(base64.b64decode(value))

        with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as answer:
            if answer.status != 200:
                return False
        hooks = kube.get(
            "admissionregistration.k8s.io/v1",
            "mutatingwebhookconfigurations",
            None,
            "kueue-mutating-webhook-configuration",
        )
        return all(w["clientConfig"].get("caBundle") for w in hooks["webhooks"])

    plane._wait("readyz and webhook CA", ready, 90, "kueue")
    # The webhook answers (the CA may be in place a moment before the server serves it).
    deadline = time.monotonic() + 30
    probe = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ResourceFlavor",
        "metadata": {"name": "kubetune-probe"},
    }
    while True:
        try:
            dry_run = Kube.path("kueue.x-k8s.io/v1beta2", "resourceflavors", None) + "?dryRun=All"
            kube.request("POST", dry_run, probe)
            return
        except ApiStatus:
            if time.monotonic() > deadline:
                raise
            plane.check()
            time.sleep(0.5)
