"""Server-sent events framing: the only place that writes ``data: ...`` lines."""

from __future__ import annotations

import json
from typing import Any

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No caching, and no proxy buffering (nginx honours X-Accel-Buffering), so tokens flow."""

DONE_EVENT = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One event: ``data: {compact JSON}`` and a blank line."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + body.encode() + b"\n\n"
