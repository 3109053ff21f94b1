"""Server-sent events framing: the only place that writes ``data: ...`` lines."""

from __future__ import annotations

import json
from typing import Any

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No caching, and no proxy buffering (nginx honours X-Accel-Buffering), so tokens flow."""

DONE_EVENT = b"data: [DONE]\n\n"


def sse_response_doc(description: str) -> dict[int | str, Any]:
    """OpenAPI ``responses`` of a streaming route: each event has a ``data`` line.

    The data is JSON (described in ``description``) or ``[DONE]`` at the end, so it is
    documented as a string rather than with a JSON schema that ``[DONE]`` would violate.
    """
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": description}},
    }
    return {200: {"description": description, "content": {SSE_MEDIA_TYPE: {"schema": event}}}}


def sse_event(payload: dict[str, Any]) -> bytes:
    """One event: ``data: {compact JSON}`` and a blank line."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + body.encode() + b"\n\n"
