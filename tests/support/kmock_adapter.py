"""A Kubernetes API server for tests: kmock 0.8's KubernetesEmulator plus what kopf and kubectl
need and kmock lacks (the gaps are listed below).

kmock gives the HTTP server, discovery of the built-in kinds (its bundled resource list) and
Kubernetes-style error bodies. This subclass serves every object request itself, with the
semantics kopf, kubectl and our operator rely on:

- metadata.uid / resourceVersion / creationTimestamp / generation (bumped on spec changes);
- list resourceVersion, list ``kind``; watch from a resourceVersion (replay, no duplicate
  ADDED), ``timeoutSeconds``; 410 Gone when the history is too old;
- ``labelSelector`` (=, ==, !=, in, notin, exists, !exists) and ``fieldSelector``
  (metadata.name, metadata.namespace, status.phase) on list and watch;
- merge-patch, strategic-merge-patch (as merge-patch), JSON-patch with a failing ``test`` ->
  422; PUT (replace, with resourceVersion conflicts -> 409); ``dryRun``; ``generateName``;
- the ``status`` subresource: writes to ``/status`` change only status, writes to the object
  cannot change status (for kinds that declare the subresource);
- finalizers and ``deletionTimestamp``; garbage collection of dependents by ownerReferences;
- CustomResourceDefinitions: creating one serves its resource (kubectl apply -f crds/...);
- ``/api/v1`` discovery reports ``groupVersion: v1`` (kmock says ``/v1``);
- server-side ``Table`` output from a CRD's ``additionalPrinterColumns`` (``kubectl get ftj``);
- protobuf bodies (``kubectl create``, helm) get a clear 415; ``kubectl apply`` sends JSON;
- request counters (per verb and resource) for the operator benchmark.

``EmulatorThread`` runs it on a background event loop and writes a kubeconfig; ``Kube`` is a
tiny synchronous client for test code (and the kubelet fixture).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import json
import random
import string
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import references, rendering

HISTORY = 50000  # watch events kept for resumption by resourceVersion


class ApiStatus(Exception):
    """An API error rendered as a Kubernetes Status body."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            "details": self.details,
        }


