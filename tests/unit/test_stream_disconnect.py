"""A client that drops a stream stops the engine request (real Uvicorn, real sockets)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from fictures_ai.api.app import create_app
from tests.unit.conftest import make_services, wait_until
from tests.unit.fake_engines import FakeTextEngine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def slow_server() -> AsyncIterator[tuple[str, FakeTextEngine]]:
    engine = FakeTextEngine(reply=" ".join(["word"] * 500), token_delay=0.02)
    app = create_app(services=make_services(engine))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, timeout=10)
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    await task


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
