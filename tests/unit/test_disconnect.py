"""A client that goes away stops its work in the engine (real Uvicorn, real sockets)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from fictures_ai.api.app import create_app
from tests.unit.conftest import live_server, make_services, wait_until
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine


@pytest.fixture
def slow_image_engine() -> FakeImageEngine:
    return FakeImageEngine(step_delay=0.02)


@pytest.fixture
async def slow_server(
    slow_image_engine: FakeImageEngine,
) -> AsyncIterator[tuple[str, FakeTextEngine]]:
    engine = FakeTextEngine(reply=" ".join(["word"] * 500), token_delay=0.02)
    app = create_app(services=make_services(engine, image_engine=slow_image_engine))
    async with live_server(app) as port:
        yield f"http://127.0.0.1:{port}", engine


async def test_dropping_a_stream_aborts_the_engine_request(
    slow_server: tuple[str, FakeTextEngine],
) -> None:
    url, engine = slow_server
    async with (
        httpx.AsyncClient(base_url=url) as client,
        client.stream("POST", "/api/v1/text/stream", json={"prompt": "x"}) as response,
    ):
        received = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 3:
                break
    # The client has closed the connection after 3 of 500 tokens.
    await wait_until(lambda: len(engine.aborted) == 1, timeout=5)
    assert engine.finished == []
    tokens_at_abort = engine.produced_tokens
    assert tokens_at_abort < 20
    await asyncio.sleep(0.2)
    assert engine.produced_tokens == tokens_at_abort


async def test_a_finished_stream_is_not_aborted(slow_server: tuple[str, FakeTextEngine]) -> None:
    url, engine = slow_server
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/api/v1/text/stream", json={"prompt": "x", "max_tokens": 3})
    assert response.text.endswith("data: [DONE]\n\n")
    assert engine.aborted == []
    assert len(engine.finished) == 1


async def test_dropping_a_plain_generate_request_aborts_it(
    slow_server: tuple[str, FakeTextEngine],
) -> None:
    url, engine = slow_server
    async with httpx.AsyncClient(base_url=url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/api/v1/text/generate", json={"prompt": "x"})
    await wait_until(lambda: len(engine.aborted) == 1, timeout=5)
    assert engine.finished == []


async def test_dropping_image_requests_frees_the_queue_and_stops_the_render(
    slow_server: tuple[str, FakeTextEngine],
    slow_image_engine: FakeImageEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    url, _ = slow_server
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 100}
    # The first request renders (100 steps x 20 ms), the second waits in the queue. The
    # waiting one leaves first: were both to leave at once, the slot the render frees could
    # reach the waiting request before the server noticed that its client left too.
    async with (
        httpx.AsyncClient(base_url=url, timeout=0.8) as rendering,
        httpx.AsyncClient(base_url=url, timeout=0.4) as waiting,
    ):
        first = asyncio.create_task(rendering.post("/api/v1/images/generate", json=body))
        await wait_until(lambda: len(slow_image_engine.calls) == 1, timeout=5)
        results = await asyncio.gather(
            first,
            waiting.post("/api/v1/images/generate", json={**body, "seed": 5}),
            return_exceptions=True,
        )
    assert all(isinstance(result, httpx.ReadTimeout) for result in results)
    await wait_until(lambda: len(slow_image_engine.cancelled) == 1, timeout=5)
    await asyncio.sleep(0.3)
    # The queued request never reached the engine; the running one was stopped mid-render.
    assert len(slow_image_engine.calls) == 1
    assert slow_image_engine.completed == []
    # A client that left is no failure of ours: a 499 in the access log, no error logged.
    statuses = [
        getattr(r, "status", None) for r in caplog.records if r.name == "fictures_ai.access"
    ]
    assert statuses.count(499) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
