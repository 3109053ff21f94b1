"""SIGTERM: stop accepting, let in-flight requests finish up to the deadline, then stop."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import start_server

pytestmark = pytest.mark.e2e

RENDER = {"prompt": "a harbour", "width": 512, "height": 512, "seed": 1}


def start_image_server(tmp_path: Path, grace_s: int) -> tuple[subprocess.Popen[bytes], str]:
    env = {
        "REQUIRE_API_KEY": "false",
        "SHUTDOWN_GRACE_S": str(grace_s),
        "MODEL_CACHE_DIR": str(tmp_path / "models"),
    }
    process, url = start_server(env, tmp_path / "server.log")
    # Load the image model before the test proper.
    warm = httpx.post(
        f"{url}/api/v1/images/generate", json={**RENDER, "num_inference_steps": 1}, timeout=120
    )
    assert warm.status_code == 200, warm.text
    return process, url


def assert_clean_exit(process: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """Exited after its own shutdown (engines released), by the signal or with status 0.

    Uvicorn re-raises the SIGTERM it handled once shutdown is complete, so the status shows it.
    """
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Fictures AI Server stopped" in (tmp_path / "server.log").read_text()


def render_in_background(url: str, steps: int) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def render() -> None:
        try:
            result["response"] = httpx.post(
                f"{url}/api/v1/images/generate",
                json={**RENDER, "num_inference_steps": steps},
                timeout=120,
            )
        except httpx.HTTPError as exc:
            result["error"] = exc

    worker = threading.Thread(target=render)
    worker.start()
    time.sleep(1.0)  # the render is under way
    return worker, result


def test_in_flight_requests_finish_and_new_ones_are_refused(tmp_path: Path) -> None:
    process, url = start_image_server(tmp_path, grace_s=60)
    worker, result = render_in_background(url, steps=8)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
    worker.join(timeout=90)
    response = result.get("response")
    assert isinstance(response, httpx.Response), result
    assert response.status_code == 200
    assert_clean_exit(process, tmp_path)


def test_requests_past_the_deadline_are_stopped_and_the_server_exits(tmp_path: Path) -> None:
    process, url = start_image_server(tmp_path, grace_s=1)
    worker, result = render_in_background(url, steps=100)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert_clean_exit(process, tmp_path)
    assert time.monotonic() - started < 30
    worker.join(timeout=30)
    assert "error" in result or result["response"].status_code >= 500  # type: ignore[union-attr]
