"""The one mapping from exceptions to what a client is told: ``error_reply``.

An exception becomes an ``ErrorReply`` (status code, message, parameter, code, headers) once,
here; each surface writes that reply in its own shape, as a response before a stream starts
(``api/fictures/errors.py``, ``api/openai/errors.py``) or as the last event of a stream that
failed after it started. Status codes are the same on every surface. The handlers that
dispatch on the path are in ``api/error_handlers.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from fictures_ai.errors import (
    AuthenticationError,
    ConflictError,
    FicturesError,
    GenerationTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
    ServiceUnavailableError,
    TooManyRequestsError,
)
from fictures_ai.observability.context import current_request_id

_STATUS: tuple[tuple[type[FicturesError], int], ...] = (
    (InvalidRequestError, 400),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (ModelNotFoundError, 404),
    (NotFoundError, 404),
    (ConflictError, 409),
    (RequestTooLargeError, 413),
    (TooManyRequestsError, 429),
    (ServiceUnavailableError, 503),
    (GenerationTimeoutError, 504),
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
        "finite_number",
        "value_error",
    }
)


ERROR_DESCRIPTIONS = {
    400: "Invalid parameters",
    401: "No API key, or an unknown one",
    403: "The API key lacks the scope or the model",
    404: "Unknown model, job, batch or file",
    409: "The model's state forbids this now (busy, loading, name taken)",
    413: "Request body too large",
    429: "Rate limited or queue full (see Retry-After)",
    500: "Generation failed",
    503: "Model not loaded or engine unavailable (see Retry-After)",
    504: "Generation timed out and was stopped",
}


def error_responses(model: type[BaseModel], *, include_422: bool) -> dict[int | str, Any]:
    """OpenAPI ``responses`` documenting the error answers of a surface with ``model``."""
    codes = sorted(ERROR_DESCRIPTIONS) + ([422] if include_422 else [])
    return {
        code: {"model": model, "description": ERROR_DESCRIPTIONS.get(code, "Malformed body")}
        for code in codes
    }


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAMED_MESSAGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


def error_location(loc: Sequence[int | str]) -> str | None:
    """The parameter a Pydantic error location names, as clients write it
    (``tools[0].function.name``): ``body`` and Pydantic's union tags (``str``,
    ``literal['a','b']``, ``function-after[...]``) left out."""
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part != "body" and _FIELD_NAME.match(part) and part not in _TYPE_TAGS:
            where += f".{part}" if where else part
    return where or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def validation_message(error: Mapping[str, Any]) -> str:
    """One Pydantic validation error for people: ``field.path: message``, or the message alone
    for a check of the whole body (Pydantic's ``Value error,`` prefix left out)."""
    where = error_location(error.get("loc", ()))
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def named_parameter(message: str) -> str | None:
    """The parameter a whole-body check names at the start of its message (``seed: ...``)."""
    match = _NAMED_MESSAGE.match(message)
    return match.group(1) if match else None


def status_for(exc: FicturesError) -> int:
    """The HTTP status code of one of our exceptions (500 for ``GenerationError`` and others)."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def retry_headers(exc: FicturesError) -> dict[str, str]:
    """``Retry-After`` where waiting can help, plus an exception's own headers (rate limits)."""
    headers = dict(getattr(exc, "headers", None) or {})
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


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


INTERNAL_ERROR_MESSAGE = (
    "Internal server error: the server failed on this request; its log has the details "
    "under request id {request_id}."
)


def internal_error_message() -> str:
    """What a client is told of a failure we did not foresee (its details stay in the log)."""
    return INTERNAL_ERROR_MESSAGE.format(request_id=current_request_id() or "-")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """What a client is told of one error, whatever shape its surface writes it in.

    ``param`` names the request parameter at fault (OpenAI's ``param``); ``code`` is OpenAI's
    machine-readable ``code`` (``model_not_found``); ``headers`` go on a response (a stream
    that already started cannot send them).
    """

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def error_reply(exc: BaseException) -> ErrorReply:
    """The reply to ``exc``: its status from the table above and its own message for our
    exceptions; 500 with ``internal_error_message()`` for anything else (its details stay in
    the log)."""
    if not isinstance(exc, FicturesError):
        return ErrorReply(500, internal_error_message())
    param = exc.param if isinstance(exc, InvalidRequestError) else None
    code = None
    if isinstance(exc, ModelNotFoundError):
        param, code = "model", "model_not_found"
    return ErrorReply(status_for(exc), exc.message, param, code, retry_headers(exc))


def stream_failure(exc: Exception) -> ErrorReply:
    """Log a failure of a stream that had started and return its reply (the status is the
    one the error would have had before the stream started: an engine that died is 503)."""
    message = exc.message if isinstance(exc, FicturesError) else type(exc).__name__
    logger.error("Stream failed after it started: %s", message, exc_info=exc)
    return error_reply(exc)


_ROUTE_PREFIXES = {
    "text": ("/api/v1/text/", "/v1/chat/", "/v1/completions", "/tokenize", "/detokenize"),
    "image": ("/api/v1/images/", "/v1/images/"),
}


def unserved_route_message(path: str, generation_mode: str) -> str | None:
    """Why ``path`` is not found when it belongs to the half ``generation_mode`` leaves out."""
    for half, prefixes in _ROUTE_PREFIXES.items():
        if generation_mode not in ("all", half) and path.startswith(prefixes):
            return (
                f"Not Found: this server runs with GENERATION_MODE={generation_mode} and does "
                f"not generate {'images' if half == 'image' else 'text'}; send this request to "
                "the server that does."
            )
    return None


OPENAI_ROOT_PATHS = frozenset({"/tokenize", "/detokenize"})


def is_openai_path(path: str) -> bool:
    """Whether ``path`` belongs to the OpenAI-compatible surface (vLLM's tokenizer routes
    included)."""
    return path in OPENAI_ROOT_PATHS or path == "/v1" or path.startswith("/v1/")
