"""Checking constrained output against its constraint."""

from __future__ import annotations

import pytest

from fictures_ai.engines.base import StructuredOutputKind, StructuredOutputSpec
from fictures_ai.services.text_generation import validate_structured_output

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize(
    ("spec", "text", "finish", "expected"),
    [
        (
            StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=SCHEMA),
            '{"n": 1}',
            "stop",
            ({"n": 1}, True),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=SCHEMA),
            '{"n": "x"}',
            "stop",
            ({"n": "x"}, False),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=SCHEMA),
            '{"n": 1',
            "length",
            (None, False),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.REGEX, regex=r"\d{3}"),
            "123",
            "stop",
            (None, True),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.REGEX, regex=r"\d{3}"),
            "1234",
            "stop",
            (None, False),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.CHOICE, choices=("a", "b")),
            "b",
            "stop",
            (None, True),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.CHOICE, choices=("a", "b")),
            "c",
            "stop",
            (None, False),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.GRAMMAR, grammar='root ::= "x"'),
            "x",
            "stop",
            (None, True),
        ),
        (
            StructuredOutputSpec(StructuredOutputKind.GRAMMAR, grammar='root ::= "x"'),
            "x",
            "length",
            (None, False),
        ),
    ],
)
def test_validate_structured_output(
    spec: StructuredOutputSpec, text: str, finish: str, expected: tuple[object, bool]
) -> None:
    assert validate_structured_output(spec, text, finish) == expected  # type: ignore[arg-type]
