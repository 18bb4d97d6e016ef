"""LocalStore: the checkpoint store on a directory (a local disk or a mounted ReadWriteMany PVC).

Crash safety comes from POSIX renames: a version is assembled (and fsynced) in a hidden staging dir
``<root>/<project>/.staging-<version>-<rand>/`` with lsbert.json written last, then renamed into place in
one step; the PROMOTED pointer and lsbert.json rewrites go through a temp file + ``os.replace``. Sequence
numbers are reserved with ``O_CREAT|O_EXCL`` marker files ``.reserved-<NNNN>``, which is atomic on local
filesystems and on NFSv3+.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
    newest_mtime,
    parse_pointer,
    pointer_bytes,
    source_files,
    utc_now,
    version_seq,
)

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"
POINTER_TMP_PREFIX = f".{POINTER_FILE}.tmp-"
HEAD_TMP_PREFIX = f".{HEAD_FILE}.tmp-"
METADATA_TMP_PREFIX = f".{METADATA_FILE}.tmp-"
LOCK_FILE = ".metadata.lock"


def _ownership_hint(path: Path) -> str:
    """Who owns the nearest existing directory of ``path`` and who this process is: the usual cause of a
    permission error on a mounted volume is a directory owned by root that the pods' user cannot write."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = where.stat()
    except OSError:
        return ""
    return (
        f" ({where} is owned by uid {st.st_uid} gid {st.st_gid} with mode {st.st_mode & 0o7777:04o}; this "
        f"process runs as uid {os.getuid()} gid {os.getgid()} and cannot write there: give the directory to "
        "that uid, e.g. with the chart's volumePermissions.enabled=true or a volume owned by it)"
    )


_READS = ("listing", "reading")


def _permission_denied(action: str, path: Path) -> StoreError:
    hint = "" if action in _READS else _ownership_hint(path)
    return StoreError(f"permission denied {action} {path}{hint}")


@contextlib.contextmanager
def _os_errors(action: str, path: Path) -> Iterator[None]:
    """Turn OSErrors into StoreErrors that name the location."""
    try:
        yield
    except StoreError:
        raise
    except PermissionError:
        raise _permission_denied(action, path) from None
    except OSError as exc:
        where = exc.filename or path
        raise StoreError(f"{action} {where} failed: {exc.strerror or exc}") from exc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files were fsynced
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_replacing(tmp: Path, target: Path, data: bytes, before_replace: Callable[[], None] = lambda: None) -> None:
    """Write ``data`` to the new file ``tmp``, then rename it over ``target``: readers see the old file or the
    new one, never a part of it; ``tmp`` is removed if anything fails."""
    try:
        with _os_errors("writing", tmp):
            _write_file(tmp, data, exclusive=True)
        before_replace()
        with _os_errors("replacing", target):
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _copy_file(src: Path, dst: Path) -> int:
    shutil.copyfile(src, dst)  # sendfile / copy_file_range fast path
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _hidden_seq(name: str) -> Optional[int]:
    """Sequence number held by a hidden entry: a reservation, a staging dir or a dir being deleted."""
    if name.startswith(RESERVED_PREFIX):
        tail = name[len(RESERVED_PREFIX) :]
        return int(tail) if tail.isdigit() else None
    for prefix in (STAGING_PREFIX, DELETING_PREFIX):
        if name.startswith(prefix):
            version = name[len(prefix) :].rsplit("-", 1)[0]
            return version_seq(version)
    return None


