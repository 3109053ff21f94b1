"""Refuse request bodies whose strings are not Unicode text.

JSON may spell a lone UTF-16 surrogate (``"\\ud800"``): Python decodes it into a string that
cannot be encoded as UTF-8, so a tokenizer, a log line or an error body that meets it fails.
Both surfaces check every string of a body once, before its fields are validated, and answer
400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator


def check_unicode_text(body: Any) -> Any:
    """Return ``body`` (a decoded JSON value) unchanged.

    Raises ``ValueError`` naming the first string, key or value, that holds a lone surrogate
    (``messages[0].content: ...``), which the surfaces answer with 400.
    """
    problem = _first_lone_surrogate(body, "")
    if problem is not None:
        where = f"{problem}: " if problem else ""
        raise ValueError(
            f"{where}holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which "
            "is not Unicode text; send valid UTF-8"
        )
    return body


def _first_lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string under ``value`` that cannot be encoded as UTF-8."""
    if isinstance(value, str):
        return None if _is_text(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _is_text(key):
                return path or "(a key)"
            found = _first_lone_surrogate(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_lone_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class UnicodeTextBody(BaseModel):
    """Base of the surfaces' request bodies: every string of the body is checked once, before
    field validation (nested models need not, and do not, check again)."""

    @model_validator(mode="before")
    @classmethod
    def _check_unicode_text(cls, data: Any) -> Any:
        return check_unicode_text(data)
