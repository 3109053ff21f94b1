"""``MODELS_FILE=deploy/models.example.yaml``: a real ``fictures-ai serve`` process with two text
models, a text LoRA adapter and two image models, driven with the ``openai`` SDK, httpx and the
``fictures-ai models`` CLI, as the README shows."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from fictures_ai.services.models.memory import process_tree_rss
from tests.e2e.conftest import CLI, create_key, start_server, stop_server

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).parents[2] / "deploy" / "models.example.yaml"


@dataclass(frozen=True)
class ModelsServer:
    url: str
    log: Path
    process: subprocess.Popen[bytes]
    key: str
    admin_key: str

    def cli(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FICTURES_API_KEY": key or self.admin_key}
        return subprocess.run(
            [str(CLI), "models", *args, "--url", self.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )


@pytest.fixture(scope="module")
def models_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelsServer]:
    folder = tmp_path_factory.mktemp("models-server")
    database_url = f"sqlite:///{folder / 'keys.db'}"
    key = create_key(database_url, "writer", "stories:write", web_app=False)
    admin_key = create_key(database_url, "admin", "admin:all", web_app=False)
    log = folder / "server.log"
    process, url = start_server(
        {"MODELS_FILE": str(EXAMPLE), "DATABASE_URL": database_url, "REQUIRE_API_KEY": "true"},
        log,
    )
    yield ModelsServer(url=url, log=log, process=process, key=key, admin_key=admin_key)
    stop_server(process)


def sdk(server: ModelsServer) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=server.key, base_url=f"{server.url}/v1", max_retries=0, timeout=600
    )


def test_every_declared_model_is_listed_with_its_state(models_server: ModelsServer) -> None:
    client = sdk(models_server)
    models = client.models.list().data
    assert [model.id for model in models] == [
        "writer", "writer-brisk", "editor", "sketch", "sketch-ink", "sd15-sketch"
    ]  # fmt: skip
    brisk = client.models.retrieve("writer-brisk")
    assert brisk.model_extra is not None
    assert brisk.model_extra["parent"] == "writer"
    # An alias resolves to its model.
    assert client.models.retrieve("story-model").id == "writer"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_two_text_models_and_an_adapter_answer_by_name(models_server: ModelsServer) -> None:
    client = sdk(models_server)
    answers = {}
    for model in ("writer", "editor", "writer-brisk"):
        completion = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=12,
            temperature=0,
        )
        assert completion.model == model
        answers[model] = completion.choices[0].message.content
    assert answers["writer-brisk"] != answers["writer"]
    fictures = httpx.post(
        f"{models_server.url}/api/v1/text/generate",
        json={
            "prompt": "Name a colour.",
            "model": "story-model",
            "max_tokens": 12,
            "temperature": 0,
        },
        headers={"Authorization": f"Bearer {models_server.key}"},
        timeout=600,
    )
    assert fictures.json()["model"] == "writer"
    assert fictures.json()["text"] == answers["writer"]
    unknown = httpx.post(
        f"{models_server.url}/api/v1/text/generate",
        json={"prompt": "x", "model": "nope"},
        headers={"Authorization": f"Bearer {models_server.key}"},
    )
    assert unknown.status_code == 404


def test_two_image_models_answer_by_name(models_server: ModelsServer) -> None:
    client = sdk(models_server)
    images = {}
    for model in ("sketch", "sd15-sketch", "sketch-ink"):
        result = client.images.generate(
            model=model,
            prompt="a lighthouse",
            size="256x256",
            response_format="b64_json",
            extra_body={"seed": 5},
        )
        images[model] = base64.b64decode(result.data[0].b64_json or "")
    assert len(set(images.values())) == 3


def test_the_cli_lists_unloads_and_loads_and_memory_comes_back(
    models_server: ModelsServer,
) -> None:
    listing = models_server.cli("list", key=models_server.key)
    assert listing.returncode == 0, listing.stderr
    assert "writer *" in listing.stdout
    assert "writer-brisk" in listing.stdout
    refused = models_server.cli("unload", "editor", key=models_server.key)
    assert refused.returncode == 1
    assert "error 403" in refused.stderr
    # The editor's engine is loaded (the text test used it): unloading ends its process.
    server = psutil.Process(models_server.process.pid)
    before = process_tree_rss(server)
    unloaded = models_server.cli("unload", "editor")
    assert unloaded.returncode == 0, unloaded.stderr
    assert "not_loaded" in unloaded.stdout
    after = process_tree_rss(server)
    assert after < before - 500 * 2**20, (before, after)
    loaded = models_server.cli("load", "editor")
    assert loaded.returncode == 0, loaded.stderr
    assert " loaded " in loaded.stdout
    assert "GiB" in loaded.stdout
