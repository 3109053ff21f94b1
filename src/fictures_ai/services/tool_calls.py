"""Tool calls forced by structured output: ``tool_choice`` ``required`` or a named function.

The model is constrained, while it samples, to a JSON schema built from the tools, so forced
tool calls work with any model, the bundled one included. The schema is vLLM's
(``vllm.tool_parsers.utils.get_json_schema_from_tools``): for ``required`` an array of
``{"name": ..., "parameters": {...}}`` objects, one branch per tool; for a named function the
function's own parameters schema, so the whole output is the arguments.

The parsers here read that output as it streams and hand out OpenAI's tool-call pieces: the
``arguments`` pieces are the generated text itself, never re-serialised, so the pieces of a
stream joined equal the arguments of the same answer unstreamed.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fictures_ai.engines.base import (
    ParsedDelta,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextChunk,
    ToolCallDelta,
    ToolCallParser,
    ToolDefinition,
)

_ANY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


def new_tool_call_id() -> str:
    """A fresh tool-call id in OpenAI's form (``call_`` and 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parameters_schema(tool: ToolDefinition) -> dict[str, Any]:
    """The JSON schema of a tool's arguments; a tool without one takes any object."""
    return tool.parameters or _ANY_OBJECT


def required_tool_calls_spec(
    tools: tuple[ToolDefinition, ...], *, parallel: bool
) -> StructuredOutputSpec:
    """The constraint for ``tool_choice: "required"``: one call or more (just one when
    ``parallel`` is false), each to one of ``tools`` with arguments that follow its schema.

    A tool schema with ``$ref``s is moved under the wrapper's ``$defs`` with its own
    definitions, and its references rewritten, so that ``#`` and ``#/$defs/...`` still mean
    the tool's schema and not the wrapper around it.
    """
    definitions: dict[str, Any] = {}
    branches = []
    for index, tool in enumerate(tools):
        parameters = parameters_schema(tool)
        if _has_ref(parameters):
            parameters = _hoist(parameters, f"tool{index}", definitions)
        branches.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool.name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
            }
        )
    calls: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": branches},
    }
    if not parallel:
        calls["maxItems"] = 1
    if definitions:
        calls["$defs"] = definitions
    return StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=calls)


_DEFINITION_KEYS = ("$defs", "definitions")


def _has_ref(schema: Any) -> bool:
    if isinstance(schema, dict):
        return "$ref" in schema or any(_has_ref(value) for value in schema.values())
    if isinstance(schema, list):
        return any(_has_ref(item) for item in schema)
    return False


def _hoist(schema: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """Put ``schema`` and its definitions into ``definitions`` under ``prefix``; return a
    reference to it."""

    def rewrite(value: Any) -> Any:
        if isinstance(value, list):
            return [rewrite(item) for item in value]
        if not isinstance(value, dict):
            return value
        result = {key: rewrite(item) for key, item in value.items()}
        ref = result.get("$ref")
        if isinstance(ref, str):
            result["$ref"] = _moved_ref(ref, prefix)
        return result

    for key in _DEFINITION_KEYS:
        for name, definition in (schema.get(key) or {}).items():
            definitions[f"{prefix}__{name}"] = rewrite(definition)
    body = {key: value for key, value in schema.items() if key not in _DEFINITION_KEYS}
    definitions[prefix] = rewrite(body)
    return {"$ref": f"#/$defs/{prefix}"}


def _moved_ref(ref: str, prefix: str) -> str:
    if ref == "#":
        return f"#/$defs/{prefix}"
    for key in _DEFINITION_KEYS:
        start = f"#/{key}/"
        if ref.startswith(start):
            return f"#/$defs/{prefix}__{ref[len(start) :]}"
    if ref.startswith("#/"):
        return f"#/$defs/{prefix}/{ref[2:]}"
    return ref  # a remote reference: left for the schema check to refuse


def named_tool_call_spec(tool: ToolDefinition) -> StructuredOutputSpec:
    """The constraint for a named function: the output is its arguments."""
    return StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=parameters_schema(tool))


class NamedToolCallParser(ToolCallParser):
    """The output of a named-function request: all of it is the one call's arguments."""

    finish_reason = "stop"

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False

    def feed(self, chunk: TextChunk) -> ParsedDelta:
        """The call's header (first chunk only) and the chunk's text as arguments."""
        if self._started:
            return ParsedDelta(tool_calls=(ToolCallDelta(0, arguments=chunk.delta),))
        self._started = True
        return ParsedDelta(
            tool_calls=(
                ToolCallDelta(0, id=new_tool_call_id(), name=self._name, arguments=chunk.delta),
            )
        )


