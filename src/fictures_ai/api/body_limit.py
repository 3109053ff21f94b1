"""Refuse request bodies over ``MAX_REQUEST_BYTES`` before anything parses them.

A pure ASGI middleware: a ``Content-Length`` over the limit is answered 413 without parsing
the body (read and dropped when it is at most ``DRAIN_BYTES`` over, so that the client reads
the answer); a body without a length (chunked) is read up to the limit and refused as
soon as it goes past it, then replayed to the app. Memory per request stays within the limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fictures_ai.api.errors import is_openai_path
from fictures_ai.api.openai.errors import error_body
from fictures_ai.errors import RequestTooLargeError

DRAIN_BYTES = 16 << 20
"""A body at most this much over the limit is read (and dropped) before the 413: a client
that is still sending when the server answers and closes (httpx, the openai SDK) sees a
connection error instead of the 413. Larger bodies are refused without reading them."""


class BodySizeLimitMiddleware:
    """413 for request bodies larger than ``max_bytes``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        larger: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        """``larger`` maps path prefixes to their own, larger limits and the setting that
        names each (uploads)."""
        self.app = app
        self.max_bytes = max_bytes
        self.larger = dict(larger or {})

    def _limit(self, path: str) -> tuple[int, str]:
        for prefix, limit in self.larger.items():
            if path == prefix or path.startswith(prefix + "/"):
                return limit
        return self.max_bytes, "MAX_REQUEST_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self._limit(scope["path"])
        length = _content_length(scope)
        if length is not None:
            if length > max_bytes:
                if length - max_bytes <= DRAIN_BYTES:
                    await _drain(receive)
                await self._refuse(scope, send, max_bytes, setting)
                return
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await self._refuse(scope, send, max_bytes, setting)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, max_bytes: int, setting: str) -> None:
        message = RequestTooLargeError(limit=max_bytes, setting=setting).message
        if is_openai_path(scope["path"]):
            body = error_body(message, 413, param=None)
        else:
            body = {"detail": message}
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
