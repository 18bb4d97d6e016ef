"""The checkpoint store: versioned, per-project fine-tuned checkpoints on a path (PVC) or in S3.

``open_store`` picks the implementation from ``MODEL_DIR``; the layout and guarantees are described in
``lsbert.store.base``.
"""

from __future__ import annotations

from pathlib import Path

from lsbert.store.base import (
    METADATA_FILE,
    POINTER_FILE,
    CheckpointStore,
    StoreError,
    VersionInfo,
    VersionNotFound,
    format_version,
    version_seq,
)

__all__ = [
    "METADATA_FILE",
    "POINTER_FILE",
    "CheckpointStore",
    "StoreError",
    "VersionInfo",
    "VersionNotFound",
    "format_version",
    "open_store",
    "version_seq",
]


def open_store(uri: str, cache_dir: str | Path = ".lsbert-cache") -> CheckpointStore:
    """``s3://bucket/prefix`` → S3Store (endpoint from AWS_ENDPOINT_URL); anything else → LocalStore."""
    if uri.startswith("s3://"):
        from lsbert.store.s3 import S3Store  # boto3 is imported only for an S3 store

        return S3Store(uri, cache_dir=Path(cache_dir))
    from lsbert.store.local import LocalStore

    return LocalStore(Path(uri))
