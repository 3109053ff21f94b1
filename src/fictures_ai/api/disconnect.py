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

CLIENT_CLOSED_REQUEST = 499
"""The status the access log records for a request whose client left before its answer
(nginx's convention; nothing is sent)."""


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready; its work was stopped. Answered with
    an empty 499 that nobody reads, not logged as a failure."""


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; cancel it and raise ``ClientDisconnectedError`` if the client
    disconnects (a cancellation of the request itself, at shutdown, stays a
    ``CancelledError``).

    Call it after the body has been read (FastAPI has parsed it by the time a handler runs):
    the next ASGI message is then either ``http.disconnect`` or nothing.
    """
    task = asyncio.ensure_future(work)
    left = False

    async def watch() -> None:
        nonlocal left
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not task.done():
                    logger.info("Client disconnected from %s; cancelling", request.url.path)
                    left = True
                    task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if left and (current is None or not current.cancelling()):
            raise ClientDisconnectedError from None
        raise
    finally:
        watcher.cancel()
