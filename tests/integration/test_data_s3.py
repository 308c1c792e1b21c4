"""The data stage end to end on S3: fetch a dataset, validate, split, commit the split
manifests next to the outputs, and read them back the way a reviewer would."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer import data
from kubetune_trainer.errors import UserError
from kubetune_trainer.storage import Storage, fetch
from tests.support import s3 as s3h

ROWS = [
    {"instruction": f"Route ticket {i}.", "input": f"text {i}", "output": f"team={i % 4}"}
    for i in range(200)
]


def test_dataset_from_s3_to_committed_split_manifests(
    s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3h.s3_env(monkeypatch)
    bucket = s3h.new_bucket(s3_server)
    body = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    s3h.client(s3_server).put_object(Bucket=bucket, Key="datasets/tickets.jsonl", Body=body)
    s3 = api.S3Spec(endpoint=s3_server, region=s3h.REGION)
    spec = api.DatasetSpec.model_validate(
        {
            "source": f"s3://{bucket}/datasets/tickets.jsonl",
            "license": {"name": "CC-BY-4.0", "usage": "commercial"},
            "split": {"validation": 0.1, "test": 0.1, "seed": 1},
        }
    )
    data.check_license(spec.license, api.Policy(allowedLicenses=["CC-BY-4.0"]))
    path = fetch(spec.source, s3, tmp_path / "data", field="spec.dataset.source")
    dataset = data.load_dataset(path, spec)
    assert dataset.sha256 == hashlib.sha256(body).hexdigest()
    assert dataset.format == "alpaca" and len(dataset.examples) == 200

    splits = data.split_dataset(dataset, spec.split)
    data.write_split_manifests(splits, tmp_path / "splits")
    output = Storage.open(f"s3://{bucket}/runs/r1", s3, field="spec.output.destination")
    output.commit_dir(tmp_path / "splits", "splits")

    manifest = output.read_manifest("splits")
    assert manifest is not None
    hashes = json.loads(output.read_bytes("splits/hashes.json"))
    assert hashes == splits.hashes
    for name, part in splits.items():
        ids = output.read_bytes(f"splits/{name}.ids")
        assert hashlib.sha256(ids).hexdigest() == hashes[name]
        assert len(ids.decode().splitlines()) == len(part)
    assert sum(len(p) for _, p in splits.items()) == 200


def test_bad_rows_in_an_s3_dataset_name_the_source_field(
    s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3h.s3_env(monkeypatch)
    bucket = s3h.new_bucket(s3_server)
    body = json.dumps(ROWS[0]) + "\n" + '{"instruction": "x"}\n'
    s3h.client(s3_server).put_object(Bucket=bucket, Key="v.jsonl", Body=body.encode())
    spec = api.DatasetSpec.model_validate(
        {"source": "train.jsonl", "license": {"name": "MIT", "usage": "research"}}
    )
    path = fetch(f"s3://{bucket}/v.jsonl", api.S3Spec(endpoint=s3_server), tmp_path)
    field = "spec.dataset.split.validationSource"
    with pytest.raises(UserError) as error:
        data.load_dataset(path, spec, field=field)
    assert str(error.value).startswith(f"{field}: 1 of 2 rows are invalid")
    assert "row 2: missing field 'output'" in str(error.value)
