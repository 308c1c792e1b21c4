"""A Job controller and kubelet for the Kubernetes emulator: runs each Job's container command
as a local process.

Per Job (single pod; what kubetune's single-node Jobs need), polling the emulator over HTTP:

- creates a Pod object from the template (owner reference to the Job, so deleting the Job
  garbage-collects it), reports Pending, then Running with ``podIP`` 127.0.0.1;
- runs the container's command locally: ``python`` is this interpreter; the ConfigMap volume is
  written to a temp dir and paths under its mount are rewritten; emptyDir mounts become temp
  dirs; env comes from ``value``, ``secretKeyRef`` (read from the Secret) and ``fieldRef``;
  the trainer's metrics port and termination-log path are given by env (the pod's ``metrics``
  containerPort is set to the same free port, which is where the operator scrapes);
- on exit: the termination message file is read back (or the log tail when it is empty, as
  ``FallbackToLogsOnError``); the pod goes Succeeded/Failed with the exit code; the Job's
  counters and conditions follow ``podFailurePolicy`` and ``backoffLimit`` (Ignore: not counted,
  a new pod; FailJob: Failed at once; otherwise counted and retried while the limit allows);
- ``suspend: true`` stops the process (SIGTERM) and removes the pod; a deleted Job or Pod stops
  its process.

``kill(job, signal)`` simulates a node problem killing the trainer mid-run.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shlex
import signal as signals
import socket
import string
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.kmock_adapter import ApiStatus, Kube

TERMINATION_TAIL = 2048


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    """One pod and its local process."""

    namespace: str
    job: str
    pod: str
    process: subprocess.Popen[bytes]
    root: Path
    termination: Path
    log: Path
    port: int


@dataclass
class Kubelet:
    kube: Kube
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    poll: float = 0.2
    runs: dict[tuple[str, str], Run] = field(default_factory=dict)  # (namespace, job) -> run
    logs: list[Path] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)

    # ---- lifecycle

    def start(self) -> Kubelet:
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for run in list(self.runs.values()):
            self._terminate(run, signals.SIGKILL)

    def kill(self, namespace: str, job: str, sig: int = signals.SIGKILL) -> None:
        run = self.runs.get((namespace, job))
        if run is None:
            raise KeyError(f"no running pod for job {namespace}/{job}")
        run.process.send_signal(sig)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as error:  # keep serving; tests assert on .errors
                self.errors.append(error)
            self._stop.wait(self.poll)

    # ---- reconciliation

    def sync(self) -> None:
        jobs = {
            (j["metadata"]["namespace"], j["metadata"]["name"]): j
            for j in self.kube.list("batch/v1", "jobs")
        }
        for key, run in list(self.runs.items()):
            if key not in jobs or self.kube.get("v1", "pods", run.namespace, run.pod) is None:
                self._terminate(run, signals.SIGKILL)  # Job or Pod deleted
                del self.runs[key]
        for key, job in jobs.items():
            current = self.runs.get(key)
            if current is not None and current.process.poll() is not None:
                del self.runs[key]
                self._finished(job, current)
                continue
            if _condition(job, "Complete") or _condition(job, "Failed"):
                continue
            if job["spec"].get("suspend"):
                self._suspend(job, current)
                continue
            if current is None:
                self._start(job)

    def _suspend(self, job: dict[str, Any], run: Run | None) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if run is not None:
            self._terminate(run, signals.SIGTERM)
            del self.runs[(ns, name)]
            with contextlib.suppress(ApiStatus):
                self.kube.delete("v1", "pods", ns, run.pod)
        if not _condition(job, "Suspended"):
            self._job_status(job, active=0, conditions=[_cond("Suspended", "JobSuspended")])

    def _start(self, job: dict[str, Any]) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        template = job["spec"]["template"]
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        pod_name = f"{name}-{suffix}"
        port = free_port()
        spec = _with_port(template["spec"], port)
        labels = dict(template["metadata"].get("labels") or {})
        labels.update({"batch.kubernetes.io/job-name": name, "job-name": name})
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": ns,
                "labels": labels,
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        self.kube.create("v1", "pods", ns, pod)
        self.kube.patch("v1", "pods", ns, pod_name, {"status": {"phase": "Pending"}}, sub="status")
        # Drop a lingering Suspended condition: the Job runs again.
        conds = [
            c for c in job.get("status", {}).get("conditions") or [] if c["type"] != "Suspended"
        ]
        self._job_status(job, active=1, conditions=conds, replace_conditions=True)
        root = self.workdir / pod_name
        try:
            argv, env = self._container(ns, pod_name, spec, root, port)
        except ApiStatus as error:  # e.g. a missing Secret: the kubelet cannot start it
            self.kube.patch(
                "v1",
                "pods",
                ns,
                pod_name,
                {"status": _waiting("CreateContainerConfigError", str(error))},
                sub="status",
            )
            return
        log = root / "log"
        termination = Path(env["KUBETUNE_TERMINATION_LOG"])
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
                start_new_session=True,
            )
        self.logs.append(log)
        self.runs[(ns, name)] = Run(ns, name, pod_name, process, root, termination, log, port)
        self.kube.patch(
            "v1",
            "pods",
            ns,
            pod_name,
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "startTime": _now(),
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "ready": True,
                            "restartCount": 0,
                            "state": {"running": {"startedAt": _now()}},
                        }
                    ],
                }
            },
            sub="status",
        )

    def _container(
        self, ns: str, pod: str, spec: dict[str, Any], root: Path, port: int
    ) -> tuple[list[str], dict[str, str]]:
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, str] = {}  # container path -> local path
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            local = root / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                cm = self.kube.get("v1", "configmaps", ns, volume["configMap"]["name"])
                if cm is None:
                    raise ApiStatus(404, "NotFound", f"configmap {volume['configMap']['name']}")
                for key, value in (cm.get("data") or {}).items():
                    (local / key).write_text(value)
            if mount["mountPath"] != "/dev/shm":
                mounts[mount["mountPath"]] = str(local)

        def rewrite(value: str) -> str:
            for inside, outside in mounts.items():
                if value == inside or value.startswith(inside + "/"):
                    return outside + value[len(inside) :]
                value = value.replace("=" + inside + "/", "=" + outside + "/")
            return value

        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = rewrite(item["value"])
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                value = self._secret(ns, ref["name"], ref["key"])
                if value is None and not ref.get("optional"):
                    raise ApiStatus(404, "NotFound", f"secret {ref['name']} key {ref['key']}")
                if value is not None:
                    env[item["name"]] = value
            elif "fieldRef" in item.get("valueFrom", {}):
                path = item["valueFrom"]["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": pod, "metadata.namespace": ns}.get(path, "0")
        env.update(
            KUBETUNE_METRICS_PORT=str(port),
            KUBETUNE_TERMINATION_LOG=str(root / "termination-log"),
            **self.extra_env,
        )
        argv = [rewrite(a) for a in [*container.get("command", []), *container.get("args", [])]]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        (root / "command").write_text(shlex.join(argv) + "\n")
        return argv, env

    def _secret(self, ns: str, name: str, key: str) -> str | None:
        secret = self.kube.get("v1", "secrets", ns, name)
        if secret is None:
            return None
        if key in (secret.get("stringData") or {}):
            return str(secret["stringData"][key])
        raw = (secret.get("data") or {}).get(key)
        return base64.b64decode(raw).decode() if raw is not None else None

    def _finished(self, job: dict[str, Any], run: Run) -> None:
        code = run.process.returncode
        exit_code = 128 - code if code < 0 else code  # killed by a signal: 128 + signal number
        message = run.termination.read_text() if run.termination.exists() else ""
        if not message.strip() and exit_code != 0:
            message = run.log.read_bytes()[-TERMINATION_TAIL:].decode(errors="replace")
        ok = exit_code == 0
        reason = "Completed" if ok else "Error"
        self.kube.patch(
            "v1",
            "pods",
            run.namespace,
            run.pod,
            {
                "status": {
                    "phase": "Succeeded" if ok else "Failed",
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "ready": False,
                            "restartCount": 0,
                            "state": {
                                "terminated": {
                                    "exitCode": exit_code,
                                    "reason": reason,
                                    "message": message,
                                    "finishedAt": _now(),
                                }
                            },
                        }
                    ],
                }
            },
            sub="status",
        )
        st = job.get("status", {})
        conds = list(st.get("conditions") or [])
        if ok:
            conds += [
                _cond("SuccessCriteriaMet", "CompletionsReached"),
                _cond("Complete", "CompletionsReached"),
            ]
            self._job_status(job, active=0, succeeded=1, conditions=conds, completionTime=_now())
            return
        action = _policy_action(job, exit_code)
        failed = st.get("failed", 0) + (0 if action == "Ignore" else 1)
        if action == "FailJob":
            conds.append(
                _cond(
                    "Failed",
                    "PodFailurePolicy",
                    f"Container trainer for pod {run.pod} failed with exit code "
                    f"{exit_code} matching FailJob rule",
                )
            )
        elif failed > job["spec"].get("backoffLimit", 6):
            conds.append(
                _cond(
                    "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                )
            )
        self._job_status(job, active=0, failed=failed, conditions=conds)

    def _job_status(
        self,
        job: dict[str, Any],
        *,
        conditions: list[dict[str, Any]],
        replace_conditions: bool = False,
        **fields: Any,
    ) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        current = self.kube.get("batch/v1", "jobs", ns, name)
        if current is None:
            return
        status = dict(current.get("status") or {})
        status.setdefault("startTime", _now())
        status.update(fields)
        if replace_conditions:
            status["conditions"] = conditions
        else:
            known = {c["type"] for c in conditions}
            status["conditions"] = [
                c for c in status.get("conditions") or [] if c["type"] not in known
            ] + conditions
        self.kube.patch("batch/v1", "jobs", ns, name, {"status": status}, sub="status")
        job["status"] = status

    @staticmethod
    def _terminate(run: Run, sig: int) -> None:
        if run.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, sig)
            try:
                run.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(run.process.pid, signals.SIGKILL)
                run.process.wait(5)


def _condition(job: dict[str, Any], type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in job.get("status", {}).get("conditions") or []
    )


def _cond(type_: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": _now(),
        "lastProbeTime": _now(),
    }


def _waiting(reason: str, message: str) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "trainer",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ],
    }


def _with_port(spec: dict[str, Any], port: int) -> dict[str, Any]:
    out = dict(spec)
    containers = []
    for c in spec["containers"]:
        c = dict(c)
        c["ports"] = [
            {**p, "containerPort": port} if p.get("name") == "metrics" else p
            for p in c.get("ports") or []
        ]
        containers.append(c)
    out["containers"] = containers
    return out


def _policy_action(job: dict[str, Any], exit_code: int) -> str | None:
    for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules") or []:
        codes = rule.get("onExitCodes")
        if codes and (exit_code in codes.get("values", [])) == (codes.get("operator") == "In"):
            return str(rule["action"])
    return None
