"""JSON schemas from clients, in the one dialect the engine and the validator take.

Clients send schemas in two dialects. OpenAI's API (and the Vercel AI SDK) send JSON Schema.
The Fictures web app sends schemas that Zod produces for OpenAPI 3.0, whose Schema Object
differs from JSON Schema in two keywords (OpenAPI 3.0.3, "Schema Object"; JSON Schema 2020-12,
"Validation" 6.1.1 and 6.2.3/6.2.5):

- ``nullable: true`` allows ``null`` besides the schema's type (JSON Schema: ``"type":
  [..., "null"]``); structured-output engines and validators ignore the unknown keyword, so
  without conversion a nullable field could never be null;
- ``exclusiveMinimum: true`` / ``exclusiveMaximum: true`` are flags on ``minimum`` /
  ``maximum`` (JSON Schema: numbers that replace them).

:func:`to_json_schema` converts both dialects into JSON Schema (a JSON Schema comes through
unchanged) and checks the result, once, at the edge; both surfaces use it.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from fictures_ai.errors import InvalidRequestError

# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SCHEMA_KEYWORDS = ("additionalProperties", "items", "not", "if", "then", "else", "contains")
_SCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions")


def to_json_schema(
    schema: dict[str, Any], *, param: str, subject: str | None = None
) -> dict[str, Any]:
    """``schema`` (JSON Schema or OpenAPI 3.0's dialect) as JSON Schema 2020-12.

    Returns a new dict; the input is not changed. Raises ``InvalidRequestError`` naming
    ``param`` (and ``subject``, what the schema belongs to, such as a tool) when the result is
    not a valid JSON Schema.
    """
    named = f"{param} ({subject})" if subject else param
    try:
        converted: dict[str, Any] = _convert(schema)
        jsonschema.Draft202012Validator.check_schema(converted)
    except RecursionError:
        raise InvalidRequestError(
            f"{named} nests too deeply to be used as a JSON schema.", param=param
        ) from None
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise InvalidRequestError(
            f"{named} is not a valid JSON schema: {exc.message}"
            + (f" (at {where})" if where else ""),
            param=param,
        ) from None
    return converted


def _convert(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema  # true/false schemas, and invalid values check_schema reports
    result = {key: value for key, value in schema.items() if key != "nullable"}
    for key in _SCHEMA_KEYWORDS:
        if key in result:
            result[key] = _convert(result[key])
    for key in _SCHEMA_LIST_KEYWORDS:
        if isinstance(result.get(key), list):
            result[key] = [_convert(item) for item in result[key]]
    for key in _SCHEMA_MAP_KEYWORDS:
        if isinstance(result.get(key), dict):
            result[key] = {name: _convert(item) for name, item in result[key].items()}
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # A true flag turns its bound into the exclusive bound; a false one just goes.
        if isinstance(result.get(flag), bool) and result.pop(flag) and bound in result:
            result[flag] = result.pop(bound)
    if schema.get("nullable") is True:
        result = _allow_null(result)
    return result


def _allow_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` that also accepts ``null``."""
    if isinstance(schema.get("enum"), list) and None not in schema["enum"]:
        schema["enum"] = [*schema["enum"], None]
    kind = schema.get("type")
    if isinstance(kind, str):
        schema["type"] = [kind, "null"] if kind != "null" else kind
        return schema
    if isinstance(kind, list):
        schema["type"] = kind if "null" in kind else [*kind, "null"]
        return schema
    if "enum" in schema:
        return schema
    # No type to widen (anyOf, allOf, $ref, ...): null or the schema as it was.
    return {"anyOf": [schema, {"type": "null"}]}
