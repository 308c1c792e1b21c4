"""Storage: one location root on S3 (boto3) or on a local disk (``file://`` or a plain path).

The commit protocol (docs/storage.md): a folder - a checkpoint, an artifact set - is written
object by object, and ``manifest.json`` (file list, sizes, sha256) goes LAST. A folder without
its manifest does not exist for readers: :meth:`Storage.committed` lists only folders with one,
and deletion removes the manifest FIRST. So a reader never sees half a checkpoint, on S3 (which
has no rename) or on a disk, and a crash at any point leaves either the old state or the new
one.

Errors come out as :class:`~kubetune_trainer.errors.UserError` (not found, access denied,
missing bucket: retrying cannot help) or :class:`~kubetune_trainer.errors.InfraError`
(unreachable endpoint, 5xx after retries), with the spec field in the message. Credentials come
from the standard environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, which the
operator fills from ``spec.storage.s3.credentialsSecret``) or boto3's default chain (pod
identity); their values never appear in messages.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune import api

from .errors import InfraError, TrainerError, UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kubetune-manifest/v1"
# Local writes go to a hidden temp name next to the target, then os.replace: readers see the
# old file or the new one, never a partial one. list() skips these names.
_TMP_PREFIX = ".kubetune-tmp-"

# Transfers: objects above the threshold move in ranged GETs / multipart uploads of CHUNK
# bytes, CONCURRENCY at a time (across parts and files: one pool for a whole folder).
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
MAX_CONCURRENCY = 16
# botocore "standard" retry mode: exponential backoff with jitter on throttling, 5xx and
# connection errors. 8 attempts ride out a few seconds of endpoint trouble.
MAX_ATTEMPTS = 8

# Inside Storage, `list` names the method: annotations there use these aliases.
Keys = list[str]
_Transfers = list[tuple[str, str, Path]]
_Uploads = list[tuple[Path, str]]

_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "403",
    "Forbidden",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# 4xx answers that are about the moment, not the request: retrying (the Job) can help.
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "TooManyRequests",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}


# What an OSError from a local disk or volume means, by errno (docs/storage.md has this table;
# a test keeps them equal). 10 (user): retrying the same pod on the same volume fails the same
# way, a person must change something (the path, the volume's mode or size). 11 (transient):
# the moment, not the request - a retry can succeed. Anything not listed: 11.
ERRNO_EXIT: dict[int, tuple[int, str]] = {
    errno.ENOENT: (api.EXIT_USER_ERROR, "check the path"),
    errno.ENOTDIR: (api.EXIT_USER_ERROR, "a part of the path is a file"),
    errno.EISDIR: (api.EXIT_USER_ERROR, "expected a file, found a folder"),
    errno.ENAMETOOLONG: (api.EXIT_USER_ERROR, "use a shorter path"),
    errno.EACCES: (api.EXIT_USER_ERROR, "give the trainer's user access (fsGroup, mode)"),
    errno.EPERM: (api.EXIT_USER_ERROR, "give the trainer's user access (fsGroup, mode)"),
    errno.EROFS: (api.EXIT_USER_ERROR, "mount the volume read-write or choose another path"),
    errno.ENOSPC: (api.EXIT_USER_ERROR, "free space or give the volume more"),
    errno.EDQUOT: (api.EXIT_USER_ERROR, "raise the quota or free space"),
    errno.EFBIG: (api.EXIT_USER_ERROR, "the file system's file size limit is too small"),
    errno.EIO: (api.EXIT_INFRA_ERROR, "an I/O error on the device: retried"),
    errno.ESTALE: (api.EXIT_INFRA_ERROR, "a stale network file handle: retried"),
    errno.ETIMEDOUT: (api.EXIT_INFRA_ERROR, "timed out: retried"),
    errno.EAGAIN: (api.EXIT_INFRA_ERROR, "temporarily unavailable: retried"),
    errno.EBUSY: (api.EXIT_INFRA_ERROR, "busy: retried"),
    errno.EINTR: (api.EXIT_INFRA_ERROR, "interrupted: retried"),
    errno.ENETDOWN: (api.EXIT_INFRA_ERROR, "the network is down: retried"),
    errno.ENETUNREACH: (api.EXIT_INFRA_ERROR, "the network is unreachable: retried"),
    errno.ECONNRESET: (api.EXIT_INFRA_ERROR, "the connection was reset: retried"),
    errno.ENOMEM: (api.EXIT_INFRA_ERROR, "out of kernel memory: retried"),
}


def os_error(exc: OSError, what: str) -> TrainerError:
    """The UserError or InfraError (by errno, ERRNO_EXIT) for an OSError while doing `what`
    (e.g. "spec.output.destination: writing /out/report.json")."""
    code, hint = ERRNO_EXIT.get(exc.errno or -1, (api.EXIT_INFRA_ERROR, "retried"))
    reason = exc.strerror or type(exc).__name__
    kind = UserError if code == api.EXIT_USER_ERROR else InfraError
    return kind(f"{what}: {reason} ({errno.errorcode.get(exc.errno or -1, '?')}): {hint}")


# --------------------------------------------------------------------------------------------
# helpers


def _clean_rel(rel: str) -> str:
    """A relative key in POSIX form; refuses absolute paths and '..' (a manifest or a key must
    never make a download write outside its destination)."""
    rel = rel.replace("\\", "/").strip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UserError(f"invalid relative path {rel!r}: '..' is not allowed")
    return "/".join(parts)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _natural_key(text: str) -> list[Any]:
    """Sort 'step-20' before 'step-100'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _local_files(src: Path) -> list[tuple[str, Path]]:
    """(relative POSIX key, path) of every file under src, sorted."""
    out = []
    for path in sorted(src.rglob("*")):
        if path.is_file():
            out.append((path.relative_to(src).as_posix(), path))
    return out


