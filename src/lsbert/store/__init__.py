from lsbert.store.base import (
    METADATA_FILE,
    POINTER_FILE,
    CheckpointStore,
    StoreError,
    VersionInfo,
    VersionNotFound,
    format_version,
    open_store,
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
