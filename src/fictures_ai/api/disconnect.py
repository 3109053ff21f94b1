"""Stop the work of a non-streaming request when its client disconnects.

Starlette cancels a streaming response when the client goes away, but not a plain handler
that is still awaiting its result. ``cancel_on_disconnect`` races the work against the
client's ``http.disconnect`` message and cancels the work when it arrives, so a queued image
leaves the queue and a running render or text generation is aborted in its engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; cancel it (and raise ``CancelledError``) if the client disconnects.

    Call it after the body has been read (FastAPI has parsed it by the time a handler runs):
    the next ASGI message is then either ``http.disconnect`` or nothing.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not task.done():
                    logger.info("Client disconnected from %s; cancelling", request.url.path)
                    task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    finally:
        watcher.cancel()
