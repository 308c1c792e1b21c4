"""The only module that talks to the Kubernetes API server (plus the trainer's /metrics).

API verbs the operator uses (the Helm chart's RBAC grants exactly these):

  kubetune.io  finetunejobs           get list watch patch   (kopf: watch, finalizer, annotations)
  kubetune.io  finetunejobs/status    get patch              (kopf: status patches)
  batch        jobs                   get list watch create patch   (patch: spec.suspend)
  ""           configmaps             create
  ""           services               create                 (multi-node only)
  ""           pods                   get list watch         (read-only: reasons, pod IP)
  ""           events                 create patch           (kopf.event; patch for repeats)
  events.k8s.io events                create patch           (newer kopf versions)

Nothing here reads or writes Secrets: the trainer pod gets credentials by secretKeyRef.
Standalone kopf peering: no peering CRDs, no extra verbs. Jobs and Pods are watched with the
server-side selector ``app.kubernetes.io/managed-by=kubetune-operator``.

Optional (cluster-wide installs only): ``apiextensions.k8s.io customresourcedefinitions list
watch`` lets kopf notice a CRD installed after the operator started; without it kopf logs "Not
enough permissions to watch for resources" once and works from API discovery at startup.

Children are created with deterministic names; 409 Conflict means "already there" (an operator
restart or a retried handler), never a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from kubetune import __version__, metrics

log = logging.getLogger(__name__)
USER_AGENT = f"kubetune-operator/{__version__}"

_PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("batch/v1", "Job"): "jobs",
}


class ApiError(Exception):
    """A failed API call; ``status`` is the HTTP code (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


@dataclass
class Connection:
    server: str
    token: str | None = None
    ssl: ssl.SSLContext | bool = True


def _load_connection() -> Connection:
    # The kubernetes client already knows kubeconfig and in-cluster config; kopf logs in with it
    # too, so both see the same cluster.
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    context: ssl.SSLContext | bool = True
    if cfg.host.startswith("https"):
        if not cfg.verify_ssl:
            context = False
        else:
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file and cfg.key_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file)
    token = cfg.get_api_key_with_prefix("authorization")  # runs the token refresh hook
    return Connection(server=cfg.host.rstrip("/"), token=token, ssl=context)


class Client:
    """A small async client: the handful of calls the handlers make."""

    def __init__(self, connection: Connection | None = None) -> None:
        self._connection = connection
        self._session: aiohttp.ClientSession | None = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        operation: str,
    ) -> Any:
        if self._connection is None:
            self._connection = await asyncio.to_thread(_load_connection)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        conn = self._connection
        headers = {
            "Content-Type": content_type,
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if conn.token:
            headers["Authorization"] = conn.token
        try:
            async with self._session.request(
                method, conn.server + path, json=body, headers=headers, ssl=conn.ssl
            ) as response:
                data = await response.json(content_type=None)
                if response.status >= 400:
                    reason = data.get("reason", "") if isinstance(data, dict) else ""
                    message = data.get("message", "") if isinstance(data, dict) else str(data)
                    raise ApiError(response.status, reason or response.reason or "", message)
                return data
        except ApiError as error:
            if error.status != 409:
                metrics.api_error(operation, error.reason or str(error.status))
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            metrics.api_error(operation, type(error).__name__)
            raise ApiError(0, type(error).__name__, str(error)) from error

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create a namespaced object; False when it already exists (409)."""
        plural = _PLURALS[(obj["apiVersion"], obj["kind"])]
        namespace = obj["metadata"]["namespace"]
        prefix = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        try:
            await self._request(
                "POST",
                f"{prefix}/namespaces/{namespace}/{plural}",
                body=obj,
                operation=f"create_{plural}",
            )
        except ApiError as error:
            if error.status == 409:
                return False
            raise
        return True

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._request(
                "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", operation="get_job"
            )
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return result

    async def set_job_suspended(self, namespace: str, name: str, suspend: bool) -> None:
        await self._request(
            "PATCH",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            body={"spec": {"suspend": suspend}},
            content_type="application/merge-patch+json",
            operation="patch_job",
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def fetch_metrics(
    session: aiohttp.ClientSession, host: str, port: int, *, timeout: float = 3.0
) -> str | None:
    """The trainer's Prometheus page, or None when it cannot be read (progress just stays)."""
    url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return None
            return await response.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as error:
        log.debug("cannot read %s: %r", url, error)
        return None
