"""The Fictures web app's calls, replayed against a real server (api-contract.md, revision 2).

The session's server runs as the web app's does: ``API_KEY_STORE=fictures`` with the web app's
``users`` and ``api_keys`` tables in a real PostgreSQL. Keys are made the web app's way (bcrypt,
cost 10) and sent in ``x-api-key``, as the web app forwards its users' keys. Requests carry what
the web app sends: long prompts, ``max_tokens: 16384``, Zod's OpenAPI-3.0 schemas with
``nullable``, ``stop_sequences: []``, ``response_format: "json"``, and its image sizes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psutil
import pytest
from PIL import Image

from fictures_ai.api.auth import MISSING_KEY
from fictures_ai.api.json_schema import to_json_schema
from tests.e2e.conftest import CLI, RunningServer, start_server, stop_server
from tests.support import WEB_APP_SIZES

pytestmark = pytest.mark.e2e

TIMEOUT = httpx.Timeout(300.0, connect=5.0)
GENERATE = "/api/v1/text/generate"
STREAM = "/api/v1/text/stream"
STRUCTURED = "/api/v1/text/structured"
IMAGES = "/api/v1/images/generate"
FORBIDDEN = "Insufficient permissions. Required scope: stories:write"

# A comic-script schema as Zod writes it for OpenAPI 3.0: nested, arrays, enums, nullable, no
# $schema; bounded the way the web app bounds its fields (.max()).
COMIC_SCRIPT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scene_title": {"type": "string", "maxLength": 80},
        "panels": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "panel_number": {"type": "integer", "minimum": 1},
                    "shot_type": {
                        "type": "string",
                        "enum": ["establishing", "wide", "medium", "close_up"],
                    },
                    "description": {"type": "string", "maxLength": 160},
                    "dialogue": {
                        "type": "array",
                        "maxItems": 2,
                        "items": {
                            "type": "object",
                            "properties": {
                                "character": {"type": "string", "maxLength": 40},
                                "text": {"type": "string", "maxLength": 120},
                            },
                            "required": ["character", "text"],
                        },
                        "nullable": True,
                    },
                    "narration": {"type": "string", "maxLength": 120, "nullable": True},
                    "sfx": {"type": "string", "maxLength": 40, "nullable": True},
                },
                "required": ["panel_number", "shot_type", "description", "dialogue",
                             "narration", "sfx"],
            },
        },
    },
    "required": ["scene_title", "panels"],
}  # fmt: skip
CHARACTER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 60},
        "role": {"type": "string", "enum": ["protagonist", "antagonist", "supporting"]},
        "age": {"type": "integer", "nullable": True},
    },
    "required": ["name", "role", "age"],
}
SCENE = (
    "Mira climbs the lighthouse stairs in a storm. At the top she finds the lamp dark and her "
    "brother Tomas asleep. She wakes him and they relight the lamp as a ship's horn sounds."
)


def story_prompt(characters: int) -> str:
    """A prompt shaped like the web app's: a long instruction template, then the story so far."""
    template = (
        "You are an expert fiction writer working on a serialized story. Follow the style "
        "guide: vivid sensory detail, varied sentence length, dialogue that reveals character, "
        "no summaries of events the reader has already seen. Keep names and facts consistent "
        "with the story bible below. Write the next scene only.\n"
    ) * 12
    chapter = (
        "Chapter {n}. The wind came off the sea in long grey sheets, and Mira counted the "
        "steps as she climbed, one hundred and twelve of them, each worn smooth in the middle "
        "by a century of keepers. Tomas had promised to trim the wick at dusk. "
    )
    parts, n = [template, "\nStory so far:\n"], 1
    while sum(map(len, parts)) < characters:
        parts.append(chapter.format(n=n))
        n += 1
    return "".join(parts)[:characters]


