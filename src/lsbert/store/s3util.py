"""S3 plumbing shared by the S3 store and its local cache: the client, error codes, safe object names."""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

PARTIAL_PREFIX = ".partial-"
STALE_CACHE_PREFIX = ".stale-"
DENIED = {
    "AccessDenied",
    "AllAccessDisabled",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "403",
}
NO_CONDITIONAL = {"NotImplemented", "InvalidArgument", "InvalidRequest", "NotSupported", "501"}


def redact_url(url: Optional[str]) -> str:
    """An endpoint URL for messages, without any user:password@ part."""
    if not url:
        return "the default AWS endpoint"
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def make_client() -> Any:
    kwargs: dict[str, Any] = {}
    if not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        endpoint = os.environ.get("S3_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
    s3_config: dict[str, Any] = {}
    style = os.environ.get("S3_ADDRESSING_STYLE")
    if style:
        s3_config["addressing_style"] = style
    options: dict[str, Any] = {"connect_timeout": 10, "read_timeout": 120, "max_pool_connections": 32}
    if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):  # the env wins if set
        options["retries"] = {"max_attempts": 5, "mode": "standard"}
    if s3_config:
        options["s3"] = s3_config
    config = Config(**options)
    return boto3.session.Session().client("s3", config=config, **kwargs)


def error_code(exc: BaseException) -> tuple[str, Optional[int]]:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status
    return "", None


def safe_rel(rel: str) -> bool:
    path = PurePosixPath(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts and "" not in rel.split("/")
