"""Images through the real server process: the tiny offline pipeline, PNGs, health, CLI."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import CLI, RunningServer

pytestmark = pytest.mark.e2e

TIMEOUT = httpx.Timeout(300.0, connect=5.0)


def png_of(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))


def test_generate_returns_a_png_of_the_requested_size(server: RunningServer) -> None:
    body = {"prompt": "a lighthouse at dusk", "width": 320, "height": 256}
    body |= {"num_inference_steps": 3, "seed": 11}
    response = server.http.post(f"{server.url}/api/v1/images/generate", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"] == "tiny-sdxl-random"
    assert (result["width"], result["height"], result["seed"]) == (320, 256, 11)
    image = png_of(result["image_url"])
    assert image.format == "PNG"
    assert image.size == (320, 256)
    again = server.http.post(f"{server.url}/api/v1/images/generate", json=body, timeout=TIMEOUT)
    assert again.json()["image_url"] == result["image_url"]

    models = server.http.get(f"{server.url}/api/v1/images/models").json()["models"]
    assert models[0]["status"] == "initialized"
    assert "random weights" in models[0]["notice"]


def test_health_and_text_answer_while_a_large_image_renders(server: RunningServer) -> None:
    done: dict[str, httpx.Response] = {}

    def render() -> None:
        done["image"] = server.http.post(
            f"{server.url}/api/v1/images/generate",
            json={"prompt": "a city", "width": 1024, "height": 1024, "num_inference_steps": 3},
            timeout=TIMEOUT,
        )

    worker = threading.Thread(target=render)
    worker.start()
    time.sleep(1.5)  # the render is under way
    latencies = []
    while worker.is_alive() and len(latencies) < 5:
        started = time.perf_counter()
        assert server.http.get(f"{server.url}/health", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.2)
    text = server.http.post(
        f"{server.url}/api/v1/text/generate",
        json={"prompt": "Say hello.", "max_tokens": 8},
        timeout=TIMEOUT,
    )
    rendering_during_text = worker.is_alive()
    worker.join()
    assert latencies, "the render finished before /health was asked"
    assert max(latencies) < 1.0
    assert text.status_code == 200
    assert rendering_during_text
    assert done["image"].status_code == 200
    health = server.http.get(f"{server.url}/health").json()["models"]
    # Both models are loaded side by side; neither evicted the other.
    assert health["text"]["initialized"] is True
    assert health["image"]["initialized"] is True


def test_bad_image_requests_are_400(server: RunningServer) -> None:
    too_wide = server.http.post(
        f"{server.url}/api/v1/images/generate", json={"prompt": "x", "width": 4096}
    )
    assert too_wide.status_code == 400
    too_small = server.http.post(
        f"{server.url}/api/v1/images/generate", json={"prompt": "x", "height": 255}
    )
    assert too_small.status_code == 400
    assert "height" in too_small.json()["detail"]


def test_cli_renders_an_image_to_a_file(server: RunningServer, tmp_path: object) -> None:
    output = f"{tmp_path}/out.png"
    result = subprocess.run(
        [str(CLI), "generate", "image", "a small boat", "-o", output, "--width", "256"]
        + ["--height", "256", "--steps", "3", "--seed", "5", "--url", server.url],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "seed 5" in result.stdout
    assert "3/3" in result.stderr  # the progress bar reached the last step
    with Image.open(output) as image:
        assert image.size == (256, 256)


def batch_counts(server: RunningServer) -> tuple[float, float]:
    """(pipeline calls, images) counted by ``fictures_image_batch_size`` so far."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    calls = re.search(r"^fictures_image_batch_size_count\{[^}]*\} (\S+)$", text, re.M)
    images = re.search(r"^fictures_image_batch_size_sum\{[^}]*\} (\S+)$", text, re.M)
    assert calls
    assert images
    return float(calls.group(1)), float(images.group(1))


def test_a_burst_of_panels_shares_pipeline_calls_and_each_is_its_lone_image(
    server: RunningServer,
) -> None:
    def post(body: dict[str, object]) -> dict[str, object]:
        response = server.http.post(
            f"{server.url}/api/v1/images/generate", json=body, timeout=TIMEOUT
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    panels = [
        {"prompt": f"panel {index}: a harbour", "width": 264, "height": 256, "seed": 30 + index}
        | {"num_inference_steps": 3, "guidance_scale": 1.0}
        for index in range(4)
    ]
    calls, images = batch_counts(server)
    with ThreadPoolExecutor(max_workers=5) as pool:
        holder = pool.submit(post, {"prompt": "a harbour", "width": 512, "height": 512})
        time.sleep(1.0)  # the holder renders; the panels queue behind it
        burst = list(pool.map(post, panels))
        holder.result()
    after_calls, after_images = batch_counts(server)
    assert after_images - images == 5
    assert after_calls - calls == 2  # the holder alone, then the four panels in one call
    for body, batched in zip(panels, burst, strict=True):
        alone = post(body)
        one = png_of(str(batched["image_url"])).convert("RGB").tobytes()
        two = png_of(str(alone["image_url"])).convert("RGB").tobytes()
        assert batched["seed"] == body["seed"]
        assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1