@pytest.fixture(scope="module")
def keys(server: RunningServer) -> dict[str, tuple[str, str]]:
    """The web app's keys, by kind: (row id, key)."""
    web_app = server.web_app
    return {
        "valid": web_app.add_key(scopes=["stories:write"]),
        "expired": web_app.add_key(expires_at=datetime.now(UTC) - timedelta(hours=1)),
        "inactive": web_app.add_key(is_active=False),
        "reader": web_app.add_key(scopes=["stories:read"]),
        "revoked_later": web_app.add_key(scopes=["stories:write"]),
    }


@pytest.fixture(scope="module")
def web_app(server: RunningServer, keys: dict[str, tuple[str, str]]) -> Iterator[httpx.Client]:
    """An HTTP client that sends a valid web app key as the web app does (x-api-key)."""
    with httpx.Client(
        base_url=server.url, headers={"x-api-key": keys["valid"][1]}, timeout=TIMEOUT
    ) as client:
        yield client


def test_the_web_apps_keys_are_checked_against_its_database(
    server: RunningServer, keys: dict[str, tuple[str, str]]
) -> None:
    body = {"prompt": "Say hello.", "max_tokens": 4}

    def generate(key: str) -> httpx.Response:
        return httpx.post(f"{server.url}{GENERATE}", json=body, headers={"x-api-key": key},
                          timeout=TIMEOUT)  # fmt: skip

    valid = keys["valid"][1]
    assert generate(valid).status_code == 200
    wrong = valid[:-1] + ("A" if valid[-1] != "A" else "B")
    for key in (wrong, keys["expired"][1], keys["inactive"][1]):
        refused = generate(key)
        assert refused.status_code == 401
        assert refused.json() == {"detail": MISSING_KEY}
    reader = keys["reader"][1]
    assert generate(reader).status_code == 403
    assert generate(reader).json() == {"detail": FORBIDDEN}
    listing = httpx.get(f"{server.url}/api/v1/models", headers={"x-api-key": reader})
    assert listing.status_code == 200
    # The same keys on the OpenAI surface, in Authorization: Bearer.
    openai = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {valid}"})
    assert openai.status_code == 200


def test_a_key_made_inactive_stops_working_within_the_cache_time(
    server: RunningServer, keys: dict[str, tuple[str, str]]
) -> None:
    key_id, key = keys["revoked_later"]
    headers = {"x-api-key": key}
    assert httpx.get(f"{server.url}/api/v1/models", headers=headers).status_code == 200
    server.web_app.set_active(key_id, False)
    time.sleep(5.5)  # API_KEY_CACHE_S: 5
    assert httpx.get(f"{server.url}/api/v1/models", headers=headers).status_code == 401


