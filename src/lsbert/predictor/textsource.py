"""Texts that a task holds as a link (``<Text valueType="url">``).

Links on Label Studio's host (absolute, or relative such as ``/data/upload/...``) are fetched with the API
key, following the redirects Label Studio answers with (storage presigned URLs, fetched without the key).
Links on other hosts are refused unless ``allowed_hosts`` names them: a task must not make the predictor
fetch arbitrary addresses. Cloud storage links (``s3://``, ``gs://``, ``azure-blob://``) are resolved by the
Label Studio SDK through Label Studio. Every fetch has connect/read timeouts and a size limit; fetched texts
are cached on disk, the cache bounded in bytes (oldest files removed first).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urljoin, urlsplit

log = logging.getLogger(__name__)

MAX_BYTES = 4 * 1024 * 1024
CACHE_BYTES = 256 * 1024 * 1024
TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
MAX_REDIRECTS = 5


class TextSourceError(RuntimeError):
    pass


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def fetch_text(
    url: str,
    *,
    task_id: Optional[int],
    hostname: Optional[str],
    api_key: Optional[str],
    cache_dir: Path,
    allowed_hosts: Iterable[str] = (),
    max_bytes: int = MAX_BYTES,
) -> str:
    if not hostname:
        raise TextSourceError("the task holds a URL but LABEL_STUDIO_URL is not set")
    url = url.strip()
    if url.startswith("/"):
        url = hostname.rstrip("/") + url
    scheme = urlsplit(url).scheme.lower()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if scheme in ("http", "https"):
        cached = cache_dir / (hashlib.sha256(url.encode()).hexdigest() + ".txt")
        if cached.exists():
            return cached.read_bytes().decode("utf-8", errors="replace")
        data = _fetch_http(url, hostname, api_key, {h.lower() for h in allowed_hosts}, max_bytes)
        _store(cached, data, cache_dir)
        return data.decode("utf-8", errors="replace")
    if scheme in ("s3", "gs", "azure-blob"):
        return _fetch_cloud(url, task_id, hostname, api_key, cache_dir, max_bytes)
    raise TextSourceError(f"cannot fetch a {scheme or 'relative'} link; expected http(s) or a storage URI")


def _fetch_http(url: str, hostname: str, api_key: Optional[str], allowed: set[str], max_bytes: int) -> bytes:
    import requests

    label_studio = _origin(hostname)
    target = _origin(url)
    if target != label_studio and target[1] not in allowed:
        raise TextSourceError(f"the link is not on Label Studio's host ({target[1]}); see TEXT_URL_ALLOWED_HOSTS")
    session = requests.Session()
    session.trust_env = False
    for _ in range(MAX_REDIRECTS + 1):
        headers = {}
        if api_key and _origin(url) == label_studio:  # the key goes to Label Studio only
            headers["Authorization"] = f"Token {api_key}"
        try:
            response = session.get(url, headers=headers, timeout=TIMEOUT, stream=True, allow_redirects=False)
        except requests.RequestException as exc:
            raise TextSourceError(f"cannot fetch the task's text: {type(exc).__name__}") from None
        with response:
            if response.is_redirect and "location" in response.headers:
                # a storage redirect is followed only when Label Studio (or an allowed host) issued it
                if _origin(url) != label_studio and _origin(url)[1] not in allowed:
                    raise TextSourceError("the link redirects from a host that is not Label Studio's")
                url = urljoin(url, response.headers["location"])
                if urlsplit(url).scheme not in ("http", "https"):
                    raise TextSourceError("the link redirects to a non-HTTP address")
                continue
            if response.status_code != 200:
                raise TextSourceError(f"cannot fetch the task's text: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise TextSourceError(f"the task's text is larger than {max_bytes} bytes")
            chunks, size = [], 0
            for chunk in response.iter_content(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise TextSourceError(f"the task's text is larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    raise TextSourceError("the link redirects too many times")


def _fetch_cloud(
    url: str, task_id: Optional[int], hostname: str, api_key: Optional[str], cache_dir: Path, max_bytes: int
) -> str:
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path

    try:
        path = get_local_path(url, cache_dir=str(cache_dir), hostname=hostname, access_token=api_key, task_id=task_id)
    except Exception as exc:
        raise TextSourceError(f"cannot fetch the task's text: {type(exc).__name__}") from None
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TextSourceError(f"the task's text is larger than {max_bytes} bytes")
    _prune(cache_dir)
    return data.decode("utf-8", errors="replace")


def _store(path: Path, data: bytes, cache_dir: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    _prune(cache_dir)


def _prune(cache_dir: Path, limit: int = CACHE_BYTES) -> None:
    """Remove the oldest cached files until the cache holds at most ``limit`` bytes."""
    files = [(p.stat(), p) for p in cache_dir.rglob("*") if p.is_file()]
    total = sum(st.st_size for st, _ in files)
    for st, path in sorted(files, key=lambda item: item[0].st_mtime):
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= st.st_size
