"""``/metrics``: HTTP, text, image, queue and engine figures over the fake engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from fictures_ai.errors import ModelLoadError
from fictures_ai.observability.metrics import (
    ITL_BUCKETS,
    VLLM_FAMILIES,
    BulkHistogram,
    RequestWindow,
)
from fictures_ai.shared import EngineStats
from tests.unit.conftest import make_services, text_of, wait_until
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine

IMAGE = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 2}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        number
        for (sample, sample_labels), number in samples(text).items()
        if sample == name and wanted <= sample_labels
    )


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.fixture
async def app_client(
    engine: FakeTextEngine, image_engine: FakeImageEngine
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(services=make_services(engine, image_engine=image_engine))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as http:
        yield app, http


async def test_a_text_request_moves_the_text_and_http_metrics(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    assert value(before, "fictures_time_to_first_token_seconds_count", model="fake-model") == 0
    response = await client.post(
        "/api/v1/text/generate", json={"prompt": "two words here", "max_tokens": 5}
    )
    assert response.status_code == 200
    after = await scrape(client)
    assert value(after, "fictures_time_to_first_token_seconds_count", model="fake-model") == 1
    # Five chunks of one token each: four gaps between them.
    assert value(after, "fictures_inter_token_latency_seconds_count", model="fake-model") == 4
    assert value(after, "fictures_generation_tokens_total", model="fake-model") == 5
    assert value(after, "fictures_prompt_tokens_total", model="fake-model") == 3
    assert value(after, "fictures_text_requests_total", finish_reason="length") == 1
    assert value(after, "fictures_queue_wait_seconds_count", engine="text") == 1
    assert (
        value(
            after,
            "fictures_http_requests_total",
            method="POST",
            route="/api/v1/text/generate",
            status="200",
        )
        == 1
    )
    assert (
        value(
            after,
            "fictures_http_request_duration_seconds_count",
            method="POST",
            route="/api/v1/text/generate",
        )
        == 1
    )


async def test_a_stream_counts_once_and_measures_the_whole_stream(
    engine: FakeTextEngine, client: httpx.AsyncClient
) -> None:
    engine.token_delay = 0.02
    await client.post("/api/v1/text/stream", json={"prompt": "x", "max_tokens": 5})
    text = await scrape(client)
    labels = {"method": "POST", "route": "/api/v1/text/stream"}
    assert value(text, "fictures_http_requests_total", status="200", **labels) == 1
    # The histogram's sum is the stream's whole duration (five tokens of 20 ms), not the
    # time to the response headers.
    assert value(text, "fictures_http_request_duration_seconds_sum", **labels) >= 0.09
    assert value(text, "fictures_time_to_first_token_seconds_count") == 1


async def test_routes_are_labelled_by_template_and_unknown_paths_by_one_label(
    client: httpx.AsyncClient,
) -> None:
    await client.get("/api/v1/does-not-exist/12345")
    await client.get("/another/unknown/path")
    await client.post("/api/v1/text/generate", json={"prompt": "", "max_tokens": 5})
    text = await scrape(client)
    assert value(text, "fictures_http_requests_total", route="unmatched", status="404") == 2
    assert "12345" not in text
    assert (
        value(text, "fictures_http_requests_total", route="/api/v1/text/generate", status="400")
        == 1
    )


async def test_an_image_request_records_render_seconds_and_queue_wait(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/api/v1/images/generate", json=IMAGE)
    assert response.status_code == 200
    text = await scrape(client)
    assert value(text, "fictures_image_render_seconds_count", model="fake-image-model") == 1
    assert value(text, "fictures_image_renders_total", outcome="ok") == 1
    assert value(text, "fictures_queue_wait_seconds_count", engine="image") == 1


async def test_gauges_show_running_and_waiting_requests_per_engine(
    engine: FakeTextEngine, image_engine: FakeImageEngine, client: httpx.AsyncClient
) -> None:
    image_engine.step_delay = 0.05
    engine.token_delay = 0.05
    renders = [
        asyncio.create_task(client.post("/api/v1/images/generate", json=IMAGE)) for _ in range(3)
    ]
    stream = asyncio.create_task(
        client.post("/api/v1/text/stream", json={"prompt": "x", "max_tokens": 8})
    )
    await wait_until(lambda: len(image_engine.calls) == 1 and len(engine.calls) == 1)
    text = await scrape(client)
    assert value(text, "fictures_requests_running", engine="image") == 1
    assert value(text, "fictures_requests_waiting", engine="image") == 2
    assert value(text, "fictures_requests_running", engine="text") == 1
    assert value(text, "fictures_engine_capacity", engine="image") == 1
    assert value(text, "fictures_engine_capacity", engine="text") == 256
    await asyncio.gather(*renders, stream)
    text = await scrape(client)
    assert value(text, "fictures_requests_running") == 0
    assert value(text, "fictures_requests_waiting") == 0


async def test_vllm_scheduler_figures_are_exported_per_text_model_under_vllms_names(
    engine: FakeTextEngine, client: httpx.AsyncClient
) -> None:
    engine.engine_stats = EngineStats(
        running=3,
        waiting=2,
        kv_cache_usage=0.25,
        prefix_cache_queries=1000,
        prefix_cache_hits=600,
        spec_decode_num_drafts=40,
        spec_decode_num_draft_tokens=160,
        spec_decode_num_accepted_tokens=70,
    )
    before = samples(await scrape(client))
    # Not loaded yet: the families are declared, with no series.
    assert not {name for name, _ in before if name.startswith("fictures_vllm_")}
    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    text = await scrape(client)
    model = {"model": "fake-model"}
    assert value(text, "fictures_vllm_num_requests_running", **model) == 3
    assert value(text, "fictures_vllm_num_requests_waiting", **model) == 2
    assert value(text, "fictures_vllm_kv_cache_usage_perc", **model) == 0.25
    assert value(text, "fictures_vllm_prefix_cache_queries_total", **model) == 1000
    assert value(text, "fictures_vllm_prefix_cache_hits_total", **model) == 600
    assert "# TYPE fictures_vllm_prefix_cache_hits_total counter" in text
    assert value(text, "fictures_vllm_spec_decode_num_drafts_total", **model) == 40
    assert value(text, "fictures_vllm_spec_decode_num_draft_tokens_total", **model) == 160
    assert value(text, "fictures_vllm_spec_decode_num_accepted_tokens_total", **model) == 70
    assert "# TYPE fictures_vllm_kv_cache_usage_perc gauge" in text
    # Only the model label, as one text engine is one vLLM engine; the image engine has none.
    vllm_series = [labels for name, labels in samples(text) if name.startswith("fictures_vllm_")]
    assert vllm_series
    assert all(labels == frozenset(model.items()) for labels in vllm_series)
    # Read again at each scrape: the figures follow the engine.
    engine.engine_stats = EngineStats(
        running=0, waiting=0, kv_cache_usage=0.0, prefix_cache_queries=1500, prefix_cache_hits=900
    )
    text = await scrape(client)
    assert value(text, "fictures_vllm_num_requests_running", **model) == 0
    assert value(text, "fictures_vllm_prefix_cache_hits_total", **model) == 900


def test_each_vllm_figure_is_named_after_vllms_own() -> None:
    for ours, theirs in VLLM_FAMILIES.items():
        assert ours == "fictures_vllm_" + theirs.removeprefix("vllm:")


async def test_engine_up_state_and_load_figures_follow_the_model() -> None:
    release = asyncio.Event()
    engine = FakeTextEngine()

    async def slow_load() -> FakeTextEngine:
        await release.wait()
        return engine

    app = create_app(services=make_services(engine, loader=slow_load))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        text = await scrape(c)
        assert value(text, "fictures_engine_up", engine="text") == 0
        assert value(text, "fictures_engine_state", engine="text", state="not_loaded") == 1
        request = asyncio.create_task(
            c.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
        )
        await wait_until(lambda: text_of(app.state.services).info().waiting_for_load == 1)
        text = await scrape(c)
        assert value(text, "fictures_requests_waiting_for_model_load", engine="text") == 1
        assert value(text, "fictures_engine_state", engine="text", state="loading") == 1
        release.set()
        assert (await request).status_code == 200
        text = await scrape(c)
        assert value(text, "fictures_engine_up", engine="text", model="fake-model") == 1
        assert value(text, "fictures_engine_state", engine="text", state="loaded") == 1
        assert value(text, "fictures_requests_waiting_for_model_load", engine="text") == 0
        assert value(text, "fictures_model_load_seconds", engine="text") >= 0


async def test_failed_loads_are_counted_and_the_state_says_failed() -> None:
    async def broken() -> FakeTextEngine:
        raise ModelLoadError("no weights", model="fake-model")

    app = create_app(services=make_services(loader=broken))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
        assert response.status_code == 503
        text = await scrape(c)
    assert value(text, "fictures_model_load_failures_total", engine="text") == 1
    assert value(text, "fictures_engine_state", engine="text", state="failed") == 1
    assert value(text, "fictures_engine_up", engine="text") == 0
    assert value(text, "fictures_http_requests_total", status="503") == 1


async def test_failed_and_rejected_generations_have_their_own_finish_reasons(
    engine: FakeTextEngine, client: httpx.AsyncClient
) -> None:
    engine.fail_after = 2
    await client.post("/api/v1/text/stream", json={"prompt": "x", "max_tokens": 5})
    engine.fail_after = None
    rejected = await client.post("/api/v1/text/generate", json={"prompt": "x " * 8192})
    assert rejected.status_code == 400  # the prompt alone fills the context
    text = await scrape(client)
    assert value(text, "fictures_text_requests_total", finish_reason="error") == 1
    assert value(text, "fictures_text_requests_total", finish_reason="rejected") == 1
    # Tokens generated before the failure still count.
    assert value(text, "fictures_generation_tokens_total") == 2


async def test_a_stream_closed_early_counts_as_aborted_with_its_tokens() -> None:
    from fictures_ai.engines.base import TextGenerationParams, TextPrompt
    from fictures_ai.observability.metrics import Metrics

    services = make_services()
    metrics = Metrics(version="test")
    text_of(services).instrument(metrics)
    stream = text_of(services).stream(TextPrompt(text="x"), TextGenerationParams(max_tokens=5))
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # what Starlette does when the client goes away
    text = metrics.exposition(None)[0].decode()
    assert value(text, "fictures_text_requests_total", finish_reason="abort") == 1
    assert value(text, "fictures_generation_tokens_total") == 2
    assert text_of(services).info().running == 0


async def test_every_app_has_its_own_registry() -> None:
    first = create_app(services=make_services())
    second = create_app(services=make_services())
    transport = httpx.ASGITransport(app=first)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        await c.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=second), base_url="http://t"
    ) as c:
        assert value(await scrape(c), "fictures_time_to_first_token_seconds_count") == 0


async def test_openmetrics_is_served_when_the_scraper_asks(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


async def test_the_build_info_names_the_version(client: httpx.AsyncClient) -> None:
    from fictures_ai import __version__

    assert value(await scrape(client), "fictures_build_info", version=__version__) == 1


def test_request_window_reports_percentiles_and_error_share() -> None:
    now = [0.0]
    window = RequestWindow(window_s=60, clock=lambda: now[0])
    assert window.summary().count == 0
    assert window.summary().latency_p50_ms is None
    for millis in range(1, 101):
        window.record(seconds=millis / 1000, error=millis > 95)
    summary = window.summary()
    assert summary.count == 100
    assert summary.latency_p50_ms == 50.0
    assert summary.latency_p95_ms == 95.0
    assert summary.error_rate == 0.05
    now[0] = 61.0  # everything has aged out
    assert window.summary().count == 0


def test_request_window_is_bounded_by_count() -> None:
    window = RequestWindow(window_s=3600, max_requests=10)
    for _ in range(25):
        window.record(seconds=0.01, error=False)
    assert window.summary().count == 10


def test_the_engine_states_in_metrics_are_the_loader_states() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    app = create_app(services=make_services(settings=settings))
    text = app.state.observability.metrics.exposition(None)[0].decode()
    states = {
        labels["state"]
        for family in text_string_to_metric_families(text)
        if family.name == "fictures_engine_state"
        for _, labels, _ in (sample[:3] for sample in family.samples)
    }
    assert states == {"not_loaded", "loading", "loaded", "unloading", "failed"}


def test_a_bulk_histogram_scrapes_like_a_histogram_fed_one_value_at_a_time() -> None:
    plain_registry, bulk_registry = CollectorRegistry(), CollectorRegistry()
    plain = Histogram(
        "gap_seconds", "Gaps.", ["model"], buckets=ITL_BUCKETS, registry=plain_registry
    )
    bulk = BulkHistogram(
        "gap_seconds", "Gaps.", ["model"], buckets=ITL_BUCKETS, registry=bulk_registry
    )
    tally = bulk.labels("m").tally()
    for gap, times in [(0.0004, 1), (0.001, 2), (0.0011, 1), (0.02, 3), (0.5, 1), (7.0, 2)]:
        tally.observe(gap, times)
        for _ in range(times):
            plain.labels("m").observe(gap)
    bulk.labels("m").add(tally)

    def scraped(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {
            key: number
            for key, number in samples(generate_latest(registry).decode()).items()
            if not key[0].endswith("_created")
        }

    assert scraped(bulk_registry) == pytest.approx(scraped(plain_registry))
    assert value(generate_latest(bulk_registry).decode(), "gap_seconds_count", model="m") == 10
