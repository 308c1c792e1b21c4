"""The operator on the real test cluster (tests/support/controlplane.py), as in production.

One :class:`Session` per pytest run: the control plane, our CRD applied server-side, the
chart's rendered ServiceAccount and RBAC applied, a token for that ServiceAccount minted with
TokenRequest, and the real `kubetune operator` as a subprocess whose kubeconfig carries only
that token (so the chart's least privilege is what it gets). Every request the operator makes is
in the API server's audit log: :meth:`Session.forbidden` lists the refused ones.

One :class:`Cluster` per test: a namespace of its own, the admin's view of it, kubectl, waiting
(which also notices a control-plane process that died), and the pods' local processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.support import helm_chart, kubelet
from tests.support import s3 as s3_support
from tests.support.controlplane import ClusterError, ControlPlane, free_port, kubeconfig
from tests.support.kube import ApiStatus, Kube
from tests.support.tools import binary

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
FTJ = "kubetune.io/v1alpha1"
OPERATOR_NAMESPACE = helm_chart.NAMESPACE
DEMO_MODEL = ROOT / "examples" / "demo-model"
DATASET = ROOT / "examples" / "data" / "quickstart.jsonl"
T = TypeVar("T")


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 30.0,
    every: float = 0.2,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` and the last value.
    ``check`` runs first on every round (it raises when the cluster is broken)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def established(kube: Kube, names: list[str]) -> bool:
    """Whether every named CRD is Established. Not `kubectl wait crd --all`: it fails on a CRD
    whose status is not written yet instead of waiting for it."""
    for name in names:
        crd = kube.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)
        conditions = ((crd or {}).get("status") or {}).get("conditions") or []
        if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return False
    return True


def demo_bucket(endpoint: str) -> str:
    """A new bucket with the demo model under model/ and the quickstart data at
    data/train.jsonl: what the end-to-end FineTuneJobs train on."""
    name = s3_support.new_bucket(endpoint)
    client = s3_support.client(endpoint)
    for path in DEMO_MODEL.iterdir():
        if path.is_file():
            client.upload_file(str(path), name, f"model/{path.name}")
    client.upload_file(str(DATASET), name, "data/train.jsonl")
    return name


def kubectl(config: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    # `kubectl wait --timeout=Ns` gets N s and a margin; anything else a minute.
    waits = [int(a.split("=")[1].rstrip("s")) for a in args if a.startswith("--timeout=")]
    result = subprocess.run(
        [binary("kubectl"), f"--kubeconfig={config}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=max([60, *[w + 30 for w in waits]]),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result.stdout if check else result.stdout + result.stderr


class Session:
    def __init__(
        self,
        root: Path,
        *,
        progress_interval: float = 0.5,
        kueue: bool = True,
        kubelet_args: list[str] | None = None,
    ):
        self.root = root
        self.plane = ControlPlane(root / "cluster", kueue=kueue, kubelet_args=kubelet_args or [])
        self.progress_interval = progress_interval
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_logs: list[Path] = []
        self.operator_env: dict[str, str] = {}

    # ---- lifecycle

    def start(self) -> Session:
        try:
            self.plane.up()
            self.admin = Kube(self.plane.kubeconfig)
            self.kubectl("apply", "--server-side", "-f", str(CRDS))
            wait_for("our CRDs Established", self._established, timeout=60, check=self.plane.check)
            self.kubectl("create", "namespace", OPERATOR_NAMESPACE)
            self.operator_kubeconfig = self._operator_identity()
            self.start_operator()
        except BaseException:
            self.close()
            raise
        return self

    def _established(self) -> bool:
        names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in CRDS.glob("*.yaml")]
        return established(self.admin, names)

    def _operator_identity(self) -> Path:
        """The chart's ServiceAccount and RBAC, and a kubeconfig with a token for it."""
        rbac = [
            doc
            for doc in helm_chart.render()
            if doc["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
        ]
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
        self.service_account = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"][
            "name"
        ]
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 24 * 3600},
        }
        answer = self.admin.create(
            "v1",
            "serviceaccounts",
            OPERATOR_NAMESPACE,
            request,
            sub=f"{self.service_account}/token",
        )
        return kubeconfig(
            self.root / "operator.kubeconfig",
            self.plane.server,
            self.plane.dir / "pki" / "ca.crt",
            token=answer["status"]["token"],
        )

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{self.service_account}"

    def check(self) -> None:
        """Raise (one line) when a control-plane process or the operator has died."""
        try:
            self.plane.check()
        except ClusterError as error:
            raise AssertionError(f"error: {error}") from None
        if self.operator is not None and self.operator.poll() is not None:
            raise AssertionError(
                f"error: kubetune operator exited with code {self.operator.returncode}; "
                f"log: {self.operator_logs[-1]}"
            )

    def close(self) -> None:
        self.stop_operator()
        self.plane.down()

    # ---- the operator

    def start_operator(self, **env: str) -> None:
        log = self.root / f"operator-{len(self.operator_logs)}.log"
        self.operator_logs.append(log)
        self.metrics_port, self.health_port = free_port(), free_port()
        environ = {
            **os.environ,
            "KUBECONFIG": str(self.operator_kubeconfig),
            "KUBETUNE_PROGRESS_INTERVAL": str(self.progress_interval),
            "KUBETUNE_PROGRESS_MIN_INTERVAL": "1",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test",
            **env,
        }
        self.operator_env = dict(env)
        with log.open("wb") as out:
            self.operator = subprocess.Popen(
                [sys.executable, "-m", "kubetune.cli", "operator"],
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(
            "the operator's health endpoint",
            lambda: _http_ok(f"http://127.0.0.1:{self.health_port}/healthz"),
            timeout=60,
            check=self.check,
        )

    def stop_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.terminate()
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait(5)
        self.operator = None

    def restart_operator(self, **env: str) -> None:
        self.stop_operator()
        self.start_operator(**env)

    def audit(self) -> list[dict[str, Any]]:
        """The operator's requests as the API server answered them (audit events); anonymous
        ones count as the operator's (nothing else here talks to the API server unauthenticated:
        an operator request that lost its token)."""
        path = self.plane.dir / "audit.log"
        events = []
        for line in path.read_text().splitlines() if path.exists() else []:
            event = json.loads(line)
            if event.get("user", {}).get("username") in (self.user, "system:anonymous"):
                events.append(event)
        return events

    def forbidden(self) -> list[str]:
        """The operator's requests that authorization refused (RBAC, not e.g. a namespace
        being deleted, which is also a 403)."""
        return [
            f"{e['verb']} {e['requestURI']}"
            for e in self.audit()
            if (e.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid"
        ]

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return kubectl(self.plane.kubeconfig, *args, input=input)

    def logs(self) -> str:
        parts = [
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in self.operator_logs
        ]
        for name in ("kubelet", "kube-controller-manager"):
            path = self.plane.log(name)
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Cluster:
    """One test's namespace on the session's cluster, seen as the admin."""

    def __init__(self, session: Session, prefix: str = "t"):
        self.session = session
        self.ns = f"{prefix[:40].rstrip('-')}-{uuid.uuid4().hex[:6]}"
        self.kube = session.admin
        self.kubeconfig = session.root / f"{self.ns}.kubeconfig"
        admin = yaml.safe_load(session.plane.kubeconfig.read_text())
        admin["contexts"][0]["context"]["namespace"] = self.ns
        self.kubeconfig.write_text(yaml.safe_dump(admin))
        self.kube.create(
            "v1",
            "namespaces",
            None,
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}},
        )
        self.workdir = session.plane.dir / "pods" / self.ns

    def close(self) -> None:
        with contextlib.suppress(ApiStatus):
            self.kube.delete("v1", "namespaces", None, self.ns)

    def wait_for(
        self, what: str, probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.2
    ) -> T:
        return wait_for(what, probe, timeout, every, check=self.session.check)

    # ---- API helpers

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return kubectl(self.kubeconfig, *args, input=input, check=check)

    def apply(self, doc: dict[str, Any] | str) -> str:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
        return self.kubectl("apply", "-f", "-", input=text)

    def s3_credentials(self) -> None:
        """The Secret `s3-credentials` (the moto server's test keys) that FineTuneJobs on
        :func:`demo_bucket` reference."""
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3-credentials", "namespace": self.ns},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": s3_support.TEST_KEY_ID,
                    "AWS_SECRET_ACCESS_KEY": s3_support.TEST_SECRET,
                },
            }
        )

    def ftj(self, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.kube.get(FTJ, "finetunejobs", self.ns, name)
        return result

    def status(self, name: str) -> dict[str, Any]:
        obj = self.ftj(name) or {}
        return dict(obj.get("status") or {})

    def wait_phase(self, name: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(
            f"{name} phase {phase}",
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.kube.list("v1", "events", self.ns)
            if e.get("involvedObject", {}).get("name") == name
        ]

    def jobs(self) -> list[dict[str, Any]]:
        return self.kube.list("batch/v1", "jobs", self.ns)

    def pods(self, job: str | None = None) -> list[dict[str, Any]]:
        selector = f"batch.kubernetes.io/job-name={job}" if job else ""
        return self.kube.list("v1", "pods", self.ns, selector=selector)

    def running_pod(self, job: str) -> dict[str, Any]:
        """The job's pod whose process is running (it has a pid file and phase Running)."""
        return self.wait_for(
            f"a running pod of {job}",
            lambda: next(
                (
                    p
                    for p in self.pods(job)
                    if p.get("status", {}).get("phase") == "Running"
                    and not p["metadata"].get("deletionTimestamp")
                    and (self.workdir / p["metadata"]["name"] / "pid").exists()
                ),
                None,
            ),
            timeout=60,
        )

    def pod_logs(self, prefix: str = "") -> dict[str, str]:
        """Every pod process's output in this namespace (pods that are gone too), by pod name."""
        if not self.workdir.exists():
            return {}
        return {
            d.name: (d / "log").read_text(errors="replace")
            for d in sorted(self.workdir.iterdir(), key=lambda d: d.stat().st_mtime)
            if d.name.startswith(prefix) and (d / "log").exists()
        }

    def kill(self, pod: str, sig: int = signal.SIGKILL) -> None:
        kubelet.kill(self.session.plane.dir / "pods", self.ns, pod, sig)

    def evict(self, pod: str) -> None:
        kubelet.evict(self.kube, self.ns, pod)

    def logs(self) -> str:
        out = [self.session.logs()]
        out += [f"--- pod {name}\n{text[-3000:]}" for name, text in self.pod_logs().items()]
        return "\n".join(out)
