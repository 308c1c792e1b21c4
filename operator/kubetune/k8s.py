"""The only module that talks to the Kubernetes API server (plus the trainer's /metrics).

API verbs the operator uses (the Helm chart's RBAC grants exactly these):

  kubetune.io  finetunejobs           get list watch create patch   (create: sweep trials)
  kubetune.io  finetunejobs/status    get patch              (kopf: status patches)
  kubetune.io  finetunesweeps         get list watch patch   (kopf: watch, finalizer)
  kubetune.io  finetunesweeps/status  get patch              (kopf: status patches)
  batch        jobs                   get list watch create patch   (patch: spec.suspend)
  ""           configmaps             create
  ""           services               create delete          (multi-node; staging engine)
  ""           pods                   get list watch         (read-only: reasons, pod IP)
  ""           pods/log               get                    (staging: an engine's log tail)
  apps         deployments            get create delete      (staging engine)
  serving.kserve.io inferenceservices get create delete      (staging engine, KServe)
  ""           events                 create patch           (kopf.event; patch for repeats)
  events.k8s.io events                create patch           (newer kopf versions)

Nothing here reads or writes Secrets: the trainer pod gets credentials by secretKeyRef.
Standalone kopf peering: no peering CRDs, no extra verbs. Jobs and Pods are watched with the
server-side selector ``app.kubernetes.io/managed-by=kubetune-operator``.

Optional (cluster-wide installs only): ``apiextensions.k8s.io customresourcedefinitions list
watch`` lets kopf notice a CRD installed after the operator started; without it kopf logs "Not
enough permissions to watch for resources" once and works from API discovery at startup.

Children are created with deterministic names; 409 Conflict means "already there" (an operator
restart or a retried handler), never a duplicate. Creates use ``fieldValidation=Strict``. Whether
KServe is installed is asked by API discovery (:meth:`Client.serves`), which needs no RBAC.

Credentials come from :func:`login`, kopf's login handler too; the client logs in again on 401
or when they expire (rotated ServiceAccount tokens, exec-plugin credentials).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from kubetune import __version__, metrics

log = logging.getLogger(__name__)
USER_AGENT = f"kubetune-operator/{__version__}"

_PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("batch/v1", "Job"): "jobs",
    ("kubetune.io/v1alpha1", "FineTuneJob"): "finetunejobs",  # a FineTuneSweep's trials
    ("apps/v1", "Deployment"): "deployments",  # staging engine
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservices",  # staging, KServe
}


def _prefix(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def _path(api_version: str, kind: str, namespace: str, name: str = "") -> str:
    plural = _PLURALS[(api_version, kind)]
    path = f"{_prefix(api_version)}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class ApiError(Exception):
    """A failed API call; ``status`` is the HTTP code (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def invalid(self) -> bool:
        """The server refused the object itself (400 BadRequest, 422 Invalid): a retry of the
        same object cannot succeed."""
        return self.status in (400, 422)

    @property
    def namespace_terminating(self) -> bool:
        """The namespace is being deleted: nothing new can be created in it (403)."""
        return self.status == 403 and "because it is being terminated" in self.message


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials, the same for kopf (its login handler) and for :class:`Client`: the pod's
    ServiceAccount token first, then KUBECONFIG through the kubernetes client (token files,
    exec plugins such as EKS's and GKE's, auth providers). Read afresh on every call, so a
    rotated token is picked up by logging in again."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_via_client(**kwargs)


# Connections kopf may open to the API server at once (its watch streams included, about six).
# kopf's own session has no bound: 300 jobs' handlers and timers patching at once held 230 TLS
# connections, ~0.2 MB each (asyncio's 128 KiB TLS buffer and OpenSSL's); more buy nothing
# from an API server that serves them from a few cores.
KOPF_CONNECTIONS = 24
# The same for this module's client (children, Job gets) and for the trainer scrapes.
CLIENT_CONNECTIONS = 16


async def kopf_login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's login handler: :func:`login`'s credentials in an HTTP session whose connection
    pool is bounded (``KOPF_CONNECTIONS``); kopf closes it when it logs in again."""
    info = await asyncio.to_thread(login, **kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        priority=info.priority,
    )


Login = Callable[[], Awaitable[kopf.ConnectionInfo]]


async def _default_login() -> kopf.ConnectionInfo:
    info = await asyncio.to_thread(login, logger=log, settings=kopf.OperatorSettings())
    if info is None:
        raise ApiError(0, "LoginError", "no credentials: neither in-cluster nor KUBECONFIG")
    return info


@dataclass(frozen=True)
class _Credentials:
    """What one login gives: where to send requests and how to authenticate them."""

    info: kopf.ConnectionInfo
    server: str
    headers: dict[str, str]
    ssl: ssl.SSLContext | bool

    @classmethod
    def of(cls, info: kopf.ConnectionInfo) -> _Credentials:
        context = info.as_ssl_context() if info.server.startswith("https") else True
        return cls(info, info.server.rstrip("/"), info.as_http_headers(), context)

    def expired(self, now: datetime) -> bool:
        expiration = self.info.expiration
        if expiration is None:
            return False
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        return now >= expiration


class Client:
    """A small async client: the handful of calls the handlers make.

    It logs in with ``login`` (default: :func:`login`, as kopf does) and logs in again when
    the server answers 401 or the credentials expire, then retries the request once: tokens
    rotate (projected ServiceAccount tokens, exec-plugin credentials) while the operator runs.
    """

    def __init__(self, login: Login | None = None) -> None:
        self._login = login or _default_login
        self._auth: _Credentials | None = None
        self._auth_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def _authenticated(self, stale: _Credentials | None = None) -> _Credentials:
        """The current credentials; a fresh login when there are none, they expired, or they
        are the ``stale`` ones a request was refused with (one login for many such requests)."""
        async with self._auth_lock:
            auth = self._auth
            if auth is None or auth is stale or auth.expired(datetime.now(UTC)):
                if auth is not None:
                    log.info("logging in to the API server again (credentials refused or expired)")
                try:
                    auth = self._auth = _Credentials.of(await self._login())
                except kopf.LoginError as error:
                    raise ApiError(0, "LoginError", str(error)) from error
            return auth

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        operation: str,
    ) -> Any:
        try:
            auth = await self._authenticated()
            try:
                return await self._send(auth, method, path, body, content_type)
            except ApiError as error:
                if error.status != 401:
                    raise
                return await self._send(
                    await self._authenticated(stale=auth), method, path, body, content_type
                )
        except ApiError as error:
            if error.status != 409:
                metrics.api_error(operation, error.reason or str(error.status))
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            metrics.api_error(operation, type(error).__name__)
            raise ApiError(0, type(error).__name__, str(error)) from error

    async def _send(
        self, auth: _Credentials, method: str, path: str, body: Any, content_type: str
    ) -> Any:
        session = self._http()
        headers = {
            **auth.headers,
            "Content-Type": content_type,
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        async with session.request(
            method, auth.server + path, json=body, headers=headers, ssl=auth.ssl
        ) as response:
            data = await response.json(content_type=None)
            if response.status >= 400:
                reason = data.get("reason", "") if isinstance(data, dict) else ""
                message = data.get("message", "") if isinstance(data, dict) else str(data)
                raise ApiError(response.status, reason or response.reason or "", message)
            return data

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create a namespaced object; False when it already exists (409).

        ``fieldValidation=Strict``: a field the server's schema does not know (a built-in's, or
        a CRD's structural schema such as KServe's) is a 400 naming it, not silently dropped."""
        plural = _PLURALS[(obj["apiVersion"], obj["kind"])]
        namespace = obj["metadata"]["namespace"]
        prefix = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        try:
            await self._request(
                "POST",
                f"{prefix}/namespaces/{namespace}/{plural}?fieldValidation=Strict",
                body=obj,
                operation=f"create_{plural}",
            )
        except ApiError as error:
            if error.status == 409:
                return False
            raise
        return True

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        """One namespaced object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self._request(
                "GET",
                _path(api_version, kind, namespace, name),
                operation=f"get_{_PLURALS[(api_version, kind)]}",
            )
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return result

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (pods go by garbage collection); False on 404."""
        try:
            await self._request(
                "DELETE",
                _path(api_version, kind, namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
                operation=f"delete_{_PLURALS[(api_version, kind)]}",
            )
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def pod_log(self, namespace: str, pod: str, container: str, lines: int) -> str:
        """The last ``lines`` lines of a container's log ('' when there is none yet)."""
        auth = await self._authenticated()
        session = self._http()
        url = (
            f"{auth.server}/api/v1/namespaces/{namespace}/pods/{pod}/log"
            f"?container={container}&tailLines={lines}"
        )
        headers = {**auth.headers, "User-Agent": USER_AGENT}
        try:
            async with session.get(url, headers=headers, ssl=auth.ssl) as response:
                if response.status >= 400:
                    metrics.api_error("get_pods_log", str(response.status))
                    return ""
                return await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as error:
            metrics.api_error("get_pods_log", type(error).__name__)
            return ""

    async def serves(self, group_version: str, plural: str) -> bool:
        """API discovery: does the server serve ``plural`` in ``group_version``? (Discovery is
        open to every authenticated user: no RBAC needed; an unknown group is a plain-text
        404.)"""
        auth = await self._authenticated()
        session = self._http()
        headers = {**auth.headers, "Accept": "application/json", "User-Agent": USER_AGENT}
        url = f"{auth.server}/apis/{group_version}"
        try:
            async with session.get(url, headers=headers, ssl=auth.ssl) as response:
                if response.status != 200:
                    return False
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            metrics.api_error("discovery", type(error).__name__)
            raise ApiError(0, type(error).__name__, str(error)) from error
        names = [r.get("name") for r in (data or {}).get("resources") or []]
        return plural in names

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

    async def patch_finetunejob(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """A merge patch on a FineTuneJob (a sweep suspends the trials it prunes)."""
        await self._request(
            "PATCH",
            f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}",
            body=dict(body),
            content_type="application/merge-patch+json",
            operation="patch_finetunejobs",
        )

    async def wait_served(
        self, paths: list[str], *, timeout: float = 60.0, every: float = 1.0
    ) -> None:
        """Wait until each list ``path`` is served. A CRD established a moment ago (installed
        with the operator, as `helm install` does) has its storage still initializing: the API
        server answers 429 "storage is (re)initializing" for a few seconds, and kopf logs each
        retry of its first list as an ERROR. Any other answer (200, 403, 404) ends the wait:
        kopf reports those itself; so does a timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        for path in paths:
            told = False
            while True:
                try:  # not through _request: these 429s are no API errors worth a metric
                    auth = await self._authenticated()
                    await self._send(auth, "GET", f"{path}?limit=1", None, "application/json")
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    break
                except ApiError as error:
                    now = asyncio.get_running_loop().time()
                    if error.status == 429 and now < deadline:
                        if not told:
                            log.info("waiting for the API server to serve %s: %s", path, error)
                            told = True
                        await asyncio.sleep(every)
                        continue
                break

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
