"""Tool calling on ``/v1/chat/completions`` over the fake engine, driven by the ``openai`` SDK,
and the parser that reads forced tool calls as they stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.engines.base import TextChunk, ToolCallDelta, ToolDefinition
from fictures_ai.services.tool_calls import (
    NamedToolCallParser,
    RequiredToolCallParser,
    required_tool_calls_spec,
)
from tests.support import WEATHER_TOOL
from tests.unit.conftest import make_services
from tests.unit.fake_engines import FakeTextEngine

TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CALLS = (
    '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
    '{"name": "get_time", "parameters": {}}]'
)


@pytest.fixture
async def sdk(engine: FakeTextEngine) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(services=make_services(engine))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
    async with openai.AsyncOpenAI(
        api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def http(engine: FakeTextEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services=make_services(engine))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client


def chunks_of(text: str, size: int) -> list[TextChunk]:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    return [
        TextChunk(
            delta=piece,
            prompt_tokens=1,
            completion_tokens=n + 1,
            finish_reason="stop" if n == len(pieces) - 1 else None,
        )
        for n, piece in enumerate(pieces)
    ]


def joined(pieces: list[ToolCallDelta]) -> list[tuple[str | None, str]]:
    calls: list[list[Any]] = []
    for piece in pieces:
        if piece.name is not None:
            assert piece.index == len(calls)
            assert piece.id
            calls.append([piece.name, ""])
        calls[piece.index][1] += piece.arguments
    return [(name, arguments) for name, arguments in calls]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_required_parser_reads_calls_split_anywhere(size: int) -> None:
    text = (
        '[{"name":"get_weather","parameters":{"city":"Pa\\"ris}","tags":["a",{"b":1}]}},'
        ' {"parameters": {"x": 1.5}, "name": "get_time"}]'
    )
    parser = RequiredToolCallParser()
    pieces = [piece for chunk in chunks_of(text, size) for piece in parser.feed(chunk).tool_calls]

    assert joined(pieces) == [
        ("get_weather", '{"city":"Pa\\"ris}","tags":["a",{"b":1}]}'),
        ("get_time", '{"x": 1.5}'),
    ]
    assert json.loads(joined(pieces)[0][1]) == {"city": 'Pa"ris}', "tags": ["a", {"b": 1}]}


def test_named_parser_hands_out_all_text_as_arguments() -> None:
    parser = NamedToolCallParser("get_weather")
    pieces = [
        p for chunk in chunks_of('{"city": "Oslo"}', 4) for p in parser.feed(chunk).tool_calls
    ]
    assert joined(pieces) == [("get_weather", '{"city": "Oslo"}')]


def test_required_schema_allows_one_call_without_parallel_calls() -> None:
    tools = (ToolDefinition("a"), ToolDefinition("b", parameters={"type": "object"}))
    schema = required_tool_calls_spec(tools, parallel=False).json_schema or {}
    assert schema["minItems"] == 1
    assert schema["maxItems"] == 1
    branches = schema["items"]["anyOf"]
    assert [b["properties"]["name"]["enum"] for b in branches] == [["a"], ["b"]]
    assert branches[0]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert "maxItems" not in (required_tool_calls_spec(tools, parallel=True).json_schema or {})


async def test_required_tool_choice_answers_tool_calls(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    engine.json_reply = CALLS
    completion = await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=[WEATHER_TOOL, TIME],  # type: ignore[list-item]
        tool_choice="required",
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert all(c.id.startswith("call_") for c in calls)
    prompt, params = engine.calls[-1]
    assert [tool.name for tool in prompt.tools] == ["get_weather", "get_time"]
    assert params.structured is not None
    assert (params.structured.json_schema or {})["type"] == "array"


async def test_streamed_tool_calls_join_to_the_unstreamed_ones(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    engine.json_reply = CALLS
    request: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER_TOOL, TIME],
        "tool_choice": "required",
    }
    whole = await sdk.chat.completions.create(**request)
    stream = await sdk.chat.completions.create(**request, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index not in calls  # id, type and name come first, once
                assert delta.type == "function"
                assert delta.function
                assert delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += (delta.function and delta.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish

    assert finish == "tool_calls"
    expected = whole.choices[0].message.tool_calls or []
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments)  # type: ignore[union-attr]
        for c in expected
    ]


async def test_named_tool_choice_calls_that_function_and_stops(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    engine.json_reply = '{"city": "Lima"}'
    completion = await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Weather in Lima?"}],
        tools=[WEATHER_TOOL, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI answers a named function
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Lima"}'  # type: ignore[union-attr]
    schema = engine.calls[-1][1].structured.json_schema  # type: ignore[union-attr]
    assert schema == WEATHER_TOOL["function"]["parameters"]  # type: ignore[index]


async def test_auto_without_a_parser_is_a_400_naming_the_setting(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER_TOOL],
        },
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "TEXT_TOOL_CALL_PARSER" in error["message"]
    assert error["param"] == "tool_choice"
    assert error["type"] == "invalid_request_error"


async def test_tool_choice_none_without_tools_is_plain_chat(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    completion = await sdk.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Hi"}], tool_choice="none"
    )
    assert completion.choices[0].message.content == engine.reply
    assert completion.choices[0].message.tool_calls is None


async def test_tool_history_reaches_the_chat_template(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    await sdk.chat.completions.create(
        model="fake-model",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
    )
    prompt, params = engine.calls[-1]
    assert params.structured is None
    assert prompt.messages is not None
    assistant, tool = prompt.messages[1], prompt.messages[2]
    assert assistant.content == ""
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}')
    ]
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", "Sunny, 21 C")


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tool_choice": "required"}, None, "needs tools"),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            None,
            "'nope', which is not in tools",
        ),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL], "tool_choice": "required"}, None, "twice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "bad",
                            "parameters": {"type": "object", "required": "city"},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
            "tool 'bad'",
        ),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            None,
            "not both",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, None, "tool_call_id"),
        ({"functions": [{"name": "f"}]}, None, "send tools and tool_choice"),
    ],
)
async def test_inconsistent_tool_requests_are_400s(
    http: httpx.AsyncClient, extra: dict[str, Any], param: str | None, words: str
) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], **extra}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(("parallel", "calls"), [(True, 2), (False, 1)])
async def test_auto_reads_the_calls_the_model_writes(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine, parallel: bool, calls: int
) -> None:
    engine.writes_tool_calls = True
    engine.reply = CALLS
    completion = await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Weather and time?"}],
        tools=[WEATHER_TOOL, TIME],  # type: ignore[list-item]
        parallel_tool_calls=parallel,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls or []) == calls
    assert engine.calls[-1][1].structured is None  # auto: the model is not constrained


def test_references_in_a_tool_schema_keep_meaning_the_tool_schema() -> None:
    # "#" and "#/$defs/..." in a tool's parameters must not point at the wrapper around them.
    tree = {
        "type": "object",
        "properties": {"label": {"$ref": "#/$defs/label"}, "child": {"$ref": "#"}},
        "$defs": {"label": {"type": "string", "maxLength": 5}},
    }
    schema = required_tool_calls_spec((ToolDefinition("tree", parameters=tree),), parallel=True)
    validator = jsonschema.Draft202012Validator(schema.json_schema or {})
    good = [{"name": "tree", "parameters": {"label": "a", "child": {"child": {"label": "b"}}}}]
    assert validator.is_valid(good)
    assert not validator.is_valid([{"name": "tree", "parameters": {"child": [{"name": "x"}]}}])
    assert not validator.is_valid([{"name": "tree", "parameters": {"label": "far too long"}}])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required", "stop": ["city"]}, "stop"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "a", "parameters": {"type": "array"}}}
                ]
            },
            "tools[0].function.parameters",
        ),
    ],
)
async def test_tool_refusals_name_the_parameter(
    http: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [WEATHER_TOOL],
        **extra,
    }
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
