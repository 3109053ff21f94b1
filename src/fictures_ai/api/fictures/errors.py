"""Error bodies of the Fictures surface: ``{"detail": "..."}``."""

from __future__ import annotations

import math
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fictures_ai.api.errors import (
    RANGE_ERROR_TYPES,
    ErrorReply,
    error_location,
    validation_message,
)
from fictures_ai.api.fictures.protocol import PROMPT_TOO_LONG


def fictures_error(reply: ErrorReply) -> JSONResponse:
    """The response for an error before the response started."""
    return JSONResponse(
        {"detail": reply.message}, status_code=reply.status, headers=dict(reply.headers)
    )


def fictures_validation_error(exc: RequestValidationError) -> JSONResponse:
    """400 for values out of range (what existing clients check), 422 for malformed bodies."""
    errors = list(exc.errors())
    if errors and all(error.get("type") in RANGE_ERROR_TYPES for error in errors):
        first = errors[0]
        where = error_location(first.get("loc", ()))
        if where == "prompt" and first.get("type") == "string_too_long":
            detail = PROMPT_TOO_LONG
        elif where == "prompt" and first.get("type") == "string_too_short":
            detail = "Prompt must not be empty"
        else:
            detail = "; ".join(validation_message(error) for error in errors)
        return JSONResponse({"detail": detail}, status_code=400)
    return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)


def _json_safe(value: Any) -> Any:
    """``value`` with what JSON cannot carry made printable: the errors quote the input, which
    may hold a number too large for a float (``1e309`` parses as infinity) or a lone
    surrogate."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value
