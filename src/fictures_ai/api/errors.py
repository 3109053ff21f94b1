"""The one mapping from our exceptions to HTTP status codes, and the app's exception handlers.

Status codes are the same on every surface; each surface formats its own error body. The
handlers dispatch on the path: ``/v1/...`` is the OpenAI-compatible surface (added with it),
everything else speaks the Fictures ``{"detail": ...}`` shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fictures_ai.errors import (
    FicturesError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
)

logger = logging.getLogger(__name__)

# Pydantic error types that mean "a value out of its allowed range", which the Fictures
# contract answers with 400; every other validation error (wrong type, missing field,
# malformed JSON) is a malformed body, 422.
RANGE_ERROR_TYPES = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "string_too_short",
        "string_too_long",
        "too_short",
        "too_long",
        "multiple_of",
        "value_error",
    }
)


def status_for(exc: FicturesError) -> int:
    """The HTTP status code of one of our exceptions."""
    if isinstance(exc, InvalidRequestError):
        return 400
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, ServiceUnavailableError):
        return 503
    if isinstance(exc, GenerationError):
        return 500
    return 500


def retry_headers(exc: FicturesError) -> dict[str, str]:
    """``Retry-After`` where waiting can help."""
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after else {}


def log_error(request: Request, exc: FicturesError, status: int) -> None:
    """Log an error once, where it leaves our code: with the traceback for failures only.

    503s are logged without one: the load or engine failure behind them was logged where it
    happened.
    """
    if status >= 500 and not isinstance(exc, ServiceUnavailableError):
        logger.error(
            "%s %s failed: %s", request.method, request.url.path, exc.message, exc_info=exc
        )
    else:
        level = logging.WARNING if status >= 500 else logging.INFO
        logger.log(level, "%s %s answered %d: %s", request.method, request.url.path, status, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn our exceptions and validation errors into responses."""
    from fictures_ai.api.fictures.errors import fictures_error, fictures_validation_error
    from fictures_ai.api.openai.errors import openai_error, openai_validation_error

    @app.exception_handler(FicturesError)
    async def _handle_fictures_error(request: Request, exc: FicturesError) -> JSONResponse:
        status = status_for(exc)
        log_error(request, exc, status)
        if is_openai_path(request.url.path):
            return openai_error(exc, status)
        return fictures_error(exc, status)

    @app.exception_handler(RequestValidationError)
    async def _handle_validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        if is_openai_path(request.url.path):
            return openai_validation_error(exc)
        return fictures_validation_error(exc)


def is_openai_path(path: str) -> bool:
    """Whether ``path`` belongs to the OpenAI-compatible surface."""
    return path == "/v1" or path.startswith("/v1/")
