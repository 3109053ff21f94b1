"""Property-based tests of the whole HTTP API from its own OpenAPI schema (schemathesis).

Every operation gets generated requests, valid and invalid; every answer must be a non-5xx
response that matches the schema, and requests that break the schema must be refused. Runs
in-process over the fake engines.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fictures_ai.api.app import create_app
from tests.unit.conftest import make_services
from tests.unit.fake_engines import FakeTextEngine

MAX_EXAMPLES = 30
CASES_RUN: list[str] = []

app = create_app(services=make_services(FakeTextEngine(reply="a b c d")))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_schema(case: Case) -> None:
    CASES_RUN.append(case.operation.label)
    # Schema-valid requests may still be refused for reasons a schema cannot express (a prompt
    # plus max_tokens beyond the context window is a 400); every other check applies.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