def test_keys_check_says_which_store_accepts_a_key(
    server: RunningServer, keys: dict[str, tuple[str, str]]
) -> None:
    env = {**os.environ, "DATABASE_URL": server.database_url, "API_KEY_STORE": "fictures",
           "FICTURES_DATABASE_URL": server.web_app.url}  # fmt: skip
    accepted = subprocess.run([str(CLI), "keys", "check", keys["reader"][1]], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.startswith("Accepted by the fictures store")
    assert "scopes:  stories:read" in accepted.stdout
    refused = subprocess.run([str(CLI), "keys", "check", keys["expired"][1]], env=env,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert refused.returncode == 3
    assert "the key expired at" in refused.stdout
    ours = subprocess.run([str(CLI), "keys", "check", server.key], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert ours.stdout.startswith("Accepted by the local store (the server's table")


def test_a_20000_character_prompt_is_served(web_app: httpx.Client, server: RunningServer) -> None:
    prompt = story_prompt(20_000)
    response = web_app.post(
        GENERATE,
        json={"prompt": prompt, "max_tokens": 24, "temperature": 0.8, "stop_sequences": []},
        headers={"X-Request-ID": "web-app-long-prompt"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["finish_reason"] in ("stop", "length")
    access = next(
        json.loads(line)
        for line in server.log.read_text().splitlines()
        if '"request_id":"web-app-long-prompt"' in line and '"event":"request"' in line
    )
    assert access["prompt_tokens"] > 3000


def test_max_tokens_beyond_the_context_is_lowered_and_a_cut_reply_says_length(
    web_app: httpx.Client,
) -> None:
    nearly_full = "word " * 8150  # with the chat template, a few tokens short of 8192
    generated = web_app.post(GENERATE, json={"prompt": nearly_full, "max_tokens": 16_384,
                                             "temperature": 0.7})  # fmt: skip
    assert generated.status_code == 200, generated.text
    assert generated.json()["finish_reason"] in ("length", "stop")
    assert generated.json()["tokens_used"] < 40
    structured = web_app.post(
        STRUCTURED,
        json={
            "prompt": nearly_full,
            "max_tokens": 16_384,
            "guided_decoding": {"type": "json", "schema": COMIC_SCRIPT},
        },
    )
    assert structured.status_code == 200, structured.text
    body = structured.json()
    assert (body["finish_reason"], body["is_valid"], body["parsed_output"]) == (
        "length",
        False,
        None,
    )
    alone = web_app.post(GENERATE, json={"prompt": "word " * 9000, "max_tokens": 16_384})
    assert alone.status_code == 400
    assert "context is 8192 tokens" in alone.json()["detail"]


def test_structured_with_a_nested_zod_schema_and_max_tokens_16384(web_app: httpx.Client) -> None:
    response = web_app.post(
        STRUCTURED,
        json={
            "prompt": f"Turn this scene into comic panels as JSON.\n\nScene: {SCENE}",
            "max_tokens": 16_384,
            "temperature": 0.7,
            "top_p": 0.9,
            "guided_decoding": {"type": "json", "schema": COMIC_SCRIPT},
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    # Bounded fields and compact JSON: the reply ends when the object does.
    assert body["finish_reason"] == "stop"
    assert body["is_valid"] is True
    assert body["tokens_used"] < 1000
    assert "\n" not in body["output"]
    jsonschema.validate(body["parsed_output"], to_json_schema(COMIC_SCRIPT, param="schema"))


def test_generate_with_response_format_json_returns_text_that_parses(
    web_app: httpx.Client,
) -> None:
    response = web_app.post(
        GENERATE,
        json={
            "prompt": f"Describe the main character of this scene as JSON.\n\n{SCENE}",
            "max_tokens": 2048,
            "temperature": 0.7,
            "response_format": "json",
            "response_schema": CHARACTER,
            "stop_sequences": [],
        },
    )
    assert response.status_code == 200, response.text
    value = json.loads(response.json()["text"])
    jsonschema.validate(value, to_json_schema(CHARACTER, param="schema"))


def test_streams_with_an_empty_stop_list_and_min_tokens(web_app: httpx.Client) -> None:
    body = {"prompt": "Write a line of a sea shanty.", "max_tokens": 20, "min_tokens": 12,
            "stop_sequences": [], "model": "SmolLM2-135M-Instruct"}  # fmt: skip
    with web_app.stream("POST", STREAM, json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert events[-1]["done"] is True
    assert events[-1]["tokens_used"] >= 12
    assert events[-1]["text"] == "".join(event["delta"] for event in events)


def test_an_unknown_model_is_404(web_app: httpx.Client) -> None:
    text = web_app.post(GENERATE, json={"prompt": "x", "model": "qwen3-14b-awq"})
    image = web_app.post(IMAGES, json={"prompt": "x", "model": "qwen-image-lightning"})
    assert (text.status_code, image.status_code) == (404, 404)
    assert "Text models here: SmolLM2-135M-Instruct" in text.json()["detail"]
    assert "Image models here: tiny-sdxl-random" in image.json()["detail"]
    other_half = web_app.post(GENERATE, json={"prompt": "x", "model": "tiny-sdxl-random"})
    assert other_half.status_code == 404
    assert "There is no text model 'tiny-sdxl-random'" in other_half.json()["detail"]


@pytest.mark.parametrize(("width", "height"), WEB_APP_SIZES)
def test_every_image_size_the_web_app_uses_comes_back_exactly(
    web_app: httpx.Client, width: int, height: int
) -> None:
    # The web app's quick profile: distilled-model settings, no negative prompt.
    body = {"prompt": "a lighthouse in a storm, comic panel", "width": width, "height": height,
            "num_inference_steps": 3, "guidance_scale": 1}  # fmt: skip
    response = web_app.post(IMAGES, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["width"], result["height"]) == (width, height)
    data = base64.b64decode(result["image_url"].removeprefix("data:image/png;base64,"))
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (width, height)


def test_the_openai_image_api_takes_any_size_too(
    server: RunningServer, keys: dict[str, tuple[str, str]]
) -> None:
    response = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": "a ship", "size": "768x1365", "response_format": "b64_json",
              "steps": 1, "guidance_scale": 1.0},
        headers={"Authorization": f"Bearer {keys['valid'][1]}"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))) as image:
        assert image.size == (768, 1365)


def image_waiting(server: RunningServer) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    match = re.search(
        r'^fictures_requests_waiting\{engine="image",model="[^"]+"\} (\S+)$', metrics, re.M
    )
    assert match is not None
    return float(match.group(1))


def image_renders_ok(server: RunningServer) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(value)
        for value in re.findall(r'^fictures_image_renders_total\{.*outcome="ok"\} (\S+)$',
                                metrics, re.M)
    )  # fmt: skip


def test_a_client_that_gave_up_frees_its_place_in_the_image_queue(
    web_app: httpx.Client, server: RunningServer
) -> None:
    long_render = {"prompt": "a harbour", "width": 1024, "height": 1024,
                   "num_inference_steps": 6, "seed": 1}  # fmt: skip
    done: dict[str, httpx.Response] = {}
    headers = dict(web_app.headers)

    def render() -> None:  # its own connection, as another user of the web app would have
        done["first"] = httpx.post(
            f"{server.url}{IMAGES}", json=long_render, headers=headers, timeout=TIMEOUT
        )

    worker = threading.Thread(target=render)
    rendered_before = image_renders_ok(server)
    worker.start()
    time.sleep(1.0)  # the long render holds the renderer
    # A client with a short time-out, as the web app's 120 s is short against a long queue.
    with pytest.raises(httpx.ReadTimeout):
        web_app.post(IMAGES, json={**long_render, "seed": 2}, timeout=httpx.Timeout(2.0))
    deadline = time.monotonic() + 5
    while image_waiting(server) != 0:  # its place is freed at once, not when its turn comes
        assert time.monotonic() < deadline, "the abandoned request still holds its place"
        time.sleep(0.1)
    assert worker.is_alive()  # the long render is still going
    after = web_app.post(IMAGES, json={"prompt": "x", "width": 256, "height": 256,
                                       "num_inference_steps": 1})  # fmt: skip
    worker.join()
    assert done["first"].status_code == 200
    assert after.status_code == 200
    # Two renders, not three: the abandoned request never reached the pipeline.
    assert image_renders_ok(server) == rendered_before + 2


def test_an_image_only_server_never_loads_the_text_model(tmp_path: Path) -> None:
    env = {"GENERATION_MODE": "image", "REQUIRE_API_KEY": "false",
           "MODEL_CACHE_DIR": str(tmp_path / "models")}  # fmt: skip
    process, url = start_server(env, tmp_path / "server.log")
    try:
        health = httpx.get(f"{url}/health").json()
        assert health["generation_mode"] == "image"
        assert set(health["models"]) == {"image"}
        text = httpx.post(f"{url}{GENERATE}", json={"prompt": "x"})
        assert text.status_code == 404
        assert "GENERATION_MODE=image" in text.json()["detail"]
        chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "x", "messages": []})
        assert chat.json()["error"]["message"].startswith("Not Found: this server runs with")
        body = {"prompt": "x", "width": 300, "height": 300, "num_inference_steps": 1}
        image = httpx.post(f"{url}{IMAGES}", json=body, timeout=TIMEOUT)
        assert image.status_code == 200
        children = psutil.Process(process.pid).children(recursive=True)
        assert not [child for child in children if "EngineCor" in child.name()]
    finally:
        stop_server(process)
    assert "Starting vLLM" not in (tmp_path / "server.log").read_text()
