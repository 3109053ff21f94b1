"""Error bodies of the OpenAI-compatible surface: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fictures_ai.api.errors import RANGE_ERROR_TYPES, retry_headers, validation_message
from fictures_ai.errors import FicturesError, InvalidRequestError, ModelNotFoundError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    message: str, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object for ``status``."""
    kind = _TYPES.get(status, "server_error" if status != 503 else "service_unavailable_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(exc: FicturesError, status: int) -> JSONResponse:
    """The response for one of our exceptions."""
    param = exc.param if isinstance(exc, InvalidRequestError) else None
    code = "model_not_found" if isinstance(exc, ModelNotFoundError) else None
    if isinstance(exc, ModelNotFoundError):
        param = "model"
    return JSONResponse(
        error_body(exc.message, status, param=param, code=code),
        status_code=status,
        headers=retry_headers(exc),
    )


def openai_validation_error(exc: RequestValidationError) -> JSONResponse:
    """400 for values out of range, 422 for malformed bodies (as on the Fictures surface)."""
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = "; ".join(validation_message(error) for error in errors)
    status = 400 if errors and all(e.get("type") in RANGE_ERROR_TYPES for e in errors) else 422
    return JSONResponse(error_body(message, status, param=param), status_code=status)
