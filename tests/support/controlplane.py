"""A real Kubernetes control plane on loopback, for tests and for trying kubetune by hand.

etcd, kube-apiserver (secure port, RBAC + Node authorization, real ServiceAccount tokens),
kube-controller-manager (job, deployment, replicaset, garbage collector, ttl-after-finished,
namespace, serviceaccount and token controllers) and the process kubelet
(tests/support/kubelet.py), optionally Kueue; binaries from scripts/build-cluster.sh.
Everything lives in one directory:

    DIR/kubeconfig        admin (client certificate in system:masters)
    DIR/pki/              CA, serving, client certificates, the ServiceAccount signing key
    DIR/<binary>.log      each process's log;  DIR/state.json  their PIDs
    DIR/audit.log         API audit log of ServiceAccount requests (forbidden-request checks)
    DIR/pods/             the kubelet's pod directories

    python -m tests.support.controlplane up DIR [kueue]   (what scripts/dev-cluster.sh runs)
    python -m tests.support.controlplane down DIR

``down`` stops every process ``up`` started, by PID (and any pod process left behind).
A process that fails gives one line naming the binary and its log (:class:`ClusterError`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-cluster.sh"
NODE = "kubetune-node"
SERVICE_CIDR = "10.0.0.0/24"
# KCM controllers (their kube-controller-manager names).
CONTROLLERS = [
    "job-controller",
    "deployment-controller",  # spec.staging's engine
    "replicaset-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
]  # no endpointslice controller: loopback pod IPs are no valid endpoint addresses
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "userGroups": ["system:serviceaccounts:kueue-system"]},  # Kueue's
        {"level": "Metadata", "userGroups": ["system:serviceaccounts", "system:unauthenticated"]},
        {"level": "None"},
    ],
}
# Start order; down stops in reverse.
ORDER = ["etcd", "kube-apiserver", "kube-controller-manager", "kueue", "kubelet"]


class ClusterError(Exception):
    """One line for the user: which binary, what happened, where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build() -> Path:
    """The binaries' directory, building them first when missing (cached)."""
    result = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        raise ClusterError(lines[-1][len("error: ") :] if lines else result.stderr.strip())
    return Path(result.stdout.strip().splitlines()[-1])


# ---- certificates


