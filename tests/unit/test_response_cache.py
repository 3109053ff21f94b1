"""The response cache (issue 15, item 4): exact-match answers of deterministic requests on
both surfaces, what the key covers, Cache-Control, streams, bounds and metrics."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.api.cache_control import cache_directives, cache_ticket, max_age_s
from fictures_ai.api.openai.protocol import ImageGenerationRequest
from fictures_ai.config import Settings
from fictures_ai.engines.base import (
    GeneratedImage,
    LoraAdapter,
    TextGenerationParams,
    TextPrompt,
)
from fictures_ai.errors import GenerationError
from fictures_ai.observability.metrics import Metrics
from fictures_ai.services import response_cache
from fictures_ai.services.keys.local_store import ApiKeyService
from fictures_ai.services.response_cache import (
    ENTRY_OVERHEAD_BYTES,
    CacheOutcome,
    CacheTicket,
    ResponseCache,
    access_fingerprint,
)
from tests.support import WEATHER_TOOL
from tests.unit.conftest import image_of, make_services, text_of
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine, json_events

GENERATE = "/api/v1/text/generate"
STREAM = "/api/v1/text/stream"
STRUCTURED = "/api/v1/text/structured"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
IMAGES = "/api/v1/images/generate"
IMAGE_STREAM = "/api/v1/images/stream"
OPENAI_IMAGES = "/v1/images/generations"
HEADER = "x-fictures-cache"
GREEDY = {"prompt": "Tell me a story", "temperature": 0}
CHAT_GREEDY: dict[str, Any] = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Tell me a story"}],
    "temperature": 0,
}


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg, arg-type]


@contextlib.asynccontextmanager
async def serve(
    engine: FakeTextEngine | None = None,
    image_engine: FakeImageEngine | None = None,
    **overrides: object,
) -> Any:
    services = make_services(engine, image_engine=image_engine, settings=settings(**overrides))
    app = create_app(services=services)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client


# -- both surfaces ----------------------------------------------------------------------------


async def test_fictures_text_second_identical_request_is_a_hit() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        first = await client.post(GENERATE, json=GREEDY)
        second = await client.post(GENERATE, json=GREEDY)
    assert first.headers[HEADER] == "miss"
    assert second.headers[HEADER] == "hit"
    assert second.json() == first.json()
    assert len(engine.calls) == 1


async def test_fictures_stream_hit_is_a_stream_shared_with_the_plain_answer() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        plain = await client.post(GENERATE, json=GREEDY)
        streamed = await client.post(STREAM, json=GREEDY)
    assert streamed.headers[HEADER] == "hit"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = json_events(streamed.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert isinstance(final, dict)
    assert final["done"] is True
    assert final["text"] == plain.json()["text"]
    assert len(engine.calls) == 1


async def test_fictures_stream_miss_is_stored_and_a_plain_request_hits() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        streamed = await client.post(STREAM, json=GREEDY)
        plain = await client.post(GENERATE, json=GREEDY)
    assert streamed.headers[HEADER] == "miss"
    assert plain.headers[HEADER] == "hit"
    assert plain.json()["text"] == "Once upon a time there was a brave little dragon ."
    assert len(engine.calls) == 1


async def test_structured_output_hits_with_its_parsed_value() -> None:
    engine = FakeTextEngine()
    body = {**GREEDY, "guided_decoding": {"type": "json", "schema": {"type": "object"}}}
    async with serve(engine) as client:
        first = await client.post(STRUCTURED, json=body)
        second = await client.post(STRUCTURED, json=body)
    assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "hit")
    assert second.json() == first.json()
    assert second.json()["is_valid"] is True


async def test_openai_chat_hit_is_a_well_formed_new_answer() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        first = await client.post(CHAT, json=CHAT_GREEDY)
        second = await client.post(CHAT, json=CHAT_GREEDY)
    assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "hit")
    one, two = first.json(), second.json()
    assert two["id"] != one["id"]
    assert two["choices"] == one["choices"]
    assert two["usage"] == one["usage"]  # the tokens of the answer, as first generated
    assert len(engine.calls) == 1


async def test_openai_streamed_hit_is_an_sse_stream_ending_with_done() -> None:
    engine = FakeTextEngine()
    body = {**CHAT_GREEDY, "stream": True, "stream_options": {"include_usage": True}}
    async with serve(engine) as client:
        live = await client.post(CHAT, json=body)
        cached = await client.post(CHAT, json=body)
    assert (live.headers[HEADER], cached.headers[HEADER]) == ("miss", "hit")
    live_events, cached_events = json_events(live.text), json_events(cached.text)
    assert cached_events[-1] == "[DONE]"

    def text(events: list[Any]) -> str:
        return "".join(
            choice["delta"].get("content") or ""
            for event in events
            if isinstance(event, dict)
            for choice in event["choices"]
        )

    def finish(events: list[Any]) -> list[str]:
        return [
            choice["finish_reason"]
            for event in events
            if isinstance(event, dict)
            for choice in event["choices"]
            if choice["finish_reason"]
        ]

    assert text(cached_events) == text(live_events)
    assert finish(cached_events) == finish(live_events) == ["stop"]
    assert cached_events[-2]["usage"] == live_events[-2]["usage"]  # type: ignore[index]
    assert cached_events[0]["object"] == "chat.completion.chunk"  # type: ignore[index]
    assert len(engine.calls) == 1


async def test_openai_plain_and_streamed_completions_share_an_entry() -> None:
    engine = FakeTextEngine()
    body = {"model": "fake-model", "prompt": "Once", "temperature": 0, "max_tokens": 5}
    async with serve(engine) as client:
        plain = await client.post(COMPLETIONS, json=body)
        streamed = await client.post(COMPLETIONS, json={**body, "stream": True})
    assert streamed.headers[HEADER] == "hit"
    events = json_events(streamed.text)
    joined = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict))  # type: ignore[index]
    assert joined == plain.json()["choices"][0]["text"]
    assert len(engine.calls) == 1


async def test_n_choices_with_a_seed_are_each_kept_and_all_hit() -> None:
    engine = FakeTextEngine()
    body = {**CHAT_GREEDY, "temperature": 1, "seed": 7, "n": 3}
    async with serve(engine) as client:
        first = await client.post(CHAT, json=body)
        second = await client.post(CHAT, json=body)
        wider = await client.post(CHAT, json={**body, "n": 4})
    assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "hit")
    assert len(second.json()["choices"]) == 3
    assert wider.headers[HEADER] == "miss"  # choice 4 (seed 10) was never generated
    assert [params.seed for _, params in engine.calls] == [7, 8, 9, 10]


# -- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (GENERATE, {"prompt": "Tell me a story"}),
        (CHAT, {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}),
        (CHAT, {**CHAT_GREEDY, "temperature": None}),
        (GENERATE, {"prompt": "Tell me a story", "temperature": 0.5}),
    ],
)
async def test_a_defaulted_or_nonzero_temperature_without_seed_is_not_cached(
    path: str, body: dict[str, Any]
) -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        first = await client.post(path, json=body)
        second = await client.post(path, json=body)
    assert first.headers[HEADER] == second.headers[HEADER] == "uncacheable"
    assert len(engine.calls) == 2


async def test_a_model_default_of_temperature_0_does_not_make_a_request_deterministic() -> None:
    async with serve() as client:
        app_services = client._transport.app.state.services  # type: ignore[attr-defined]
        model = app_services.models.default("text")
        model.defaults = {"temperature": 0}
        response = await client.post(GENERATE, json={"prompt": "Hi"})
    assert response.headers[HEADER] == "uncacheable"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (GENERATE, {"prompt": "Tell me a story", "seed": 3}),
        (CHAT, {**CHAT_GREEDY, "temperature": None, "seed": 3}),
    ],
)
async def test_a_seed_makes_a_sampled_request_cacheable(path: str, body: dict[str, Any]) -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        await client.post(path, json=body)
        second = await client.post(path, json=body)
        other_seed = await client.post(path, json={**body, "seed": 4})
    assert second.headers[HEADER] == "hit"
    assert other_seed.headers[HEADER] == "miss"
    assert len(engine.calls) == 2


# -- what the key covers ----------------------------------------------------------------------

CHAT_VARIANTS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Tell me a poem"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, *CHAT_GREEDY["messages"]]},
    {"top_p": 0.5},
    {"max_tokens": 4},
    {"stop": ["dragon"]},
    {"seed": 1},
    {"presence_penalty": 0.5},
    {"frequency_penalty": 0.5},
    {"logit_bias": {"5": 1.0}},
    {"logprobs": True},
    {"logprobs": True, "top_logprobs": 2},
    {"min_tokens": 2},
    {"ignore_eos": True},
    {"response_format": {"type": "json_object"}},
    {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": {"type": "object"}},
        }
    },
    {"tools": [WEATHER_TOOL], "tool_choice": "required"},
    {"tools": [WEATHER_TOOL], "tool_choice": "none"},
]


@pytest.mark.parametrize("change", CHAT_VARIANTS, ids=lambda change: ",".join(change))
async def test_every_field_that_changes_the_output_is_in_the_key(change: dict[str, Any]) -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        await client.post(CHAT, json=CHAT_GREEDY)
        response = await client.post(CHAT, json={**CHAT_GREEDY, **change})
        again = await client.post(CHAT, json={**CHAT_GREEDY, **change})
    assert response.status_code == 200, response.text
    assert response.headers[HEADER] == "miss"
    assert again.headers[HEADER] == "hit"
    assert len(engine.calls) == 2


@pytest.mark.parametrize(
    "change",
    [
        {"max_tokens": 3},
        {"top_p": 0.5},
        {"stop_sequences": ["dragon"]},
        {"response_format": "json"},
        {"response_format": "json", "response_schema": {"type": "object"}},
        {"min_tokens": 2},
        {"prompt": "Tell me a poem"},
    ],
    ids=lambda change: ",".join(change),
)
async def test_fictures_fields_are_in_the_key(change: dict[str, Any]) -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        await client.post(GENERATE, json=GREEDY)
        response = await client.post(GENERATE, json={**GREEDY, **change})
    assert response.headers[HEADER] == "miss"
    assert len(engine.calls) == 2


async def test_the_scheduling_priority_is_not_in_the_key() -> None:
    service = text_of(make_services(settings=settings()))
    prompt, params = TextPrompt(text="Hi"), TextGenerationParams(max_tokens=None, temperature=0)
    await service.generate(prompt, params, cache=_ticket())
    ticket = _ticket()
    await service.generate(prompt, TextGenerationParams(max_tokens=None, priority=1), cache=ticket)
    assert ticket.outcome is CacheOutcome.MISS  # a different temperature: a different key
    ticket = _ticket()
    batch = TextGenerationParams(max_tokens=None, temperature=0, priority=1)
    await service.generate(prompt, batch, cache=ticket)
    assert ticket.outcome is CacheOutcome.HIT


def _ticket(access: str = "all", **fields: Any) -> CacheTicket:
    return CacheTicket(access=access, deterministic=True, **fields)


async def test_a_re_registered_adapter_of_the_same_name_misses() -> None:
    engine = FakeTextEngine()
    service = text_of(make_services(engine, settings=settings()))
    for adapter_id in (1, 2):
        await engine.add_lora(LoraAdapter(name="noir", id=adapter_id, path="/a"))
    prompt = TextPrompt(text="Hi")
    first = TextGenerationParams(
        max_tokens=None, temperature=0, lora=LoraAdapter(name="noir", id=1, path="/a")
    )
    await service.generate(prompt, first, cache=_ticket())
    again = _ticket()
    await service.generate(prompt, first, cache=again)
    assert again.outcome is CacheOutcome.HIT
    renewed = TextGenerationParams(
        max_tokens=None, temperature=0, lora=LoraAdapter(name="noir", id=2, path="/a")
    )
    ticket = _ticket()
    await service.generate(prompt, renewed, cache=ticket)
    assert ticket.outcome is CacheOutcome.MISS
    base = _ticket()
    await service.generate(prompt, TextGenerationParams(max_tokens=None, temperature=0), cache=base)
    assert base.outcome is CacheOutcome.MISS
    assert len(service.response_cache) == 3
    service.forget_adapter(1)  # removed: its answers go
    assert len(service.response_cache) == 2


async def test_removing_an_adapter_drops_its_entries(tmp_path: Path) -> None:
    engine = FakeTextEngine()
    services = make_services(engine, settings=settings())
    registry = services.models
    base = registry.find("fake-model")
    base.lora_enabled = True
    await registry.register_adapter("noir", base="fake-model", lora=str(tmp_path))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(services=services)), base_url="http://t"
    ) as client:
        body = {**CHAT_GREEDY, "model": "noir"}
        await client.post(CHAT, json=body)
        assert (await client.post(CHAT, json=body)).headers[HEADER] == "hit"
        await registry.remove_adapter("noir")
        assert len(text_of(services).response_cache) == 0
        await registry.register_adapter("noir", base="fake-model", lora=str(tmp_path))
        response = await client.post(CHAT, json=body)
    assert response.headers[HEADER] == "miss"
    ids = [params.lora.id for _, params in engine.calls if params.lora is not None]
    assert len(ids) == 2
    assert ids[0] != ids[1]


async def test_keys_with_different_model_access_never_share_entries(tmp_path: Path) -> None:
    keys = ApiKeyService(database_url=f"sqlite:///{tmp_path / 'keys.db'}")
    engine = FakeTextEngine()
    try:
        _, narrow = keys.create("narrow", "stories:write", models="fake-model")
        _, narrow_too = keys.create("narrow-too", "stories:write", models="fake-model")
        _, wide = keys.create("wide", "stories:write")
        app = create_app(services=make_services(engine, api_keys=keys, settings=settings()))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:

            async def ask(key: str) -> str:
                response = await client.post(GENERATE, json=GREEDY, headers={"x-api-key": key})
                assert response.status_code == 200
                return response.headers[HEADER]

            assert await ask(narrow) == "miss"
            assert await ask(wide) == "miss"
            assert await ask(narrow_too) == "hit"  # the same allow-list
            assert await ask(wide) == "hit"
    finally:
        keys.close()
    assert len(engine.calls) == 2


def test_access_fingerprint_ignores_order_and_repeats() -> None:
    assert access_fingerprint(None) == "all"
    assert access_fingerprint(["a", "b"]) == access_fingerprint(("b", "a", "a"))
    assert access_fingerprint(["a"]) != access_fingerprint(["a", "b"])
    assert access_fingerprint([]) != "all"


async def test_a_model_reload_empties_its_cache_and_misses() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        services = client._transport.app.state.services  # type: ignore[attr-defined]
        service = text_of(services)
        await client.post(GENERATE, json=GREEDY)
        assert len(service.response_cache) == 1
        await services.models.unload("fake-model")
        assert len(service.response_cache) == 0
        assert service.response_cache.bytes_used == 0
        response = await client.post(GENERATE, json=GREEDY)
    assert response.headers[HEADER] == "miss"
    assert len(engine.calls) == 2


async def test_an_answer_finished_after_the_engine_changed_is_not_stored() -> None:
    engine = FakeTextEngine()
    service = text_of(make_services(engine, settings=settings()))
    prompt, params = TextPrompt(text="Hi"), TextGenerationParams(max_tokens=None, temperature=0)
    stream = service.stream(prompt, params, cache=_ticket())
    await anext(stream)
    service.model.generation += 1  # as a restart under the running request does
    async for _ in stream:
        pass
    assert len(service.response_cache) == 0


# -- streams that do not finish ---------------------------------------------------------------


async def test_a_stream_closed_before_its_end_is_not_stored() -> None:
    engine = FakeTextEngine()
    service = text_of(make_services(engine, settings=settings()))
    prompt, params = TextPrompt(text="Hi"), TextGenerationParams(max_tokens=None, temperature=0)
    stream = service.stream(prompt, params, cache=_ticket())
    await anext(stream)
    await stream.aclose()
    assert len(service.response_cache) == 0
    ticket = _ticket()
    await service.generate(prompt, params, cache=ticket)
    assert ticket.outcome is CacheOutcome.MISS


async def test_a_stream_that_failed_is_not_stored() -> None:
    engine = FakeTextEngine(fail_after=3)
    async with serve(engine) as client:
        body = {**CHAT_GREEDY, "stream": True}
        first = await client.post(CHAT, json=body)
        second = await client.post(CHAT, json=body)
    assert "error" in first.text
    assert second.headers[HEADER] == "miss"
    assert len(engine.calls) == 2


async def test_a_timed_out_generation_is_not_stored() -> None:
    engine = FakeTextEngine(token_delay=0.05)
    async with serve(engine, request_timeout_s=0.1) as client:
        first = await client.post(GENERATE, json=GREEDY)
        second = await client.post(GENERATE, json=GREEDY)
    assert first.status_code == second.status_code == 504
    assert len(engine.calls) == 2


async def test_a_failed_plain_generation_is_not_stored() -> None:
    engine = FakeTextEngine(fail_after=1)
    service = text_of(make_services(engine, settings=settings()))
    prompt, params = TextPrompt(text="Hi"), TextGenerationParams(max_tokens=None, temperature=0)
    with pytest.raises(GenerationError):
        await service.generate(prompt, params, cache=_ticket())
    assert len(service.response_cache) == 0


# -- Cache-Control ----------------------------------------------------------------------------


async def test_no_cache_skips_reading_but_stores() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        fresh = await client.post(GENERATE, json=GREEDY, headers={"Cache-Control": "no-cache"})
        again = await client.post(GENERATE, json=GREEDY, headers={"Cache-Control": "No-Cache"})
        cached = await client.post(GENERATE, json=GREEDY)
    assert (fresh.headers[HEADER], again.headers[HEADER]) == ("bypass", "bypass")
    assert cached.headers[HEADER] == "hit"
    assert len(engine.calls) == 2


async def test_no_store_neither_reads_nor_stores_on_both_surfaces() -> None:
    engine = FakeTextEngine()
    no_store = {"Cache-Control": "max-age=0, no-store"}
    async with serve(engine) as client:
        await client.post(CHAT, json=CHAT_GREEDY, headers=no_store)
        await client.post(GENERATE, json=GREEDY, headers=no_store)
        chat = await client.post(CHAT, json=CHAT_GREEDY)
        stream = await client.post(STREAM, json=GREEDY, headers=no_store)
        fictures = await client.post(GENERATE, json=GREEDY)
    assert chat.headers[HEADER] == "miss"
    assert stream.headers[HEADER] == "bypass"
    assert fictures.headers[HEADER] == "miss"
    assert len(engine.calls) == 5


@pytest.mark.parametrize(
    "value", ["", "=,,", 'private, max-age="x', "no-cachey", "nocache", ";no-store;"]
)
async def test_a_malformed_cache_control_is_ignored(value: str) -> None:
    async with serve() as client:
        await client.post(GENERATE, json=GREEDY)
        response = await client.post(GENERATE, json=GREEDY, headers={"Cache-Control": value})
    assert response.status_code == 200
    assert response.headers[HEADER] == "hit"


def test_cache_directives_parse_names_and_arguments() -> None:
    assert cache_directives(' No-Store , max-age="0", foo=bar,,Max-Age=9') == {
        "no-store": [None],
        "max-age": ["0", "9"],
        "foo": ["bar"],
    }
    assert cache_directives(None) == {}
    ticket = cache_ticket(None, models=None, deterministic=True)
    assert (ticket.read, ticket.write, ticket.access, ticket.max_age_s) == (True, True, "all", None)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("max-age=0", 0), ('max-age="60"', 60), ("MAX-AGE = 5", 5), ("max-age=-1", None),
     ("max-age=1.5", None), ("max-age", None), ("max-age=", None), ("max-age=\u0663", None),
     ('max-age="0', None), ('max-age=0"', None), ("max-age=100, max-age=0", 0),
     ("max-age=0, max-age=100", 0), ("max-age=abc, max-age=7", 7)],
)  # fmt: skip
def test_max_age_is_a_non_negative_integer_or_ignored(value: str, seconds: int | None) -> None:
    assert max_age_s(cache_directives(value)) == seconds


async def test_max_age_0_answers_from_the_engine_and_replaces_the_answer() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        await client.post(GENERATE, json=GREEDY)
        fresh = await client.post(GENERATE, json=GREEDY, headers={"Cache-Control": "max-age=0"})
        chat = await client.post(CHAT, json=CHAT_GREEDY, headers={"Cache-Control": "max-age=0"})
        cached = await client.post(GENERATE, json=GREEDY, headers={"Cache-Control": "max-age=60"})
        stream = await client.post(STREAM, json=GREEDY, headers={"Cache-Control": "max-age=60"})
    assert (fresh.headers[HEADER], chat.headers[HEADER]) == ("miss", "miss")
    assert "age" not in fresh.headers
    assert (cached.headers[HEADER], cached.headers["age"]) == ("hit", "0")
    assert (stream.headers[HEADER], stream.headers["age"]) == ("hit", "0")
    assert len(engine.calls) == 3


async def test_max_age_over_several_headers_counts_the_smallest() -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        await client.post(GENERATE, json=GREEDY)
        both = httpx.Headers([("Cache-Control", "max-age=100"), ("Cache-Control", "max-age=0")])
        fresh = await client.post(GENERATE, json=GREEDY, headers=both)
    assert fresh.headers[HEADER] == "miss"
    assert len(engine.calls) == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [(GENERATE, {"prompt": "x", "top_p": 0}), (GENERATE, {"prompt": "x", "temperature": 1e-6}),
     (CHAT, {**CHAT_GREEDY, "temperature": 0.7, "top_p": 0}),
     (COMPLETIONS, {"model": "fake-model", "prompt": "x", "temperature": 1e-6})],
)  # fmt: skip
async def test_greedy_by_top_p_0_or_a_tiny_temperature_is_cacheable(
    path: str, body: dict[str, Any]
) -> None:
    engine = FakeTextEngine()
    async with serve(engine) as client:
        await client.post(path, json=body)
        again = await client.post(path, json=body)
    assert again.headers[HEADER] == "hit"
    assert len(engine.calls) == 1


def test_an_answer_older_than_max_age_misses_and_a_hit_says_its_age(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(response_cache, "time", SimpleNamespace(monotonic=lambda: now[0]))
    cache: ResponseCache[bytes] = ResponseCache(max_bytes=10_000, size_of=len)
    _, key = cache.lookup(_ticket(), dict)
    assert key is not None
    cache.store(key, b"answer")
    now[0] += 30.4
    young = _ticket(max_age_s=31)
    assert cache.lookup(young, dict) == (b"answer", None)
    assert (young.outcome, int(young.age_s)) == (CacheOutcome.HIT, 30)
    old = _ticket(max_age_s=30)
    assert cache.lookup(old, dict) == (None, key)  # stale: the new answer replaces it
    assert old.outcome is CacheOutcome.MISS
    cache.store(key, b"newer")
    assert cache.lookup(_ticket(max_age_s=0), dict) == (None, key)
    assert cache.lookup(_ticket(max_age_s=0, write=False), dict) == (None, None)
    assert cache.lookup(_ticket(), dict) == (b"newer", None)


async def test_no_header_when_the_cache_is_off() -> None:
    engine = FakeTextEngine()
    async with serve(engine, response_cache_max_bytes=0) as client:
        await client.post(GENERATE, json=GREEDY)
        response = await client.post(GENERATE, json=GREEDY)
    assert HEADER not in response.headers
    assert len(engine.calls) == 2


# -- bounds, eviction, metrics ----------------------------------------------------------------


def test_the_byte_bound_evicts_the_least_recently_used_entries() -> None:
    metrics = Metrics(version="test")
    cache: ResponseCache[bytes] = ResponseCache(
        max_bytes=3 * (100 + ENTRY_OVERHEAD_BYTES), size_of=len
    )
    cache.instrument(metrics.response_cache("m", "image"))
    for key in "abc":
        cache.store(key, b"x" * 100)
    ticket = _ticket()
    assert cache.lookup(ticket, dict)[0] is None  # the key of {} is none of a, b, c
    cache._entries.move_to_end("a")  # a used: b is now the oldest
    cache.store("d", b"x" * 100)
    assert list(cache._entries) == ["c", "a", "d"]
    assert cache.bytes_used == 3 * (100 + ENTRY_OVERHEAD_BYTES)
    cache.store("big", b"x" * (3 * (100 + ENTRY_OVERHEAD_BYTES)))  # larger than the bound
    assert "big" not in cache._entries
    cache.store("e", b"x" * 250)
    assert cache.bytes_used <= 3 * (100 + ENTRY_OVERHEAD_BYTES)
    assert _sample(metrics, "fictures_response_cache_evictions_total", "m", "image") == 3.0
    assert _sample(metrics, "fictures_response_cache_bytes", "m", "image") == cache.bytes_used


async def test_a_full_cache_evicts_older_answers_over_http() -> None:
    engine = FakeTextEngine()
    async with serve(engine, response_cache_max_bytes=2 * (ENTRY_OVERHEAD_BYTES + 150)) as client:
        for prompt in ("one", "two", "three"):
            await client.post(GENERATE, json={**GREEDY, "prompt": prompt})
        oldest = await client.post(GENERATE, json={**GREEDY, "prompt": "one"})
        newest = await client.post(GENERATE, json={**GREEDY, "prompt": "three"})
    assert oldest.headers[HEADER] == "miss"
    assert newest.headers[HEADER] == "hit"


def _sample(metrics: Metrics, name: str, model: str, kind: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": model, "kind": kind})


async def test_hits_misses_and_bytes_reach_metrics() -> None:
    async with serve() as client:
        await client.post(GENERATE, json=GREEDY)
        await client.post(GENERATE, json=GREEDY)
        await client.post(CHAT, json=CHAT_GREEDY)
        await client.post(GENERATE, json={"prompt": "not deterministic"})
        await client.post(IMAGES, json={"prompt": "a fox", "seed": 5})
        exposition = (await client.get("/metrics")).text
    assert 'fictures_response_cache_hits_total{kind="text",model="fake-model"} 1.0' in exposition
    assert 'fictures_response_cache_misses_total{kind="text",model="fake-model"} 2.0' in exposition
    assert (
        'fictures_response_cache_misses_total{kind="image",model="fake-image-model"} 1.0'
        in exposition
    )
    bytes_line = next(
        line
        for line in exposition.splitlines()
        if line.startswith('fictures_response_cache_bytes{kind="text"')
    )
    assert float(bytes_line.split()[-1]) > 2 * ENTRY_OVERHEAD_BYTES


# -- images -----------------------------------------------------------------------------------


async def test_an_image_with_a_seed_is_kept_and_one_without_is_not() -> None:
    image_engine = FakeImageEngine()
    body = {"prompt": "a fox", "width": 256, "height": 256, "seed": 42}
    async with serve(image_engine=image_engine) as client:
        first = await client.post(IMAGES, json=body)
        second = await client.post(IMAGES, json=body)
        other = await client.post(IMAGES, json={**body, "guidance_scale": 3.0})
        random = await client.post(IMAGES, json={"prompt": "a fox", "width": 256, "height": 256})
        random_again = await client.post(
            IMAGES, json={"prompt": "a fox", "width": 256, "height": 256}
        )
    assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "hit")
    assert second.json() == first.json()
    assert other.headers[HEADER] == "miss"
    assert random.headers[HEADER] == random_again.headers[HEADER] == "uncacheable"
    assert len(image_engine.calls) == 4


async def test_an_image_stream_hit_is_a_stream_with_the_image() -> None:
    image_engine = FakeImageEngine()
    body = {"prompt": "a fox", "width": 256, "height": 256, "seed": 42, "num_inference_steps": 3}
    async with serve(image_engine=image_engine) as client:
        plain = await client.post(IMAGES, json=body)
        streamed = await client.post(IMAGE_STREAM, json=body)
    assert streamed.headers[HEADER] == "hit"
    events = json_events(streamed.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert isinstance(final, dict)
    assert final["done"] is True
    assert final["image_url"] == plain.json()["image_url"]
    assert len(image_engine.calls) == 1


async def test_openai_images_are_kept_one_by_one() -> None:
    image_engine = FakeImageEngine()
    body = {"prompt": "a fox", "size": "256x256", "seed": 9, "n": 2, "response_format": "b64_json"}
    async with serve(image_engine=image_engine) as client:
        first = await client.post(OPENAI_IMAGES, json=body)
        second = await client.post(OPENAI_IMAGES, json=body)
        three = await client.post(OPENAI_IMAGES, json={**body, "n": 3})
    assert (first.headers[HEADER], second.headers[HEADER]) == ("miss", "hit")
    assert second.json()["data"] == first.json()["data"]
    assert three.headers[HEADER] == "miss"  # its third image was never rendered
    assert three.json()["data"][:2] == first.json()["data"]
    assert len(image_engine.calls) == 3


async def test_image_service_keeps_the_png_it_rendered() -> None:
    service = image_of(make_services(settings=settings()))
    params = ImageGenerationRequest(prompt="a fox", size="256x256", seed=1).to_generation_params()[
        0
    ]
    first = await service.generate(params, cache=_ticket())
    ticket = _ticket()
    second = await service.generate(params, cache=ticket)
    assert ticket.outcome is CacheOutcome.HIT
    assert isinstance(second, GeneratedImage)
    assert second == first
