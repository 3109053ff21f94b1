"""Metrics, request ids, probes and the JSON access log of the real server."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import RunningServer

pytestmark = pytest.mark.e2e

TIMEOUT = httpx.Timeout(300.0, connect=5.0)


def metric_total(server: RunningServer, sample_name: str) -> float:
    """The sum of every sample called ``sample_name`` in ``/metrics`` (all label sets)."""
    text = server.http.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name
    )


def test_a_text_stream_moves_the_time_to_first_token_histogram(server: RunningServer) -> None:
    ttft_before = metric_total(server, "fictures_time_to_first_token_seconds_count")
    tokens_before = metric_total(server, "fictures_generation_tokens_total")
    with server.http.stream(
        "POST",
        f"{server.url}/api/v1/text/stream",
        json={"prompt": "Name a colour.", "max_tokens": 8},
        headers={"X-Request-ID": "e2e-observability-1"},
        timeout=TIMEOUT,
    ) as response:
        assert response.status_code == 200
        assert response.headers["X-Request-ID"] == "e2e-observability-1"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    completion_tokens = json.loads(events[-2][len("data: ") :])["tokens_used"]

    assert metric_total(server, "fictures_time_to_first_token_seconds_count") == ttft_before + 1
    assert (
        metric_total(server, "fictures_generation_tokens_total")
        == tokens_before + completion_tokens
    )
    assert metric_total(server, "fictures_engine_up") >= 1  # the text engine at least

    # The access line is written when the stream has ended: one JSON object, with the tokens.
    line = _access_line(server, "e2e-observability-1")
    assert line["route"] == "/api/v1/text/stream"
    assert line["status"] == 200
    assert line["completion_tokens"] == completion_tokens
    assert line["prompt_tokens"] > 0
    assert "Name a colour" not in json.dumps(line)  # prompts are not logged by default


def test_probes_answer(server: RunningServer) -> None:
    live = server.http.get(f"{server.url}/health/live", timeout=5)
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    ready = server.http.get(f"{server.url}/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    # By model name; loaded by the text tests.
    assert ready.json()["models"]["SmolLM2-135M-Instruct"]["state"] == "loaded"
    health = server.http.get(f"{server.url}/health", timeout=5).json()
    assert health["requests"]["count"] >= 1
    assert health["gpu"] is None  # the CPU machine


def _access_line(server: RunningServer, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for text in server.log.read_text(errors="replace").splitlines():
            if not text.startswith("{"):
                continue  # vLLM's engine processes print in their own format
            line = json.loads(text)
            if line.get("logger") == "fictures_ai.access" and line.get("request_id") == request_id:
                return dict(line)
        time.sleep(0.1)
    pytest.fail(f"no access line for {request_id}")
