"""Schemathesis against the real server on the real engines (vLLM on the bundled model, the tiny
diffusers pipeline): the values at and past the edge of every field reach what the engines
refuse, and no answer may be a 5xx.

``tests/unit/test_openapi_fuzz.py`` runs many more cases over the fake engines; this run is
bounded. The server's context is 256 tokens, so no generation runs long. Image renders cost
seconds per step at large sizes on the CPU, so valid or absent image sizes, steps and counts
are made cheap (256x256, at most 2 steps and 2 images) before a request is sent; invalid values
are sent as generated.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fictures_ai.api.app import create_app
from tests.e2e.conftest import start_server, stop_server
from tests.unit.conftest import make_services
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 2
CASES_RUN: list[str] = []
# field: (lowest valid, highest valid, what a valid value is lowered to)
CHEAP_IMAGE = {"steps": (1, 100, 2), "num_inference_steps": (1, 100, 2), "n": (1, 10, 2)}
"""Per field: the lowest and highest valid value, and what a valid (or absent) one becomes."""
_SIZE = re.compile(r"^\d+x\d+$")


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``fictures-ai serve`` on the real engines, models loaded; its URL."""
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    env = {
        "TEXT_MAX_MODEL_LEN": "256",
        "TEXT_CPU_KV_CACHE_MB": "128",
        "REQUIRE_API_KEY": "false",
        "PRELOAD_MODELS": "true",
    }
    process, url = start_server(env, log)
    try:
        deadline = time.monotonic() + 600
        while httpx.get(f"{url}/health/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                pytest.fail(f"models did not load:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        stop_server(process)


# The server's schema is the app's own (the routes do not depend on the engines behind them).
schema = schemathesis.openapi.from_dict(
    create_app(services=make_services(FakeTextEngine(), image_engine=FakeImageEngine())).openapi()
)


def _cheapen(case: Case) -> None:
    """Make a valid image request cheap to render; leave every other request as generated."""
    body = case.body
    if not isinstance(body, dict) or "images" not in case.operation.path:
        return
    openai = case.operation.path.startswith("/v1/")
    steps = "steps" if openai else "num_inference_steps"
    sides = ("size",) if openai else ("width", "height")
    for key, (low, high, cheap) in CHEAP_IMAGE.items():
        value = body.get(key)
        if value is None and key in (steps, "n"):
            body[key] = 1 if key == "n" else cheap  # the defaults (30 steps) cost seconds
        elif isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            body[key] = min(value, cheap)
    for key in sides:
        value = body.get(key)
        if key == "size" and (value is None or (isinstance(value, str) and _SIZE.match(value))):
            body[key] = "256x256" if value is None or _valid_size(value) else value
        elif value is None or (
            isinstance(value, int) and not isinstance(value, bool) and 256 <= value <= 2048
        ):
            body[key] = 256


def _valid_size(size: str) -> bool:
    return all(256 <= int(side) <= 2048 for side in size.split("x"))


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_value_reaches_an_engine_as_a_server_error(case: Case, real_server: str) -> None:
    CASES_RUN.append(case.operation.label)
    _cheapen(case)
    case.call_and_validate(
        base_url=real_server, excluded_checks=[positive_data_acceptance], timeout=300
    )
