"""The operator's plan input from S3 (kubetune.model_headers, moto over real HTTP) for a .gguf
source: ranged reads of the file's first bytes only, the same config and tensors as the local
reader, and a truncated file Unreadable (the job then runs unplanned, docs/operations.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune import api, gguf_header, model_headers
from tests.support import s3 as s3_support
from tests.support.gguf_model import write_llama_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "demo.gguf"
    return write_llama_gguf(ROOT / "examples" / "demo-model", out)


def test_a_gguf_on_s3_is_planned_from_its_header(
    demo_gguf: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_support.s3_env(monkeypatch)
    bucket = s3_support.new_bucket(s3_server)
    s3_support.client(s3_server).upload_file(str(demo_gguf), bucket, "models/demo.gguf")
    got: list[int] = []
    real_read = gguf_header.read

    def counting(fetch: Callable[[int], bytes], size: int, where: str) -> Any:
        def counted(n: int) -> bytes:
            data = fetch(n)
            got.append(len(data))
            return data

        return real_read(counted, size, where)

    monkeypatch.setattr(gguf_header, "read", counting)
    monkeypatch.setattr(gguf_header, "FIRST_READ", 1024)
    config, tensors = model_headers.read_s3_model(
        f"s3://{bucket}/models/demo.gguf", api.S3Spec(endpoint=s3_server)
    )
    assert (config, tensors) == gguf_header.as_model(
        gguf_header.read_local(demo_gguf), f"s3://{bucket}/models/demo.gguf"
    )
    size = demo_gguf.stat().st_size
    assert len(got) > 1 and sum(got) < size // 4  # ranged reads of the header, not the file


def test_a_truncated_gguf_on_s3_is_unreadable(
    demo_gguf: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_support.s3_env(monkeypatch)
    bucket = s3_support.new_bucket(s3_server)
    data = demo_gguf.read_bytes()
    s3_support.client(s3_server).put_object(
        Bucket=bucket, Key="cut.gguf", Body=data[: len(data) // 2]
    )
    with pytest.raises(model_headers.Unreadable, match=r"cut\.gguf: truncated GGUF file"):
        model_headers.read_s3_model(f"s3://{bucket}/cut.gguf", api.S3Spec(endpoint=s3_server))
