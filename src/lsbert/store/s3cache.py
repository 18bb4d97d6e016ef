"""The S3 store's local copies: a version is downloaded once into ``CACHE_DIR`` (verified against the
manifest in its lsbert.json) and renamed into place, so serving always loads from a complete directory."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from lsbert.store.base import (
    METADATA_FILE,
    STALE_AFTER_S,
    STORE_KEY,
    StoreError,
    VersionNotFound,
    check_project,
    check_version,
    newest_mtime,
)
from lsbert.store.s3util import PARTIAL_PREFIX, STALE_CACHE_PREFIX, safe_rel

T = TypeVar("T")


class S3LocalCache:
    """Mixed into ``S3Store``: ``local_path`` and the download behind it."""

    bucket: str
    prefix: str
    cache_dir: Path
    _client: Any
    _transfer: Any

    if TYPE_CHECKING:  # provided by S3Store / CheckpointStore

        def _version_prefix(self, project: int, version: str) -> str: ...
        def _get(self, key: str) -> Optional[bytes]: ...
        def _list(self, prefix: str) -> list[dict[str, Any]]: ...
        def _loc(self, key: str) -> str: ...
        def _call(self, action: str, key: str, fn: Callable[..., T], **kwargs: Any) -> T: ...
        def _fault(self, step: str) -> None: ...

    def _cache_path(self, project: int, version: str) -> Path:
        parts = [p for p in self.prefix.split("/") if p]
        return self.cache_dir.joinpath(self.bucket, *parts, str(check_project(project)), check_version(version))

    @staticmethod
    def _same_save(cached: dict[str, Any], remote: dict[str, Any]) -> bool:
        a, b = (cached.get(STORE_KEY) or {}).get("save_id"), (remote.get(STORE_KEY) or {}).get("save_id")
        return a == b if (a or b) else cached == remote

    def local_path(self, project: int, version: str) -> Path:
        vp = self._version_prefix(project, version)
        raw = self._get(vp + METADATA_FILE)
        if raw is None:
            raise VersionNotFound(
                f"version {version} of project {project} not found or incomplete at {self._loc(vp + METADATA_FILE)}"
            )
        try:
            remote = json.loads(raw)
        except ValueError:
            raise StoreError(f"corrupt checkpoint metadata {self._loc(vp + METADATA_FILE)}: not JSON") from None
        target = self._cache_path(project, version)
        cached = self._cached_metadata(target)
        if cached is not None and self._same_save(cached, remote):
            if (target / METADATA_FILE).read_bytes() != raw:  # metadata updated since: refresh it atomically
                tmp = target / f".{METADATA_FILE}.tmp-{secrets.token_hex(4)}"
                tmp.write_bytes(raw)
                os.replace(tmp, target / METADATA_FILE)
            return target
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the checkpoint cache {parent}: {exc.strerror or exc}") from exc
        self._clean_cache(parent)
        tmp = parent / f"{PARTIAL_PREFIX}{version}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            self._download(vp, remote, tmp)
            self._fault("download:before-metadata")
            (tmp / METADATA_FILE).write_bytes(raw)
            self._install(tmp, target, remote)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._fault("download:after-rename")
        return target

    @staticmethod
    def _cached_metadata(target: Path) -> Optional[dict[str, Any]]:
        try:
            doc = json.loads((target / METADATA_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _download(self, vp: str, remote: dict[str, Any], tmp: Path) -> None:
        listed = {o["Key"][len(vp) :]: o for o in self._list(vp)}
        manifest = (remote.get(STORE_KEY) or {}).get("files")
        if not isinstance(manifest, dict):  # a version written by something else: take every object
            manifest = {rel: {"size": o.get("Size")} for rel, o in listed.items() if rel != METADATA_FILE}
        for rel in sorted(manifest):
            want = manifest[rel] or {}
            obj = listed.get(rel)
            if not safe_rel(rel):
                raise StoreError(f"refusing unsafe object name {self._loc(vp + rel)}")
            if obj is None:
                raise StoreError(f"checkpoint {self._loc(vp)} is missing {rel} (listed in its {METADATA_FILE})")
            etag = str(obj.get("ETag", "")).strip('"')
            if (want.get("size") is not None and obj.get("Size") != want["size"]) or (
                want.get("etag") and etag and want["etag"] != etag
            ):
                raise StoreError(f"checkpoint object {self._loc(vp + rel)} does not match its {METADATA_FILE}")
            dst = tmp.joinpath(*rel.split("/"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._call(
                "downloading",
                vp + rel,
                self._client.download_file,
                Bucket=self.bucket,
                Key=vp + rel,
                Filename=str(dst),
                Config=self._transfer,
            )
            if want.get("size") is not None and dst.stat().st_size != want["size"]:
                raise StoreError(f"download of {self._loc(vp + rel)} is truncated")
            self._fault(f"download:file:{rel}")

    def _install(self, tmp: Path, target: Path, remote: dict[str, Any]) -> None:
        """Rename the finished download into place (replacing a stale copy), tolerating a concurrent winner."""
        stale = None
        if target.exists():
            stale = target.parent / f"{STALE_CACHE_PREFIX}{target.name}-{secrets.token_hex(4)}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, stale)
        try:
            os.rename(tmp, target)
        except OSError:
            cached = self._cached_metadata(target)
            if cached is None or not self._same_save(cached, remote):
                raise StoreError(f"could not install the downloaded checkpoint at {target}") from None
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same download first
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def _clean_cache(parent: Path) -> None:
        """Drop abandoned partial downloads (a killed process) and stale copies."""
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(parent):
                if entry.name.startswith(STALE_CACHE_PREFIX) or (
                    entry.name.startswith(PARTIAL_PREFIX) and now - newest_mtime(Path(entry.path)) > STALE_AFTER_S
                ):
                    shutil.rmtree(entry.path, ignore_errors=True)
