"""The checkpoint store: versioned, per-project fine-tuned checkpoints on a path (PVC) or in S3.

Layout under the root (``MODEL_DIR``)::

    <root>/<project>/<version>/          one immutable checkpoint (save_pretrained output + lsbert.json)
    <root>/<project>/<version>/lsbert.json   metadata; written LAST: a version without it is incomplete
    <root>/<project>/PROMOTED            pointer {"version": ..., "promoted_at": ..., "previous": ...};
                                         replaced atomically ("previous" only when there was one)
    <root>/<project>/.reserved-<NNNN>    sequence reservation taken by next_version (create-if-absent)
    <root>/<project>/.head/state.npz     the project's embedding head and the labelled examples it was fitted
                                         on (one file, replaced atomically; never a version)

Versions are ``<FINETUNED_MODEL_NAME>-<NNNN>`` with a per-project sequence number. Readers only ever see
complete versions, and the pointer only ever names a complete version: a crash at any step leaves the
previously promoted version serving.

Store-managed bookkeeping lives under the ``"_store"`` key of lsbert.json (``version``, ``project``,
``saved_at``, a unique ``save_id`` and a ``files`` manifest ``{relpath: {"size": ..., "etag": ...(S3)}}``); callers' own
metadata sits next to it and ``update_metadata`` may not touch it. Names starting with ``.`` under a
project (staging dirs, reservations, temp files) are never versions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

METADATA_FILE = "lsbert.json"
POINTER_FILE = "PROMOTED"
STORE_KEY = "_store"  # store-managed section of lsbert.json
RESERVED_PREFIX = ".reserved-"
HEAD_DIR = ".head"  # under a project: the embedding head's state (a hidden name: never a version)
HEAD_FILE = "state.npz"
STALE_AFTER_S = 3600.0  # abandoned staging dirs / partial uploads older than this are removed by prune()
VERSION_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<seq>\d{4,})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

FaultHook = Callable[[str], None]


class StoreError(RuntimeError):
    """A checkpoint store operation failed; the message names the location."""


class VersionNotFound(StoreError):
    pass


def format_version(name: str, seq: int) -> str:
    return f"{name}-{seq:04d}"


def version_seq(version: str) -> Optional[int]:
    match = VERSION_RE.match(version)
    return int(match.group("seq")) if match else None


def check_project(project: int) -> int:
    """Project ids are non-negative integers (they become directory / key names)."""
    if isinstance(project, bool) or not isinstance(project, int) or project < 0:
        raise ValueError(f"project must be a non-negative int, got {project!r}")
    return project


def check_version(version: str) -> str:
    """A version id must look like ``<name>-<NNNN>`` (this also rules out path traversal)."""
    if not isinstance(version, str) or VERSION_RE.match(version) is None:
        raise ValueError(f"invalid version id {version!r}: expected <name>-<NNNN>")
    return version


def check_name(name: str) -> str:
    if not isinstance(name, str) or NAME_RE.match(name) is None:
        raise ValueError(f"invalid model name {name!r}: letters, digits, '_', '.', '-' only")
    return name


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_pointer(raw: bytes, location: str) -> str:
    """The version named by a PROMOTED pointer's bytes; StoreError naming ``location`` if unreadable."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"unreadable promotion pointer {location}: not JSON ({exc.__class__.__name__})") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if not isinstance(version, str) or VERSION_RE.match(version) is None:
        raise StoreError(f"unreadable promotion pointer {location}: no valid 'version' in {raw[:200]!r}")
    return version


def pointer_bytes(version: str, previous: Optional[str]) -> bytes:
    doc: dict[str, Any] = {"version": version, "promoted_at": utc_now()}
    if previous and previous != version:
        doc["previous"] = previous
    return (json.dumps(doc, indent=2) + "\n").encode()


