"""S3-only behaviour against real HTTP servers: multipart/ranged transfers, concurrency, and
every failure a user can meet (missing object or bucket, wrong or missing credentials, an
unreachable or failing endpoint)."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune import api
from kubetune_trainer.errors import InfraError, UserError
from kubetune_trainer.storage import S3Storage, Storage, fetch
from tests.support import s3 as s3h

MB = 1024 * 1024


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    s3h.s3_env(monkeypatch)
    return s3h.new_bucket(s3_server)


def s3_spec(endpoint: str, **fields: Any) -> api.S3Spec:
    return api.S3Spec(endpoint=endpoint, region=s3h.REGION, **fields)


def record_calls(store: Storage, operation: str) -> list[dict[str, Any]]:
    """Parameters of every `operation` request the storage's client sends."""
    assert isinstance(store, S3Storage)
    calls: list[dict[str, Any]] = []
    store.client.meta.events.register(
        f"before-parameter-build.s3.{operation}", lambda params, **_: calls.append(dict(params))
    )
    return calls


@pytest.mark.timeout(120)
def test_big_objects_move_in_parts(s3_server: str, bucket: str, tmp_path: Path) -> None:
    big = os.urandom(12 * MB)
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(big)
    (src / "config.json").write_bytes(b'{"hidden_size": 8}')
    (src / "tokenizer.json").write_bytes(b"{}")
    store = Storage.open(
        f"s3://{bucket}/models/base",
        s3_spec(s3_server),
        field="spec.model.source",
        multipart_threshold=5 * MB,
        multipart_chunksize=5 * MB,
    )
    parts = record_calls(store, "UploadPart")
    store.commit_dir(src, "")
    assert len(parts) == 3  # 12 MB in 5 MB parts
    gets = record_calls(store, "GetObject")
    dest = store.download_dir("", tmp_path / "down")
    ranged = [g for g in gets if g.get("Key", "").endswith("model.safetensors")]
    assert len(ranged) == 3 and all(str(g.get("Range", "")).startswith("bytes=") for g in ranged)
    assert (dest / "model.safetensors").read_bytes() == big
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_a_folder_downloads_concurrently(s3_server: str, bucket: str, tmp_path: Path) -> None:
    client = s3h.client(s3_server)
    for i in range(24):
        client.put_object(Bucket=bucket, Key=f"shards/part-{i:02d}.bin", Body=os.urandom(20_000))
    store = Storage.open(f"s3://{bucket}/shards", s3_spec(s3_server), max_concurrency=8)
    assert isinstance(store, S3Storage)
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def started(**_: Any) -> None:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])

    def finished(**_: Any) -> None:
        with lock:
            state["now"] -= 1

    store.client.meta.events.register("before-send.s3.GetObject", started)
    store.client.meta.events.register("needs-retry.s3.GetObject", finished)
    dest = store.download_dir("", tmp_path / "shards")
    assert len(list(dest.iterdir())) == 24
    assert state["max"] > 1  # several requests were in flight at once


