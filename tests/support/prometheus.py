"""A real Prometheus (Debian's binary) on loopback, and a metrics process it scrapes.

The exporter is a separate Python process that serves the operator's metrics
(`kubetune.metrics.start_server`) and a trainer's (`kubetune_trainer.report.Telemetry`), and
changes them on command (JSON lines on stdin), so tests can move a job through its phases while
Prometheus watches.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

EXPORTER = r"""
import json, sys
from datetime import datetime, timedelta, timezone
from kubetune import api, metrics
from kubetune_trainer.report import Telemetry

metrics.start_server(int(sys.argv[1]), addr="127.0.0.1")
trainer = Telemetry(port=int(sys.argv[2]), host="127.0.0.1")
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    now = datetime.now(timezone.utc)
    if cmd["op"] == "state":
        progress = api.Progress(**cmd["progress"]) if cmd.get("progress") else None
        created = now - timedelta(seconds=cmd.get("age", 0))
        metrics.job_state(cmd["namespace"], cmd["name"], cmd["phase"], progress, created, now)
    elif cmd["op"] == "deleted":
        metrics.job_deleted(cmd["namespace"], cmd["name"])
    elif cmd["op"] == "sweep":
        metrics.sweep_state(
            cmd["namespace"], cmd["name"], cmd["phase"], cmd["trials"], cmd.get("best"),
            cmd.get("metric", "evalLoss"), cmd.get("direction", "minimize"),
        )
    elif cmd["op"] == "sweep_deleted":
        metrics.sweep_deleted(cmd["namespace"], cmd["name"])
    elif cmd["op"] == "api_error":
        metrics.api_error(cmd["operation"], cmd["reason"])
    elif cmd["op"] == "reconcile":
        try:
            with metrics.reconcile_timer(cmd["handler"]):
                if cmd.get("fail"):
                    raise RuntimeError("reconcile failed")
        except RuntimeError:
            pass
    elif cmd["op"] == "trainer":
        trainer.update(**cmd["values"])
    print("ok", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_for(what: str, probe: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


class Exporter:
    def __init__(self, process: subprocess.Popen[str], port: int, trainer_port: int) -> None:
        self.process, self.port, self.trainer_port = process, port, trainer_port

    def send(self, **command: Any) -> None:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline().strip()
        assert reply == "ok", f"exporter replied {reply!r} to {command}"

    def operator_metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.port}/metrics").decode()

    def trainer_metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.trainer_port}/metrics").decode()


@contextmanager
def exporter() -> Iterator[Exporter]:
    port, trainer_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(port), str(trainer_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout
        line = process.stdout.readline().strip()
        assert line == "ready", f"exporter did not start (got {line!r})"
        yield Exporter(process, port, trainer_port)
    finally:
        process.kill()
        process.wait(timeout=10)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises urllib.error.HTTPError (400) when the expression is invalid."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def wait_query(
        self, expr: str, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        seen: list[list[dict[str, Any]]] = []

        def probe() -> bool:
            seen.append(self.query(expr))
            return check(seen[-1])

        try:
            wait_for(f"query {expr!r}", probe, timeout)
        except TimeoutError as error:
            raise AssertionError(f"{error}; last result: {seen[-1] if seen else None}") from None
        return seen[-1]


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise RuntimeError("prometheus not found: apt-get install prometheus (see .ci/run)")
    return found


@contextmanager
def prometheus(
    workdir: Path, scrape_configs: list[dict[str, Any]], rules: dict[str, Any] | None = None
) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1 with a 1 s scrape and rule evaluation interval."""
    port = free_port()
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": scrape_configs,
    }
    if rules is not None:
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config["rule_files"] = [str(workdir / "rules.yaml")]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus to be ready", lambda: http_get(f"{url}/-/ready") is not None)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
