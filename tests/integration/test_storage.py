"""The storage protocol, the same on a local folder and on S3 (a moto server over HTTP)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune import api
from kubetune_trainer.errors import InfraError, UserError
from kubetune_trainer.storage import (
    MANIFEST,
    MANIFEST_FORMAT,
    CorruptFolder,
    S3Storage,
    Storage,
    fetch,
)
from tests.support import s3 as s3h

OpenStorage = Callable[..., Storage]


@pytest.fixture(params=["local", "s3"])
def open_storage(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> OpenStorage:
    """A factory for a fresh, empty root of the parametrized kind."""
    if request.param == "local":
        return lambda **kw: Storage.open(str(tmp_path / "root"), field="spec.output.destination")
    endpoint = request.getfixturevalue("s3_server")
    s3h.s3_env(monkeypatch)
    bucket = s3h.new_bucket(endpoint)
    spec = api.S3Spec(endpoint=endpoint, region=s3h.REGION)
    return lambda **kw: Storage.open(
        f"s3://{bucket}/runs/demo", spec, field="spec.output.destination", **kw
    )


def make_folder(path: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(content)
    return path


FILES = {
    "adapter_model.safetensors": os.urandom(3000),
    "adapter_config.json": b'{"r": 8}',
    "optimizer/state.pt": os.urandom(500),
}


def test_objects_round_trip(open_storage: OpenStorage) -> None:
    store = open_storage()
    assert not store.exists("report.json") and store.list() == []
    store.write_bytes("report.json", b'{"ok": true}')
    store.write_bytes("plots/loss.png", b"png")
    assert store.exists("report.json") and store.read_bytes("report.json") == b'{"ok": true}'
    assert store.list() == ["plots/loss.png", "report.json"]
    assert store.list("plots/") == ["plots/loss.png"]
    assert store.uri_for("plots/loss.png") == store.uri + "/plots/loss.png"
    store.write_bytes("report.json", b"v2")  # overwrite
    assert store.read_bytes("report.json") == b"v2"


def test_commit_then_read_manifest_and_download(open_storage: OpenStorage, tmp_path: Path) -> None:
    store = open_storage()
    src = make_folder(tmp_path / "ckpt", FILES)
    uri = store.commit_dir(src, "checkpoints/step-10")
    assert uri == store.uri_for("checkpoints/step-10")
    manifest = store.read_manifest("checkpoints/step-10")
    assert manifest is not None
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        rel: (len(content), hashlib.sha256(content).hexdigest()) for rel, content in FILES.items()
    }
    assert manifest["totalBytes"] == sum(len(c) for c in FILES.values())
    assert store.committed("checkpoints") == ["checkpoints/step-10"]
    dest = store.download_dir("checkpoints/step-10", tmp_path / "back")
    assert {
        p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
    } == FILES
    # The manifest is the last object written.
    assert sorted(store.list("checkpoints/step-10/")) == sorted(
        [f"checkpoints/step-10/{r}" for r in FILES] + [f"checkpoints/step-10/{MANIFEST}"]
    )


def test_folder_without_manifest_does_not_exist_for_readers(
    open_storage: OpenStorage, tmp_path: Path
) -> None:
    store = open_storage()
    store.commit_dir(make_folder(tmp_path / "a", FILES), "checkpoints/step-20")
    store.commit_dir(make_folder(tmp_path / "b", FILES), "checkpoints/step-100")
    # A crash mid-upload leaves objects without a manifest:
    store.write_bytes("checkpoints/step-200/adapter_model.safetensors", b"partial")
    store.write_bytes("checkpoints/step-300/sub/manifest.json", b"{}")  # not at folder level
    assert store.read_manifest("checkpoints/step-200") is None
    assert store.committed("checkpoints") == ["checkpoints/step-20", "checkpoints/step-100"]
    assert store.committed("checkpoints/") == store.committed("checkpoints")
    assert store.committed("nothing-here") == []


def test_recommit_replaces_the_manifest(open_storage: OpenStorage, tmp_path: Path) -> None:
    store = open_storage()
    store.commit_dir(make_folder(tmp_path / "v1", {"a.txt": b"one", "b.txt": b"two"}), "art")
    store.commit_dir(make_folder(tmp_path / "v2", {"a.txt": b"ONE"}), "art")
    manifest = store.read_manifest("art")
    assert manifest is not None and [f["path"] for f in manifest["files"]] == ["a.txt"]
    dest = store.download_dir("art", tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]  # b.txt is not in the commit
    assert (dest / "a.txt").read_bytes() == b"ONE"


def test_delete_folder_and_object(open_storage: OpenStorage, tmp_path: Path) -> None:
    store = open_storage()
    store.commit_dir(make_folder(tmp_path / "c", FILES), "checkpoints/step-1")
    store.commit_dir(make_folder(tmp_path / "d", FILES), "checkpoints/step-2")
    store.write_bytes("report.json", b"{}")
    store.delete("checkpoints/step-1")
    assert store.committed("checkpoints") == ["checkpoints/step-2"]
    assert not any(k.startswith("checkpoints/step-1/") for k in store.list())
    store.delete("report.json")
    assert not store.exists("report.json")
    store.delete("never-existed")  # nothing to do, no error
    assert store.committed("checkpoints") == ["checkpoints/step-2"]


def test_download_checks_the_manifest(open_storage: OpenStorage, tmp_path: Path) -> None:
    store = open_storage()
    store.commit_dir(make_folder(tmp_path / "c", FILES), "model")
    store.write_bytes("model/adapter_config.json", b'{"r": 9}')  # changed after the commit
    with pytest.raises(InfraError, match=r"adapter_config.json does not match its manifest"):
        store.download_dir("model", tmp_path / "dl")


def test_a_same_size_change_is_named_a_sha256_difference(
    open_storage: OpenStorage, tmp_path: Path
) -> None:
    store = open_storage()
    store.commit_dir(make_folder(tmp_path / "c", FILES), "model")
    store.write_bytes("model/adapter_config.json", b'{"r": 9}')  # same size, other bytes
    with pytest.raises(CorruptFolder) as caught:
        store.download_dir("model", tmp_path / "dl")
    message = str(caught.value)
    assert "adapter_config.json does not match its manifest (sha256 " in message
    assert "differs from the manifest's" in message and "same size, 8 bytes" in message


def test_manifest_paths_cannot_escape_the_destination(
    open_storage: OpenStorage, tmp_path: Path
) -> None:
    store = open_storage()
    evil = {
        "format": MANIFEST_FORMAT,
        "files": [{"path": "../../escape.txt", "size": 1, "sha256": "0" * 64}],
    }
    store.write_bytes("evil/manifest.json", json.dumps(evil).encode())
    with pytest.raises(UserError, match=r"'\.\.' is not allowed"):
        store.download_dir("evil", tmp_path / "dl" / "x")
    assert not (tmp_path / "escape.txt").exists()


def test_a_foreign_manifest_json_is_just_a_file(open_storage: OpenStorage, tmp_path: Path) -> None:
    store = open_storage()
    store.write_bytes("model/config.json", b"{}")
    store.write_bytes("model/manifest.json", b'{"name": "shipped with the model"}')
    assert store.read_manifest("model") is None
    dest = store.download_dir("model", tmp_path / "dl")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "manifest.json"]


def test_missing_object_and_empty_folder_name_the_field(
    open_storage: OpenStorage, tmp_path: Path
) -> None:
    store = open_storage()
    with pytest.raises(UserError) as error:
        store.read_bytes("nope/report.json")
    assert str(error.value).startswith("spec.output.destination: ")
    assert "nope/report.json" in str(error.value) and "not found" in str(error.value)
    with pytest.raises(UserError, match=r"spec.output.destination: .*empty-model: not found"):
        store.download_dir("empty-model", tmp_path / "dl")


def test_fetch_a_folder_and_a_file(open_storage: OpenStorage, tmp_path: Path) -> None:
    store = open_storage()
    store.commit_dir(make_folder(tmp_path / "m", FILES), "models/base")
    store.write_bytes("data/train.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    spec = store.spec if isinstance(store, S3Storage) else None
    folder = fetch(
        store.uri_for("models/base"), spec, tmp_path / "model", field="spec.model.source"
    )
    assert (folder / "optimizer" / "state.pt").read_bytes() == FILES["optimizer/state.pt"]
    file = fetch(store.uri_for("data/train.jsonl"), spec, tmp_path / "data")
    assert file.name == "train.jsonl" and file.read_bytes().startswith(b'{"prompt"')
    with pytest.raises(UserError, match=r"spec.dataset.source: .*missing.jsonl: .*not found"):
        fetch(
            store.uri_for("data/missing.jsonl"), spec, tmp_path / "x", field="spec.dataset.source"
        )


# ---- local only


def test_local_paths_resolve_against_base_dir_and_are_not_copied(tmp_path: Path) -> None:
    (tmp_path / "jobs" / "data").mkdir(parents=True)
    (tmp_path / "jobs" / "data" / "t.jsonl").write_text("{}")
    got = fetch("data/t.jsonl", None, tmp_path / "unused", base_dir=tmp_path / "jobs")
    assert got == tmp_path / "jobs" / "data" / "t.jsonl"
    assert not (tmp_path / "unused").exists()
    store = Storage.open(f"file://{tmp_path}/jobs", field="f")
    assert store.uri == (tmp_path / "jobs").as_uri() and store.exists("data/t.jsonl")
    relative = Storage.open("out", base_dir=tmp_path / "jobs")
    relative.write_bytes("r.json", b"1")
    assert (tmp_path / "jobs" / "out" / "r.json").read_bytes() == b"1"
    with pytest.raises(UserError, match=r"spec.model.source: .*no-model: not found"):
        fetch("no-model", None, tmp_path, base_dir=tmp_path, field="spec.model.source")


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = Storage.open(str(tmp_path / "root"))
    store.write_bytes("a/b.json", b"x" * 10)
    store.commit_dir(make_folder(tmp_path / "src", FILES), "c")
    names = [p.name for p in (tmp_path / "root").rglob("*")]
    assert not [n for n in names if n.startswith(".kubetune-tmp-")]
    # A temp file left by a crash is invisible to list().
    (tmp_path / "root" / "a" / ".kubetune-tmp-123").write_bytes(b"partial")
    assert store.list("a/") == ["a/b.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_local_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    # Temp files are created 0600; once renamed into place they must be readable like any
    # file the user writes (a report, a checkpoint on a shared PVC).
    previous = os.umask(umask)
    try:
        store = Storage.open(str(tmp_path / "root"))
        store.write_bytes("out/report.json", b"{}")
        store.commit_dir(make_folder(tmp_path / "src", FILES), "ckpt")
        store.download_dir("ckpt", tmp_path / "copy")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "root").rglob("*") if p.is_file()]
    files += [p for p in (tmp_path / "copy").rglob("*") if p.is_file()]
    assert len(files) == 1 + (len(FILES) + 1) + len(FILES)  # report, folder + manifest, copy
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in files}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def _errno_table() -> dict[str, int]:
    """errno name -> exit code, as docs/storage.md documents it."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "storage.md").read_text()
    table = text.split("| errno | exit | message hint |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:] if line.startswith("| E")]
    return {name.strip(): int(code) for name, code in rows}


def test_the_documented_errno_table_is_the_code() -> None:
    import errno

    from kubetune_trainer.storage import ERRNO_EXIT

    assert _errno_table() == {errno.errorcode[e]: code for e, (code, _) in ERRNO_EXIT.items()}


@pytest.mark.parametrize(
    ("name", "exit_code", "shown"),
    [
        ("EROFS", api.EXIT_USER_ERROR, "Read-only file system (EROFS): mount the volume"),
        ("ENOSPC", api.EXIT_USER_ERROR, "No space left on device (ENOSPC): free space"),
        ("EACCES", api.EXIT_USER_ERROR, "Permission denied (EACCES): give the trainer's user"),
        ("EIO", api.EXIT_INFRA_ERROR, "Input/output error (EIO): an I/O error"),
        ("ESTALE", api.EXIT_INFRA_ERROR, "(ESTALE): a stale network file handle: retried"),
    ],
)
def test_local_disk_errors_exit_by_errno(
    tmp_path: Path, name: str, exit_code: int, shown: str
) -> None:
    import errno

    store = Storage.open(str(tmp_path), field="spec.output.destination")
    number = getattr(errno, name)
    with pytest.raises((UserError, InfraError)) as caught, store._errors("writing", "report.json"):
        raise OSError(number, os.strerror(number))
    assert caught.value.exit_code == exit_code
    assert str(caught.value).startswith(
        f"spec.output.destination: writing {tmp_path}/report.json: "
    )
    assert shown in str(caught.value)
