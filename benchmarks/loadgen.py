"""A fast load generator for streamed completions: raw asyncio streams, no HTTP library.

httpx (and, less so, aiohttp) spend more CPU per server-sent event than the servers under test
do on a 2-core machine, which would make the client the bottleneck. This module speaks just
enough HTTP/1.1 for a ``POST`` answered with a chunked ``text/event-stream``: one keep-alive
connection per virtual user, chunked decoding, and events split on blank lines.

Two ways to drive a server: :func:`run_level` (every event is parsed as JSON, for token
counting, time to first token and inter-token latency) and :func:`count_events` (events are
only counted, for the HTTP-layer ceiling at tens of thousands of events per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DONE = b"[DONE]"


@dataclass
class StreamResult:
    """One streamed request as the client saw it."""

    ttft_s: float
    """Seconds from sending the request to the first event that carries text."""
    itl_s: list[float]
    """Gaps between consecutive text-carrying events (one token each when streamed per token)."""
    total_s: float
    content_events: int
    completion_tokens: int | None
    """The usage the server reported (``stream_options.include_usage``), if any."""


@dataclass
class LevelResult:
    """All requests of one concurrency level."""

    concurrency: int
    requests: int
    seconds: float
    results: list[StreamResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Throughput and latency percentiles (milliseconds), as written to the results."""
        tokens = sum(r.completion_tokens or r.content_events for r in self.results)
        ttfts = [r.ttft_s for r in self.results]
        itls = [gap for r in self.results for gap in r.itl_s]
        usage = {r.completion_tokens for r in self.results}
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "output_tokens": tokens,
            "tokens_per_s": round(tokens / self.seconds, 1),
            "ttft_p50_ms": round(percentile(ttfts, 0.50) * 1000, 2),
            "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1000, 2),
            "itl_p50_ms": round(percentile(itls, 0.50) * 1000, 3),
            "itl_p99_ms": round(percentile(itls, 0.99) * 1000, 3),
            "completion_tokens_seen": sorted(t for t in usage if t is not None),
        }


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile by linear interpolation (0.0 for no values)."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[
        min(998, max(0, round(share * 1000) - 1))
    ]


class SseConnection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads SSE answers."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20
            )
        return self._reader, self._writer

    async def close(self) -> None:
        """Close the socket."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def post_stream(self, path: str, body: bytes, on_chunk: Callable[[bytes], None]) -> None:
        """POST ``body`` to ``path`` and hand each decoded body chunk to ``on_chunk``.

        Raises ``RuntimeError`` for a status other than 200.
        """
        reader, writer = await self._connect()
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            payload = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers are sent
                    break
                data = await reader.readexactly(size + 2)
                if status == 200:
                    on_chunk(data[:-2])
                else:
                    payload += data[:-2]
        else:
            length = int(headers.get("content-length", "0"))
            payload = bytearray(await reader.readexactly(length))
            if status == 200 and payload:
                on_chunk(bytes(payload))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if status != 200:
            raise RuntimeError(f"POST {path}: {status} {bytes(payload[:300])!r}")


def content_of(event: dict[str, Any]) -> str | None:
    """The text an event carries: OpenAI chat/completion chunks or Fictures stream events."""
    choices = event.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        return delta.get("content") if delta is not None else choice.get("text")
    return event.get("delta")


async def stream_once(connection: SseConnection, path: str, body: bytes) -> StreamResult:
    """Send one streamed request and time its events (each parsed as JSON)."""
    started = time.perf_counter()
    stamps: list[float] = []
    usage: list[int] = []
    buffer = bytearray()
    errors: list[str] = []

    def on_chunk(data: bytes) -> None:
        now = time.perf_counter()
        buffer.extend(data)
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                return
            event = bytes(buffer[:end])
            del buffer[: end + 2]
            if not event.startswith(b"data: ") or event[6:] == DONE:
                continue
            payload = json.loads(event[6:])
            if "error" in payload:
                errors.append(str(payload["error"])[:300])
            if payload.get("usage"):
                usage.append(payload["usage"]["completion_tokens"])
            if content_of(payload):
                stamps.append(now)

    await connection.post_stream(path, body, on_chunk)
    if errors:
        raise RuntimeError(f"error event: {errors[0]}")
    if not stamps:
        raise RuntimeError("the stream carried no text")
    return StreamResult(
        ttft_s=stamps[0] - started,
        itl_s=[b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        total_s=time.perf_counter() - started,
        content_events=len(stamps),
        completion_tokens=usage[-1] if usage else None,
    )


async def run_workers(
    concurrency: int,
    requests: int,
    one: Callable[[int, Any], Awaitable[StreamResult]],
    make_state: Callable[[], Any],
    close_state: Callable[[Any], Awaitable[None]],
) -> LevelResult:
    """Run ``requests`` calls of ``one`` with ``concurrency`` workers, each keeping a state.

    Each worker sends its next request as soon as the previous one ends (closed loop), so
    exactly ``concurrency`` requests are in flight until the queue runs dry.
    """
    queue = iter(range(requests))
    results: list[StreamResult] = []

    async def worker() -> None:
        state = make_state()
        try:
            for number in queue:
                results.append(await one(number, state))
        finally:
            await close_state(state)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return LevelResult(concurrency=concurrency, requests=requests, seconds=elapsed, results=results)


async def run_level(
    url: str, path: str, bodies: list[bytes], *, concurrency: int, requests: int
) -> LevelResult:
    """Closed-loop load over HTTP: request ``i`` sends ``bodies[i % len(bodies)]``."""

    async def one(number: int, connection: SseConnection) -> StreamResult:
        return await stream_once(connection, path, bodies[number % len(bodies)])

    async def close(connection: SseConnection) -> None:
        await connection.close()

    return await run_workers(concurrency, requests, one, lambda: SseConnection(url), close)


async def count_events(
    url: str, path: str, body: bytes, *, concurrency: int, seconds: float
) -> dict[str, float]:
    """Keep ``concurrency`` streams busy for ``seconds``; count data events (not ``[DONE]``).

    Events are counted by their ``data: `` prefix without parsing, so the client stays far
    cheaper than the server.
    """
    deadline = time.perf_counter() + seconds
    counts = {"events": 0, "requests": 0}

    async def worker() -> None:
        connection = SseConnection(url)

        def on_chunk(data: bytes) -> None:
            counts["events"] += data.count(b"data: ") - data.count(b"data: [DONE]")

        try:
            while time.perf_counter() < deadline:
                await connection.post_stream(path, body, on_chunk)
                counts["requests"] += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "seconds": round(elapsed, 3),
        "requests": counts["requests"],
        "events": counts["events"],
        "events_per_s": round(counts["events"] / elapsed, 1),
    }
