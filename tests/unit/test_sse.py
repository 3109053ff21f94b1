"""EventStreamResponse: events that are ready leave together, late ones alone and at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from fictures_ai.api import sse
from fictures_ai.api.sse import SSE_MEDIA_TYPE, EventStreamResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.4"}}


class Recorder:
    """An ASGI ``send`` that keeps the body messages and when each arrived."""

    def __init__(self, *, fail_after: int | None = None) -> None:
        self.start: Message | None = None
        self.bodies: list[bytes] = []
        self.ended = False
        self.fail_after = fail_after

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        if not message["more_body"]:
            self.ended = True
            return
        if self.fail_after is not None and len(self.bodies) == self.fail_after:
            raise OSError("client went away")
        self.bodies.append(message["body"])


async def never_disconnects() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def event(number: int) -> bytes:
    return f"data: {number}\n\n".encode()


async def test_events_made_without_waiting_leave_in_one_write() -> None:
    async def events() -> AsyncGenerator[bytes, None]:
        for number in range(100):
            yield event(number)

    send = Recorder()
    await EventStreamResponse(events())(SCOPE, never_disconnects, send)

    assert send.start is not None
    assert send.start["status"] == 200
    assert (b"content-type", f"{SSE_MEDIA_TYPE}; charset=utf-8".encode()) in send.start["headers"]
    assert send.bodies == [b"".join(event(n) for n in range(100))]
    assert send.ended


async def test_events_that_come_one_at_a_time_go_out_one_at_a_time() -> None:
    written_before: list[int] = []
    send = Recorder()

    async def events() -> AsyncGenerator[bytes, None]:
        for number in range(5):
            written_before.append(len(send.bodies))
            yield event(number)
            await asyncio.sleep(0.01)

    await EventStreamResponse(events())(SCOPE, never_disconnects, send)

    assert send.bodies == [event(n) for n in range(5)]
    # Each event had been written before the source made the next one: no event waits.
    assert written_before == [0, 1, 2, 3, 4]


async def test_a_full_buffer_holds_the_producer_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "HIGH_WATER_BYTES", 3 * len(event(0)))
    made = 0

    async def events() -> AsyncGenerator[bytes, None]:
        nonlocal made
        for number in range(10):
            made += 1
            yield event(number)

    sent_when_made: list[int] = []

    class SlowSend(Recorder):
        async def __call__(self, message: Message) -> None:
            if message["type"] == "http.response.body" and message["more_body"]:
                sent_when_made.append(made)
            await super().__call__(message)

    send = SlowSend()
    await EventStreamResponse(events())(SCOPE, never_disconnects, send)

    assert b"".join(send.bodies) == b"".join(event(n) for n in range(10))
    assert len(send.bodies) == 4  # 3 + 3 + 3 + 1: the producer stopped at each full buffer
    assert sent_when_made == [3, 6, 9, 10]


async def test_a_client_that_goes_away_closes_the_event_source() -> None:
    closed = asyncio.Event()

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            for number in range(1000):
                yield event(number)
                await asyncio.sleep(0.001)
        finally:
            await asyncio.sleep(0.05)  # where the routes abort their engine requests
            closed.set()

    with pytest.raises(ClientDisconnect):  # Starlette's word for the OSError of a closed socket
        await EventStreamResponse(events())(SCOPE, never_disconnects, Recorder(fail_after=2))
    assert closed.is_set()  # before the response ended: the request's figures include it


async def test_a_cancelled_response_closes_a_source_waiting_for_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "HIGH_WATER_BYTES", 1)
    closed = asyncio.Event()
    send_blocked = asyncio.Event()

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            for number in range(1000):
                yield event(number)
        finally:
            await asyncio.sleep(0.05)
            closed.set()

    class StuckSend(Recorder):
        async def __call__(self, message: Message) -> None:
            if message["type"] == "http.response.body":
                send_blocked.set()
                await asyncio.Event().wait()  # the socket never drains
            await super().__call__(message)

    response = asyncio.create_task(
        EventStreamResponse(events())(SCOPE, never_disconnects, StuckSend())
    )
    await asyncio.wait_for(send_blocked.wait(), timeout=5)
    response.cancel()
    with pytest.raises(asyncio.CancelledError):
        await response
    assert closed.is_set()


async def test_an_error_in_the_source_is_raised_after_the_events_before_it() -> None:
    async def events() -> AsyncGenerator[bytes, None]:
        yield event(0)
        yield event(1)
        raise RuntimeError("broken source")

    send = Recorder()
    with pytest.raises(RuntimeError, match="broken source"):
        await EventStreamResponse(events())(SCOPE, never_disconnects, send)
    assert b"".join(send.bodies) == event(0) + event(1)
    assert not send.ended