def metadata_bytes(metadata: dict[str, Any]) -> bytes:
    return (json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n").encode()


def source_files(source_dir: Path) -> list[tuple[str, Path]]:
    """The regular files of a checkpoint directory as (posix relpath, path), sorted; lsbert.json excluded
    (the store writes its own). Raises StoreError if ``source_dir`` is not a directory."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise StoreError(f"checkpoint source {source_dir} is not a directory")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(source_dir):
        dirnames.sort()
        for fname in filenames:
            path = Path(dirpath) / fname
            rel = path.relative_to(source_dir).as_posix()
            if rel == METADATA_FILE or not path.is_file():
                continue
            out.append((rel, path))
    return sorted(out)


@dataclass(frozen=True)
class VersionInfo:
    project: int
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.metadata.get("metrics") or {}


class CheckpointStore(ABC):
    """Abstract store; ``lsbert.store.open_store(uri)`` picks the implementation from the URI."""

    root: str
    #: Test hook: called with a step name at every point where a crash must leave the store consistent:
    #: save:file:<rel> (after each file), save:before-metadata, save:after-metadata, save:after-rename (local),
    #: promote:before-pointer, promote:after-temp (local), promote:after-pointer, and for S3 downloads
    #: download:file:<rel>, download:before-metadata, download:after-rename. None in production.
    fault_hook: Optional[FaultHook] = None

    def _fault(self, step: str) -> None:
        hook = self.fault_hook
        if hook is not None:
            hook(step)

    @abstractmethod
    def projects(self) -> list[int]:
        """Project ids that have at least one complete version or a pointer."""

    @abstractmethod
    def versions(self, project: int) -> list[VersionInfo]:
        """Complete versions of a project, oldest first (by sequence number)."""

    @abstractmethod
    def promoted(self, project: int) -> Optional[str]:
        """The promoted version named by the pointer, or None."""

    @abstractmethod
    def metadata(self, project: int, version: str) -> dict[str, Any]:
        """The version's lsbert.json; VersionNotFound if the version is not complete."""

    @abstractmethod
    def next_version(self, project: int, name: str) -> str:
        """Reserve and return ``<name>-<NNNN>``, one past every sequence number the project has used.

        The number is above every complete version, in-progress (staging / partially uploaded) version and
        earlier reservation, and the reservation is taken with a create-if-absent, so concurrent callers in
        different processes never get the same number. Reservations are never handed out twice."""

    @abstractmethod
    def save(self, project: int, version: str, source_dir: Path, metadata: dict[str, Any]) -> None:
        """Copy a finished checkpoint directory into the store as ``version`` and write lsbert.json last.

        Never overwrites an existing complete version (StoreError)."""

    @abstractmethod
    def promote(self, project: int, version: str) -> None:
        """Atomically point the project at a complete version."""

    @abstractmethod
    def local_path(self, project: int, version: str) -> Path:
        """A local directory holding the complete version, for loading (downloaded first for S3)."""

    @abstractmethod
    def prune(self, project: int, keep: int) -> list[str]:
        """Delete the oldest complete versions beyond the newest ``keep``; never the promoted one.

        Returns the deleted ids, oldest first. Also removes abandoned staging dirs / partial uploads older
        than STALE_AFTER_S and superseded reservations (the highest sequence number stays reserved, so ids
        are never reused)."""

    # ---- the embedding head's state -------------------------------------------------------------------
    # One opaque file per project (``lsbert.model.headstate`` encodes it), replaced atomically: readers see
    # the old or the new bytes. A tag (size and mtime locally, the ETag on S3) tells whether it changed.

    @abstractmethod
    def read_head(self, project: int) -> Optional[tuple[bytes, str]]:
        """The project's head state and its tag, or None if there is none."""

    @abstractmethod
    def write_head(self, project: int, data: bytes) -> str:
        """Replace the project's head state in one step; returns its new tag."""

    @abstractmethod
    def head_tag(self, project: int) -> Optional[str]:
        """The tag of the project's head state (cheap: no download), or None if there is none."""

    def update_metadata(self, project: int, version: str, updates: dict[str, Any]) -> None:
        """Merge ``updates`` into a complete version's lsbert.json (e.g. the promotion decision).

        The rewrite is atomic (readers see the old or the new file); the ``_store`` key is off limits."""
        raise NotImplementedError

    @staticmethod
    def _plan_prune(versions: list[VersionInfo], keep: int, promoted: Optional[str]) -> list[str]:
        """Versions prune() deletes: all but the newest ``keep`` (by sequence) and the promoted one, oldest first."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep must be a non-negative int, got {keep!r}")
        ordered = sorted(versions, key=lambda v: (version_seq(v.version) or 0, v.version))
        kept = {v.version for v in ordered[max(0, len(ordered) - keep) :]} if keep else set()
        return [v.version for v in ordered if v.version not in kept and v.version != promoted]

    @staticmethod
    def _store_section(project: int, version: str, files: dict[str, dict[str, Any]], save_id: str) -> dict[str, Any]:
        return {"project": project, "version": version, "saved_at": utc_now(), "save_id": save_id, "files": files}

    @staticmethod
    def _merge_metadata(current: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
        if STORE_KEY in updates:
            raise ValueError(f"{STORE_KEY!r} in lsbert.json is managed by the store")
        merged = dict(current)
        merged.update(updates)
        return merged


def newest_mtime(path: Path) -> float:
    """The newest mtime in a tree (a staging dir's own mtime does not move when its subdirs fill)."""
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return time.time()
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest
