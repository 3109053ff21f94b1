"""A bare Starlette app that streams the same SSE bytes as our two streaming text routes.

The reference for the HTTP-layer ceiling: no middleware, no validation, no services, one
``send`` per event. ``/v1/chat/completions`` writes the chunk JSON shape of OpenAI's
``stream: true`` (precomputed once); ``/api/v1/text/stream`` writes the Fictures contract's
events, whose cumulative ``text`` grows with every token. Each route only reads
``max_tokens`` from the body and writes that many events, then ``data: [DONE]``. Whatever our
app streams below this app's rate is our own overhead.
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


async def stream_text(request: Request) -> StreamingResponse:
    """Stream ``max_tokens`` Fictures events, each with the whole text so far."""
    body = await request.json()
    total = int(body.get("max_tokens") or 256)

    async def events() -> AsyncIterator[bytes]:
        text = ""
        for produced in range(1, total + 1):
            text += TOKEN
            done = produced == total
            payload = {
                "text": text,
                "delta": TOKEN,
                "model": MODEL_NAME,
                "tokens_used": produced,
                "finish_reason": "length" if done else None,
                "done": done,
            }
            yield b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def create_bare_app() -> Starlette:
    """The bare app: the two streaming routes."""
    return Starlette(
        routes=[
            Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
            Route("/api/v1/text/stream", stream_text, methods=["POST"]),
        ]
    )