@dataclass(frozen=True)
class Path_:
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_path(path: str) -> Path_ | None:
    """An object/collection path, or None for discovery and other paths."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return Path_(group, version, plural, namespace, name, sub)


# --------------------------------------------------------------------------------------------
# selectors and patches


@functools.lru_cache(maxsize=256)
def _label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """A labelSelector string -> predicate on a labels dict (the equality/set-based grammar)."""
    terms: list[tuple[str, str, set[str]]] = []  # (op, key, values)
    depth, start, pieces = 0, 0, []
    for i, ch in enumerate(selector):  # split on commas outside parentheses
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            pieces.append(selector[start:i])
            start = i + 1
    pieces.append(selector[start:])
    for raw in (p.strip() for p in pieces):
        if not raw:
            continue
        for op in (" notin ", " in ", "!=", "==", "="):
            if op in raw:
                key, _, values = raw.partition(op)
                vals = {v.strip() for v in values.strip().strip("()").split(",")}
                terms.append((op.strip().replace("==", "="), key.strip(), vals))
                break
        else:
            terms.append(
                ("!exists", raw[1:].strip(), set())
                if raw.startswith("!")
                else ("exists", raw, set())
            )

    def check(labels: dict[str, str]) -> bool:
        for op, key, vals in terms:
            value = labels.get(key)
            ok = {
                "in": value in vals,
                "=": value in vals,
                "notin": value not in vals,
                "!=": value not in vals,
                "exists": key in labels,
                "!exists": key not in labels,
            }[op]
            if not ok:
                return False
        return True

    return check


def _field_matcher(selector: str) -> Callable[[dict[str, Any]], bool]:
    terms = []
    for raw in (p.strip() for p in selector.split(",") if p.strip()):
        neg = "!=" in raw
        key, _, value = raw.replace("==", "=").partition("!=" if neg else "=")

        def get(obj: dict[str, Any], path: str = key.strip()) -> Any:
            cur: Any = obj
            for part in path.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            return "" if cur is None else str(cur)

        terms.append((get, value.strip(), neg))
    return lambda obj: all((get(obj) != v) if n else (get(obj) == v) for get, v, n in terms)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902; a failing ``test`` raises ApiStatus 422 (kmock answers 500)."""
    doc = copy.deepcopy(doc)

    def parent(path: list[str]) -> tuple[Any, str]:
        cur = doc
        for part in path[:-1]:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        return cur, path[-1]

    def get(path: list[str]) -> Any:
        cur = doc
        for part in path:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        return cur

    for op in ops:
        kind, path = op.get("op"), _pointer(op.get("path", ""))
        try:
            if kind == "test":
                if get(path) != op.get("value"):
                    raise ApiStatus(422, "Invalid", f"test operation failed at {op.get('path')}")
            elif kind in ("add", "replace"):
                obj, key = parent(path)
                if isinstance(obj, list):
                    if key == "-":
                        obj.append(copy.deepcopy(op["value"]))
                    elif kind == "add":
                        obj.insert(int(key), copy.deepcopy(op["value"]))
                    else:
                        obj[int(key)] = copy.deepcopy(op["value"])
                else:
                    if kind == "replace" and key not in obj:
                        raise KeyError(key)
                    obj[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                obj, key = parent(path)
                del obj[int(key) if isinstance(obj, list) else key]
            else:
                raise ApiStatus(422, "Invalid", f"unsupported JSON-patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as error:
            if kind == "test":
                raise ApiStatus(
                    422, "Invalid", f"test operation failed at {op.get('path')}"
                ) from error
            raise ApiStatus(422, "Invalid", f"cannot apply {kind} at {op.get('path')}") from error
    return doc


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(stamp: str) -> str:
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --------------------------------------------------------------------------------------------
# the emulator


@dataclass
class _Event:
    rv: int
    key: tuple[str, str]  # (group, plural)
    type: str
    obj: dict[str, Any]


@dataclass
class Counters:
    """API requests served, for the benchmark: by verb and by (verb, plural[/sub])."""

    verbs: collections.Counter[str] = field(default_factory=collections.Counter)
    by_resource: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    # (client, verb, plural[/sub]); client is the User-Agent's product name ("kopf", ...).
    by_client: collections.Counter[tuple[str, str, str]] = field(
        default_factory=collections.Counter
    )
    # Every write, for per-object accounting: (resourceVersion after, client, verb, label,
    # namespace, name).
    log: list[tuple[int, str, str, str, str | None, str | None]] = field(default_factory=list)

    def writes(self, plural: str | None = None) -> int:
        return sum(
            n
            for (verb, res), n in self.by_resource.items()
            if verb in ("create", "patch", "update", "delete")
            and (plural is None or res.split("/")[0] == plural)
        )


class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with real(istic) object semantics; see the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():  # load_bundled() warns about its own deprecated API
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        self.rv = 0
        self.db: dict[tuple[str, str], dict[tuple[str | None, str], dict[str, Any]]] = (
            collections.defaultdict(dict)
        )
        self.history: collections.deque[_Event] = collections.deque(maxlen=HISTORY)
        self.changed = asyncio.Event()
        self.counters = Counters()
        self._info: dict[tuple[str, str], tuple[references.resource, Any]] = {}
        # CRD additionalPrinterColumns: `kubectl get` asks for a server-side Table.
        self.printer_columns: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._index_resources()

    # ---- resource registry

    def _index_resources(self) -> None:
        self._info = {}
        for res in self.resources:
            info = self.resources[res]
            if res.plural:
                self._info[(res.group or "", res.plural)] = (res, info)

    def add_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            key = f"{spec['group']}/{version['name']}/{names['plural']}"
            self.printer_columns[(spec["group"], names["plural"])] = list(
                version.get("additionalPrinterColumns") or []
            )
            self.resources[key] = references.ResourceInfo(
                kind=names.get("kind"),
                singular=names.get("singular"),
                namespaced=spec.get("scope") == "Namespaced",
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources={"status"} if "status" in version.get("subresources", {}) else set(),
            )
        self._index_resources()

    def _resource(self, p: Path_) -> tuple[references.resource, Any]:
        found = self._info.get((p.group, p.plural))
        if found is None:
            raise ApiStatus(
                404, "NotFound", f"the server could not find the requested resource ({p.plural})"
            )
        return found

    # ---- HTTP entry

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        p = parse_path(raw.path)
        if p is None:
            return await super().__call__(raw)  # discovery and the rest: kmock
        await raw.read()
        try:
            res, info = self._resource(p)
            if p.subresource not in (None, "status"):
                raise ApiStatus(404, "NotFound", f"no subresource {p.subresource}")
            verb = self._verb(raw, p)
            self.counters.verbs[verb] += 1
            label = p.plural + (f"/{p.subresource}" if p.subresource else "")
            self.counters.by_resource[(verb, label)] += 1
            client = raw.headers.get("User-Agent", "").split("/")[0] or "unknown"
            self.counters.by_client[(client, verb, label)] += 1
            if verb == "watch":
                return await self._watch(raw, p, info)
            body = await self._dispatch(raw, verb, p, res, info)
            if verb in ("create", "patch", "update", "delete"):
                name = p.name or ((body or {}).get("metadata") or {}).get("name")
                self.counters.log.append((self.rv, client, verb, label, p.namespace, name))
            status = 201 if verb == "create" and not raw.query.get("dryRun") else 200
            return aiohttp.web.json_response(body, status=status)
        except ApiStatus as error:
            return aiohttp.web.json_response(error.body(), status=error.code)

    @staticmethod
    def _verb(raw: aiohttp.web.BaseRequest, p: Path_) -> str:
        m = raw.method.upper()
        if m == "GET":
            if raw.query.get("watch") in ("true", "1"):
                return "watch"
            return "get" if p.name else "list"
        return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(
            m, m.lower()
        )

    async def _dispatch(
        self, raw: aiohttp.web.BaseRequest, verb: str, p: Path_, res: Any, info: Any
    ) -> Any:
        key = (p.group, p.plural)
        if "protobuf" in raw.headers.get("Content-Type", ""):
            # kubectl create/helm send protobuf for built-in kinds; `kubectl apply` sends JSON.
            raise ApiStatus(415, "UnsupportedMediaType", "protobuf bodies are not supported")
        table = "as=Table" in raw.headers.get("Accept", "") and key in self.printer_columns
        if verb == "list":
            listed = self._list(raw, p, res, info)
            return self._table(key, listed["items"], listed["metadata"]) if table else listed
        if verb == "create":
            return self._create(raw, p, res, info, await raw.json())
        if verb == "get":
            obj = copy.deepcopy(self._get(key, p))
            return self._table(key, [obj], {"resourceVersion": str(self.rv)}) if table else obj
        if verb == "patch":
            return self._patch(raw, p, info, await raw.json())
        if verb == "update":
            return self._update(raw, p, info, await raw.json())
        if verb == "delete":
            return self._delete(raw, p)
        raise ApiStatus(405, "MethodNotAllowed", f"{raw.method} is not supported")

    def _table(
        self, key: tuple[str, str], items: list[dict[str, Any]], meta: dict[str, Any]
    ) -> dict[str, Any]:
        """A meta.k8s.io/v1 Table from the CRD's printer columns (simple .a.b.c JSONPaths)."""

        def cell(obj: Any, column: dict[str, Any]) -> Any:
            for part in column["jsonPath"].lstrip(".").split("."):
                obj = obj.get(part) if isinstance(obj, dict) else None
            if column.get("type") == "date" and isinstance(obj, str):
                return _age(obj)  # the API server prints dates as ages
            return obj

        columns = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name of the object",
            }
        ]
        columns += [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": c.get("format", ""),
                "priority": c.get("priority", 0),
                "description": c.get("description", ""),
            }
            for c in self.printer_columns[key]
        ]
        rows = [
            {
                "cells": [o["metadata"]["name"]] + [cell(o, c) for c in self.printer_columns[key]],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                },
            }
            for o in items
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "columnDefinitions": columns,
            "rows": rows,
        }

    # ---- store helpers

    def _get(self, key: tuple[str, str], p: Path_) -> dict[str, Any]:
        obj = self.db[key].get((p.namespace, p.name or ""))
        if obj is None:
            raise ApiStatus(
                404,
                "NotFound",
                f'{p.plural} "{p.name}" not found',
                {"name": p.name, "kind": p.plural},
            )
        return obj

    def _emit(self, key: tuple[str, str], type_: str, obj: dict[str, Any]) -> None:
        self.history.append(_Event(self.rv, key, type_, copy.deepcopy(obj)))
        self.changed.set()
        self.changed = asyncio.Event()

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def _matches(self, obj: dict[str, Any], p: Path_, query: Any) -> bool:
        meta = obj.get("metadata", {})
        if p.namespace is not None and meta.get("namespace") != p.namespace:
            return False
        if query.get("labelSelector") and not _label_matcher(query["labelSelector"])(
            meta.get("labels") or {}
        ):
            return False
        return not (query.get("fieldSelector") and not _field_matcher(query["fieldSelector"])(obj))

    def _list(self, raw: aiohttp.web.BaseRequest, p: Path_, res: Any, info: Any) -> Any:
        items = [
            copy.deepcopy(o)
            for o in self.db[(p.group, p.plural)].values()
            if self._matches(o, p, raw.query)
        ]
        api_version = f"{p.group}/{p.version}" if p.group else p.version
        return {
            "apiVersion": api_version,
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        }

    def _create(self, raw: aiohttp.web.BaseRequest, p: Path_, res: Any, info: Any, obj: Any) -> Any:
        if not isinstance(obj, dict):
            raise ApiStatus(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            raise ApiStatus(422, "Invalid", "metadata.name: Required value")
        if info.kind and obj.get("kind") not in (None, info.kind):
            raise ApiStatus(400, "BadRequest", f"kind {obj.get('kind')} posted to {p.plural}")
        if info.namespaced:
            ns = p.namespace or meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, ns):
                raise ApiStatus(400, "BadRequest", "the namespace of the object does not match")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        key = (p.group, p.plural)
        ident = (meta.get("namespace"), meta["name"])
        if ident in self.db[key]:
            raise ApiStatus(
                409,
                "AlreadyExists",
                f'{p.plural} "{meta["name"]}" already exists',
                {"name": meta["name"], "kind": p.plural},
            )
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.pop("resourceVersion", None)
        obj.setdefault("apiVersion", f"{p.group}/{p.version}" if p.group else p.version)
        obj.setdefault("kind", info.kind)
        if "status" in info.subresources and p.plural != "customresourcedefinitions":
            obj.pop("status", None)  # status is written through /status only
        if raw.query.get("dryRun"):
            return obj
        self._bump(obj)
        self.db[key][ident] = obj
        self._emit(key, "ADDED", obj)
        if p.plural == "customresourcedefinitions":
            self.add_crd(obj)
        return copy.deepcopy(obj)

    def _store(self, p: Path_, info: Any, old: dict[str, Any], new: dict[str, Any]) -> Any:
        """Write ``new`` over ``old`` with subresource rules; returns what the API answers."""
        key = (p.group, p.plural)
        has_status = "status" in info.subresources
        if p.subresource == "status":
            updated = copy.deepcopy(old)
            updated["status"] = new.get("status")
            if updated["status"] is None:
                updated.pop("status")
        else:
            updated = copy.deepcopy(new)
            if has_status:
                if "status" in old:
                    updated["status"] = copy.deepcopy(old["status"])
                else:
                    updated.pop("status", None)
            # Identity and server-owned fields cannot be changed by a client.
            for f in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
                if f in old["metadata"]:
                    updated["metadata"][f] = old["metadata"][f]
            spec_old = {k: v for k, v in old.items() if k not in ("metadata", "status")}
            spec_new = {k: v for k, v in updated.items() if k not in ("metadata", "status")}
            generation = old["metadata"].get("generation", 1)
            updated["metadata"]["generation"] = generation + (spec_old != spec_new)
        updated["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if updated == old:
            return copy.deepcopy(old)  # a no-op write does not bump resourceVersion
        ident = (old["metadata"].get("namespace"), old["metadata"]["name"])
        self._bump(updated)
        meta = updated["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.db[key].pop(ident, None)
            self._emit(key, "DELETED", updated)
            self._collect(meta["uid"])
        else:
            self.db[key][ident] = updated
            self._emit(key, "MODIFIED", updated)
        return copy.deepcopy(updated)

    def _precondition(self, old: dict[str, Any], new: Any) -> None:
        wanted = (
            (new.get("metadata") or {}).get("resourceVersion") if isinstance(new, dict) else None
        )
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise ApiStatus(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            )

    def _patch(self, raw: aiohttp.web.BaseRequest, p: Path_, info: Any, body: Any) -> Any:
        old = self._get((p.group, p.plural), p)
        ctype = raw.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype == "application/json-patch+json":
            new = json_patch(old, body)
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            self._precondition(old, body)
            new = merge_patch(old, body)
        else:
            raise ApiStatus(415, "UnsupportedMediaType", f"patch type {ctype!r} not supported")
        if raw.query.get("dryRun"):
            return new
        return self._store(p, info, old, new)

    def _update(self, raw: aiohttp.web.BaseRequest, p: Path_, info: Any, body: Any) -> Any:
        old = self._get((p.group, p.plural), p)
        self._precondition(old, body)
        if raw.query.get("dryRun"):
            return body
        return self._store(p, info, old, body)

    def _delete(self, raw: aiohttp.web.BaseRequest, p: Path_) -> Any:
        key = (p.group, p.plural)
        obj = self._get(key, p)
        if raw.query.get("dryRun"):
            return copy.deepcopy(obj)
        return self.delete_object(key, obj)

    def delete_object(self, key: tuple[str, str], obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        ident = (meta.get("namespace"), meta["name"])
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                self._bump(obj)
                self._emit(key, "MODIFIED", obj)
            return copy.deepcopy(obj)
        self.db[key].pop(ident, None)
        self._bump(obj)
        self._emit(key, "DELETED", obj)
        self._collect(meta["uid"])
        return copy.deepcopy(obj)

    def _collect(self, owner_uid: str) -> None:
        """Garbage collection: delete every object owned by ``owner_uid`` (background policy)."""
        for key, objects in list(self.db.items()):
            for obj in list(objects.values()):
                refs = obj.get("metadata", {}).get("ownerReferences") or []
                if any(r.get("uid") == owner_uid for r in refs):
                    self.delete_object(key, obj)

    # ---- watch

    async def _watch(self, raw: aiohttp.web.BaseRequest, p: Path_, info: Any) -> Any:
        query = raw.query
        key = (p.group, p.plural)
        timeout = float(query.get("timeoutSeconds") or 1800)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        since = query.get("resourceVersion")
        pending: list[dict[str, Any]] = []
        if not since or since == "0":
            cursor = self.rv
            pending = [
                {"type": "ADDED", "object": copy.deepcopy(o)}
                for o in self.db[key].values()
                if self._matches(o, p, query)
            ]
        else:
            cursor = int(since)
            if self.history and cursor < self.history[0].rv - 1 and len(self.history) == HISTORY:
                gone = ApiStatus(410, "Expired", f"too old resource version: {cursor}").body()
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                for line in pending:
                    await response.write(json.dumps(line).encode() + b"\n")
                pending = []
                for event in self._events_after(cursor, key):
                    cursor = event.rv
                    if self._matches(event.obj, p, query):
                        pending.append({"type": event.type, "object": event.obj})
                if pending:
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                waiter = self.changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), timeout=min(left, 5.0))
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        with _suppress_closed():
            await response.write_eof()
        return response

    def _events_after(self, cursor: int, key: tuple[str, str]) -> Iterable[_Event]:
        # History is ordered by rv; scan from the end back to the cursor.
        out = []
        for event in reversed(self.history):
            if event.rv <= cursor:
                break
            if event.key == key:
                out.append(event)
        return reversed(out)

    # ---- discovery fix

    async def _serve_version(self, request: rendering.Request) -> Any:
        result = await super()._serve_version(request)
        if isinstance(result, dict) and result.get("groupVersion", "").startswith("/"):
            result["groupVersion"] = result["groupVersion"][1:]  # "/v1" -> "v1"
        return result


class _suppress_closed:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ConnectionResetError, RuntimeError))


