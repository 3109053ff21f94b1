"""OpenTelemetry spans of text and image requests, recorded by the SDK's in-memory exporter."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from fictures_ai.observability.tracing import build_tracer_provider, otlp_traces_endpoint
from tests.unit.conftest import make_services
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine

IMAGE = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 2}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(
    exporter: InMemorySpanExporter, engine: FakeTextEngine, image_engine: FakeImageEngine
) -> AsyncIterator[httpx.AsyncClient]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(
        services=make_services(engine, image_engine=image_engine), tracer_provider=provider
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c
    provider.shutdown()


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def assert_children_of(root: ReadableSpan, *children: ReadableSpan) -> None:
    assert root.parent is None
    for child in children:
        assert child.parent is not None, child.name
        assert child.parent.span_id == root.context.span_id, child.name
        assert child.context.trace_id == root.context.trace_id, child.name


async def test_a_text_request_has_queue_and_generation_spans(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    response = await traced.post(
        "/api/v1/text/generate",
        json={"prompt": "x", "max_tokens": 3},
        headers={"X-Request-ID": "trace-me"},
    )
    assert response.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST /api/v1/text/generate", "queue.model_load", "text.generate"}
    root = spans["POST /api/v1/text/generate"]
    assert_children_of(root, spans["queue.model_load"], spans["text.generate"])
    assert root.kind is SpanKind.SERVER
    assert root.attributes is not None
    assert root.attributes["http.route"] == "/api/v1/text/generate"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["fictures.request_id"] == "trace-me"
    generate = spans["text.generate"]
    assert generate.attributes is not None
    assert generate.attributes["gen_ai.usage.output_tokens"] == 3
    assert generate.attributes["fictures.engine_id"] == "trace-me"

    # Once the model is loaded there is no load to wait for.
    exporter.clear()
    await traced.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    assert {span.name for span in exporter.get_finished_spans()} == {
        "POST /api/v1/text/generate",
        "text.generate",
    }


async def test_a_text_stream_span_covers_the_whole_stream(
    traced: httpx.AsyncClient,
    exporter: InMemorySpanExporter,
    engine: FakeTextEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine.token_delay = 0.01
    with caplog.at_level(logging.WARNING):
        response = await traced.post("/api/v1/text/stream", json={"prompt": "x", "max_tokens": 4})
    assert response.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    root, generate = spans["POST /api/v1/text/stream"], spans["text.generate"]
    assert_children_of(root, spans["queue.model_load"], generate)
    # The generation started in the handler and ended in the response task, inside the root.
    assert root.start_time is not None
    assert generate.start_time is not None
    assert root.end_time is not None
    assert generate.end_time is not None
    assert root.start_time <= generate.start_time
    assert generate.end_time <= root.end_time
    assert generate.end_time - generate.start_time >= 30_000_000  # four tokens of 10 ms
    # Spans are never made current across the generator's yields, so OTel has no context to
    # detach in the wrong task.
    assert not [record for record in caplog.records if record.name.startswith("opentelemetry")]


async def test_an_image_request_has_queue_render_and_encode_spans(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    response = await traced.post("/api/v1/images/generate", json=IMAGE)
    assert response.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {
        "POST /api/v1/images/generate",
        "queue.model_load",
        "queue.image_slot",
        "image.render",
        "image.encode",
    }
    root = spans.pop("POST /api/v1/images/generate")
    assert_children_of(root, *spans.values())
    order = sorted(spans.values(), key=lambda span: span.start_time or 0)
    assert [span.name for span in order] == [
        "queue.model_load",
        "queue.image_slot",
        "image.render",
        "image.encode",
    ]
    render = spans["image.render"].attributes
    assert render is not None
    assert (render["fictures.width"], render["fictures.steps"]) == (256, 2)


async def test_an_image_stream_has_the_same_spans(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    await traced.post("/api/v1/images/stream", json=IMAGE)
    spans = by_name(exporter.get_finished_spans())
    root = spans.pop("POST /api/v1/images/stream")
    assert set(spans) == {"queue.model_load", "queue.image_slot", "image.render", "image.encode"}
    assert_children_of(root, *spans.values())


async def test_a_failed_generation_marks_its_span_and_the_request(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter, engine: FakeTextEngine
) -> None:
    engine.fail_after = 1
    response = await traced.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 3})
    assert response.status_code == 500
    spans = by_name(exporter.get_finished_spans())
    assert spans["text.generate"].status.status_code is StatusCode.ERROR
    assert spans["POST /api/v1/text/generate"].status.status_code is StatusCode.ERROR


async def test_an_incoming_traceparent_is_continued(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    await traced.get("/health", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    [root] = exporter.get_finished_spans()
    assert root.name == "GET /health"
    assert root.context.trace_id == int(trace_id, 16)
    assert root.parent is not None
    assert root.parent.span_id == int(parent_id, 16)


async def test_unmatched_paths_get_a_low_cardinality_span_name(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    await traced.get("/no/such/thing/123")
    [root] = exporter.get_finished_spans()
    assert root.name == "GET unmatched"


async def test_without_a_provider_nothing_is_traced(client: httpx.AsyncClient) -> None:
    app = create_app(services=make_services())
    assert app.state.observability.tracer is None
    assert (await client.post("/api/v1/images/generate", json=IMAGE)).status_code == 200


def test_tracing_is_off_unless_an_endpoint_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert otlp_traces_endpoint(settings.otlp_endpoint) is None
    assert build_tracer_provider(settings.otlp_endpoint) is None

    configured = Settings(_env_file=None, otlp_endpoint="http://collector:4318/")  # type: ignore[call-arg]
    assert otlp_traces_endpoint(configured.otlp_endpoint) == "http://collector:4318/v1/traces"
    provider = build_tracer_provider(configured.otlp_endpoint)
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "fictures-ai"
    provider.shutdown()  # no spans: nothing is sent

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318")
    assert otlp_traces_endpoint(settings.otlp_endpoint) == "http://otel:4318"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert otlp_traces_endpoint(settings.otlp_endpoint) is None
