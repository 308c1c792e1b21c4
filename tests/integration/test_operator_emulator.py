"""The Kubernetes emulator the operator tests stand on (tests/support/kmock_adapter.py): the API
semantics kopf and kubectl rely on, checked over real HTTP."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kmock_adapter import ApiStatus, EmulatorThread, Kube
from tests.support.operator_harness import CRD, FTJ

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorThread]:
    thread = EmulatorThread(crds=[CRD]).start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def kube(emulator: EmulatorThread) -> Kube:
    return Kube(emulator.url)


def cm(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def watch(kube: Kube, path: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(kube.url + path, timeout=10) as response:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def test_server_owned_metadata_and_generation(kube: Kube) -> None:
    obj = kube.create(FTJ, "finetunejobs", "ns1", {"metadata": {"name": "a"}, "spec": {"x": 1}})
    meta = obj["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert meta["namespace"] == "ns1" and int(meta["resourceVersion"]) > 0
    spec_change = kube.patch(FTJ, "finetunejobs", "ns1", "a", {"spec": {"x": 2}})
    assert spec_change["metadata"]["generation"] == 2
    assert int(spec_change["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    labelled = kube.patch(FTJ, "finetunejobs", "ns1", "a", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 2  # metadata is not spec
    assert labelled["metadata"]["uid"] == meta["uid"]


def test_status_subresource_separation(kube: Kube) -> None:
    kube.create(FTJ, "finetunejobs", "ns1", {"metadata": {"name": "b"}, "spec": {"x": 1}})
    via_status = kube.patch(
        FTJ,
        "finetunejobs",
        "ns1",
        "b",
        {"spec": {"x": 9}, "status": {"phase": "Running"}},
        sub="status",
    )
    assert via_status["status"] == {"phase": "Running"} and via_status["spec"] == {"x": 1}
    via_main = kube.patch(FTJ, "finetunejobs", "ns1", "b", {"status": {"phase": "Failed"}})
    assert via_main["status"] == {"phase": "Running"}
    assert via_main["metadata"]["generation"] == 1


def test_list_kind_version_and_label_selectors(kube: Kube) -> None:
    for name, team in (("c1", "a"), ("c2", "b"), ("c3", "a")):
        kube.create("v1", "configmaps", "sel", cm(name, team=team))
    listing = kube.request("GET", "/api/v1/namespaces/sel/configmaps?labelSelector=team%3Da")
    assert listing["kind"] == "ConfigMapList" and listing["apiVersion"] == "v1"
    assert int(listing["metadata"]["resourceVersion"]) > 0
    assert sorted(i["metadata"]["name"] for i in listing["items"]) == ["c1", "c3"]
    assert [
        i["metadata"]["name"] for i in kube.list("v1", "configmaps", "sel", "team notin (a)")
    ] == ["c2"]
    assert len(kube.list("v1", "configmaps", "sel", "team,!missing")) == 3
    assert kube.list("v1", "configmaps", "sel", "team!=a,team!=b") == []


def test_watch_resumes_from_a_resource_version_and_times_out(kube: Kube) -> None:
    first = kube.create("v1", "configmaps", "w", cm("w1"))
    rv = first["metadata"]["resourceVersion"]
    kube.create("v1", "configmaps", "w", cm("w2"))
    kube.patch("v1", "configmaps", "w", "w1", {"data": {"k": "changed"}})
    events = watch(
        kube, f"/api/v1/namespaces/w/configmaps?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "w2"),
        ("MODIFIED", "w1"),
    ]
    fresh = watch(kube, "/api/v1/namespaces/w/configmaps?watch=true&timeoutSeconds=1")
    assert sorted(e["object"]["metadata"]["name"] for e in fresh) == ["w1", "w2"]
    assert {e["type"] for e in fresh} == {"ADDED"}


def test_json_patch_test_failure_is_422_and_conflicts_are_409(kube: Kube) -> None:
    kube.create("v1", "configmaps", "p", cm("p1"))
    ops = [
        {"op": "test", "path": "/data/k", "value": "other"},
        {"op": "replace", "path": "/data/k", "value": "x"},
    ]
    with pytest.raises(ApiStatus) as error:
        kube.request(
            "PATCH", "/api/v1/namespaces/p/configmaps/p1", ops, "application/json-patch+json"
        )
    assert error.value.code == 422
    ops[0]["value"] = "v"
    patched = kube.request(
        "PATCH", "/api/v1/namespaces/p/configmaps/p1", ops, "application/json-patch+json"
    )
    assert patched["data"]["k"] == "x"
    stale = dict(patched, metadata=dict(patched["metadata"], resourceVersion="1"))
    with pytest.raises(ApiStatus) as conflict:
        kube.request("PUT", "/api/v1/namespaces/p/configmaps/p1", stale)
    assert conflict.value.code == 409
    with pytest.raises(ApiStatus) as exists:
        kube.create("v1", "configmaps", "p", cm("p1"))
    assert (exists.value.code, exists.value.reason) == (409, "AlreadyExists")


def test_dry_run_and_generate_name(kube: Kube) -> None:
    kube.request("POST", "/api/v1/namespaces/d/configmaps?dryRun=All", cm("dry"))
    assert kube.get("v1", "configmaps", "d", "dry") is None
    made = kube.create("v1", "configmaps", "d", {"metadata": {"generateName": "gen-"}})
    assert made["metadata"]["name"].startswith("gen-") and len(made["metadata"]["name"]) == 9


def test_finalizers_and_garbage_collection(kube: Kube) -> None:
    owner = kube.create(
        FTJ,
        "finetunejobs",
        "gc",
        {"metadata": {"name": "owner", "finalizers": ["kubetune.io/finalizer"]}, "spec": {}},
    )
    ref = {
        "apiVersion": FTJ,
        "kind": "FineTuneJob",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    kube.create("batch/v1", "jobs", "gc", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    job = kube.get("batch/v1", "jobs", "gc", "child")
    kube.create(
        "v1",
        "pods",
        "gc",
        {
            "metadata": {
                "name": "grandchild",
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": "child",
                        "uid": job["metadata"]["uid"],
                    }
                ],
            }
        },
    )
    kube.delete(FTJ, "finetunejobs", "gc", "owner")
    marked = kube.get(FTJ, "finetunejobs", "gc", "owner")
    assert marked["metadata"]["deletionTimestamp"]  # held by its finalizer
    assert kube.get("batch/v1", "jobs", "gc", "child") is not None
    kube.patch(FTJ, "finetunejobs", "gc", "owner", {"metadata": {"finalizers": None}})
    assert kube.get(FTJ, "finetunejobs", "gc", "owner") is None
    assert kube.get("batch/v1", "jobs", "gc", "child") is None
    assert kube.get("v1", "pods", "gc", "grandchild") is None


def test_discovery_fixes_for_kubectl(kube: Kube) -> None:
    core = kube.request("GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    assert any(r["name"] == "pods" for r in core["resources"])
    ours = kube.request("GET", "/apis/kubetune.io/v1alpha1")
    names = {r["name"]: r for r in ours["resources"]}
    assert names["finetunejobs"]["kind"] == "FineTuneJob"
    assert "finetunejobs/status" in names and names["finetunejobs"]["namespaced"] is True


def test_protobuf_bodies_are_refused_clearly(kube: Kube) -> None:
    with pytest.raises(ApiStatus) as error:
        kube.request(
            "POST", "/api/v1/namespaces/x/configmaps", {}, "application/vnd.kubernetes.protobuf"
        )
    assert error.value.code == 415


def test_server_side_table_from_printer_columns(kube: Kube) -> None:
    kube.create(FTJ, "finetunejobs", "t", {"metadata": {"name": "t1"}, "spec": {}})
    kube.patch(
        FTJ,
        "finetunejobs",
        "t",
        "t1",
        {"status": {"phase": "Running", "progress": {"percent": 12.5}}},
        sub="status",
    )
    request = urllib.request.Request(
        kube.url + "/apis/kubetune.io/v1alpha1/namespaces/t/finetunejobs",
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        table = json.loads(response.read())
    names = [c["name"] for c in table["columnDefinitions"]]
    assert table["kind"] == "Table" and names[:3] == ["Name", "Phase", "Progress"]
    (row,) = table["rows"]
    assert row["cells"][:3] == ["t1", "Running", 12.5]
    assert row["cells"][names.index("Age")].endswith("s")  # a date column is shown as an age
