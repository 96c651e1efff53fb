"""OpenAI-shaped errors: every failure a client sees is `{"error": {"message", "type",
"param", "code"}}` with the status code OpenAI would use.

`APIError` is raised by the request parsing and the routes; `api_error` maps everything
else (meshpy's typed exceptions, Starlette's HTTP errors) onto it, in one place.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException

from meshpy.errors import (
    ChatTemplateError,
    ContextOverflowError,
    InvalidSamplingError,
    NetworkError,
    NoRouteError,
    RequestTimeoutError,
    WorkerError,
    format_layer_list,
)

__all__ = ["APIError", "api_error"]

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client: HTTP status and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {...}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def api_error(exc: BaseException) -> APIError:
    """The client-facing error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (InvalidSamplingError, ChatTemplateError)):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, NoRouteError):
        return APIError(
            503,
            f"no route through the mesh: no worker serves layers {format_layer_list(exc.missing_layers)}",
            "server_error",
            code="no_route",
        )
    if isinstance(exc, WorkerError):
        return APIError(503, f"a worker of the mesh refused the request: {exc}", "server_error", code=exc.code)
    if isinstance(exc, (NetworkError, RequestTimeoutError)):
        return APIError(503, f"the mesh did not answer: {exc}", "server_error", code="mesh_unavailable")
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return APIError(404, f"no such endpoint: {exc.detail}", code="unknown_url")
        if exc.status_code == 405:
            return APIError(405, "method not allowed on this endpoint", code="method_not_allowed")
        return APIError(exc.status_code, str(exc.detail))
    log.error("internal error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