def build_manifest(src: Path) -> dict[str, Any]:
    """The manifest of a local folder: every file with its size and sha256."""
    files: list[dict[str, Any]] = []
    for rel, path in _local_files(src):
        if rel == MANIFEST:
            raise ValueError(f"{src}: '{MANIFEST}' is reserved for the commit marker")
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return {
        "format": MANIFEST_FORMAT,
        "files": files,
        "totalBytes": sum(f["size"] for f in files),
        "committedAt": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class CorruptFolder(InfraError):
    """A committed folder whose files differ from its manifest (changed or corrupted after
    the commit). Retried by default; a reader with an older copy (checkpoints) falls back."""


def _check_against_manifest(dest: Path, manifest: dict[str, Any], uri: str, field: str) -> None:
    """A downloaded folder must match its manifest byte for byte (size and sha256)."""
    where = f"{field}: " if field else ""
    for entry in manifest.get("files", []):
        path = dest / _clean_rel(str(entry["path"]))
        size = path.stat().st_size if path.exists() else -1
        if size != int(entry["size"]):
            found = "missing" if size < 0 else f"size {size}"
            problem = f"{found}, the manifest says size {entry['size']}"
        else:
            digest = sha256_file(path)
            if digest == entry["sha256"]:
                continue
            problem = (
                f"sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... "
                f"(same size, {size} bytes)"
            )
        raise CorruptFolder(
            f"{where}{uri}: {entry['path']} does not match its manifest ({problem}): the object "
            "changed or the download was corrupted"
        )


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere reading it means setting it
    for a moment (os.umask), which could race with a thread creating a file."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """The mode of a file the user writes (0644 under the usual umask 022). mkstemp creates its
    file 0600 - right for a temp file, wrong for a report or a checkpoint that others (a
    serving pod, a colleague on the PVC) must read once it is renamed into place."""
    return 0o666 & ~_umask()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)  # contents only: the mode stays mkstemp's 0600
        os.chmod(tmp, _file_mode())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# the interface


class Storage:
    """A location root. Keys (``rel``) are POSIX paths relative to it; "" is the root itself.

    Use :meth:`open`; it returns the local or the S3 implementation.
    """

    uri: str  # normalized root URI: file:///abs/path or s3://bucket[/prefix]
    field: str  # the spec field this location came from, for messages

    @classmethod
    def open(
        cls,
        uri: str,
        s3: api.S3Spec | None = None,
        *,
        base_dir: Path | None = None,
        field: str = "",
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNKSIZE,
        max_concurrency: int = MAX_CONCURRENCY,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> Storage:
        """Open a root. Relative plain paths resolve against ``base_dir`` (default: the current
        directory). ``field`` (e.g. "spec.output.destination") prefixes error messages. No
        network call happens here: errors surface on first use."""
        if uri.startswith("s3://"):
            return S3Storage(
                uri,
                s3 or api.S3Spec(),
                field=field,
                multipart_threshold=multipart_threshold,
                multipart_chunksize=multipart_chunksize,
                max_concurrency=max_concurrency,
                max_attempts=max_attempts,
            )
        return LocalStorage(local_path(uri, base_dir), field=field)

    # Every method below is implemented by both backends.
    def uri_for(self, rel: str) -> str:
        """The full URI of a key (what goes into status and reports)."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        """Whether a single object (file) exists at rel."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        """One object's bytes; UserError "not found" when missing."""
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object, atomically for readers (S3 PUT; local temp file + os.replace)."""
        raise NotImplementedError

    def list(self, rel_prefix: str = "") -> Keys:
        """Keys (relative to the root) that start with rel_prefix, sorted. A plain string
        prefix, as on S3: pass "checkpoints/" to list inside a folder."""
        raise NotImplementedError

    def download_dir(self, rel: str, dest: Path) -> Path:
        """Copy the folder rel to dest (created) and return dest. When the folder has a
        manifest, exactly its files are fetched and checked (size, sha256); otherwise every
        object under it (e.g. a model uploaded with `aws s3 cp`). S3 transfers run
        concurrently, large objects in ranged parts. UserError when the folder is empty."""
        raise NotImplementedError

    def _put_file(self, src: Path, rel: str) -> None:
        raise NotImplementedError

    def _put_files(self, files: _Uploads) -> None:
        for src, rel in files:
            self._put_file(src, rel)

    def _delete_keys(self, rels: Keys) -> None:
        raise NotImplementedError

    # ---- shared protocol (the same on both backends)

    def commit_dir(self, src: Path, rel: str) -> str:
        """Upload every file of the local folder src to rel, then manifest.json LAST (files,
        sizes, sha256). Re-committing a folder first deletes its old manifest, so readers never
        trust a mix. Objects under rel that the manifest does not list are left alone and
        ignored by readers (download_dir fetches exactly the manifest's files). Returns the
        folder's URI."""
        rel = _clean_rel(rel)
        if not src.is_dir():
            raise UserError(f"{self.field or 'storage'}: {src}: not a folder")
        manifest = build_manifest(src)
        manifest_key = _join(rel, MANIFEST)
        if self.exists(manifest_key):
            self._delete_keys([manifest_key])
        self._put_files([(src / f["path"], _join(rel, f["path"])) for f in manifest["files"]])
        self.write_bytes(manifest_key, json.dumps(manifest, indent=1).encode())
        return self.uri_for(rel)

    def read_manifest(self, rel: str) -> dict[str, Any] | None:
        """The folder's manifest, or None when it was never committed (or is being deleted).
        A manifest.json that kubetune did not write (a model may ship its own) is not a
        commit marker: None too, and download_dir then fetches the folder as it is."""
        key = _join(_clean_rel(rel), MANIFEST)
        if not self.exists(key):
            return None
        try:
            manifest = json.loads(self.read_bytes(key))
        except UserError:
            return None  # deleted between exists() and the read
        except ValueError:
            return None
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), list)
        ):
            return None
        return manifest

    def committed(self, rel_prefix: str) -> Keys:
        """Subfolders of rel_prefix that have a manifest, as keys usable with the other methods
        (e.g. "checkpoints/step-100"), in natural order (step-20 before step-100)."""
        base = _clean_rel(rel_prefix)
        prefix = base + "/" if base else ""
        found = []
        for key in self.list(prefix):
            parts = key[len(prefix) :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST:
                found.append(_join(base, parts[0]))
        return sorted(found, key=_natural_key)

    def uncommitted(self, rel_prefix: str) -> Keys:
        """Subfolders of rel_prefix without a manifest: what a writer killed mid-commit left."""
        base = _clean_rel(rel_prefix)
        prefix = base + "/" if base else ""
        folders = {
            _join(base, key[len(prefix) :].split("/")[0])
            for key in self.list(prefix)
            if "/" in key[len(prefix) :]
        }
        return sorted(folders - set(self.committed(rel_prefix)), key=_natural_key)

    def sweep_uncommitted(self, rel_prefix: str) -> Keys:
        """Delete the uncommitted subfolders of rel_prefix (call it only as the one writer:
        a folder being committed has no manifest yet either). Returns their URIs."""
        swept = self.uncommitted(rel_prefix)
        for rel in swept:
            self.delete(rel)
        return [self.uri_for(rel) for rel in swept]

    def delete(self, rel: str) -> None:
        """Delete a folder (its manifest FIRST, so it stops existing before it is partial) or a
        single object. Missing: nothing to do."""
        rel = _clean_rel(rel)
        manifest_key = _join(rel, MANIFEST)
        if self.exists(manifest_key):
            self._delete_keys([manifest_key])
        keys = self.list(rel + "/" if rel else "")
        if rel and self.exists(rel):
            keys.append(rel)
        if keys:
            self._delete_keys(keys)


def local_path(uri: str, base_dir: Path | None = None) -> Path:
    """file:///x -> /x; a plain path, relative to base_dir (default: the current directory)."""
    path = Path(uri[len("file://") :]) if uri.startswith("file://") else Path(uri).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return Path(os.path.normpath(path))


class LocalStorage(Storage):
    """A folder on a local disk or a mounted volume (PVC)."""

    def __init__(self, root: Path, *, field: str = "") -> None:
        self.root = root
        self.uri = root.as_uri()
        self.field = field

    def path(self, rel: str) -> Path:
        """The local path of a key."""
        rel = _clean_rel(rel)
        return self.root / rel if rel else self.root

    def uri_for(self, rel: str) -> str:
        return self.path(rel).as_uri()

    @contextlib.contextmanager
    def _errors(self, verb: str, rel: str) -> Iterator[None]:
        where = f"{self.field}: " if self.field else ""
        try:
            yield
        except FileNotFoundError:
            raise UserError(f"{where}{self.path(rel)}: not found") from None
        except IsADirectoryError:
            raise UserError(f"{where}{self.path(rel)}: is a folder, expected a file") from None
        except OSError as exc:
            raise os_error(exc, f"{where}{verb} {self.path(rel)}") from None

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("reading", rel):
            return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._errors("writing", rel):
            _atomic_write(self.path(rel), data)

    def list(self, rel_prefix: str = "") -> Keys:
        # Walk only the folder the prefix points into, then filter by the string prefix.
        prefix = rel_prefix.replace("\\", "/").lstrip("/")
        folder = self.path(prefix.rsplit("/", 1)[0] if "/" in prefix else "")
        if not folder.is_dir():
            return []
        keys: Keys = []
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(_TMP_PREFIX):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def download_dir(self, rel: str, dest: Path) -> Path:
        rel = _clean_rel(rel)
        manifest = self.read_manifest(rel)
        if manifest is not None:
            keys = [str(f["path"]) for f in manifest["files"]]
        else:
            prefix = rel + "/" if rel else ""
            keys = [k[len(prefix) :] for k in self.list(prefix)]
        if not keys:
            raise UserError(f"{self.field}: {self.uri_for(rel)}: not found (no files)")
        with self._errors("copying", rel):
            for key in keys:
                _atomic_copy(self.path(_join(rel, key)), dest / _clean_rel(key))
        if manifest is not None:
            _check_against_manifest(dest, manifest, self.uri_for(rel), self.field)
        dest.mkdir(parents=True, exist_ok=True)
        return dest

    def _put_file(self, src: Path, rel: str) -> None:
        with self._errors("writing", rel):
            _atomic_copy(src, self.path(rel))

    def uncommitted(self, rel_prefix: str) -> Keys:
        # A folder may hold nothing but a killed writer's hidden temp files, which list() skips.
        base = _clean_rel(rel_prefix)
        folder = self.path(base)
        found = set(super().uncommitted(rel_prefix))
        if folder.is_dir():
            found |= {_join(base, d.name) for d in folder.iterdir() if d.is_dir()}
        return sorted(found - set(self.committed(rel_prefix)), key=_natural_key)

    def delete(self, rel: str) -> None:
        super().delete(rel)
        folder = self.path(rel)
        if _clean_rel(rel) and folder.is_dir():
            # What is left are temp files of a writer killed mid-copy (list() skips them):
            # nobody else will ever remove them.
            with self._errors("deleting", rel):
                for path in sorted(folder.rglob(_TMP_PREFIX + "*"), reverse=True):
                    path.unlink(missing_ok=True)
                for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
                    if path.is_dir():
                        with contextlib.suppress(OSError):
                            path.rmdir()
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _delete_keys(self, rels: Keys) -> None:
        with self._errors("deleting", rels[0] if rels else ""):
            for rel in rels:
                with contextlib.suppress(FileNotFoundError):
                    self.path(rel).unlink()
            # Remove folders the deletion emptied (never the root itself).
            for parent in sorted({self.path(r).parent for r in rels}, key=lambda p: -len(p.parts)):
                while parent != self.root and parent.is_relative_to(self.root):
                    try:
                        parent.rmdir()
                    except OSError:
                        break
                    parent = parent.parent


_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def _new_client(s3: api.S3Spec, config: Any) -> Any:
    """An S3 client from a fresh session, so credentials are resolved now (from the
    environment the operator fills from the Secret, or the default chain) and never cached
    across storages; the sessions share one data loader, which caches the parsed service model
    (half the cost of creating a client)."""
    global _LOADER
    import boto3
    import botocore.session

    with _LOADER_LOCK:  # botocore sessions are not thread-safe; clients are
        session = botocore.session.Session()
        if _LOADER is None:
            _LOADER = session.get_component("data_loader")
        session.register_component("data_loader", _LOADER)
        return boto3.session.Session(botocore_session=session).client(
            "s3", endpoint_url=s3.endpoint, region_name=s3.region, config=config
        )


class S3Storage(Storage):
    """s3://bucket[/prefix] through boto3, with retries and concurrent transfers."""

    def __init__(
        self,
        uri: str,
        s3: api.S3Spec,
        *,
        field: str = "",
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNKSIZE,
        max_concurrency: int = MAX_CONCURRENCY,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise UserError(f"{field}: {uri}: missing bucket name")
        self.bucket = bucket
        self.prefix = _clean_rel(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.field = field
        self.spec = s3
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            s3={"addressing_style": s3.addressingStyle},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=max(10, max_concurrency + 2),
        )
        self.client: Any = _new_client(s3, config)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )

    def key(self, rel: str) -> str:
        return _join(self.prefix, _clean_rel(rel))

    def uri_for(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}".rstrip("/")

    @contextlib.contextmanager
    def _errors(self, verb: str, rel: str) -> Iterator[None]:
        """Map boto errors to messages that name the cause and the field."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from s3transfer.exceptions import RetriesExceededError

        uri = self.uri_for(rel)
        where = f"{self.field}: " if self.field else ""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket":
                raise UserError(
                    f"{where}bucket {self.bucket!r} does not exist ({verb} {uri})"
                ) from None
            if code in _NOT_FOUND_CODES:
                raise UserError(f"{where}{uri}: object not found") from None
            if code in _CREDENTIAL_CODES:
                raise UserError(self._denied(verb, uri, code)) from None
            if status >= 500 or code in _TRANSIENT_CODES:
                raise InfraError(
                    f"{where}{verb} {uri}: S3 error {code or status} after retries"
                ) from None
            raise UserError(f"{where}{verb} {uri}: {code}: {error.get('Message', '')}") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise UserError(
                f"spec.storage.s3.credentialsSecret: no S3 credentials found {verb} {uri}: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the operator sets them from "
                "spec.storage.s3.credentialsSecret) or give the pod an identity"
            ) from None
        except (EndpointConnectionError, ConnectionError, RetriesExceededError) as exc:
            endpoint = self.spec.endpoint or "AWS S3"
            raise InfraError(f"{where}{verb} {uri}: cannot reach {endpoint}: {exc}") from None
        except BotoCoreError as exc:
            raise InfraError(f"{where}{verb} {uri}: {exc}") from None

    def _denied(self, verb: str, uri: str, code: str) -> str:
        secret = self.spec.credentialsSecret
        hint = (
            f"check the credentials in the Secret {secret!r}"
            if secret
            else "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or the pod's "
            "identity), or name a Secret in spec.storage.s3.credentialsSecret"
        )
        used_for = f" (for {self.field})" if self.field else ""
        return (
            f"spec.storage.s3.credentialsSecret: access denied {verb} {uri} ({code}){used_for}: "
            f"{hint}"
        )

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors("reading", rel):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
                return True
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code"))
                if code in _NOT_FOUND_CODES:
                    return False
                if code in ("403", "Forbidden"):
                    # A HEAD response has no body, so no reason: ask again with a 1-byte GET
                    # to tell a wrong key (InvalidAccessKeyId) from a wrong secret or a policy.
                    self.client.get_object(Bucket=self.bucket, Key=self.key(rel), Range="bytes=0-0")
                    return True
                raise

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("reading", rel):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"]
            data: bytes = body.read()
            return data

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._errors("writing", rel):
            self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def list(self, rel_prefix: str = "") -> Keys:
        prefix = rel_prefix.replace("\\", "/").lstrip("/")
        root = self.prefix + "/" if self.prefix else ""
        keys: Keys = []
        with self._errors("listing", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
            for page in pages:
                keys.extend(item["Key"][len(root) :] for item in page.get("Contents", []))
        return sorted(keys)

    def _transfer(self, verb: str, rel: str, jobs: _Transfers) -> None:
        """Run (direction, key, path) transfers through one pool: files and their parts
        share max_concurrency, so a folder of many small files is as fast as one big file."""
        from boto3.s3.transfer import create_transfer_manager

        if not jobs:
            return
        with (
            self._errors(verb, rel),
            create_transfer_manager(self.client, self.transfer_config) as manager,
        ):
            futures = []
            for direction, key, path in jobs:
                if direction == "down":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    futures.append(manager.download(self.bucket, key, str(path)))
                else:
                    futures.append(manager.upload(str(path), self.bucket, key))
            for future in futures:
                future.result()

    def download_dir(self, rel: str, dest: Path) -> Path:
        rel = _clean_rel(rel)
        manifest = self.read_manifest(rel)
        if manifest is not None:
            keys = [_clean_rel(str(f["path"])) for f in manifest["files"]]
        else:
            prefix = rel + "/" if rel else ""
            # "Folder" placeholder objects (keys ending in /) carry no data.
            keys = [k[len(prefix) :] for k in self.list(prefix) if not k.endswith("/")]
        if not keys:
            raise UserError(f"{self.field}: {self.uri_for(rel)}: not found (no objects)")
        dest.mkdir(parents=True, exist_ok=True)
        self._transfer(
            "downloading",
            rel,
            [("down", self.key(_join(rel, k)), dest / _clean_rel(k)) for k in keys],
        )
        if manifest is not None:
            _check_against_manifest(dest, manifest, self.uri_for(rel), self.field)
        return dest

    def download_file(self, rel: str, dest: Path) -> Path:
        """One object to the local file dest (ranged parts when large)."""
        self._transfer("downloading", rel, [("down", self.key(rel), dest)])
        return dest

    def _put_file(self, src: Path, rel: str) -> None:
        self._put_files([(src, rel)])

    def _put_files(self, files: _Uploads) -> None:
        self._transfer(
            "writing", files[0][1] if files else "", [("up", self.key(r), p) for p, r in files]
        )

    def _delete_keys(self, rels: Keys) -> None:
        with self._errors("deleting", rels[0] if rels else ""):
            for start in range(0, len(rels), 1000):  # DeleteObjects takes 1000 keys per call
                batch = [{"Key": self.key(r)} for r in rels[start : start + 1000]]
                result = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if result.get("Errors"):
                    first = result["Errors"][0]
                    raise InfraError(
                        f"{self.field}: deleting {self.uri_for(first.get('Key', ''))}: "
                        f"{first.get('Code')}: {first.get('Message', '')}"
                    )


def fetch(
    uri: str,
    s3: api.S3Spec | None,
    dest: Path,
    *,
    base_dir: Path | None = None,
    field: str = "",
) -> Path:
    """Make a file or a folder (a model) available locally and return its local path.

    A local source is returned as is (no copy); UserError when it does not exist. An S3 object
    lands at ``dest / <its name>``; an S3 folder (every object under the prefix, or exactly the
    files of its manifest) lands in ``dest`` itself.
    """
    if not uri.startswith("s3://"):
        path = local_path(uri, base_dir)
        if not path.exists():
            raise UserError(f"{field}: {path}: not found" if field else f"{path}: not found")
        return path
    bucket_and_key = uri[len("s3://") :]
    if "/" in bucket_and_key.strip("/") and not uri.endswith("/"):
        parent, _, name = uri.rpartition("/")
        folder = Storage.open(parent, s3, field=field)
        assert isinstance(folder, S3Storage)
        if folder.exists(name):
            return folder.download_file(name, dest / name)
    store = Storage.open(uri, s3, field=field)
    if not store.list(""):
        where = f"{field}: " if field else ""
        raise UserError(f"{where}{store.uri}: object not found")
    return store.download_dir("", dest)
