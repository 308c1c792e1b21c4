"""The process kubelet: a Node of the test cluster whose pods are local processes.

Everything else is the real control plane: the Job controller makes the pods, the garbage
collector removes them, the API server evicts them. This process plays only the node:

- registers Node ``--node`` as ``system:node:<node>`` (the Node authorizer limits it to its own
  pods, and to the ConfigMaps and Secrets they reference) with a Ready condition and capacity
  cpu, memory, pods and ``nvidia.com/gpu: 8``;
- schedules: binds each unscheduled pod to the node (pods/binding, as ``system:kube-scheduler``);
- runs each bound pod's first container as a local process in ``--workdir/<ns>/<pod>/``:
  ``python`` is this interpreter and ``torchrun`` its ``torch.distributed.run``; ConfigMap,
  Secret and emptyDir volumes become directories there, and every path under a mount, in the
  command and in env values, is rewritten to that directory; env from ``value``,
  ``secretKeyRef``, ``configMapKeyRef`` and ``fieldRef``; ``$(VAR)`` in command and args is
  expanded as Kubernetes does; the terminationMessagePath is given as env
  KUBETUNE_TERMINATION_LOG;
- networking: each pod gets its own loopback address (``--ip-prefix``.N, 127.A.B.N) as
  ``podIP``, given to the process as KUBETUNE_METRICS_HOST (the trainer binds /metrics
  there, so pods do not collide on the port); the DNS name of a pod behind a headless Service
  (``<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]``) in the command or env is rewritten to
  that pod's address, as cluster DNS would resolve it;
- init containers run first, one after the other, to completion (a failed one leaves the pod
  Pending with its terminated status, as Init:Error); ``vllm serve M`` is the vLLM venv's
  server (.tools/vllm, scripts/install-vllm.sh) and that venv's bin is on the pods' PATH (this
  node's "image" has guidellm); an httpGet readinessProbe keeps the pod not Ready until it
  answers 200; a Service name ``<svc>.<ns>.svc[.cluster.local][:port]`` resolves to a Ready
  pod it selects (and its targetPort), as cluster DNS and kube-proxy would;
- reports pods/status: phase, conditions, containerStatuses with
  ``terminated.exitCode/reason/message`` (the termination message file, or the log tail when it
  is empty and the policy is FallbackToLogsOnError);
- with ``--no-exec`` (benchmarks) it starts no process and reports every pod Running at
  ``PREFIX.1``, so a thousand pods cost only their API writes;
- honours deletion: SIGTERM to the process group, SIGKILL after the pod's grace period, reports
  the terminal status, then deletes the pod with grace 0 (as a kubelet does).

Each pod's process id is in ``<workdir>/<ns>/<pod>/pid`` (a test may SIGKILL it, as a node
problem would) and its output in ``.../log``. Eviction is the API server's: POST
pods/NAME/eviction adds the DisruptionTarget condition and deletes the pod (:func:`evict`).

    python -m tests.support.kubelet --kubeconfig K --scheduler-kubeconfig S --workdir D --node N
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.kube import ApiStatus, Kube

TERMINATION_TAIL = 2048
ROOT = Path(__file__).resolve().parents[2]
VLLM_BIN = ROOT / ".tools" / "vllm" / "bin"
INIT_TIMEOUT = 600
CAPACITY = {"cpu": "64", "memory": "512Gi", "pods": "250", "nvidia.com/gpu": "8"}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def evict(kube: Kube, namespace: str, pod: str) -> None:
    """Evict a pod through the Eviction API: the API server marks it DisruptionTarget
    (reason EvictionByEvictionAPI) and deletes it; the kubelet then stops its process."""
    kube.create(
        "v1",
        "pods",
        namespace,
        {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace},
        },
        sub=f"{pod}/eviction",
    )


def pod_dir(workdir: Path, namespace: str, pod: str) -> Path:
    return workdir / namespace / pod


def kill(workdir: Path, namespace: str, pod: str, sig: int = signal.SIGKILL) -> None:
    """Signal a pod's process group, as a node problem (OOM killer, crash) would."""
    pid = int((pod_dir(workdir, namespace, pod) / "pid").read_text())
    os.killpg(pid, sig)


