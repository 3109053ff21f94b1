"""Schemas in Zod's OpenAPI 3.0 dialect become JSON Schema, once, at the edge."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from fictures_ai.api.json_schema import to_json_schema
from fictures_ai.errors import InvalidRequestError

# What zod-to-openapi writes for a comic scene: nullable fields, nested objects, arrays, enums,
# an OpenAPI 3.0 exclusive bound, no $schema.
ZOD_SCENE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "description": "The scene's title"},
        "summary": {"type": "string", "nullable": True},
        "mood": {"type": "string", "enum": ["calm", "tense", "joyful"], "nullable": True},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "panel_number": {"type": "integer", "minimum": 0, "exclusiveMinimum": True},
                    "dialogue": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "character": {"type": "string"},
                                "text": {"type": "string"},
                            },
                            "required": ["character", "text"],
                        },
                        "nullable": True,
                    },
                    "camera": {
                        "allOf": [{"$ref": "#/$defs/camera"}],
                        "nullable": True,
                    },
                },
                "required": ["panel_number", "dialogue", "camera"],
            },
        },
    },
    "required": ["title", "summary", "mood", "panels"],
    "$defs": {"camera": {"type": "string", "enum": ["wide", "close"]}},
}

SCENE = {
    "title": "The storm",
    "summary": None,
    "mood": None,
    "panels": [{"panel_number": 1, "dialogue": None, "camera": None}],
}


def test_a_zod_schema_becomes_json_schema_that_accepts_its_nulls() -> None:
    converted = to_json_schema(ZOD_SCENE, param="response_schema")

    properties = converted["properties"]
    assert properties["summary"] == {"type": ["string", "null"]}
    assert properties["mood"] == {
        "type": ["string", "null"],
        "enum": ["calm", "tense", "joyful", None],
    }
    panel = properties["panels"]["items"]["properties"]
    assert panel["panel_number"] == {"type": "integer", "exclusiveMinimum": 0}
    assert panel["dialogue"]["type"] == ["array", "null"]
    assert panel["camera"] == {"anyOf": [{"allOf": [{"$ref": "#/$defs/camera"}]}, {"type": "null"}]}
    assert "nullable" not in str(converted)
    jsonschema.validate(SCENE, converted)
    with pytest.raises(jsonschema.ValidationError):  # exclusive: 0 itself is out
        jsonschema.validate(
            {**SCENE, "panels": [{**SCENE["panels"][0], "panel_number": 0}]}, converted
        )


def test_the_input_is_not_changed() -> None:
    before = repr(ZOD_SCENE)
    to_json_schema(ZOD_SCENE, param="response_schema")
    assert repr(ZOD_SCENE) == before


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": ["string", "null"]}}},
        {"type": "integer", "exclusiveMinimum": 3},
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
        {"type": "object", "additionalProperties": {"type": "number"}},
        {"type": "string", "nullable": False},
    ],
)
def test_json_schema_comes_through_unchanged(schema: dict[str, Any]) -> None:
    expected = {key: value for key, value in schema.items() if key != "nullable"}
    assert to_json_schema(schema, param="schema") == expected


def test_nullable_in_every_place_a_schema_can_be() -> None:
    nullable = {"type": "string", "nullable": True}
    schema = {
        "type": "object",
        "additionalProperties": nullable,
        "patternProperties": {"^x": nullable},
        "anyOf": [nullable],
        "items": nullable,
        "prefixItems": [nullable],
        "not": nullable,
    }
    converted = to_json_schema(schema, param="schema")
    widened = {"type": ["string", "null"]}
    assert converted["additionalProperties"] == widened
    assert converted["patternProperties"]["^x"] == widened
    assert converted["anyOf"] == [widened]
    assert converted["items"] == widened
    assert converted["prefixItems"] == [widened]
    assert converted["not"] == widened


def test_an_invalid_schema_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        to_json_schema({"type": "object", "properties": {"a": {"type": "text"}}}, param="schema")
    assert caught.value.param == "schema"
    assert "schema is not a valid JSON schema" in caught.value.message
    assert "properties/a/type" in caught.value.message


def test_a_schema_nested_beyond_reason_is_refused_not_a_crash() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(2000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(InvalidRequestError, match="nests too deeply"):
        to_json_schema(schema, param="response_schema")
