"""Request ids, the JSON access line, and request ids on every log line of a request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from fictures_ai.engines.base import TextGenerationParams, TextPrompt
from fictures_ai.observability.context import RequestContext, bind_request, unbind_request
from fictures_ai.observability.logs import (
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure_logging,
)
from tests.unit.conftest import make_services, text_of, wait_until
from tests.unit.fake_engines import FakeTextEngine

HEX_ID = re.compile(r"[0-9a-f]{32}")
IMAGE = {"prompt": "a lighthouse", "width": 256, "height": 264, "num_inference_steps": 1}

LogLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    """The JSON lines logged (at INFO and above) while the test runs, as dicts."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    ours = logging.getLogger("fictures_ai")
    level = ours.level
    ours.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        ours.setLevel(level)


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "fictures_ai.access"]


async def test_a_text_request_writes_one_access_line_with_its_tokens(
    engine: FakeTextEngine, client: httpx.AsyncClient, log_lines: LogLines
) -> None:
    response = await client.post(
        "/api/v1/text/generate",
        json={"prompt": "a secret plot twist", "max_tokens": 3},
        headers={"X-Request-ID": "story-42.a_b-c"},
    )
    assert response.headers["X-Request-ID"] == "story-42.a_b-c"
    [line] = access_lines(log_lines())
    assert line["request_id"] == "story-42.a_b-c"
    assert line["event"] == "request"
    assert line["level"] == "INFO"
    assert (line["method"], line["route"], line["path"], line["status"]) == (
        "POST",
        "/api/v1/text/generate",
        "/api/v1/text/generate",
        200,
    )
    assert line["latency_ms"] >= 0
    assert line["client"] is None
    assert (line["prompt_tokens"], line["completion_tokens"]) == (4, 3)
    assert line["message"].startswith("POST /api/v1/text/generate 200 ")
    assert "time" in line
    # The request id is the engine's request id, so vLLM's logs and aborts line up.
    assert engine.finished == ["story-42.a_b-c"]