class CannotStart(Exception):
    """The pod's container cannot be created (e.g. a missing Secret): CreateContainerConfigError."""


@dataclass
class Run:
    uid: str
    namespace: str
    pod: str
    process: subprocess.Popen[bytes]
    root: Path
    termination: Path
    log: Path
    started: str
    policy: str
    kill_at: float | None = None  # SIGKILL deadline once deletion began
    reported: bool = False
    probe: tuple[int, str] | None = None  # readinessProbe httpGet (port, path) until it passes


class Kubelet:
    def __init__(
        self,
        kube: Kube,
        scheduler: Kube,
        workdir: Path,
        node: str,
        ip_prefix: str = "127.77",
        poll: float = 0.2,
        no_exec: bool = False,
    ):
        self.kube, self.scheduler, self.workdir, self.node = kube, scheduler, workdir, node
        self.ip_prefix = ip_prefix  # 127.A.B: each cluster on this machine its own range
        self.poll = poll
        # No processes: every pod is reported Running at PREFIX.1 (benchmarks: the control
        # plane's and the operator's work without a thousand trainers).
        self.no_exec = no_exec
        self.faked: set[str] = set()  # pod uids reported Running without a process
        self.pool = ThreadPoolExecutor(8) if no_exec else None
        self._pending: list[Future[None]] = []
        self.runs: dict[str, Run] = {}  # pod uid -> run
        self.ips: dict[str, str] = {}  # pod uid -> loopback address
        self.waiting: dict[str, str] = {}  # pod uid -> reason last reported
        self.init_failed: set[str] = set()  # pod uids whose init container failed
        self.stopping = threading.Event()

    # ---- node

    def register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"},
            },
        }
        with contextlib.suppress(ApiStatus):
            self.kube.create("v1", "nodes", None, node)
        self.kube.patch(
            "v1",
            "nodes",
            None,
            self.node,
            {
                "status": {
                    "capacity": CAPACITY,
                    "allocatable": CAPACITY,
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "process kubelet is posting ready status",
                            "lastHeartbeatTime": now(),
                            "lastTransitionTime": now(),
                        }
                    ],
                    "nodeInfo": {"kubeletVersion": "process", "operatingSystem": "linux"},
                }
            },
            sub="status",
        )

    # ---- loop

    def serve(self) -> None:
        self.register()
        while not self.stopping.is_set():
            try:
                self.schedule()
                self.sync()
            except Exception as error:  # keep serving; the log says why
                print(f"kubelet: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            self.stopping.wait(self.poll)
        for run in list(self.runs.values()):
            self._signal(run, signal.SIGKILL)

    def schedule(self) -> None:
        pending = self.scheduler.list("v1", "pods", fields="spec.nodeName=,status.phase=Pending")
        for pod in pending:
            meta = pod["metadata"]
            if pod["spec"].get("schedulingGates") or meta.get("deletionTimestamp"):
                continue
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
            }
            self._run(self._bind, meta["namespace"], meta["name"], binding)
        self._drain()

    def _bind(self, namespace: str, name: str, binding: dict[str, Any]) -> None:
        with contextlib.suppress(ApiStatus):  # gone or bound meanwhile
            self.scheduler.create("v1", "pods", namespace, binding, sub=f"{name}/binding")

    def _run(self, fn: Any, *args: Any) -> None:
        """Call ``fn`` now, or on the pool (no-exec mode: many pods at once)."""
        if self.pool is None:
            fn(*args)
        else:
            self._pending.append(self.pool.submit(fn, *args))

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def sync(self) -> None:
        pods = self.kube.list("v1", "pods", fields=f"spec.nodeName={self.node}")
        if self.no_exec:
            self._sync_no_exec(pods)
            return
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            run = self.runs.get(uid)
            deleting = bool(pod["metadata"].get("deletionTimestamp"))
            phase = pod.get("status", {}).get("phase")
            if run is None:
                if deleting:  # never started (e.g. CreateContainerConfigError)
                    self._stop_unstarted(pod)
                elif phase not in ("Succeeded", "Failed") and uid not in self.init_failed:
                    self._start(pod)
                continue
            if run.probe is not None and run.process.poll() is None and not deleting:
                self._probe(pod, run)
            if deleting and run.process.poll() is None:
                if run.kill_at is None:
                    grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)
                    run.kill_at = time.monotonic() + grace
                    self._signal(run, signal.SIGTERM)
                elif time.monotonic() >= run.kill_at:
                    self._signal(run, signal.SIGKILL)
            if run.process.poll() is not None and not run.reported:
                self._finished(pod, run)
            if run.reported and deleting:
                self._remove(pod)
        for uid in set(self.runs) - seen:  # deleted (force) while we looked away
            self._signal(self.runs.pop(uid), signal.SIGKILL)

    def _sync_no_exec(self, pods: list[dict[str, Any]]) -> None:
        ip = f"{self.ip_prefix}.1"
        for pod in pods:
            uid = pod["metadata"]["uid"]
            if pod["metadata"].get("deletionTimestamp"):
                self.faked.discard(uid)
                self._run(self._stop_unstarted, pod)
            elif uid not in self.faked and pod.get("status", {}).get("phase") == "Pending":
                self.faked.add(uid)
                started = now()
                container = pod["spec"]["containers"][0]
                status = {
                    "phase": "Running",
                    "hostIP": "127.0.0.1",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "startTime": started,
                    "conditions": [_cond(c) for c in ("Initialized", "Ready", "ContainersReady")],
                    "containerStatuses": [
                        _container_status(container, {"running": {"startedAt": started}}, True)
                    ],
                }
                self._run(self._status, pod, status)
        self._drain()

    def _stop_unstarted(self, pod: dict[str, Any]) -> None:
        """A deleted pod without a process (never started, or --no-exec) "exits" on SIGTERM
        (143): a terminal phase first, as a kubelet reports, so the Job controller accounts
        for it and drops its tracking finalizer (with a podFailurePolicy it waits for one)."""
        if pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            container = pod["spec"]["containers"][0]
            terminated = {"exitCode": 143, "reason": "Error", "finishedAt": now()}
            status = {
                "phase": "Failed",
                "conditions": [_cond("Ready", "False", "PodFailed")],
                "containerStatuses": [_container_status(container, {"terminated": terminated})],
            }
            self._status(pod, status)
        self._remove(pod)

    def _remove(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.runs.pop(meta["uid"], None)
        Path(f"/tmp/kt-{meta['uid'][:12]}").unlink(missing_ok=True)  # the short TMPDIR link
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        with contextlib.suppress(ApiStatus):
            self.kube.request(
                "DELETE", Kube.path("v1", "pods", meta["namespace"], meta["name"]), body
            )

    # ---- starting

    def ip(self, uid: str) -> str:
        if uid not in self.ips:  # 127.A.B.2-254, reused after 253 pods
            self.ips[uid] = f"{self.ip_prefix}.{len(self.ips) % 253 + 2}"
        return self.ips[uid]

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        root = pod_dir(self.workdir, ns, name)
        root.mkdir(parents=True, exist_ok=True)
        container = spec["containers"][0]
        try:
            if not self._init(pod, root):
                return
            argv, env = self._container(pod, container, root)
        except CannotStart as error:
            if self.waiting.get(uid) != str(error):
                self.waiting[uid] = str(error)
                self._status(
                    pod,
                    {
                        "phase": "Pending",
                        "containerStatuses": [
                            _container_status(
                                container,
                                {
                                    "waiting": {
                                        "reason": "CreateContainerConfigError",
                                        "message": str(error),
                                    }
                                },
                            )
                        ],
                    },
                )
            return
        log = root / "log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=root,
                start_new_session=True,
            )
        (root / "pid").write_text(str(process.pid))
        started = now()
        run = Run(
            uid,
            ns,
            name,
            process,
            root,
            Path(env["KUBETUNE_TERMINATION_LOG"]),
            log,
            started,
            container.get("terminationMessagePolicy", "File"),
        )
        self.runs[uid] = run
        ip = self.ip(uid)
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        if probe:
            run.probe = (_port(container, probe.get("port")), probe.get("path", "/"))
        ready = "False" if probe else "True"
        self._status(
            pod,
            {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": started,
                "conditions": [
                    _cond("PodReadyToStartContainers"),
                    _cond("Initialized"),
                    _cond("Ready", ready),
                    _cond("ContainersReady", ready),
                    _cond("PodScheduled"),
                ],
                "containerStatuses": [
                    _container_status(
                        container, {"running": {"startedAt": started}}, ready=not probe
                    )
                ],
            },
        )

    def _init(self, pod: dict[str, Any], root: Path) -> bool:
        """Run the init containers in order; False (status reported) when one fails."""
        for init in pod["spec"].get("initContainers") or []:
            argv, env = self._container(pod, init, root)
            log = root / f"init-{init['name']}.log"
            with log.open("ab") as out:
                try:
                    code = subprocess.run(
                        argv,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=root,
                        timeout=INIT_TIMEOUT,
                        check=False,
                    ).returncode
                except subprocess.TimeoutExpired:
                    code = 137
            if code == 0:
                continue
            self.init_failed.add(pod["metadata"]["uid"])
            tail = log.read_bytes()[-TERMINATION_TAIL:].decode(errors="replace")
            terminated = {"exitCode": code, "reason": "Error", "message": tail, "finishedAt": now()}
            self._status(
                pod,
                {
                    "phase": "Pending",
                    "conditions": [_cond("Initialized", "False", "ContainersNotInitialized")],
                    "initContainerStatuses": [_container_status(init, {"terminated": terminated})],
                },
            )
            return False
        return True

    def _probe(self, pod: dict[str, Any], run: Run) -> None:
        assert run.probe is not None
        port, path = run.probe
        url = f"http://{self.ip(run.uid)}:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status != 200:
                    return
        except (OSError, urllib.error.URLError):
            return
        run.probe = None
        container = pod["spec"]["containers"][0]
        self._status(
            pod,
            {
                "conditions": [_cond("Ready"), _cond("ContainersReady")],
                "containerStatuses": [
                    _container_status(
                        container, {"running": {"startedAt": run.started}}, ready=True
                    )
                ],
            },
        )

    def _container(
        self, pod: dict[str, Any], container: dict[str, Any], root: Path
    ) -> tuple[list[str], dict[str, str]]:
        meta, spec = pod["metadata"], pod["spec"]
        ns = meta["namespace"]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, str] = {}  # container path -> local path
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            local = root / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                data = self._object("configmaps", ns, volume["configMap"]["name"])
                for key, value in (data.get("data") or {}).items():
                    (local / key).write_text(value)
            elif "secret" in volume:
                data = self._object("secrets", ns, volume["secret"]["secretName"])
                for key, value in (data.get("data") or {}).items():
                    (local / key).write_bytes(base64.b64decode(value))
            mounts[mount["mountPath"]] = str(local)

        peers: list[dict[str, Any]] = []  # this namespace's pods, for their DNS names
        services: list[dict[str, Any]] = []  # and its Services

        def rewrite(value: str) -> str:
            for inside, outside in sorted(mounts.items(), key=lambda m: -len(m[0])):
                if value == inside or value.startswith(inside + "/"):
                    return outside + value[len(inside) :]
            # KEY=/mount/path forms, in one pass: a rewritten path that starts with another
            # mount's path (/tmp/...) must not be rewritten again.
            if mounts:
                insides = sorted(mounts, key=len, reverse=True)
                pattern = "=(" + "|".join(re.escape(i) for i in insides) + ")/"
                value = re.sub(pattern, lambda m: "=" + mounts[m.group(1)] + "/", value)
            if "." in value and not peers:
                peers.extend(self.scheduler.list("v1", "pods", ns))  # the node may not
                services.extend(self.scheduler.list("v1", "services", ns))
            return self._resolve(ns, value, peers, services)

        path = os.environ.get("PATH", "")
        if VLLM_BIN.is_dir():
            path += os.pathsep + str(VLLM_BIN)
        env: dict[str, str] = {"PATH": path, "LANG": "C.UTF-8"}
        # This node's setting for vLLM's CPU KV cache (GiB): a test needs little.
        env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
        if os.environ.get("PYTHONPATH"):  # this machine's "image": the source tree
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        fields = {
            "metadata.name": meta["name"],
            "metadata.namespace": ns,
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node,
            "status.podIP": self.ip(meta["uid"]),
            "status.hostIP": "127.0.0.1",
        }
        for item in container.get("env") or []:
            source = item.get("valueFrom") or {}
            if "value" in item:
                env[item["name"]] = rewrite(_expand(item["value"], env))
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if secret else "configMapKeyRef"]
                try:
                    obj = self._object("secrets" if secret else "configmaps", ns, ref["name"])
                except CannotStart:
                    if ref.get("optional"):
                        continue
                    raise
                raw = (obj.get("data") or {}).get(ref["key"])
                if raw is None:
                    if ref.get("optional"):
                        continue
                    kind = "secret" if secret else "configmap"
                    raise CannotStart(
                        f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}"
                    )
                env[item["name"]] = base64.b64decode(raw).decode() if secret else raw
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
                if match:
                    env[item["name"]] = (meta.get(match.group(1)) or {}).get(match.group(2), "")
                else:
                    env[item["name"]] = fields.get(path, "")
        if len(env.get("TMPDIR", "")) > 40:
            # Unix socket paths (vLLM's ZMQ sockets live in TMPDIR) are limited to ~107 bytes:
            # a short link to the pod's temp dir, as a real pod's /tmp is short.
            link = Path("/tmp") / f"kt-{meta['uid'][:12]}"
            if not link.exists():
                link.symlink_to(env["TMPDIR"])
            env["TMPDIR"] = str(link)
        termination = container.get("terminationMessagePath", "/dev/termination-log")
        env.update(
            KUBETUNE_METRICS_HOST=self.ip(meta["uid"]),
            KUBETUNE_TERMINATION_LOG=str(root / "termination-log"),
            HOSTNAME=spec.get("hostname") or meta["name"],
        )
        mounts[termination] = str(root / "termination-log")
        argv = [
            rewrite(_expand(a, env))
            for a in [*container.get("command", []), *container.get("args", [])]
        ]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        elif argv and argv[0] == "torchrun":
            argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
        elif argv[:2] == ["vllm", "serve"] and len(argv) > 2:
            # The vllm-cpu distribution's `vllm` script cannot start (it looks up the version of
            # a package named vllm): its python runs the same server.
            server = [str(VLLM_BIN / "python"), "-m", "vllm.entrypoints.openai.api_server"]
            argv[:3] = [*server, "--model", argv[2]]
            env.pop("PYTHONPATH", None)  # vLLM's own venv, not this source tree
        (root / "command").write_text(shlex.join(argv) + "\n")
        return argv, env

    def _object(self, plural: str, ns: str, name: str) -> dict[str, Any]:
        try:
            obj = self.kube.get("v1", plural, ns, name)
        except ApiStatus as error:
            raise CannotStart(f"{plural[:-1]} {ns}/{name}: {error}") from None
        if obj is None:
            raise CannotStart(f"{plural[:-1]} {ns}/{name} not found")
        return dict(obj)

    def _resolve(
        self,
        ns: str,
        value: str,
        peers: list[dict[str, Any]],
        services: list[dict[str, Any]] | None = None,
    ) -> str:
        """Pod DNS names behind headless Services -> those pods' loopback addresses; a
        Service's name (and port) -> a Ready pod it selects (and that pod's targetPort)."""
        for service in services or []:
            value = self._resolve_service(ns, value, service, peers)
        for pod in peers:
            host, sub = pod["spec"].get("hostname"), pod["spec"].get("subdomain")
            if not host or not sub:
                continue
            name, domain = re.escape(f"{host}.{sub}"), re.escape(ns)
            pattern = rf"\b{name}(\.{domain}(\.svc(\.cluster\.local)?)?)?\b"
            value = re.sub(pattern, self.ip(pod["metadata"]["uid"]), value)
        return value

    def _resolve_service(
        self, ns: str, value: str, service: dict[str, Any], peers: list[dict[str, Any]]
    ) -> str:
        selector = (service.get("spec") or {}).get("selector") or {}
        if not selector:
            return value
        name = re.escape(service["metadata"]["name"])
        pattern = rf"\b{name}\.{re.escape(ns)}(\.svc(\.cluster\.local)?)?(:(\d+))?\b"
        if not re.search(pattern, value):
            return value
        ready = [
            p
            for p in peers
            if selector.items() <= (p["metadata"].get("labels") or {}).items()
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        ]
        if not ready:
            return value  # as cluster DNS would: a name with no endpoints does not connect
        pod = ready[0]
        container = pod["spec"]["containers"][0]

        def target(match: re.Match[str]) -> str:
            address = self.ip(pod["metadata"]["uid"])
            if not match.group(4):
                return address
            for port in service["spec"].get("ports") or []:
                if str(port.get("port")) == match.group(4):
                    return f"{address}:{_port(container, port.get('targetPort', port['port']))}"
            return f"{address}:{match.group(4)}"

        return re.sub(pattern, target, value)

    # ---- finishing

    def _finished(self, pod: dict[str, Any], run: Run) -> None:
        code = run.process.returncode
        exit_code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        message = run.termination.read_text(errors="replace") if run.termination.exists() else ""
        if not message.strip() and exit_code != 0 and run.policy == "FallbackToLogsOnError":
            message = run.log.read_bytes()[-TERMINATION_TAIL:].decode(errors="replace")
        ok = exit_code == 0
        container = pod["spec"]["containers"][0]
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if ok else "Error",
            "startedAt": run.started,
            "finishedAt": now(),
        }
        if message:
            terminated["message"] = message
        self._status(
            pod,
            {
                "phase": "Succeeded" if ok else "Failed",
                "conditions": [
                    _cond("Ready", "False", "PodCompleted" if ok else "PodFailed"),
                    _cond("ContainersReady", "False", "PodCompleted" if ok else "PodFailed"),
                    _cond("PodReadyToStartContainers", "False"),
                ],
                "containerStatuses": [_container_status(container, {"terminated": terminated})],
            },
        )
        run.reported = True

    def _status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiStatus):  # the pod is gone
            self.kube.patch(
                "v1",
                "pods",
                meta["namespace"],
                meta["name"],
                {"status": status},
                sub="status",
                ctype="application/strategic-merge-patch+json",  # keeps others' conditions
            )

    @staticmethod
    def _signal(run: Run, sig: int) -> None:
        if run.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.process.pid, sig)


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def _port(container: dict[str, Any], port: Any) -> int:
    """A numeric port, or a container port's name."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise CannotStart(f"no container port named {port!r}")


def _cond(type_: str, status: str = "True", reason: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": type_, "status": status, "lastTransitionTime": now()}
    if reason:
        cond["reason"] = reason
    return cond


def _container_status(
    container: dict[str, Any], state: dict[str, Any], ready: bool = False
) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kubelet")
    parser.add_argument("--kubeconfig", required=True, help="the node's (system:node:NAME)")
    parser.add_argument("--scheduler-kubeconfig", required=True, help="may create pods/binding")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--ip-prefix", default="127.77", help="pod IPs: PREFIX.2-254 (127.A.B)")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between syncs")
    parser.add_argument(
        "--no-exec", action="store_true", help="start no process: report pods Running at PREFIX.1"
    )
    args = parser.parse_args(argv)
    kubelet = Kubelet(
        Kube(args.kubeconfig),
        Kube(args.scheduler_kubeconfig),
        args.workdir,
        args.node,
        args.ip_prefix,
        poll=args.poll,
        no_exec=args.no_exec,
    )
    signal.signal(signal.SIGTERM, lambda *_: kubelet.stopping.set())
    print(json.dumps({"node": args.node, "workdir": str(args.workdir)}), flush=True)
    kubelet.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
