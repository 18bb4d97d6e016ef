"""Texts that a task holds as a link (``<Text valueType="url">``) are fetched from Label Studio storage
with the SDK's resolver (uploads, local files, s3://, gs://, azure-blob:// through presigning)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

MAX_BYTES = 4 * 1024 * 1024


class TextSourceError(RuntimeError):
    pass


def fetch_text(
    url: str, *, task_id: Optional[int], hostname: Optional[str], api_key: Optional[str], cache_dir: Path
) -> str:
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path

    if not hostname:
        raise TextSourceError("the task holds a URL but LABEL_STUDIO_URL is not set")
    try:
        path = get_local_path(url, cache_dir=str(cache_dir), hostname=hostname, access_token=api_key, task_id=task_id)
    except Exception as exc:
        raise TextSourceError(f"cannot fetch the task's text: {type(exc).__name__}") from None
    data = Path(path).read_bytes()[:MAX_BYTES]
    return data.decode("utf-8", errors="replace")
