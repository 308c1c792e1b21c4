"""A model's config.json and safetensors headers from S3, for the operator's plan (no weights:
two ranged reads per safetensors file, the 8-byte length and the JSON header), or a .gguf
file's header (ranged reads of its first MiBs until the header ends: kubetune.gguf_header).

It reads with the operator's own identity (boto3's default chain), never a job's Secret: the
operator holds no read access to Secrets. Give that identity read access to the model buckets
only (docs/operations.md).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from kubetune import api, gguf_header, plan


class Unreadable(Exception):
    """The headers could not be read (no credentials, denied, unreachable, not a model)."""


def read_s3_model(source: str, s3: api.S3Spec) -> tuple[dict[str, Any], list[plan.Tensor]]:
    """config.json and every tensor header of an s3://bucket/prefix model folder, or the
    planner's config and tensors of an s3://bucket/key.gguf file."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name=s3.region or "us-east-1",
        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}),
    )

    def read(key: str, byte_range: str | None = None) -> bytes:
        extra = {"Range": byte_range} if byte_range else {}
        body: bytes = client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        return body

    base = f"{prefix}/" if prefix else ""
    try:
        if api.is_gguf_source(source):
            size = int(client.head_object(Bucket=bucket, Key=prefix)["ContentLength"])
            header = gguf_header.read(
                lambda n: read(prefix, f"bytes=0-{n - 1}"), size, source.rsplit("/", 1)[-1]
            )
            return gguf_header.as_model(header, source)
        config = json.loads(read(f"{base}config.json"))
        keys = sorted(
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
            for o in page.get("Contents", [])
            if o["Key"].endswith(".safetensors") and "/" not in o["Key"][len(base) :]
        )
        tensors: list[plan.Tensor] = []
        for key in keys:
            (size,) = struct.unpack("<Q", read(key, "bytes=0-7"))
            if size > plan.MAX_HEADER:
                raise Unreadable(f"{key}: implausible safetensors header of {size} bytes")
            tensors += plan.header_tensors(json.loads(read(key, f"bytes=8-{7 + size}")))
    except (BotoCoreError, ClientError, ValueError, struct.error) as error:
        raise Unreadable(f"{source}: {type(error).__name__}: {error}") from None
    if not isinstance(config, dict) or not tensors:
        raise Unreadable(f"{source}: no config.json or no .safetensors files")
    return config, tensors
