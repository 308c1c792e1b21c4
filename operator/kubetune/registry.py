"""A small client for MLflow's REST API (tracking and model registry), standard library only.

Why not the ``mlflow`` package: it pins dozens of packages (a web server, SQL, pandas, ...)
that would land in the operator image and the trainer's environment for the eight calls used
here. The REST API is MLflow's public, versioned contract (``/api/2.0/mlflow/...``); the tests
run these calls against a real ``mlflow server``.

Errors are :class:`RegistryError`: ``transient`` for an unreachable server, a timeout or a 5xx
(retrying may help), not transient for a refusal (4xx: bad credentials, a bad name). Messages
name the tracking URI and the call, never a credential.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import api

# The env names the trainer reads (from the Secret named by credentialsSecret); the same
# names the mlflow client uses, so one Secret serves both.
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
CREDENTIAL_ENVS = (TOKEN_ENV, USERNAME_ENV, PASSWORD_ENV)

STAGING = "staging"
PRODUCTION = "production"

# MLflow's limits (a longer param value is refused by the server).
MAX_PARAM_VALUE = 6000
MAX_BATCH_PARAMS = 100


class RegistryError(Exception):
    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Credentials:
        return cls(
            token=env.get(TOKEN_ENV) or None,
            username=env.get(USERNAME_ENV) or None,
            password=env.get(PASSWORD_ENV) or None,
        )

    def header(self) -> str | None:
        if self.token:
            return f"Bearer {self.token}"
        if self.username:
            pair = f"{self.username}:{self.password or ''}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        return None


class Client:
    def __init__(
        self, tracking_uri: str, credentials: Credentials | None = None, timeout: float = 30
    ) -> None:
        self.base = tracking_uri.rstrip("/")
        self.credentials = credentials or Credentials()
        self.timeout = timeout

    # -- transport ----------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        *,
        data: bytes | None = None,
    ) -> dict[str, Any]:
        url = f"{self.base}/api/2.0/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        auth = self.credentials.header()
        if auth:
            headers["Authorization"] = auth
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        where = f"MLflow at {self.base} ({method} /api/2.0/{path.split('?')[0]})"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode() or "{}"
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            raise RegistryError(
                f"{where}: HTTP {exc.code}{': ' + detail if detail else ''}",
                transient=exc.code >= 500 or exc.code == 429,
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(f"{where}: unreachable: {reason}", transient=True) from None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise RegistryError(
                f"{where}: the answer is not JSON: is this an MLflow tracking server?",
                transient=False,
            ) from None
        return parsed if isinstance(parsed, dict) else {}

    # -- tracking -----------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """The id of the named experiment, created when missing."""
        try:
            found = self.call(
                "GET", "mlflow/experiments/get-by-name", query={"experiment_name": name}
            )
            return str(found["experiment"]["experiment_id"])
        except RegistryError as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
        created = self.call("POST", "mlflow/experiments/create", {"name": name})
        return str(created["experiment_id"])

    def create_run(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str], start_ms: int
    ) -> dict[str, Any]:
        answer = self.call(
            "POST",
            "mlflow/runs/create",
            {
                "experiment_id": experiment_id,
                "run_name": run_name,
                "start_time": start_ms,
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            },
        )
        return dict(answer["run"]["info"])

    def log_batch(
        self,
        run_id: str,
        params: Mapping[str, str],
        metrics: Mapping[str, float],
        timestamp_ms: int,
    ) -> None:
        items = list(params.items())
        for start in range(0, max(len(items), 1), MAX_BATCH_PARAMS):
            chunk = items[start : start + MAX_BATCH_PARAMS]
            body: dict[str, Any] = {
                "run_id": run_id,
                "params": [{"key": k, "value": v} for k, v in chunk],
            }
            if start == 0:
                body["metrics"] = [
                    {"key": k, "value": v, "timestamp": timestamp_ms, "step": 0}
                    for k, v in metrics.items()
                ]
            self.call("POST", "mlflow/runs/log-batch", body)

    def finish_run(self, run_id: str, end_ms: int) -> None:
        self.call(
            "POST",
            "mlflow/runs/update",
            {"run_id": run_id, "status": "FINISHED", "end_time": end_ms},
        )

    def upload_artifact(self, artifact_uri: str, name: str, data: bytes) -> bool:
        """Put one file into the run's artifacts through the server's artifact proxy
        (``mlflow-artifacts:`` roots); False when the run's artifact root is not proxied."""
        prefix = "mlflow-artifacts:"
        if not artifact_uri.startswith(prefix):
            return False
        path = artifact_uri[len(prefix) :].lstrip("/")
        quoted = urllib.parse.quote(f"{path}/{name}")
        self.call("PUT", f"mlflow-artifacts/artifacts/{quoted}", data=data)
        return True

    def upload_folder(self, artifact_uri: str, name: str, folder: Path) -> str | None:
        """Copy a local folder into the run's artifacts under ``name``; the artifact URI of the
        copy, or None when the run's artifact root is not proxied by the server."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(folder).as_posix()
            if not self.upload_artifact(artifact_uri, f"{name}/{rel}", path.read_bytes()):
                return None
        return f"{artifact_uri.rstrip('/')}/{name}"

    # -- registry -----------------------------------------------------------------------------

    def ensure_registered_model(self, name: str) -> None:
        try:
            self.call("POST", "mlflow/registered-models/create", {"name": name})
        except RegistryError as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise

    def create_model_version(
        self, name: str, source: str, run_id: str, tags: Mapping[str, str]
    ) -> str:
        answer = self.call(
            "POST",
            "mlflow/model-versions/create",
            {
                "name": name,
                "source": source,
                "run_id": run_id,
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            },
        )
        return str(answer["model_version"]["version"])

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.call(
            "POST",
            "mlflow/registered-models/alias",
            {"name": name, "alias": alias, "version": version},
        )

    def version_by_alias(self, name: str, alias: str) -> dict[str, Any]:
        answer = self.call(
            "GET", "mlflow/registered-models/alias", query={"name": name, "alias": alias}
        )
        return dict(answer["model_version"])


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode() or "{}")
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return ""
    if not isinstance(body, dict):
        return ""
    code, message = body.get("error_code"), body.get("message")
    return ": ".join(str(p) for p in (code, message) if p)[:500]


# --------------------------------------------------------------------------------------------
# what a run logs (pure)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value, separators=(",", ":"))[:MAX_PARAM_VALUE]
    elif value is not None:
        out[prefix] = str(value)[:MAX_PARAM_VALUE]


def run_params(spec: api.FineTuneJobSpec) -> dict[str, str]:
    """The spec's training fields as MLflow params: ``training.learningRate``, ``method.lora.r``,
    ``model.source``, ... (dotted camelCase paths, as in the manifest)."""
    out: dict[str, str] = {}
    body = spec.to_api()
    _flatten("model", {k: body["model"].get(k) for k in ("source", "revision")}, out)
    dataset = body["dataset"]
    _flatten(
        "dataset",
        {k: dataset.get(k) for k in ("source", "format", "maxSeqLength", "split")},
        out,
    )
    _flatten("method", body["method"], out)
    _flatten("training", body["training"], out)
    return out


def run_metrics(metrics: api.Metrics) -> dict[str, float]:
    """``base.<m>``, ``tuned.<m>`` and ``delta.<m>``: the names gates use."""
    out: dict[str, float] = {}
    for group in ("base", "tuned", "delta"):
        for name, value in getattr(metrics, group).items():
            out[f"{group}.{name}"] = float(value)
    return out


def run_tags(config_name: str, namespace: str, status: api.FineTuneJobStatus) -> dict[str, str]:
    """Tags on the run: who it is and where its artifacts are (URIs, not copies)."""
    tags = {"kubetune.job": f"{namespace}/{config_name}", "mlflow.runName": config_name}
    repro = status.reproducibility
    if repro and repro.configHash:
        tags["kubetune.configHash"] = repro.configHash
    for name, uri in (status.artifacts.to_api() if status.artifacts else {}).items():
        tags[f"kubetune.artifact.{name}"] = uri
    return tags


def local_folder(uri: str) -> Path | None:
    """The local folder of a ``file://`` or plain-path artifact URI; None for remote ones."""
    if uri.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    if "://" not in uri:
        return Path(uri)
    return None


def now_ms() -> int:
    return int(time.time() * 1000)
