"""The operator's test cluster: the emulator, the real `kubetune operator` as a subprocess (it
reads KUBECONFIG like in production), an optional kubelet, the real kubectl, and waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.support.kmock_adapter import EmulatorThread, Kube
from tests.support.kmock_kubelet import Kubelet, free_port
from tests.support.tools import binary

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "finetunejobs.kubetune.io.yaml"
FTJ = "kubetune.io/v1alpha1"
T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class Cluster:
    def __init__(self, tmp: Path, *, progress_interval: float = 0.5, crd_via_kubectl: bool = False):
        self.tmp = tmp
        self.emulator = EmulatorThread(crds=[] if crd_via_kubectl else [CRD]).start()
        self.kubeconfig = self.emulator.write_kubeconfig(tmp / "kubeconfig")
        self.kube = Kube(self.emulator.url)
        self.progress_interval = progress_interval
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_logs: list[Path] = []
        self.kubelet: Kubelet | None = None
        if crd_via_kubectl:
            self.kubectl("apply", "--validate=false", "-f", str(CRD))

    # ---- processes

    def start_operator(self, *args: str, **env: str) -> None:
        log = self.tmp / f"operator-{len(self.operator_logs)}.log"
        self.operator_logs.append(log)
        self.metrics_port, self.health_port = free_port(), free_port()
        environ = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETUNE_PROGRESS_INTERVAL": str(self.progress_interval),
            "KUBETUNE_PROGRESS_MIN_INTERVAL": "1",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test",
            **env,
        }
        with log.open("wb") as out:
            self.operator = subprocess.Popen(
                [sys.executable, "-m", "kubetune.cli", "operator", *args],
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
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

    def start_kubelet(self, **env: str) -> Kubelet:
        self.kubelet = Kubelet(self.kube, self.tmp / "pods", extra_env=dict(env)).start()
        return self.kubelet

    def close(self) -> None:
        self.stop_operator()
        if self.kubelet is not None:
            self.kubelet.stop()
        self.emulator.stop()

    def logs(self) -> str:
        parts = [
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in self.operator_logs
        ]
        if self.kubelet is not None:
            parts += [
                f"--- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in self.kubelet.logs
            ]
        return "\n".join(parts)

    # ---- API helpers

    def kubectl(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run(
            [binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def ftj(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.kube.get(FTJ, "finetunejobs", namespace, name)
        return result

    def status(self, name: str, namespace: str = "default") -> dict[str, Any]:
        obj = self.ftj(name, namespace) or {}
        return dict(obj.get("status") or {})

    def wait_phase(self, name: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_for(
            f"{name} phase {phase}",
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout,
        )

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [
            e
            for e in self.kube.list("v1", "events", namespace)
            if e.get("involvedObject", {}).get("name") == name
        ]
