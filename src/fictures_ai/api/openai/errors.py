"""Error bodies of the OpenAI-compatible surface: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fictures_ai.api.errors import (
    ErrorReply,
    error_location,
    named_parameter,
    validation_message,
)

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


def openai_error(reply: ErrorReply) -> JSONResponse:
    """The response for an error before the response started."""
    return JSONResponse(
        error_body(reply.message, reply.status, param=reply.param, code=reply.code),
        status_code=reply.status,
        headers=dict(reply.headers),
    )


def openai_error_event(reply: ErrorReply) -> bytes:
    """The event that ends a stream that failed after it started: OpenAI's error object."""
    body = error_body(reply.message, reply.status, param=reply.param, code=reply.code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


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
