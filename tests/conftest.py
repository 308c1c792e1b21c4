"""Fixtures shared by every tier. Keep this file generic: tier- or part-specific fixtures live
in tests/<tier>/conftest.py or tests/support/<part>.py."""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server (in a thread, real HTTP on 127.0.0.1, a free port); yields its endpoint
    URL. Sets no environment: give clients credentials explicitly, or use
    tests.support.s3.s3_env. Buckets persist for the session: use unique bucket names."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def kube_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real control plane per run (tests/support/controlplane.py) with the operator
    running as the chart's ServiceAccount (tests/support/cluster.py)."""
    from tests.support.cluster import Session
    from tests.support.controlplane import ClusterError

    try:
        session = Session(tmp_path_factory.mktemp("k8s")).start()
    except ClusterError as error:
        pytest.fail(f"error: {error}", pytrace=False)
    atexit.register(session.close)  # even when pytest is interrupted
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def cluster(kube_session: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A namespace of its own on the session's cluster. After the test: no request of the
    operator was forbidden (the chart's RBAC is enough); on failure, the logs are printed."""
    from tests.support.cluster import Cluster

    name = request.node.name.replace("_", "-").lower().removeprefix("test-")
    c = Cluster(kube_session, prefix=name[:30])
    before = len(kube_session.forbidden())
    try:
        yield c
    finally:
        if request.node.stash.get(_FAILED, False):
            print(c.logs())
        c.close()
    forbidden = kube_session.forbidden()[before:]
    assert forbidden == [], f"the operator was refused: {forbidden}"
