"""Error bodies of the OpenAI-compatible surface: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fictures_ai.api.errors import (
    error_location,
    named_parameter,
    retry_headers,
    validation_message,
)
from fictures_ai.errors import FicturesError, InvalidRequestError, ModelNotFoundError

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_body(
    message: str, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object for ``status``: its own type for 401, 403, 429 and 503,
    ``invalid_request_error`` for any other 4xx, ``server_error`` for any other 5xx."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
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
    """400 ``invalid_request_error`` for every body OpenAI's API would refuse: values out of
    range, wrong types, missing fields and malformed JSON alike (OpenAI never answers 422)."""
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        # Pydantic's location of a JSON error is a character offset, not a parameter.
        offset = next((part for part in first.get("loc", ()) if isinstance(part, int)), None)
        message = (
            f"The body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')}"
            + (f", at character {offset}" if offset is not None else "")
            + ")."
        )
        return JSONResponse(error_body(message, 400), status_code=400)
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        message = "The body must be a JSON object, sent with Content-Type: application/json."
        return JSONResponse(error_body(message, 400), status_code=400)
    messages = list(dict.fromkeys(validation_message(error) for error in errors))
    message = "; ".join(messages)
    param = error_location(loc) or named_parameter(messages[0] if messages else "")
    return JSONResponse(error_body(message, 400, param=param), status_code=400)