def _certs(pki: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)

    def write_key(name: str, key: Any) -> None:
        (pki / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (pki / f"{name}.key").chmod(0o600)

    def subject(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = subject("kubetune-test-ca")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_key("ca", ca_key)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, cn: str, orgs: tuple[str, ...] = (), server: bool = False) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(cn, orgs))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            names: list[x509.GeneralName] = [
                x509.DNSName(n)
                for n in (
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                )
            ]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "10.0.0.1")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_key(name, key)
        (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    issue("apiserver", "kube-apiserver", server=True)
    issue("admin", "kubetune-admin", ("system:masters",))
    issue("controller-manager", "system:kube-controller-manager", ("system:masters",))
    issue("scheduler", "system:kube-scheduler")
    issue("kubelet", f"system:node:{NODE}", ("system:nodes",))
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_key("sa", sa)
    (pki / "sa.pub").write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> Path:
    user: dict[str, Any] = {}
    if cert is not None and key is not None:
        user = {
            "client-certificate-data": base64.b64encode(cert.read_bytes()).decode(),
            "client-key-data": base64.b64encode(key.read_bytes()).decode(),
        }
    if token is not None:
        user = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [
            {
                "name": "kubetune-test",
                "context": {"cluster": "kubetune-test", "user": "user", "namespace": namespace},
            }
        ],
        "current-context": "kubetune-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# ---- processes


@dataclass
class ControlPlane:
    dir: Path
    bin: Path | None = None
    kueue: bool = False
    kubelet_args: list[str] = field(default_factory=list)  # e.g. ["--no-exec"]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def pod_ip_prefix(self) -> str:
        """The kubelet's pod addresses are PREFIX.N: unique among the clusters on this machine
        (their API ports differ)."""
        port = self.ports["apiserver"]
        return f"127.{port // 256}.{port % 256}"

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with self.log(name).open("ab") as out:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: down kills the group
                env=env,
                cwd=self.dir,
            )
        self._save()

    def _save(self) -> None:
        state = {"pids": {n: p.pid for n, p in self.procs.items()}, "ports": self.ports}
        (self.dir / "state.json").write_text(json.dumps(state, indent=1))

    def check(self) -> None:
        """Raise ClusterError naming the first process that has exited."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise ClusterError(f"{name} exited with code {code}; log: {self.log(name)}")

    def _wait(self, what: str, probe: Callable[[], bool], timeout: float, owner: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(Exception):
                if probe():
                    return
            time.sleep(0.1)
        raise ClusterError(
            f"{owner}: {what} not ready after {timeout:.0f}s; log: {self.log(owner)}"
        )

    def up(self, timeout: float = 120.0) -> ControlPlane:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._up(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _up(self, timeout: float) -> None:
        from tests.support.kube import Kube

        bindir = self.bin or build()
        pki = self.dir / "pki"
        _certs(pki)
        for name in ("etcd", "etcd-peer", "apiserver"):
            self.ports[name] = free_port()
        etcd_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._start(
            "etcd",
            [
                str(bindir / "etcd"),
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        (self.dir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        self._start(
            "kube-apiserver",
            [
                str(bindir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # loopback is no valid Endpoints address
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=RBAC,Node",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--audit-policy-file={self.dir / 'audit-policy.yaml'}",
                f"--audit-log-path={self.dir / 'audit.log'}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--profiling=false",
                f"--cert-dir={pki}",
            ],
        )
        admin = kubeconfig(
            self.kubeconfig,
            self.server,
            pki / "ca.crt",
            cert=pki / "admin.crt",
            key=pki / "admin.key",
        )
        kube = Kube(admin, timeout=5)
        self._wait(
            "/readyz",
            lambda: kube.raw("GET", "/readyz") == b"ok",
            60,
            "kube-apiserver",
        )
        kcm = kubeconfig(
            self.dir / "controller-manager.kubeconfig",
            self.server,
            pki / "ca.crt",
            cert=pki / "controller-manager.crt",
            key=pki / "controller-manager.key",
        )
        self._start(
            "kube-controller-manager",
            [
                str(bindir / "kube-controller-manager"),
                f"--kubeconfig={kcm}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--secure-port=0",
                "--concurrent-job-syncs=20",
                "--concurrent-gc-syncs=20",
            ],
        )
        node = kubeconfig(
            self.dir / "kubelet.kubeconfig",
            self.server,
            pki / "ca.crt",
            cert=pki / "kubelet.crt",
            key=pki / "kubelet.key",
        )
        scheduler = kubeconfig(
            self.dir / "scheduler.kubeconfig",
            self.server,
            pki / "ca.crt",
            cert=pki / "scheduler.crt",
            key=pki / "scheduler.key",
        )
        if self.kueue:
            from tests.support import kueue

            kueue.start(self, bindir, kube)
        self._start(
            "kubelet",
            [
                sys.executable,
                "-m",
                "tests.support.kubelet",
                f"--kubeconfig={node}",
                f"--scheduler-kubeconfig={scheduler}",
                f"--workdir={self.dir / 'pods'}",
                f"--node={NODE}",
                f"--ip-prefix={self.pod_ip_prefix}",
                *self.kubelet_args,
            ],
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )

        def node_ready() -> bool:
            obj = kube.get("v1", "nodes", None, NODE)
            conditions = (obj or {}).get("status", {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        self._wait(f"Node {NODE} Ready", node_ready, 30, "kubelet")

        def default_sa() -> bool:
            return kube.get("v1", "serviceaccounts", "default", "default") is not None

        self._wait("ServiceAccount default/default", default_sa, 30, "kube-controller-manager")

    def down(self) -> None:
        stop(self.dir, {n: p.pid for n, p in self.procs.items()})
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                proc.wait(1)
        self.procs.clear()


def _pythonpath() -> str:
    parts = [str(ROOT), str(ROOT / "operator"), str(ROOT / "trainer-image")]
    extra = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*parts, *([extra] if extra else [])])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop(directory: Path, pids: dict[str, int] | None = None, grace: float = 10.0) -> None:
    """Stop the processes ``up`` started in ``directory`` (kubelet first, etcd last) and any
    pod process the kubelet left; by PID (each leads its own process group)."""
    if pids is None:
        state = directory / "state.json"
        pids = json.loads(state.read_text())["pids"] if state.exists() else {}
    names = sorted(pids, key=lambda n: -ORDER.index(n) if n in ORDER else 0)
    for name in names:
        _kill_group(pids[name], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pids[name]) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill_group(pids[name], signal.SIGKILL)
    for pidfile in (directory / "pods").glob("*/*/pid"):
        with contextlib.suppress(ValueError, OSError):
            _kill_group(int(pidfile.read_text()), signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        (directory / "state.json").unlink()


def main(argv: list[str]) -> int:
    usage = "usage: dev-cluster.sh up DIR [kueue] | down DIR"
    if len(argv) < 2 or argv[0] not in ("up", "down"):
        print(usage, file=sys.stderr)
        return 2
    directory = Path(argv[1]).resolve()
    try:
        if argv[0] == "down":
            stop(directory)
            print(f"stopped the cluster in {directory}")
            return 0
        if (directory / "state.json").exists():
            raise ClusterError(f"a cluster is already running in {directory}: run down first")
        started = time.monotonic()
        plane = ControlPlane(directory, kueue="kueue" in argv[2:]).up()
        print(
            f"cluster up in {time.monotonic() - started:.1f}s: export KUBECONFIG={plane.kubeconfig}"
        )
        return 0
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
