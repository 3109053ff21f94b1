"""Error bodies of the Fictures surface: ``{"detail": "..."}``."""

from __future__ import annotations

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fictures_ai.api.errors import (
    RANGE_ERROR_TYPES,
    error_location,
    retry_headers,
    validation_message,
)
from fictures_ai.api.fictures.protocol import PROMPT_TOO_LONG
from fictures_ai.errors import FicturesError


def fictures_error(exc: FicturesError, status: int) -> JSONResponse:
    """The response for one of our exceptions."""
    return JSONResponse({"detail": exc.message}, status_code=status, headers=retry_headers(exc))


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
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
