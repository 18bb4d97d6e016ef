"""The outermost layer of the HTTP server: basic auth for every route but the probes, and a request body
limit enforced before the body is read.

It is plain ASGI middleware so that it covers every route the same way, KServe's (V1/V2 inference, the model
repository extension, ``/metrics``, ``/docs``, ``/openapi.json``) as well as the Label Studio ones.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Awaitable, Callable

from lsbert.predictor.auth import BasicAuth

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Probes must answer without credentials (kubelet and Label Studio's connection check send none):
# liveness and Label Studio's health (``/``, ``/health``), KServe's readiness (``GET /v1/models/<name>``)
# and the Open Inference Protocol health routes.
_PROBES = re.compile(r"^/(health)?$|^/v1/models/[^/:]+$|^/v2/health/(live|ready)$|^/v2/models/[^/]+/ready$")
PROBE_PATHS = ("/", "/health")


def is_probe(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and bool(_PROBES.match(path))


class TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: 401 without credentials (when basic auth is on), 413 for a body over ``max_bytes``."""

    def __init__(self, app: Any, auth: BasicAuth, max_bytes: int, open_paths: tuple[str, ...] = ()):
        self.app = app
        self.auth = auth
        self.max_bytes = max_bytes
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        authorized = self.auth.check(headers.get("authorization"))
        scope.setdefault("state", {})["lsbert_authorized"] = authorized
        if not authorized and not is_probe(method, path) and path not in self.open_paths:
            self.auth.hint(path)
            await _answer(
                send,
                401,
                "authentication required: this backend has BASIC_AUTH_USER/BASIC_AUTH_PASS set",
                [(b"www-authenticate", b'Basic realm="lsbert"')],
            )
            return
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _answer(send, 400, "the Content-Length header is not a number")
                return
            if declared > self.max_bytes:
                await _answer(send, 413, self._too_large())
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge:  # a chunked body without Content-Length that grew past the limit
            if not started:
                await _answer(send, 413, self._too_large())

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (MAX_REQUEST_BYTES)"


async def _answer(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
