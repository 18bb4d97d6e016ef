"""Logging set-up. Secrets never reach the logs: configured secret values and credential-looking header
values are masked in every record, whatever logger produced it."""

from __future__ import annotations

import logging
import re
import sys
from typing import Iterable

_CREDENTIALS = re.compile(r"(?i)\b(basic|bearer|token)\s+[A-Za-z0-9+/=._\-]{8,}")
_KEYS = re.compile(
    r"(?i)(\"?(?:authorization|api[_-]?key|access_token|password|secret|token)\"?\s*[:=]\s*\"?)([^\s\",}]{4,})"
)


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = _CREDENTIALS.sub(lambda m: f"{m.group(1)} ***", text)
        return _KEYS.sub(lambda m: f"{m.group(1)}***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure(level: str, secrets: Iterable[str] = ()) -> RedactingFilter:
    redactor = RedactingFilter(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redactor)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Other libraries' handlers (kserve, uvicorn) get the same filter.
    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        for h in logger.handlers:
            h.addFilter(redactor)
    # Per-request timing lines are noise below DEBUG.
    logging.getLogger("kserve.trace").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
    for noisy in ("httpx", "urllib3", "botocore", "filelock"):
        logging.getLogger(noisy).setLevel("WARNING" if level != "DEBUG" else "INFO")
    return redactor
