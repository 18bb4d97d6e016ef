"""The predictor's domain errors and the one table that maps each to an HTTP status.

Handlers and the service raise these; ``install_error_handlers`` answers them on the FastAPI app with
``{"detail": message}`` (the shape Label Studio shows to the user), the way KServe's REST server maps its
own errors (``InvalidInput`` → 400, ``ModelNotReady`` → 503, ...). The KServe V1/V2 model keeps KServe's
convention instead and answers every bad request there with ``InvalidInput``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lsbert.labelconfig import LabelConfigError

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request is malformed (not JSON, a missing or wrong field)."""


class TooManyTasks(ValueError):
    """One request carries more tasks than the predictor takes at once."""


class UnknownProject(LookupError):
    """The predictor has no labelling config (and no checkpoint) for the project."""


class NotReady(RuntimeError):
    """The baseline model is still loading."""


class TrainingDisabled(RuntimeError):
    """Training was asked for but ``TRAINING_LAUNCHER=none``."""


# exception type -> (HTTP status, prefix of the message)
HTTP_ERRORS: dict[type[Exception], tuple[int, str]] = {
    BadRequest: (400, ""),
    UnknownProject: (404, ""),
    TrainingDisabled: (409, ""),
    TooManyTasks: (413, ""),
    LabelConfigError: (422, "lsbert cannot serve this labelling config: "),
    NotReady: (503, ""),
}


def http_error(exc: Exception) -> tuple[int, str]:
    """(status, detail) for a domain error; 500 for anything else."""
    for kind in type(exc).__mro__:
        if kind in HTTP_ERRORS:
            status, prefix = HTTP_ERRORS[kind]
            return status, f"{prefix}{exc}"
    return 500, f"{type(exc).__name__}: {exc}"


def _log_line(request: Request, status: int, detail: str) -> None:
    """One line per client error or not-ready answer: the request, the status and why."""
    log.warning("%s %s -> %d: %s", request.method, request.url.path, status, detail[:300])


async def _answer(request: Request, exc: Exception) -> JSONResponse:
    status, detail = http_error(exc)
    _log_line(request, status, detail)
    return JSONResponse({"detail": detail}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    for kind in HTTP_ERRORS:
        app.add_exception_handler(kind, _answer)


def install_kserve_error_handlers(app: FastAPI) -> None:
    """KServe's own handlers, answering as KServe does (``{"error": message}``), but logging a client error
    or a not-ready answer as one line instead of a full traceback. Server errors keep their traceback."""
    from kserve.errors import (
        InvalidInput,
        ModelNotFound,
        ModelNotReady,
        ServerNotLive,
        ServerNotReady,
        UnsupportedProtocol,
    )

    statuses: dict[type[Exception], int] = {
        InvalidInput: 400,
        UnsupportedProtocol: 400,
        ModelNotFound: 404,
        NotImplementedError: 501,
        ModelNotReady: 503,
        ServerNotReady: 503,
        ServerNotLive: 503,
    }

    def handler(status: int):
        async def answer(request: Request, exc: Exception) -> JSONResponse:
            _log_line(request, status, str(exc))
            return JSONResponse({"error": str(exc)}, status_code=status)

        return answer

    for kind, status in statuses.items():
        app.add_exception_handler(kind, handler(status))
