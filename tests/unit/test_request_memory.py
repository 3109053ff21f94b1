"""Requests leave nothing behind in the server process (real Uvicorn, real sockets).

``benchmarks/load_test.py`` watches the server's processes for minutes; this is its fast guard
for our own process. A per-request structure that is never freed (a set of request ids, a
label set per request, a task or a context kept alive, a buffer of log records) makes the
Python heap grow with every request. After a warm-up batch, further batches of streamed,
plain and dropped requests must leave the traced heap where it was.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from tests.unit.conftest import live_server, make_services
from tests.unit.fake_engines import FakeTextEngine

BATCH = 240
CONCURRENCY = 8
MEASURED_BATCHES = 3
ALLOWED_BYTES_PER_REQUEST = 40
"""Well under what one leaked request id costs in a set (a 32-character str and a slot:
about 100 bytes), so a leak of even that little per request fails the test. Without a leak
the heap moves by about 10 KB between batches (timers and connections in flight at the
moment of measuring), which does not grow with the number of requests."""


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, FakeTextEngine]]:
    engine = FakeTextEngine(reply=" ".join(["word"] * 24), token_delay=0.001)
    # A one-second health window, so that /health's record of recent requests (bounded by
    # age) is the same size after every batch.
    settings = Settings(_env_file=None, health_window_s=1)  # type: ignore[call-arg]
    app = create_app(services=make_services(engine, settings=settings))
    async with live_server(app) as port:
        yield f"http://127.0.0.1:{port}", engine


async def one_request(client: httpx.AsyncClient, number: int) -> None:
    """A Fictures stream, an OpenAI chat stream or a plain generate; every fifth stream hangs
    up after three events, as a closed browser tab does."""
    kind = number % 3
    if kind == 2:
        response = await client.post("/api/v1/text/generate", json={"prompt": f"story {number}"})
        assert response.status_code == 200, response.text
        return
    if kind == 1:
        path = "/v1/chat/completions"
        body: dict[str, object] = {
            "model": "fake-model",
            "messages": [{"role": "user", "content": f"story {number}"}],
            "stream": True,
        }
    else:
        path, body = "/api/v1/text/stream", {"prompt": f"story {number}"}
    drop = number % 5 == 0
    events = 0
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            events += line.startswith("data: ")
            if drop and events == 3:
                break


async def run_batch(url: str, first: int) -> None:
    async def loop(start: int) -> None:
        for number in range(start, first + BATCH, CONCURRENCY):
            await one_request(client, number)

    async with httpx.AsyncClient(base_url=url) as client:
        await asyncio.gather(*(loop(first + offset) for offset in range(CONCURRENCY)))


async def settled_heap(engine: FakeTextEngine) -> int:
    """Traced bytes once the last requests' clean-up has run and the window has emptied."""
    await asyncio.sleep(1.2)  # dropped streams finish their clean-up; the health window ages
    engine.calls.clear()  # the fake engine's own records of each call
    engine.aborted.clear()
    engine.finished.clear()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def test_requests_leave_the_heap_as_they_found_it(
    server: tuple[str, FakeTextEngine],
) -> None:
    url, engine = server
    tracemalloc.start()
    try:
        await run_batch(url, 0)  # warm-up: lazy imports, caches filled once, pools
        await settled_heap(engine)
        await run_batch(url, BATCH)
        before = await settled_heap(engine)
        for batch in range(MEASURED_BATCHES):
            await run_batch(url, (2 + batch) * BATCH)
        after = await settled_heap(engine)
    finally:
        tracemalloc.stop()
    requests = MEASURED_BATCHES * BATCH
    assert (after - before) / requests < ALLOWED_BYTES_PER_REQUEST, (
        f"the heap grew by {after - before} bytes over {requests} requests"
    )
