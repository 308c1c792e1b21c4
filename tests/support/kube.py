"""Synchronous JSON over HTTPS to a real API server, authenticated as a kubeconfig says (client
certificate or bearer token): what tests, the process kubelet and the benchmarks need."""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


class ApiStatus(Exception):
    """A non-2xx answer of the API server (its Status object)."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message


def _data(entry: dict[str, Any], key: str, tmp: Path) -> str | None:
    """A kubeconfig's ``key`` (a path) or ``key-data`` (base64), as a file path."""
    if entry.get(key):
        return str(entry[key])
    raw = entry.get(f"{key}-data")
    if not raw:
        return None
    path = tmp / key
    path.write_bytes(base64.b64decode(raw))
    return str(path)


class Kube:
    def __init__(self, kubeconfig: str | Path, timeout: float = 30.0) -> None:
        config = yaml.safe_load(Path(kubeconfig).read_text())
        context_name = config.get("current-context") or config["contexts"][0]["name"]
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        self.url = str(cluster["server"]).rstrip("/")
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="kube-")
        tmp = Path(self._tmp.name)
        self.ssl = ssl.create_default_context(cafile=_data(cluster, "certificate-authority", tmp))
        cert, key = _data(user, "client-certificate", tmp), _data(user, "client-key", tmp)
        if cert and key:
            self.ssl.load_cert_chain(cert, key)
        self.token: str | None = user.get("token")

    @staticmethod
    def path(api_version: str, plural: str, namespace: str | None, name: str | None = None) -> str:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        ns = f"/namespaces/{namespace}" if namespace else ""
        return f"{base}{ns}/{plural}" + (f"/{name}" if name else "")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        ctype: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        return json.loads(self.raw(method, path, body, ctype, timeout) or b"null")

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        ctype: str = "application/json",
        timeout: float | None = None,
    ) -> bytes:
        data = (body if isinstance(body, bytes) else json.dumps(body).encode()) if body else None
        headers = {"Content-Type": ctype, **self._headers()}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(
                req, timeout=timeout or self.timeout, context=self.ssl
            ) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                payload = json.loads(raw or b"{}")
            except ValueError:
                payload = {"message": raw.decode(errors="replace")}
            raise ApiStatus(
                error.code, payload.get("reason", ""), payload.get("message", "")
            ) from None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def watch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None = None,
        resource_version: str = "",
        timeout: int = 60,
    ) -> Iterator[dict[str, Any]]:
        """A watch's events (``{"type", "object"}``) until the server ends it (``timeout`` s);
        from ``resource_version``, or with every existing object first as ADDED."""
        query = {"watch": "1", "timeoutSeconds": str(timeout)}
        if resource_version:
            query["resourceVersion"] = resource_version
        path = f"{self.path(api_version, plural, namespace)}?{urllib.parse.urlencode(query)}"
        req = urllib.request.Request(self.url + path, headers=self._headers())
        with urllib.request.urlopen(req, timeout=timeout + 30, context=self.ssl) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Any:
        try:
            return self.request("GET", self.path(api_version, plural, namespace, name))
        except ApiStatus as error:
            if error.code == 404:
                return None
            raise

    def list(
        self,
        api_version: str,
        plural: str,
        namespace: str | None = None,
        selector: str = "",
        fields: str = "",
    ) -> list[dict[str, Any]]:
        query = {k: v for k, v in (("labelSelector", selector), ("fieldSelector", fields)) if v}
        q = f"?{urllib.parse.urlencode(query)}" if query else ""
        result = self.request("GET", self.path(api_version, plural, namespace) + q)
        return list(result["items"])

    def create(
        self, api_version: str, plural: str, namespace: str | None, obj: Any, sub: str = ""
    ) -> Any:
        path = self.path(api_version, plural, namespace) + (f"/{sub}" if sub else "")
        return self.request("POST", path, obj)

    def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        body: Any,
        sub: str = "",
        ctype: str = "application/merge-patch+json",
    ) -> Any:
        path = self.path(api_version, plural, namespace, name) + (f"/{sub}" if sub else "")
        return self.request("PATCH", path, body, ctype)

    def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        *,
        grace: int | None = None,
        propagation: str | None = None,
    ) -> Any:
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        if propagation:
            options["propagationPolicy"] = propagation
        return self.request("DELETE", self.path(api_version, plural, namespace, name), options)