# --------------------------------------------------------------------------------------------
# running it, and a small client


def load_crd(emulator: KubeEmulator, path: str | Path) -> None:
    """Serve the resource of a CRD file without an API call (tests that skip kubectl)."""
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            emulator.add_crd(doc)


class EmulatorThread:
    """The emulator on its own event loop in a daemon thread; ``url`` and ``kubeconfig``."""

    def __init__(self, crds: Iterable[str | Path] = (), port: int | None = None) -> None:
        self.crds = list(crds)
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.emulator: KubeEmulator | None = None
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        emulator = KubeEmulator()
        for crd in self.crds:
            load_crd(emulator, crd)
        async with emulator, kmock.Server(emulator, port=self.port) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the emulator's loop (its state is not thread-safe) and return its value."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        path = Path(path)
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {
                                "cluster": "emulator",
                                "user": "test",
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "emulator",
                }
            )
        )
        return path


class Kube:
    """Synchronous JSON over HTTP: what tests and the kubelet fixture need, nothing more."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @staticmethod
    def path(api_version: str, plural: str, namespace: str | None, name: str | None = None) -> str:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        ns = f"/namespaces/{namespace}" if namespace else ""
        return f"{base}{ns}/{plural}" + (f"/{name}" if name else "")

    def request(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json"
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": ctype}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            payload = json.loads(error.read() or b"{}")
            raise ApiStatus(
                error.code, payload.get("reason", ""), payload.get("message", "")
            ) from None

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Any:
        try:
            return self.request("GET", self.path(api_version, plural, namespace, name))
        except ApiStatus as error:
            if error.code == 404:
                return None
            raise

    def list(
        self, api_version: str, plural: str, namespace: str | None = None, selector: str = ""
    ) -> list[dict[str, Any]]:
        q = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        result = self.request("GET", self.path(api_version, plural, namespace) + q)
        return list(result["items"])

    def create(self, api_version: str, plural: str, namespace: str | None, obj: Any) -> Any:
        return self.request("POST", self.path(api_version, plural, namespace), obj)

    def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        body: Any,
        sub: str = "",
    ) -> Any:
        path = self.path(api_version, plural, namespace, name) + (f"/{sub}" if sub else "")
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> Any:
        return self.request("DELETE", self.path(api_version, plural, namespace, name))