def test_missing_object_is_a_user_error_naming_the_field(
    s3_server: str, bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/data/x.jsonl"
    with pytest.raises(UserError) as error:
        fetch(uri, s3_spec(s3_server), tmp_path, field="spec.dataset.source")
    assert str(error.value) == f"spec.dataset.source: {uri}: object not found"
    store = Storage.open(f"s3://{bucket}/data", s3_spec(s3_server), field="spec.dataset.source")
    with pytest.raises(UserError, match=rf"^spec.dataset.source: {uri}: object not found$"):
        store.read_bytes("x.jsonl")
    assert store.read_manifest("ckpt") is None and store.committed("") == []


def test_missing_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s3h.s3_env(monkeypatch)
    store = Storage.open(
        "s3://no-such-bucket-kt/out", s3_spec(s3_server), field="spec.output.destination"
    )
    with pytest.raises(UserError) as error:
        store.write_bytes("report.json", b"{}")
    assert str(error.value).startswith(
        "spec.output.destination: bucket 'no-such-bucket-kt' does not exist"
    )
    with pytest.raises(UserError, match="bucket 'no-such-bucket-kt' does not exist"):
        store.committed("checkpoints")
    with pytest.raises(UserError, match="bucket 'no-such-bucket-kt' does not exist"):
        fetch("s3://no-such-bucket-kt/m", s3_spec(s3_server), tmp_path, field="spec.model.source")


# ---- credentials: a moto server that checks them (see tests/support/s3.py)


@pytest.fixture(scope="module")
def auth_server() -> Iterator[s3h.AuthServer]:
    server = s3h.start_auth_server(["s3:*"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def auth_bucket(auth_server: s3h.AuthServer) -> str:
    client = s3h.client(auth_server.endpoint, auth_server.key_id, auth_server.secret)
    client.create_bucket(Bucket="secured")
    client.put_object(Bucket="secured", Key="data/train.jsonl", Body=b"{}\n")
    return "secured"


def test_right_credentials_work(
    auth_server: s3h.AuthServer, auth_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3h.s3_env(monkeypatch, auth_server.key_id, auth_server.secret)
    store = Storage.open(f"s3://{auth_bucket}/data", s3_spec(auth_server.endpoint))
    assert store.read_bytes("train.jsonl") == b"{}\n"


@pytest.mark.parametrize(
    ("which", "code"), [("key", "InvalidAccessKeyId"), ("secret", "SignatureDoesNotMatch")]
)
@pytest.mark.parametrize("secret_name", [None, "s3-creds"])
def test_wrong_credentials_are_a_user_error_naming_them(
    auth_server: s3h.AuthServer,
    auth_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    which: str,
    code: str,
    secret_name: str | None,
) -> None:
    key_id = "AKIAWRONGWRONGWRONG0" if which == "key" else auth_server.key_id
    secret = "wrong-secret-value-123" if which == "secret" else auth_server.secret
    s3h.s3_env(monkeypatch, key_id, secret)
    spec = s3_spec(auth_server.endpoint, credentialsSecret=secret_name)
    uri = f"s3://{auth_bucket}/data/train.jsonl"
    with pytest.raises(UserError) as error:
        fetch(uri, spec, tmp_path, field="spec.dataset.source")
    message = str(error.value)
    assert message.startswith(f"spec.storage.s3.credentialsSecret: access denied reading {uri}")
    assert f"({code})" in message and "(for spec.dataset.source)" in message
    if secret_name:
        assert "check the credentials in the Secret 's3-creds'" in message
    else:
        assert "AWS_ACCESS_KEY_ID" in message
    assert secret not in message and auth_server.secret not in message  # never leak values


def test_access_denied_by_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    server = s3h.start_auth_server(["s3:GetObject", "s3:ListBucket"])
    try:
        s3h.s3_env(monkeypatch, server.key_id, server.secret)
        store = Storage.open(
            "s3://any-bucket/out", s3_spec(server.endpoint), field="spec.output.destination"
        )
        with pytest.raises(UserError) as error:
            store.write_bytes("report.json", b"{}")
        assert "access denied writing s3://any-bucket/out/report.json (AccessDenied)" in str(
            error.value
        )
    finally:
        server.stop()


def test_no_credentials_at_all(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s3h.s3_env(monkeypatch)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = Storage.open("s3://whatever/x", s3_spec(s3_server), field="spec.model.source")
    with pytest.raises(UserError, match=r"^spec.storage.s3.credentialsSecret: no S3 credentials"):
        store.list()


# ---- infrastructure failures: retried, then InfraError


def test_unreachable_endpoint_is_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    s3h.s3_env(monkeypatch)
    endpoint = f"http://127.0.0.1:{s3h.free_port()}"  # nothing listens there
    store = Storage.open(
        "s3://bucket/out", s3_spec(endpoint), field="spec.output.destination", max_attempts=2
    )
    with pytest.raises(InfraError, match=rf"spec.output.destination: .*cannot reach {endpoint}"):
        store.write_bytes("report.json", b"{}")


class _Failing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with 503 SlowDown."""

    requests = 0

    def _fail(self) -> None:
        type(self).requests += 1
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _fail

    def log_message(self, *args: Any) -> None:
        pass


def test_5xx_is_retried_then_an_infra_error(monkeypatch: pytest.MonkeyPatch) -> None:
    s3h.s3_env(monkeypatch)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        store = Storage.open(
            "s3://bucket/out", s3_spec(endpoint), field="spec.output.destination", max_attempts=3
        )
        with pytest.raises(InfraError, match=r"spec.output.destination: reading .* after retries"):
            store.read_bytes("report.json")
        assert _Failing.requests == 3  # the first try and two retries
    finally:
        server.shutdown()
