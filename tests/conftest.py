"""Fixtures shared by every tier. Keep this file generic: tier- or part-specific fixtures live
in tests/<tier>/conftest.py or tests/support/<part>.py."""

from __future__ import annotations

from collections.abc import Iterator

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
