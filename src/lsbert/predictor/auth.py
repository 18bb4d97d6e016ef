"""HTTP basic auth for the Label Studio routes (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``)."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from typing import Optional

from fastapi import HTTPException, Request

log = logging.getLogger(__name__)

WEBHOOK_HINT = (
    "rejected a Label Studio event without credentials on /webhook. Label Studio sends annotation events "
    "without basic auth: add the header to the project's webhook, e.g. PATCH /api/webhooks/<id>/ "
    '{"headers": {"Authorization": "Basic <base64 user:pass>"}} (see README, "Basic auth and webhooks")'
)


class BasicAuth:
    def __init__(self, user: Optional[str], password: Optional[str]):
        self._last_hint = 0.0
        self.enabled = bool(user)
        self._user = (user or "").encode()
        self._password = (password or "").encode()

    def check(self, header: Optional[str]) -> bool:
        if not self.enabled:
            return True
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # Both comparisons always run, in constant time, so timing reveals neither part.
        user_ok = hmac.compare_digest(user, self._user)
        password_ok = hmac.compare_digest(password, self._password)
        return user_ok and password_ok

    def hint(self, path: str) -> None:
        """Explain (at most every 5 minutes) why Label Studio's unauthenticated webhooks are refused."""
        if path.endswith("/webhook") and time.monotonic() - self._last_hint > 300:
            self._last_hint = time.monotonic()
            log.warning(WEBHOOK_HINT)

    def __call__(self, request: Request) -> None:
        """FastAPI dependency."""
        if not self.check(request.headers.get("authorization")):
            self.hint(request.url.path)
            raise HTTPException(
                status_code=401,
                detail="authentication required: this backend has BASIC_AUTH_USER/BASIC_AUTH_PASS set",
                headers={"WWW-Authenticate": 'Basic realm="lsbert"'},
            )
