"""A real `mlflow server` on loopback: SQLite backend, local artifact root (proxied).

MLflow lives in its own venv (scripts/install-mlflow.sh -> .tools/mlflow) so its pins never
touch the project's venv; kubetune talks to it over its REST API only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.trainer_runs import ROOT

# The venv's python, not its bin/mlflow script: a script's #! line names the path the venv was
# created at, so a venv copied or moved (another checkout's .tools) breaks the script only.
MLFLOW = ROOT / ".tools" / "mlflow" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    uri: str
    artifacts: Path
    log: Path

    def get(self, endpoint: str, **query: str) -> dict[str, Any]:
        """A GET on the REST API (the test's own reads, independent of kubetune's client)."""
        url = f"{self.uri}/api/2.0/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return dict(json.loads(response.read().decode()))

    def status_of(self, endpoint: str, **query: str) -> int:
        try:
            self.get(endpoint, **query)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200


@contextmanager
def mlflow_server(workdir: Path, timeout: float = 180) -> Iterator[MlflowServer]:
    if not MLFLOW.exists():
        raise RuntimeError(f"{MLFLOW} is missing: run scripts/install-mlflow.sh")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "mlflow.log"
    artifacts = workdir / "artifacts"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(MLFLOW),
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination",
                str(artifacts),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # its uvicorn workers go down with it (killpg)
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not ready in {timeout} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield MlflowServer(uri=uri, artifacts=artifacts, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # uvicorn may wait for idle keep-alive connections
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