async def test_prompts_are_not_logged_unless_asked(
    client: httpx.AsyncClient, log_lines: LogLines
) -> None:
    await client.post("/api/v1/text/generate", json={"prompt": "a secret plot", "max_tokens": 1})
    assert "secret" not in json.dumps(log_lines())

    settings = Settings(_env_file=None, log_prompts=True)  # type: ignore[call-arg]
    app = create_app(services=make_services(settings=settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.post("/api/v1/text/generate", json={"prompt": "a secret plot", "max_tokens": 1})
    assert access_lines(log_lines())[-1]["prompt"] == "a secret plot"


async def test_an_image_request_logs_its_size(
    client: httpx.AsyncClient, log_lines: LogLines
) -> None:
    response = await client.post("/api/v1/images/generate", json=IMAGE)
    assert response.status_code == 200
    [line] = access_lines(log_lines())
    assert (line["width"], line["height"], line["status"]) == (256, 264, 200)
    assert "prompt_tokens" not in line


@pytest.mark.parametrize(
    "sent",
    [None, "", "has spaces", "semi;colon", "x" * 129, "ünïcode".encode(), "back\\slash"],
)
async def test_missing_or_odd_request_ids_are_replaced(
    client: httpx.AsyncClient, sent: str | bytes | None
) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    response = await client.get("/health", headers=headers)
    assert HEX_ID.fullmatch(response.headers["X-Request-ID"])


async def test_a_128_character_id_is_kept(client: httpx.AsyncClient) -> None:
    sent = "a" * 128
    response = await client.get("/health", headers={"X-Request-ID": sent})
    assert response.headers["X-Request-ID"] == sent


async def test_every_answer_carries_the_request_id(client: httpx.AsyncClient) -> None:
    headers = {"X-Request-ID": "rid-1"}
    answers = [
        await client.get("/nowhere", headers=headers),
        await client.post("/api/v1/text/generate", json={"prompt": ""}, headers=headers),
        await client.post("/api/v1/text/generate", json={"max_tokens": "x"}, headers=headers),
        await client.post("/api/v1/text/stream", json={"prompt": "x"}, headers=headers),
        await client.post("/api/v1/images/stream", json=IMAGE, headers=headers),
        await client.get("/metrics", headers=headers),
    ]
    assert [answer.status_code for answer in answers] == [404, 400, 422, 200, 200, 200]
    assert all(answer.headers["X-Request-ID"] == "rid-1" for answer in answers)


async def test_an_unhandled_error_still_answers_with_the_id_and_is_counted(
    log_lines: LogLines,
) -> None:
    app = create_app(services=make_services())

    async def explode() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/explode", explode)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.get("/explode", headers={"X-Request-ID": "boom-1"})
        metrics = (await c.get("/metrics")).text
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "boom-1"
    assert 'fictures_http_requests_total{method="GET",route="/explode",status="500"} 1.0' in (
        metrics
    )
    [line] = [line for line in access_lines(log_lines()) if line["route"] == "/explode"]
    assert (line["status"], line["request_id"]) == (500, "boom-1")


async def test_log_lines_emitted_while_handling_a_request_carry_its_id(
    engine: FakeTextEngine, client: httpx.AsyncClient, log_lines: LogLines
) -> None:
    engine.fail_after = 1  # the router logs the failure of the started stream
    await client.post(
        "/api/v1/text/stream", json={"prompt": "x"}, headers={"X-Request-ID": "fail-7"}
    )
    lines = log_lines()
    failure = [line for line in lines if "failed after it started" in line["message"]]
    assert failure
    assert failure[0]["request_id"] == "fail-7"
    assert "exception" in failure[0]  # the traceback, as one JSON string
    assert access_lines(lines)[0]["request_id"] == "fail-7"
    # Outside a request there is no id.
    logging.getLogger("fictures_ai.test").warning("between requests")
    assert "request_id" not in log_lines()[-1]


async def test_concurrent_requests_with_one_id_get_distinct_engine_ids(
    engine: FakeTextEngine,
) -> None:
    engine.token_delay = 0.02
    service = text_of(make_services(engine))
    prompt, params = TextPrompt(text="x"), TextGenerationParams(max_tokens=3)

    async def run() -> None:
        await service.generate(prompt, params, request_id="same")

    await asyncio.gather(run(), run())
    assert len(engine.finished) == 2
    assert len(set(engine.finished)) == 2
    assert all(engine_id.startswith("same") for engine_id in engine.finished)


async def test_the_load_runs_outside_the_first_request_context(log_lines: LogLines) -> None:
    engine = FakeTextEngine()

    async def load() -> FakeTextEngine:
        logging.getLogger("fictures_ai.test").info("loading")
        return engine

    app = create_app(services=make_services(engine, loader=load))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    loading = [line for line in log_lines() if line["message"] == "loading"]
    # The engine outlives the request; its background logs must not claim the first one.
    assert loading
    assert "request_id" not in loading[0]


def test_json_lines_hold_extra_fields_and_odd_values() -> None:
    record = logging.LogRecord("x.y", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.tokens = 5
    record.odd = object()
    token = bind_request(RequestContext(request_id="r1"))
    try:
        RequestIdFilter().filter(record)
    finally:
        unbind_request(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you"
    assert (line["level"], line["logger"], line["request_id"], line["tokens"]) == (
        "WARNING",
        "x.y",
        "r1",
        5,
    )
    assert line["odd"].startswith("<object object")
    assert line["time"].endswith("+00:00")


def test_text_lines_show_the_request_id_and_fields() -> None:
    record = logging.LogRecord("x.y", logging.INFO, __file__, 1, "GET / 200", None, None)
    record.request_id = "r2"
    record.status = 200
    text = TextFormatter().format(record)
    assert text.endswith("INFO x.y [r2]: GET / 200 status=200")
    assert not hasattr(record, "request_part")


def test_configure_logging_installs_one_json_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    # Keep pytest's own capture handlers out of harm's way; monkeypatch restores them.
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    access = logging.getLogger("uvicorn.access")
    monkeypatch.setattr(access, "level", access.level)
    stream = io.StringIO()
    configure_logging(level="INFO", log_format="json", stream=stream)
    # A logger no other test has configured (Uvicorn's own may have been, by a test server).
    logging.getLogger("configure_logging_test").info("server running")
    access.info("GET / 200")  # replaced by our access line
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (line["logger"], line["message"]) == ("configure_logging_test", "server running")
    assert len(root.handlers) == 1


async def test_streams_are_logged_when_they_end(
    engine: FakeTextEngine, client: httpx.AsyncClient, log_lines: LogLines
) -> None:
    engine.token_delay = 0.01
    task = asyncio.create_task(
        client.post("/api/v1/text/stream", json={"prompt": "x", "max_tokens": 4})
    )
    await wait_until(lambda: engine.produced_tokens >= 1)
    assert access_lines(log_lines()) == []  # not yet: the stream is still running
    await task
    [line] = access_lines(log_lines())
    assert (line["route"], line["completion_tokens"], line["latency_ms"] >= 30) == (
        "/api/v1/text/stream",
        4,
        True,
    )
