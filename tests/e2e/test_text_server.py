"""The real server process with the real model, through httpx and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import CLI, RunningServer

pytestmark = pytest.mark.e2e

TIMEOUT = httpx.Timeout(300.0, connect=5.0)


def test_first_request_loads_the_model_while_health_answers_at_once(
    server: RunningServer,
) -> None:
    health = server.http.get(f"{server.url}/health").json()
    assert health["models"]["text"]["initialized"] is False

    result: dict[str, httpx.Response] = {}

    def generate() -> None:
        result["response"] = server.http.post(
            f"{server.url}/api/v1/text/generate",
            json={"prompt": "Write two sentences about a lighthouse keeper.", "max_tokens": 60},
            timeout=TIMEOUT,
        )

    worker = threading.Thread(target=generate)
    worker.start()
    time.sleep(1.0)  # the load is under way
    started = time.perf_counter()
    during = server.http.get(f"{server.url}/health", timeout=5)
    # Quiet machine: 46 ms median, one stall of ~0.7 s while vLLM's engine starts (2026-11-30,
    # the same before and after the jobs work); a loaded CI machine stretched it to 1.09 s.
    assert time.perf_counter() - started < 2.0
    assert during.status_code == 200
    if worker.is_alive():
        assert during.json()["models"]["text"]["initialized"] is False
    worker.join()

    response = result["response"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["finish_reason"] in ("stop", "length")
    assert 0 < body["tokens_used"] <= 60
    words = re.findall(r"[A-Za-z]+", body["text"])
    assert len(words) >= 5
    assert server.http.get(f"{server.url}/health").json()["models"]["text"]["initialized"] is True


def test_stream_arrives_token_by_token(server: RunningServer) -> None:
    events = []
    with server.http.stream(
        "POST",
        f"{server.url}/api/v1/text/stream",
        json={"prompt": "Describe a castle at night.", "max_tokens": 30},
        timeout=TIMEOUT,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    data = [json.loads(event) for event in events[:-1]]
    assert len(data) > 5
    assert data[-1]["done"] is True
    assert data[-1]["finish_reason"] in ("stop", "length")
    assert "".join(event["delta"] for event in data) == data[-1]["text"]
    assert data[-1]["tokens_used"] <= 30


def test_structured_json_output_is_valid(server: RunningServer) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "chapters": {"type": "integer"}},
        "required": ["title", "chapters"],
    }
    response = server.http.post(
        f"{server.url}/api/v1/text/structured",
        json={
            "prompt": "Propose a novel: its title and number of chapters, as JSON.",
            "max_tokens": 80,
            "guided_decoding": {"type": "json", "schema": schema},
        },
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["is_valid"] is True
    assert set(body["parsed_output"]) >= {"title", "chapters"}


def test_bad_requests_get_their_status_codes(server: RunningServer) -> None:
    too_long = server.http.post(
        f"{server.url}/api/v1/text/generate", json={"prompt": "a" * 50_001}, timeout=TIMEOUT
    )
    assert too_long.status_code == 400
    assert too_long.json() == {"detail": "Prompt too long (max 50000 characters)"}
    over_context = server.http.post(
        f"{server.url}/api/v1/text/generate",
        json={"prompt": "word " * 9000, "max_tokens": 8000},
        timeout=TIMEOUT,
    )
    assert over_context.status_code == 400
    detail = over_context.json()["detail"]
    assert "context is 8192 tokens" in detail
    assert "The prompt has 90" in detail  # 9000 words and the chat template
    malformed = server.http.post(
        f"{server.url}/api/v1/text/generate", json={"prompt": 3}, timeout=TIMEOUT
    )
    assert malformed.status_code == 422


def test_cli_generates_text_against_the_server(server: RunningServer) -> None:
    plain = subprocess.run(
        [str(CLI), "generate", "text", "Name a color.", "--max-tokens", "10", "--url", server.url],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert re.search(r"[A-Za-z]", plain.stdout)
    streamed = subprocess.run(
        [str(CLI), "generate", "text", "Name a fruit.", "--stream", "--max-tokens", "10"]
        + ["--url", server.url],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert re.search(r"[A-Za-z]", streamed.stdout)
