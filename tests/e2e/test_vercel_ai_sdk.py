"""The Vercel AI SDK, which the Fictures web app is built on, against the real server's /v1.

``tests/e2e/js`` pins ``ai`` and ``@ai-sdk/openai-compatible`` (``package-lock.json``); the
fixture installs them with ``npm ci`` from the npm registry and the test runs
``vercel_ai_sdk.mjs`` with Node. The SDK's ``generateObject`` sends a ``json_schema`` response
format: before JSON was compact, one reply in three from the small model ran on in newlines
until ``maxOutputTokens``. Tool calls go through ``streamText`` with ``toolChoice: "required"``
and ``generateText`` with a named tool.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import RunningServer

pytestmark = pytest.mark.e2e

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node() -> str:
    """Node.js, with the pinned JavaScript clients installed beside the script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js 20+ and npm are needed for the JavaScript client tests", False)
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS,
        check=True,
        timeout=600,
    )
    return node


def test_the_vercel_ai_sdk_works_unchanged(server: RunningServer, node: str) -> None:
    done = subprocess.run(
        [node, "vercel_ai_sdk.mjs", f"{server.url}/v1", server.key, "SmolLM2-135M-Instruct"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for entry in result["objects"]:
        # Each object ends when its JSON does, well before maxOutputTokens (200).
        assert entry["finishReason"] == "stop", entry
        assert entry["outputTokens"] < 200
        assert isinstance(entry["object"]["name"], str)
        assert isinstance(entry["object"]["age"], int)
    assert result["text"]
    assert result["streamed"]
    # Tool calls, forced by the tools' schemas: the bundled model calls them too.
    assert result["streamedToolFinish"] == "tool-calls"
    assert result["streamedToolCalls"]
    for call in result["streamedToolCalls"]:
        assert call["toolName"] in ("get_weather", "get_time")
        if call["toolName"] == "get_weather":
            assert isinstance(call["input"]["city"], str)
    (named,) = result["namedToolCalls"]
    assert named["toolName"] == "get_weather"
    assert isinstance(named["input"]["city"], str)
    assert result["namedFinish"] == "stop"
