"""A bare Starlette app that streams the same SSE bytes as our chat completions route.

The reference for the HTTP-layer ceiling: no middleware, no validation, no services. Each
event is the chunk JSON shape of ``/v1/chat/completions`` (``stream: true``), precomputed
once; the route only reads ``max_tokens`` from the body and writes that many events, then
``data: [DONE]``. Whatever our app streams below this app's rate is our own overhead.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from instant_engine import MODEL_NAME, TOKEN

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _chunk(request_id: str, created: int, *, first: bool, finish: str | None) -> bytes:
    delta = {"role": "assistant", "content": TOKEN} if first else {"content": TOKEN}
    payload = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL_NAME,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def create_chat_completion(request: Request) -> StreamingResponse:
    """Stream ``max_tokens`` precomputed chunks."""
    body = await request.json()
    total = int(body.get("max_tokens") or 256)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    first = _chunk(request_id, created, first=True, finish=None)
    middle = _chunk(request_id, created, first=False, finish=None)
    last = _chunk(request_id, created, first=False, finish="length")

    async def events() -> AsyncIterator[bytes]:
        yield first
        for _ in range(total - 2):
            yield middle
        yield last
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def create_bare_app() -> Starlette:
    """The bare app: one streaming route."""
    route = Route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    return Starlette(routes=[route])
