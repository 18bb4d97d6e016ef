"""S3Store: the checkpoint store in an S3 bucket (AWS or any S3-compatible server: MinIO, Ceph, moto).

Single PUTs are atomic, so: a version's files are uploaded under ``<prefix>/<project>/<version>/`` first
and its lsbert.json LAST (a version is complete iff its lsbert.json exists); promotion is one PUT of the
PROMOTED pointer; sequence numbers are reserved with a create-if-absent PUT (``If-None-Match: *``) of
``<prefix>/<project>/.reserved-<NNNN>``, falling back to read-then-write-then-verify where the server does
not support conditional writes.

Endpoint: ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (read by botocore itself) or ``S3_ENDPOINT_URL``;
``S3_ADDRESSING_STYLE`` (auto/path/virtual) optionally. Credentials: the standard AWS chain.

``local_path()`` downloads a complete version into ``<cache_dir>/<bucket>/<prefix>/<project>/<version>/``
through a hidden ``.partial-*`` sibling renamed into place, so a killed download never looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import urlsplit

from boto3.exceptions import Boto3Error, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from lsbert.store.base import (
    HEAD_DIR,
    HEAD_FILE,
    METADATA_FILE,
    POINTER_FILE,
    RESERVED_PREFIX,
    STALE_AFTER_S,
    STORE_KEY,
    VERSION_RE,
    CheckpointStore,
    StoreError,
    VersionInfo,
    VersionNotFound,
    check_name,
    check_project,
    check_version,
    format_version,
    metadata_bytes,
    parse_pointer,
    pointer_bytes,
    source_files,
    utc_now,
    version_seq,
)
from lsbert.store.s3cache import S3LocalCache
from lsbert.store.s3util import (
    DENIED,
    NO_CONDITIONAL,
    error_code,
    make_client,
    redact_url,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class S3Store(S3LocalCache, CheckpointStore):
    """Checkpoint store in ``s3://bucket/prefix``; see the module docstring."""

    def __init__(self, uri: str, cache_dir: Path | str = Path(".lsbert-cache"), client: Any = None):
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.root = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.cache_dir = Path(cache_dir)
        self._client = client if client is not None else make_client()
        self._endpoint = redact_url(getattr(self._client.meta, "endpoint_url", None))
        self._conditional_put: Optional[bool] = None  # learned on first use
        self._transfer = TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=8)

    def __repr__(self) -> str:
        return f"S3Store({self.root!r}, endpoint={self._endpoint!r})"

    # ---- keys and errors -------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _project_prefix(self, project: int) -> str:
        return self._key(str(check_project(project))) + "/"

    def _version_prefix(self, project: int, version: str) -> str:
        return self._project_prefix(project) + check_version(version) + "/"

    def _loc(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _secrets(self) -> list[str]:
        values = [os.environ.get(n) for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]
        with contextlib.suppress(Exception):
            creds = self._client._request_signer._credentials
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                values += [frozen.secret_key, frozen.token, frozen.access_key]
        return [v for v in values if v and len(v) >= 4]

    def _scrub(self, text: str) -> str:
        for value in self._secrets():
            text = text.replace(value, "***")
        return text

    def _error(self, exc: BaseException, action: str, key: str) -> StoreError:
        where = self._loc(key)
        if isinstance(exc, S3UploadFailedError):
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (ClientError, BotoCoreError)):
                exc = cause
        code, status = error_code(exc)
        if code == "NoSuchBucket":
            return StoreError(f"S3 bucket {self.bucket!r} does not exist ({action} {where} via {self._endpoint})")
        if code in DENIED or status == 403:
            return StoreError(
                f"permission denied {action} {where} ({code or status}): check the S3 credentials and the "
                f"bucket policy for this location"
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"no usable S3 credentials {action} {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                f"or another standard AWS credential source"
            )
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"cannot reach the S3 endpoint {self._endpoint} ({action} {where})")
        if isinstance(exc, ClientError):
            message = exc.response.get("Error", {}).get("Message", "")
            return StoreError(self._scrub(f"S3 error {action} {where}: {code or status} {message}".rstrip()))
        return StoreError(self._scrub(f"S3 error {action} {where}: {exc.__class__.__name__}: {exc}"))

    def _call(self, action: str, key: str, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, action, key) from exc

    # ---- object primitives -----------------------------------------------------------------------

    def _get(self, key: str) -> Optional[bytes]:
        """The object's bytes, or None if it does not exist (a missing bucket is an error)."""
        found = self._get_tagged(key)
        return None if found is None else found[0]

    def _get_tagged(self, key: str) -> Optional[tuple[bytes, str]]:
        """The object's bytes and ETag, or None if it does not exist (a missing bucket is an error)."""
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            return resp["Body"].read(), str(resp.get("ETag", "")).strip('"')
        except ClientError as exc:
            code, status = error_code(exc)
            if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                return None
            raise self._error(exc, "reading", key) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, "reading", key) from exc

    def _put(self, key: str, body: bytes, **extra: Any) -> None:
        self._call("writing", key, self._client.put_object, Bucket=self.bucket, Key=key, Body=body, **extra)

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                out.extend(page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "listing", prefix) from exc
        return out

    def _list_dirs(self, prefix: str) -> list[str]:
        out: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                out.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "listing", prefix) from exc
        return out

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            resp = self._call(
                "deleting",
                batch[0],
                self._client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"deleting s3://{self.bucket}/{first.get('Key')} failed: {first.get('Code')} "
                    f"({len(errors)} object(s) not deleted)"
                )

    def _create_if_absent(self, key: str, body: bytes) -> bool:
        """Create the object unless it exists; True if this call created it. ``body`` must be unique
        (it carries a nonce or a save_id) so the read-back can tell whose write landed."""
        if self._conditional_put is not False:
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
                self._conditional_put = True
                # Read back: guards against servers that accept the header but check it non-atomically.
                return self._get(key) == body
            except ClientError as exc:
                code, status = error_code(exc)
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    return False
                if self._conditional_put is None and (code in NO_CONDITIONAL or status in (400, 501)):
                    log.info("%s rejects conditional writes (%s); using read-then-write", self._endpoint, code)
                    self._conditional_put = False
                else:
                    raise self._error(exc, "writing", key) from exc
            except (BotoCoreError, Boto3Error) as exc:
                raise self._error(exc, "writing", key) from exc
        # Fallback for servers without If-None-Match: check, write a nonce, read it back.
        if self._get(key) is not None:
            return False
        self._put(key, body)
        return self._get(key) == body

    def _get_json(self, key: str) -> Optional[dict[str, Any]]:
        raw = self._get(key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise StoreError(f"corrupt checkpoint metadata {self._loc(key)}: not JSON") from None
        if not isinstance(doc, dict):
            raise StoreError(f"corrupt checkpoint metadata {self._loc(key)}: not a JSON object")
        return doc

    # ---- readers ---------------------------------------------------------------------------------

    def projects(self) -> list[int]:
        base = self._key("") if self.prefix else ""
        out = []
        for name in self._list_dirs(base):
            if not (name.isdigit() and str(int(name)) == name):
                continue
            keys = {o["Key"] for o in self._list(base + name + "/")}
            pp = base + name + "/"
            if pp + POINTER_FILE in keys or any(
                k.endswith("/" + METADATA_FILE) and VERSION_RE.match(k[len(pp) :].split("/")[0] or "") for k in keys
            ):
                out.append(int(name))
        return sorted(out)

    def _complete_versions(self, project: int, objects: list[dict[str, Any]]) -> list[str]:
        pp = self._project_prefix(project)
        out = []
        for obj in objects:
            rel = obj["Key"][len(pp) :]
            version, _, rest = rel.partition("/")
            if rest == METADATA_FILE and VERSION_RE.match(version):
                out.append(version)
        return sorted(out, key=lambda v: (version_seq(v) or 0, v))

    def versions(self, project: int) -> list[VersionInfo]:
        pp = self._project_prefix(project)
        out = []
        for version in self._complete_versions(project, self._list(pp)):
            try:
                metadata = self._get_json(pp + version + "/" + METADATA_FILE)
            except StoreError as exc:
                log.warning("skipping version with unreadable metadata: %s", exc)
                continue
            if metadata is not None:  # None: pruned since the listing
                out.append(VersionInfo(project=project, version=version, metadata=metadata))
        return out

    def promoted(self, project: int) -> Optional[str]:
        key = self._project_prefix(project) + POINTER_FILE
        raw = self._get(key)
        return None if raw is None else parse_pointer(raw, self._loc(key))

    def metadata(self, project: int, version: str) -> dict[str, Any]:
        key = self._version_prefix(project, version) + METADATA_FILE
        doc = self._get_json(key)
        if doc is None:
            raise VersionNotFound(f"version {version} of project {project} not found or incomplete at {self._loc(key)}")
        return doc

    # ---- writers ---------------------------------------------------------------------------------

    def _max_seq(self, project: int, objects: list[dict[str, Any]]) -> tuple[int, int]:
        """(highest sequence used by any version object, highest reserved sequence)."""
        pp = self._project_prefix(project)
        used = reserved = 0
        for obj in objects:
            rel = obj["Key"][len(pp) :]
            head, sep, _ = rel.partition("/")
            if sep:
                seq = version_seq(head)
                if seq is not None:
                    used = max(used, seq)
            elif head.startswith(RESERVED_PREFIX) and head[len(RESERVED_PREFIX) :].isdigit():
                reserved = max(reserved, int(head[len(RESERVED_PREFIX) :]))
        return used, reserved

    def _reservation(self, project: int, seq: int, version: str) -> tuple[str, bytes]:
        body = json.dumps(
            {
                "version": version,
                "reserved_at": utc_now(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "nonce": uuid.uuid4().hex,
            }
        ).encode()
        return self._project_prefix(project) + f"{RESERVED_PREFIX}{seq:04d}", body

    def next_version(self, project: int, name: str) -> str:
        check_name(name)
        used, reserved = self._max_seq(project, self._list(self._project_prefix(project)))
        seq = max(used, reserved) + 1
        for _ in range(10_000):
            version = format_version(name, seq)
            if self._create_if_absent(*self._reservation(project, seq, version)):
                return version
            seq += 1
        raise StoreError(f"could not reserve a version number under {self._loc(self._project_prefix(project))}")

    def save(self, project: int, version: str, source_dir: Path, metadata: dict[str, Any]) -> None:
        vp = self._version_prefix(project, version)
        files = source_files(Path(source_dir))
        meta_key = vp + METADATA_FILE
        if self._get(meta_key) is not None:
            raise StoreError(f"version {version} already exists at {self._loc(vp)}; versions are immutable")
        for rel, path in files:
            key = vp + rel
            self._call(
                "uploading to",
                key,
                self._client.upload_file,
                Filename=str(path),
                Bucket=self.bucket,
                Key=key,
                Config=self._transfer,
            )
            self._fault(f"save:file:{rel}")
        listed = {o["Key"][len(vp) :]: o for o in self._list(vp)}
        manifest: dict[str, dict[str, Any]] = {}
        for rel, path in files:
            obj = listed.get(rel)
            size = path.stat().st_size
            if obj is None or obj.get("Size") != size:
                raise StoreError(f"upload of {self._loc(vp + rel)} did not land intact (expected {size} bytes)")
            manifest[rel] = {"size": size, "etag": str(obj.get("ETag", "")).strip('"')}
        self._fault("save:before-metadata")
        save_id = uuid.uuid4().hex
        doc = dict(metadata)
        doc[STORE_KEY] = self._store_section(project, version, manifest, save_id)
        if not self._create_if_absent(meta_key, metadata_bytes(doc)):
            existing = self._get_json(meta_key) or {}
            if (existing.get(STORE_KEY) or {}).get("save_id") != save_id:  # not our own retried PUT
                raise StoreError(f"version {version} already exists at {self._loc(vp)}; versions are immutable")
        self._fault("save:after-metadata")

    def promote(self, project: int, version: str) -> None:
        self.metadata(project, version)  # VersionNotFound unless complete
        try:
            previous = self.promoted(project)
        except StoreError:
            previous = None  # a broken pointer is exactly what promote() repairs
        self._fault("promote:before-pointer")
        self._put(
            self._project_prefix(project) + POINTER_FILE,
            pointer_bytes(version, previous),
            ContentType="application/json",
        )
        self._fault("promote:after-pointer")

    # ---- the embedding head's state (one object, replaced by one PUT) ---------------------------------

    def _head_key(self, project: int) -> str:
        return self._project_prefix(project) + f"{HEAD_DIR}/{HEAD_FILE}"

    def read_head(self, project: int) -> Optional[tuple[bytes, str]]:
        return self._get_tagged(self._head_key(project))

    def head_tag(self, project: int) -> Optional[str]:
        key = self._head_key(project)
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code, status = error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket"):
                return None
            raise self._error(exc, "reading", key) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, "reading", key) from exc
        return str(resp.get("ETag", "")).strip('"')

    def write_head(self, project: int, data: bytes) -> str:
        key = self._head_key(project)
        resp = self._call(
            "writing",
            key,
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType="application/octet-stream",
        )
        return str(resp.get("ETag", "")).strip('"')

    def update_metadata(self, project: int, version: str, updates: dict[str, Any]) -> None:
        """Read-merge-write with ``If-Match`` on the ETag read, so a concurrent update is not lost and a
        version pruned meanwhile is not resurrected as an lsbert.json without files."""
        self._merge_metadata({}, updates)  # validates before any request
        key = self._version_prefix(project, version) + METADATA_FILE
        for _ in range(10):
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=key)
                raw, etag = resp["Body"].read(), resp.get("ETag")
            except ClientError as exc:
                code, status = error_code(exc)
                if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                    raise VersionNotFound(
                        f"version {version} of project {project} not found or incomplete at {self._loc(key)}"
                    ) from None
                raise self._error(exc, "reading", key) from exc
            except (BotoCoreError, Boto3Error) as exc:
                raise self._error(exc, "reading", key) from exc
            try:
                current = json.loads(raw)
            except ValueError:
                raise StoreError(f"corrupt checkpoint metadata {self._loc(key)}: not JSON") from None
            body = metadata_bytes(self._merge_metadata(current, updates))
            extra: dict[str, Any] = {"IfMatch": etag} if etag and self._conditional_put is not False else {}
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", **extra)
                return
            except ClientError as exc:
                code, status = error_code(exc)
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    continue  # changed under us: merge again
                if code in ("NoSuchKey",) or (status == 404 and code != "NoSuchBucket"):
                    raise VersionNotFound(
                        f"version {version} of project {project} was deleted at {self._loc(key)}"
                    ) from None
                if extra and (code in NO_CONDITIONAL or status in (400, 501)):
                    self._conditional_put = False
                    continue
                raise self._error(exc, "writing", key) from exc
            except (BotoCoreError, Boto3Error) as exc:
                raise self._error(exc, "writing", key) from exc
        raise StoreError(f"{self._loc(key)} kept changing; metadata update abandoned")

    def prune(self, project: int, keep: int) -> list[str]:
        pp = self._project_prefix(project)
        objects = self._list(pp)
        complete = self._complete_versions(project, objects)
        promoted = self.promoted(project)  # an unreadable pointer raises: never prune blind
        doomed = self._plan_prune([VersionInfo(project, v) for v in complete], keep, promoted)
        used, reserved = self._max_seq(project, objects)
        if used > reserved:  # keep the highest number reserved so ids are never reused
            self._create_if_absent(*self._reservation(project, used, f"?-{used:04d}"))
        by_version: dict[str, list[dict[str, Any]]] = {}
        reservations: list[tuple[int, str]] = []
        for obj in objects:
            head, sep, _ = obj["Key"][len(pp) :].partition("/")
            if sep and VERSION_RE.match(head):
                by_version.setdefault(head, []).append(obj)
            elif not sep and head.startswith(RESERVED_PREFIX) and head[len(RESERVED_PREFIX) :].isdigit():
                reservations.append((int(head[len(RESERVED_PREFIX) :]), obj["Key"]))
        deleted = []
        for version in doomed:
            vp = pp + version + "/"
            # lsbert.json first: the version stops being complete in one step, then the rest goes.
            self._call(
                "deleting", vp + METADATA_FILE, self._client.delete_object, Bucket=self.bucket, Key=vp + METADATA_FILE
            )
            self._delete_keys([o["Key"] for o in self._list(vp)])
            deleted.append(version)
            shutil.rmtree(self._cache_path(project, version), ignore_errors=True)
        # Abandoned partial uploads: no lsbert.json and nothing written for STALE_AFTER_S.
        now = datetime.now(timezone.utc)
        for version, objs in by_version.items():
            if version in complete or version in deleted:
                continue
            newest = max(o["LastModified"] for o in objs)
            if (now - newest).total_seconds() > STALE_AFTER_S:
                self._delete_keys([o["Key"] for o in objs])
        reservations.sort()
        if len(reservations) > 1:
            self._delete_keys([k for _, k in reservations[:-1]])
        return deleted
