"""Killing vLLM's engine process under a running stream: a clear error, then recovery.

Runs last in the e2e session (see conftest): it kills the engine the other tests use.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from tests.e2e.conftest import RunningServer

pytestmark = pytest.mark.e2e


def engine_core(server: RunningServer) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "EngineCor" in child.name():
            return child
    pytest.fail("no vLLM engine core process under the server")


def test_killing_the_engine_mid_stream_ends_the_stream_and_the_server_recovers(
    server: RunningServer,
) -> None:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Tell a very long story."}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    with server.http.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: ") :])
            if len(events) == 5:
                engine_core(server).send_signal(signal.SIGKILL)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert "error" in final, final
    assert "engine" in final["error"]["message"].lower()

    # The dead engine shows in readiness, then the service brings a new one up by itself.
    deadline = time.monotonic() + 15
    while server.http.get(f"{server.url}/health/ready").status_code != 503:
        assert time.monotonic() < deadline, "readiness never reported the dead engine"
        time.sleep(0.2)
    started = time.monotonic()
    while server.http.get(f"{server.url}/health/ready").status_code != 200:
        assert time.monotonic() - started < 90, "the engine was not restarted"
        time.sleep(1)
    recovered = server.http.post(
        f"{server.url}/api/v1/text/generate", json={"prompt": "Hi", "max_tokens": 5}, timeout=120
    )
    assert recovered.status_code == 200, recovered.text
    assert time.monotonic() - started < 60 + 30