class RequiredToolCallParser(ToolCallParser):
    """Reads ``[{"name": ..., "parameters": {...}}, ...]`` as it streams.

    A character scanner tracks strings and nesting: a call starts at each object in the
    array; the ``name`` string's value names it; the raw text of the ``parameters`` value is
    handed out as it arrives. A call's header goes out once its name is complete; arguments
    seen before that wait for it.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._index = -1
        self._key: list[str] | None = None  # a key being read, in a call object
        self._last_key = ""
        self._expect_value = False
        self._value: str | None = None  # the key whose value is being read
        self._name: list[str] = []
        self._named = False
        self._waiting = ""  # arguments read before the call's name was complete

    def feed(self, chunk: TextChunk) -> ParsedDelta:
        """The tool-call pieces ``chunk`` completes."""
        pieces: list[ToolCallDelta] = []
        arguments: list[str] = []
        for char in chunk.delta:
            self._read(char, arguments, pieces)
        self._flush(arguments, pieces)
        return ParsedDelta(tool_calls=tuple(pieces))

    def _flush(self, arguments: list[str], pieces: list[ToolCallDelta]) -> None:
        if not arguments:
            return
        text = "".join(arguments)
        arguments.clear()
        if self._named:
            pieces.append(ToolCallDelta(self._index, arguments=text))
        else:
            self._waiting += text

    def _read(self, char: str, arguments: list[str], pieces: list[ToolCallDelta]) -> None:
        in_call = self._depth == 2
        if self._in_string:
            self._read_in_string(char, arguments, pieces)
            return
        if self._value is not None and in_call and char in ",}":
            self._end_value(arguments, pieces)
        elif self._value is None and self._expect_value and not char.isspace():
            self._expect_value = False
            self._value = self._last_key
        if char == '"':
            self._in_string = True
            if in_call and self._value is None and not self._expect_value:
                self._key = []
        elif char in "{[":
            self._depth += 1
            if self._depth == 2 and char == "{":
                self._start_call(arguments, pieces)
        elif char in "}]":
            self._depth -= 1
        elif char == ":" and in_call and self._value is None:
            self._expect_value = True
            return
        if self._value == "parameters":
            arguments.append(char)
        elif self._value == "name" and self._depth == 2:
            self._name.append(char)

    def _read_in_string(self, char: str, arguments: list[str], pieces: list[ToolCallDelta]) -> None:
        closing = not self._escaped and char == '"'
        self._escaped = not self._escaped and char == "\\"
        if self._key is not None:
            if closing:
                self._last_key = json.loads('"' + "".join(self._key) + '"')
                self._key = None
            else:
                self._key.append(char)
        elif self._value == "parameters":
            arguments.append(char)
        elif self._value == "name":
            self._name.append(char)
            if closing:
                self._flush(arguments, pieces)
                self._header(pieces)
        if closing:
            self._in_string = False

    def _start_call(self, arguments: list[str], pieces: list[ToolCallDelta]) -> None:
        self._flush(arguments, pieces)
        self._index += 1
        self._name, self._named, self._waiting = [], False, ""
        self._value, self._expect_value, self._key = None, False, None

    def _header(self, pieces: list[ToolCallDelta]) -> None:
        name = json.loads("".join(self._name))
        self._named = True
        pieces.append(
            ToolCallDelta(self._index, id=new_tool_call_id(), name=name, arguments=self._waiting)
        )
        self._waiting = ""

    def _end_value(self, arguments: list[str], pieces: list[ToolCallDelta]) -> None:
        self._flush(arguments, pieces)
        self._value = None


class FirstCallParser(ToolCallParser):
    """Another parser's reading with every call after the first left out
    (``parallel_tool_calls: false`` when the model writes calls on its own)."""

    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self.skip_special_tokens = parser.skip_special_tokens
        self.finish_reason = parser.finish_reason

    def feed(self, chunk: TextChunk) -> ParsedDelta:
        """The inner parser's pieces of the first call, and its content."""
        return self._first(self._parser.feed(chunk))

    def finish(self) -> ParsedDelta:
        """The inner parser's rest, first call only."""
        return self._first(self._parser.finish())

    @staticmethod
    def _first(parsed: ParsedDelta) -> ParsedDelta:
        return ParsedDelta(
            parsed.content, tuple(piece for piece in parsed.tool_calls if piece.index == 0)
        )