class LocalStore(CheckpointStore):
    """Checkpoint store on a directory; see the module docstring for the crash-safety scheme."""

    def __init__(self, root: Path | str):
        self.path = Path(root)
        self.root = str(self.path)

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    # ---- paths -----------------------------------------------------------------------------------

    def _project_dir(self, project: int) -> Path:
        return self.path / str(check_project(project))

    def _version_dir(self, project: int, version: str) -> Path:
        return self._project_dir(project) / check_version(version)

    def _ensure_project_dir(self, project: int) -> Path:
        pdir = self._project_dir(project)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"checkpoint store root {self.path} is not a directory")
        with _os_errors("creating", pdir):
            pdir.mkdir(parents=True, exist_ok=True)
        return pdir

    # ---- readers ---------------------------------------------------------------------------------

    def _read_metadata(self, vdir: Path) -> Optional[dict[str, Any]]:
        path = vdir / METADATA_FILE
        raw = _read_optional(path, f"reading {path} failed")
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise StoreError(f"corrupt checkpoint metadata {path}: not JSON") from None
        if not isinstance(doc, dict):
            raise StoreError(f"corrupt checkpoint metadata {path}: not a JSON object")
        return doc

    def projects(self) -> list[int]:
        if not self.path.is_dir():
            return []
        out = []
        with _os_errors("listing", self.path):
            entries = list(os.scandir(self.path))
        for entry in entries:
            if not (entry.name.isdigit() and str(int(entry.name)) == entry.name and entry.is_dir()):
                continue
            project = int(entry.name)
            if (Path(entry.path) / POINTER_FILE).exists() or self.versions(project):
                out.append(project)
        return sorted(out)

    def versions(self, project: int) -> list[VersionInfo]:
        pdir = self._project_dir(project)
        if not pdir.is_dir():
            return []
        with _os_errors("listing", pdir):
            entries = list(os.scandir(pdir))
        out = []
        for entry in entries:
            if entry.name.startswith(".") or VERSION_RE.match(entry.name) is None or not entry.is_dir():
                continue
            try:
                metadata = self._read_metadata(Path(entry.path))
            except StoreError as exc:
                log.warning("skipping version with unreadable metadata: %s", exc)
                continue
            if metadata is not None:
                out.append(VersionInfo(project=project, version=entry.name, metadata=metadata))
        return sorted(out, key=lambda v: (version_seq(v.version) or 0, v.version))

    def promoted(self, project: int) -> Optional[str]:
        path = self._project_dir(project) / POINTER_FILE
        raw = _read_optional(path, f"unreadable promotion pointer {path}", what="promotion pointer ")
        return None if raw is None else parse_pointer(raw, str(path))

    def metadata(self, project: int, version: str) -> dict[str, Any]:
        vdir = self._version_dir(project, version)
        metadata = self._read_metadata(vdir)
        if metadata is None:
            raise VersionNotFound(f"version {version} of project {project} not found or incomplete at {vdir}")
        return metadata

    def local_path(self, project: int, version: str) -> Path:
        self.metadata(project, version)
        return self._version_dir(project, version)

    # ---- writers ---------------------------------------------------------------------------------

    def _max_seq(self, pdir: Path) -> int:
        """Highest sequence number used by anything in the project dir (complete or not)."""
        best = 0
        with _os_errors("listing", pdir):
            names = os.listdir(pdir)
        for name in names:
            seq = _hidden_seq(name) if name.startswith(".") else version_seq(name)
            if seq is not None:
                best = max(best, seq)
        return best

    def _reserve(self, pdir: Path, seq: int, version: str) -> bool:
        marker = pdir / f"{RESERVED_PREFIX}{seq:04d}"
        body = json.dumps(
            {"version": version, "reserved_at": utc_now(), "host": socket.gethostname(), "pid": os.getpid()}
        ).encode()
        try:
            _write_file(marker, body, exclusive=True)
        except FileExistsError:
            return False
        except PermissionError:
            raise _permission_denied("reserving", marker) from None
        except OSError as exc:
            raise StoreError(f"reserving {marker} failed: {exc.strerror or exc}") from exc
        return True

    def next_version(self, project: int, name: str) -> str:
        check_name(name)
        pdir = self._ensure_project_dir(project)
        seq = self._max_seq(pdir) + 1
        for _ in range(100_000):
            version = format_version(name, seq)
            if self._reserve(pdir, seq, version):
                _fsync_dir(pdir)
                return version
            seq += 1
        raise StoreError(f"could not reserve a version number in {pdir}")

    def save(self, project: int, version: str, source_dir: Path, metadata: dict[str, Any]) -> None:
        check_version(version)
        files = source_files(Path(source_dir))
        pdir = self._ensure_project_dir(project)
        final = pdir / version
        if os.path.lexists(final):
            raise StoreError(f"version {version} already exists at {final}; versions are immutable")
        staging = pdir / f"{STAGING_PREFIX}{version}-{secrets.token_hex(4)}"
        with _os_errors("creating", staging):
            staging.mkdir()
        try:
            manifest: dict[str, dict[str, Any]] = {}
            dirs = {staging}
            for rel, src in files:
                dst = staging / rel
                if dst.parent not in dirs:
                    with _os_errors("creating", dst.parent):
                        dst.parent.mkdir(parents=True, exist_ok=True)
                    dirs.add(dst.parent)
                with _os_errors("copying into", dst):
                    manifest[rel] = {"size": _copy_file(src, dst)}
                self._fault(f"save:file:{rel}")
            self._fault("save:before-metadata")
            doc = dict(metadata)
            doc[STORE_KEY] = self._store_section(project, version, manifest, uuid.uuid4().hex)
            with _os_errors("writing", staging / METADATA_FILE):
                _write_file(staging / METADATA_FILE, metadata_bytes(doc))
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)
            self._fault("save:after-metadata")
            if os.path.lexists(final):
                raise StoreError(f"version {version} already exists at {final}; versions are immutable")
            try:
                os.rename(staging, final)  # atomic; fails if another saver put a (non-empty) dir there first
            except OSError as exc:
                if os.path.lexists(final):
                    raise StoreError(f"version {version} already exists at {final}; versions are immutable") from None
                raise StoreError(f"moving {staging} to {final} failed: {exc.strerror or exc}") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(pdir)
        self._fault("save:after-rename")

    def promote(self, project: int, version: str) -> None:
        self.metadata(project, version)  # VersionNotFound unless complete
        pdir = self._project_dir(project)
        try:
            previous = self.promoted(project)
        except StoreError:
            previous = None  # a broken pointer is exactly what promote() repairs
        self._fault("promote:before-pointer")
        tmp = pdir / f"{POINTER_TMP_PREFIX}{secrets.token_hex(4)}"
        target = pdir / POINTER_FILE
        _write_replacing(tmp, target, pointer_bytes(version, previous), lambda: self._fault("promote:after-temp"))
        self._fault("promote:after-pointer")

    # ---- the embedding head's state -----------------------------------------------------------------

    def _head_path(self, project: int) -> Path:
        return self._project_dir(project) / HEAD_DIR / HEAD_FILE

    @staticmethod
    def _tag(st: os.stat_result) -> str:
        return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"

    def read_head(self, project: int) -> Optional[tuple[bytes, str]]:
        path = self._head_path(project)
        try:
            with open(path, "rb") as fh:  # tag and bytes of the same file, even if it is replaced meanwhile
                return fh.read(), self._tag(os.fstat(fh.fileno()))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            raise _permission_denied("reading", path) from None
        except OSError as exc:
            raise StoreError(f"reading {path} failed: {exc.strerror or exc}") from exc

    def head_tag(self, project: int) -> Optional[str]:
        path = self._head_path(project)
        try:
            return self._tag(path.stat())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"reading {path} failed: {exc.strerror or exc}") from exc

    def write_head(self, project: int, data: bytes) -> str:
        target = self._head_path(project)
        hdir = target.parent
        self._ensure_project_dir(project)
        with _os_errors("creating", hdir):
            hdir.mkdir(exist_ok=True)
        self._clean_head_temps(hdir)
        tmp = hdir / f"{HEAD_TMP_PREFIX}{secrets.token_hex(4)}"
        _write_replacing(tmp, target, data)
        with _os_errors("reading", target):
            return self._tag(target.stat())

    @staticmethod
    def _clean_head_temps(hdir: Path) -> None:
        """Temp files a killed writer left behind (older than STALE_AFTER_S, so never one being written)."""
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(hdir):
                if entry.name.startswith(HEAD_TMP_PREFIX) and now - entry.stat().st_mtime > STALE_AFTER_S:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    @contextlib.contextmanager
    def _metadata_lock(self, project: int) -> Iterator[None]:
        """Serialize read-merge-write of lsbert.json files in a project (flock; NFSv4 maps it to a lock)."""
        path = self._project_dir(project) / LOCK_FILE
        with _os_errors("locking", path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update_metadata(self, project: int, version: str, updates: dict[str, Any]) -> None:
        vdir = self._version_dir(project, version)
        self._merge_metadata({}, updates)  # validates before touching anything
        self.metadata(project, version)  # VersionNotFound before creating a lock file
        with self._metadata_lock(project):
            self._update_metadata_locked(project, version, vdir, updates)

    def _update_metadata_locked(self, project: int, version: str, vdir: Path, updates: dict[str, Any]) -> None:
        merged = self._merge_metadata(self.metadata(project, version), updates)
        tmp = vdir / f"{METADATA_TMP_PREFIX}{secrets.token_hex(4)}"
        try:
            with _os_errors("writing", tmp):
                _write_file(tmp, metadata_bytes(merged), exclusive=True)
            with _os_errors("replacing", vdir / METADATA_FILE):
                os.replace(tmp, vdir / METADATA_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(vdir)

    def prune(self, project: int, keep: int) -> list[str]:
        pdir = self._project_dir(project)
        if not pdir.is_dir():
            self._plan_prune([], keep, None)  # validates keep
            return []
        versions = self.versions(project)
        promoted = self.promoted(project)  # an unreadable pointer raises: never prune blind
        doomed = self._plan_prune(versions, keep, promoted)
        # Keep the highest sequence number reserved so ids are never reused after deleting the newest.
        top = self._max_seq(pdir)
        if top:
            top_version = next((v.version for v in versions if version_seq(v.version) == top), f"?-{top:04d}")
            self._reserve(pdir, top, top_version)
        deleted = []
        for version in doomed:
            vdir = pdir / version
            trash = pdir / f"{DELETING_PREFIX}{version}-{secrets.token_hex(4)}"
            try:
                os.rename(vdir, trash)  # disappears from readers in one step
            except FileNotFoundError:
                continue  # a concurrent prune got it
            except PermissionError:
                raise _permission_denied("deleting", vdir) from None
            except OSError as exc:
                raise StoreError(f"deleting {vdir} failed: {exc.strerror or exc}") from exc
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(version)
        self._clean(pdir)
        _fsync_dir(pdir)
        return deleted

    def _clean(self, pdir: Path) -> None:
        """Remove abandoned staging/trash/temp entries and superseded reservations."""
        now = time.time()
        reservations: list[tuple[int, Path]] = []
        for name in os.listdir(pdir):
            path = pdir / name
            if name.startswith(RESERVED_PREFIX):
                seq = _hidden_seq(name)
                if seq is not None:
                    reservations.append((seq, path))
                continue
            if name.startswith(DELETING_PREFIX) or (
                name.startswith((STAGING_PREFIX, POINTER_TMP_PREFIX)) and now - newest_mtime(path) > STALE_AFTER_S
            ):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
        reservations.sort()
        for _, path in reservations[:-1]:  # the highest stays: it is the floor for the next number
            with contextlib.suppress(OSError):
                path.unlink()


def _read_optional(path: Path, failure: str, what: str = "") -> Optional[bytes]:
    """The file's bytes, or None if it does not exist; other errors become StoreError naming the path."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise StoreError(f"permission denied reading {what}{path}") from None
    except OSError as exc:
        raise StoreError(f"{failure}: {exc.strerror or exc}") from exc
