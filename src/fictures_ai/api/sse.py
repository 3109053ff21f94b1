"""Server-sent events: the ``data: ...`` framing, the one path every stream takes
(``stream_events``), and the response that writes it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any, Protocol, TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

from fictures_ai.api.errors import ErrorReply, stream_failure

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No caching, and no proxy buffering (nginx honours X-Accel-Buffering), so tokens flow."""

DONE_EVENT = b"data: [DONE]\n\n"

encode_json_string = json.JSONEncoder(ensure_ascii=False).encode
"""``json.dumps(text, ensure_ascii=False)`` without building an encoder per call (per token)."""

HIGH_WATER_BYTES = 64 * 1024
"""Events a stream may hold unsent; past this its producer waits for the socket."""
CLEANUP_WAIT_S = 5.0
"""How long a response that ends early waits for its cancelled producer to clean up."""

# Producers whose clean-up outlasted CLEANUP_WAIT_S, kept until it has run (asyncio keeps
# only weak references to tasks).
_closing: set[asyncio.Task[None]] = set()


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


T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class EventEncoder(Protocol[T_contra]):
    """Writes the events of one stream: one per item (``b""`` to send nothing for it), the
    events after the last item, and the event of a failure after the stream started."""

    def event(self, item: T_contra) -> bytes: ...

    def end(self) -> bytes: ...

    def error(self, reply: ErrorReply) -> bytes: ...


async def stream_events(
    items: AsyncGenerator[T, None], encoder: EventEncoder[T], *, wait_for_first: bool = True
) -> EventStreamResponse:
    """The response that streams ``items`` as ``encoder`` writes them, then ``data: [DONE]``.

    With ``wait_for_first`` the first item is awaited before the response starts, so that what
    fails before any output (an invalid request, a model that cannot load, a full queue) is
    answered with its status code rather than an error event in a 200 stream; that exception
    is raised here. An image stream, whose first item may wait long in the render queue,
    starts at once instead. A failure after the start becomes ``encoder.error``'s event, with
    the status the error would have had (``stream_failure``). Closing ``items`` (the client
    left, or the stream ended) aborts the engine work behind it.
    """
    first: list[T] = []
    if wait_for_first:
        try:
            first.append(await anext(items))
        except StopAsyncIteration:
            pass
        except BaseException:
            await items.aclose()
            raise
    return EventStreamResponse(_events(first, items, encoder))


async def _events(
    first: list[T], rest: AsyncGenerator[T, None], encoder: EventEncoder[T]
) -> AsyncGenerator[bytes, None]:
    # One generator between the items and the response: no extra layer per event.
    try:
        for item in first:
            if event := encoder.event(item):
                yield event
        async for item in rest:
            if event := encoder.event(item):
                yield event
        if tail := encoder.end():
            yield tail
    except Exception as exc:
        yield encoder.error(stream_failure(exc))
    finally:
        await rest.aclose()
    yield DONE_EVENT


class EventStreamResponse(StreamingResponse):
    """A server-sent events response that writes all the events that are ready in one send.

    The events are made in a task of their own, which appends them to a buffer; the response
    writes whatever the buffer holds each time it runs. When events come slower than the
    socket takes them (an engine step per token), each goes out alone, one event-loop turn
    after it was made. When they come faster (a fast engine, several choices interleaved, a
    client that reads slowly), those that piled up leave in one write, instead of one write
    and one trip through every ASGI layer each. The buffer holds at most
    ``HIGH_WATER_BYTES``; past that the producer waits, so a slow client holds back its own
    engine request rather than filling memory.

    Closing the response early (client gone, cancelled) cancels the producer, which closes
    the event iterator (the routes' iterators abort their engine requests when closed), and
    waits up to ``CLEANUP_WAIT_S`` for that to finish.
    """

    def __init__(self, events: AsyncGenerator[bytes, None], status_code: int = 200) -> None:
        # FastAPI reads the default ``status_code`` off this signature for the OpenAPI document.
        super().__init__(events, status_code, SSE_HEADERS, SSE_MEDIA_TYPE)
        self._events = events

    async def stream_response(self, send: Send) -> None:
        """Start the response, then write the buffered events until the producer ends."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        buffer = _EventBuffer(HIGH_WATER_BYTES)
        producer = asyncio.ensure_future(buffer.fill(self._events))
        try:
            while (data := await buffer.take()) is not None:
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            if not producer.done():
                producer.cancel()
                # Let its clean-up (engine abort, token counts) finish before the request
                # ends, so that the access log and the token budget see it; shielded from the
                # cancellation that may have brought us here, and bounded.
                with anyio.move_on_after(CLEANUP_WAIT_S, shield=True):
                    await asyncio.wait([producer])
                if not producer.done():
                    _closing.add(producer)
                    producer.add_done_callback(_closing.discard)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _EventBuffer:
    """Events between the task that makes them and the response that writes them."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._data_ready: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None

    async def fill(self, source: AsyncGenerator[bytes, None]) -> None:
        """Append every event of ``source``; wait while the buffer is full."""
        try:
            async for part in source:
                self._parts.append(part)
                self._size += len(part)
                _wake(self._data_ready)
                if self._size >= self._limit:
                    self._room = asyncio.get_running_loop().create_future()
                    await self._room
        except Exception as exc:
            self._error = exc
        finally:
            self._done = True
            _wake(self._data_ready)
            await source.aclose()

    async def take(self) -> bytes | None:
        """Everything buffered, in one piece, once there is some; ``None`` at the end."""
        while not self._parts:
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            self._data_ready = asyncio.get_running_loop().create_future()
            await self._data_ready
        data = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
        self._parts.clear()
        self._size = 0
        _wake(self._room)
        return data


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
