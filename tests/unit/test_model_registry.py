"""The model registry over fake engines: the models file, routing by ``model`` on both
surfaces, listings, admin load/unload and adapters, the memory budget and ``keep_alive_s``."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fictures_ai.api.app import build_services, create_app
from fictures_ai.api.dependencies import Services
from fictures_ai.cli import main
from fictures_ai.config import Settings
from fictures_ai.engines.options import DiffusersEngineOptions, VllmEngineOptions
from fictures_ai.services import engine_factory
from fictures_ai.services.keys.local_store import ApiKeyService
from fictures_ai.services.keys.stores import KeyStores
from fictures_ai.services.models.memory import GIB, MemoryProbe
from fictures_ai.services.models.registry import ModelRegistry
from fictures_ai.services.models.spec import ModelsFileError, load_models_file
from tests.unit.conftest import wait_until
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine

MODELS_FILE = """
models:
  - name: writer
    kind: text
    source: fake-writer
    default: true
    aliases: [story-model]
    defaults: {temperature: 0.2, max_tokens: 6}
  - name: editor
    kind: text
    source: fake-editor
    options: {max_model_len: 2048}
  - name: writer-brisk
    kind: text
    base: writer
    lora: bundled:tiny-smollm2-lora
  - name: sketch
    kind: image
    source: fake-sketch
    default: true
    defaults: {num_inference_steps: 4, guidance_scale: 1.0}
  - name: sketch-ink
    kind: image
    base: sketch
    lora: bundled:tiny-sdxl-lora
    lora_weight: 0.8
  - name: painter
    kind: image
    source: fake-painter
"""

IMAGE = {"prompt": "a lighthouse", "width": 256, "height": 256, "seed": 7}


@dataclass
class Ledger:
    """What the fake engines hold, in bytes, as the fake memory probe reads it."""

    used: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    """Bytes each source costs when loaded (default 1 GiB)."""
    text: dict[str, FakeTextEngine] = field(default_factory=dict)
    image: dict[str, FakeImageEngine] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)
    shutdown_delay: float = 0.0


class FakeProbe(MemoryProbe):
    def __init__(self, ledger: Ledger) -> None:
        super().__init__("ram")
        self.ledger = ledger

    def used_bytes(self) -> int:
        return self.ledger.used


def _sized(ledger: Ledger, source: str, engine: Any) -> None:
    size = ledger.sizes.get(source, GIB)
    ledger.used += size
    ledger.loads.append(source)
    original = engine.shutdown

    async def shutdown() -> None:
        await asyncio.sleep(ledger.shutdown_delay)
        ledger.used -= size
        await original()

    engine.shutdown = shutdown


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """Fake engines behind the registry's factory, and a probe that reads their sizes."""
    ledger = Ledger()

    async def create_text(options: VllmEngineOptions) -> FakeTextEngine:
        engine = FakeTextEngine(
            reply=f"{options.model} writes .", max_model_len=options.max_model_len
        )
        ledger.text[options.model] = engine
        _sized(ledger, options.model, engine)
        return engine

    async def create_image(options: DiffusersEngineOptions) -> FakeImageEngine:
        engine = FakeImageEngine()
        ledger.image[options.model or ""] = engine
        _sized(ledger, options.model or "", engine)
        return engine

    monkeypatch.setattr(engine_factory, "create_text_engine", create_text)
    monkeypatch.setattr(engine_factory, "create_image_engine", create_image)
    monkeypatch.setattr(MemoryProbe, "for_this_machine", classmethod(lambda cls: FakeProbe(ledger)))
    return ledger


def write_models(tmp_path: Path, text: str = MODELS_FILE) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def settings_for(path: Path, **values: Any) -> Settings:
    return Settings(_env_file=None, models_file=path, require_api_key=False, **values)  # type: ignore[call-arg]


@pytest.fixture
def services(tmp_path: Path, ledger: Ledger) -> Services:
    return build_services(settings_for(write_models(tmp_path)))


@pytest.fixture
async def app(services: Services) -> AsyncIterator[FastAPI]:
    app = create_app(services=services)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


# -- the models file --------------------------------------------------------------------------


def test_the_example_and_deploy_models_files_are_valid() -> None:
    root = Path(__file__).parents[2]
    example = load_models_file(root / "deploy/models.example.yaml")
    assert {spec.kind for spec in example.models} == {"text", "image"}
    assert sum(1 for spec in example.models if spec.kind == "text" and not spec.base) == 2
    assert sum(1 for spec in example.models if spec.kind == "image" and not spec.base) == 2
    # The GPU file names hub models and paths that exist only on a GPU box: checked, not loaded.
    gpu = load_models_file(root / "deploy/models.gpu.yaml", check_paths=False)
    sources = {spec.source for spec in gpu.models if spec.source}
    assert any("Qwen3" in source or "gemma" in source for source in sources)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in sources
    assert any(spec.kind == "image" and spec.lora for spec in gpu.models)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: []", "models: List should have at least 1 item"),
        (
            "models:\n  - {name: a, kind: text, source: x, colour: red}",
            "models[0] (a): colour: Extra inputs are not permitted",
        ),
        ("models:\n  - {name: a, kind: text}", "models[0] (a): source: a base model needs"),
        ("models:\n  - {name: a, kind: video, source: x}", "models[0] (a): kind: Input should be"),
        (
            "models:\n  - {name: a, kind: text, base: b, lora: /tmp}",
            "models[0] (a): base: no base model 'b'",
        ),
        (
            "models:\n  - {name: a, kind: text, source: x}\n"
            "  - {name: b, kind: image, base: a, lora: /tmp}",
            "models[1] (b): kind: 'a' is a text model, not image",
        ),
        (
            "models:\n  - {name: a, kind: text, source: x, aliases: [b]}\n"
            "  - {name: b, kind: text, source: y}",
            "models[1] (b): name: 'b' is already the name or an alias of 'a'",
        ),
        (
            "models:\n  - {name: a, kind: text, source: x, default: true}\n"
            "  - {name: b, kind: text, source: y, default: true}",
            "default: one text model may be the default, not 2 (a, b)",
        ),
        (
            "models:\n  - {name: a, kind: text, source: x, defaults: {steps: 4}}",
            "models[0] (a): defaults.steps: Extra inputs are not permitted",
        ),
        (
            "models:\n  - {name: a, kind: image, source: x, defaults: {guidance_scale: 50}}",
            "models[0] (a): defaults.guidance_scale: Input should be less than or equal to 20",
        ),
        (
            "models:\n  - {name: a, kind: text, source: x, load: pinned, keep_alive_s: 5}",
            "models[0] (a): keep_alive_s: a pinned model is never unloaded",
        ),
        (
            "models:\n  - {name: a, kind: text, source: x}\n"
            "  - {name: b, kind: text, base: a, lora: /tmp, load: preload}",
            "models[1] (b): load: an adapter is loaded and unloaded with its base model",
        ),
        (
            "models:\n  - {name: a, kind: text, source: ./nowhere}",
            "models[0] (a): source: ",
        ),
        ("models:\n  - {name: 'x/load', kind: text, source: y}", "not ending in /load"),
        (
            "models:\n  - {name: a, kind: text, source: 'bundled:smollm2-999m'}",
            "models[0] (a): source: there is no text model 'bundled:smollm2-999m'; the bundled "
            "ones are bundled:smollm2-135m-instruct",
        ),
        (
            "models:\n  - {name: a, kind: image, source: 'bundled:tiny-sdxl'}\n"
            "  - {name: b, kind: image, base: a, lora: 'bundled:tiny-smollm2-lora'}",
            "models[1] (b): lora: there is no image adapter 'bundled:tiny-smollm2-lora'",
        ),
        (
            "models:\n  - {name: a, kind: text, source: x}\n"
            "  - {name: b, kind: text, base: a, lora: 'bundled:tiny-smollm2-lora', lora_weight: 2}",
            "models[1] (b): lora_weight: only an image adapter has a weight",
        ),
        ("models: [", "not valid YAML"),
    ],
)
def test_a_bad_models_file_names_the_entry_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ModelsFileError) as caught:
        load_models_file(write_models(tmp_path, text))
    assert message in str(caught.value)
    assert str(tmp_path / "models.yaml") in str(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{max_model_len: lots}", "models[0] (a): options.max_model_len: Input should be a valid"),
        ("{colour: red}", "models[0] (a): options.colour: not an engine option of this kind"),
        ("{model: other}", "options.model: not an engine option"),
        (
            "{speculative_method: draft_model}",
            "models[0] (a): options: speculative_method=draft_model needs speculative_model",
        ),
        (
            "{prompt_lookup_max: 1}",
            "prompt_lookup_min (2) must be at least 1 and at most prompt_lookup_max (1) (options "
            "the entry leaves out are the settings': TEXT_/IMAGE_...)",
        ),
    ],
)
def test_bad_engine_options_stop_the_server_naming_the_entry(
    tmp_path: Path, options: str, message: str
) -> None:
    path = write_models(
        tmp_path, f"models:\n  - {{name: a, kind: text, source: x, options: {options}}}"
    )
    with pytest.raises(ModelsFileError) as caught:
        build_services(settings_for(path))
    assert message in str(caught.value)


async def test_an_entry_with_another_speculative_method_does_not_inherit_the_draft_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[VllmEngineOptions] = []

    async def create_text(options: VllmEngineOptions) -> FakeTextEngine:
        built.append(options)
        return FakeTextEngine()

    monkeypatch.setattr(engine_factory, "create_text_engine", create_text)
    path = write_models(
        tmp_path,
        "models:\n  - {name: a, kind: text, source: x, options: {speculative_method: ngram}}\n"
        "  - {name: b, kind: text, source: y}",
    )
    settings = settings_for(
        path, text_speculative_method="draft_model", text_speculative_model="/models/draft"
    )
    services = build_services(settings)
    for name in ("a", "b"):
        await services.models.text(name).service.initialize()
    entry, inheriting = built
    assert (entry.speculative_method, entry.speculative_model) == ("ngram", None)
    assert inheriting.speculative_model == "/models/draft"


def test_serve_refuses_a_bad_models_file_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_models(tmp_path, "models:\n  - {name: a, kind: text}")
    monkeypatch.setenv("REQUIRE_API_KEY", "false")
    # serve configures logging onto this test's captured stderr, which closes after it.
    monkeypatch.setattr(sys.modules["fictures_ai.cli.serve"], "configure_logging", lambda **_: None)
    assert main(["serve", "--models-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Invalid models file" in err
    assert "models[0] (a): source: a base model needs a source" in err


# -- routing ------------------------------------------------------------------------------------


async def test_each_text_model_answers_by_name_alias_or_default_on_both_surfaces(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    for model, source in [
        (None, "fake-writer"),
        ("story-model", "fake-writer"),
        ("editor", "fake-editor"),
    ]:
        body: dict[str, Any] = {"prompt": "x", "max_tokens": 3}
        if model is not None:
            body["model"] = model
        answer = (await client.post("/api/v1/text/generate", json=body)).json()
        assert answer["text"].startswith(source), answer
        # The canonical name comes back, as OpenAI answers an alias with the model it means.
        assert answer["model"] == ("editor" if model == "editor" else "writer")
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "editor", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    )
    assert chat.json()["model"] == "editor"
    assert chat.json()["choices"][0]["message"]["content"].startswith("fake-editor")
    assert set(ledger.text) == {"fake-writer", "fake-editor"}


async def test_an_unknown_model_is_a_404_in_each_surfaces_shape(client: httpx.AsyncClient) -> None:
    fictures = await client.post("/api/v1/text/generate", json={"prompt": "x", "model": "nope"})
    assert fictures.status_code == 404
    assert "There is no text model 'nope'" in fictures.json()["detail"]
    assert "writer, editor, writer-brisk" in fictures.json()["detail"]
    openai = await client.post(
        "/v1/chat/completions",
        json={"model": "sketch", "messages": [{"role": "user", "content": "x"}]},
    )
    assert openai.status_code == 404
    assert openai.json()["error"]["code"] == "model_not_found"
    image = await client.post("/api/v1/images/generate", json={**IMAGE, "model": "writer"})
    assert image.status_code == 404
    assert "Image models here: sketch, sketch-ink, painter" in image.json()["detail"]
    retrieve = await client.get("/v1/models/nope")
    assert retrieve.status_code == 404


async def test_a_text_adapter_runs_on_its_base_engine_with_its_lora(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    answer = await client.post(
        "/api/v1/text/generate", json={"prompt": "x", "model": "writer-brisk", "max_tokens": 4}
    )
    assert answer.json()["text"].startswith("[writer-brisk]")
    assert answer.json()["model"] == "writer-brisk"
    engine = ledger.text["fake-writer"]
    assert engine.calls[-1][1].lora is not None
    assert engine.calls[-1][1].lora.path == "bundled:tiny-smollm2-lora"
    base = await client.post("/api/v1/text/generate", json={"prompt": "x", "model": "writer"})
    assert not base.json()["text"].startswith("[")
    assert ledger.loads.count("fake-writer") == 1  # one engine for the base and its adapter


async def test_model_defaults_fill_only_what_the_request_left_out(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    await client.post("/api/v1/text/generate", json={"prompt": "x"})
    await client.post("/api/v1/text/generate", json={"prompt": "x", "temperature": 0.9})
    await client.post(
        "/v1/chat/completions",
        json={"model": "writer", "messages": [{"role": "user", "content": "x"}]},
    )
    await client.post(
        "/v1/chat/completions",
        json={
            "model": "writer",
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 2,
        },
    )
    calls = [params for _, params in ledger.text["fake-writer"].calls]
    assert [(p.temperature, p.max_tokens) for p in calls] == [
        (0.2, 6),
        (0.9, 6),
        (0.2, 6),
        (0.2, 2),
    ]
    await client.post("/api/v1/images/generate", json=IMAGE)
    await client.post("/api/v1/images/generate", json={**IMAGE, "num_inference_steps": 2})
    await client.post(
        "/v1/images/generations", json={"prompt": "x", "model": "sketch", "size": "256x256"}
    )
    renders = ledger.image["fake-sketch"].calls
    assert [(p.num_inference_steps, p.guidance_scale) for p in renders] == [
        (4, 1.0),
        (2, 1.0),
        (4, 1.0),
    ]


async def test_image_loras_come_from_the_model_and_the_request(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    ink = await client.post("/api/v1/images/generate", json={**IMAGE, "model": "sketch-ink"})
    assert ink.json()["model"] == "sketch-ink"
    base = await client.post(
        "/api/v1/images/generate", json={**IMAGE, "loras": [{"name": "sketch-ink", "weight": 0.3}]}
    )
    plain = await client.post("/api/v1/images/generate", json=IMAGE)
    openai = await client.post(
        "/v1/images/generations",
        json={
            "prompt": "x",
            "model": "sketch",
            "size": "256x256",
            "loras": [{"name": "sketch-ink"}],
        },
    )
    assert openai.status_code == 200
    renders = ledger.image["fake-sketch"].calls
    assert [[(lora.name, lora.weight) for lora in p.loras] for p in renders] == [
        [("sketch-ink", 0.8)],
        [("sketch-ink", 0.3)],
        [],
        [("sketch-ink", 1.0)],
    ]
    assert renders[0].loras[0].path == "bundled:tiny-sdxl-lora"
    assert len({ink.json()["image_url"], base.json()["image_url"], plain.json()["image_url"]}) == 3
    twice = await client.post(
        "/api/v1/images/generate",
        json={**IMAGE, "loras": [{"name": "sketch-ink"}, {"name": "sketch-ink", "weight": 0.1}]},
    )
    assert twice.status_code == 400
    assert "loras[1].name: 'sketch-ink' is listed twice" in twice.json()["detail"]
    unknown = await client.post(
        "/api/v1/images/generate",
        json={**IMAGE, "model": "painter", "loras": [{"name": "sketch-ink"}]},
    )
    assert unknown.status_code == 400
    assert "loras[0].name: 'sketch-ink' is not an adapter of 'painter'" in unknown.json()["detail"]


# -- listings ------------------------------------------------------------------------------------


async def test_listings_show_every_model_with_its_state_memory_and_last_use(
    client: httpx.AsyncClient,
) -> None:
    listing = (await client.get("/v1/models")).json()["data"]
    assert [model["id"] for model in listing] == [
        "writer",
        "editor",
        "writer-brisk",
        "sketch",
        "sketch-ink",
        "painter",
    ]
    assert {model["state"] for model in listing} == {"not_loaded"}
    brisk = next(model for model in listing if model["id"] == "writer-brisk")
    assert (brisk["parent"], brisk["root"], brisk["kind"]) == (
        "writer",
        "bundled:tiny-smollm2-lora",
        "text",
    )
    await client.post("/api/v1/text/generate", json={"prompt": "x", "model": "editor"})
    editor = (await client.get("/v1/models/editor")).json()
    assert editor["state"] == "loaded"
    assert editor["memory_bytes"] == GIB
    assert editor["last_used_at"] is not None
    assert editor["max_model_len"] == 2048
    fictures = (await client.get("/api/v1/models")).json()
    assert [m["name"] for m in fictures["text_generation"]] == ["writer", "editor", "writer-brisk"]
    assert [m["name"] for m in fictures["image_generation"]] == ["sketch", "sketch-ink", "painter"]
    text_models = (await client.get("/api/v1/text/models")).json()["models"]
    assert [(m["id"], m["status"], m["state"]) for m in text_models][:2] == [
        ("writer", "not_loaded", "not_loaded"),
        ("editor", "initialized", "loaded"),
    ]
    image_models = (await client.get("/api/v1/images/models")).json()["models"]
    assert [m["id"] for m in image_models] == ["sketch", "sketch-ink", "painter"]
    health = (await client.get("/health")).json()["models"]
    assert (health["text"]["name"], health["image"]["name"]) == ("writer", "sketch")
    ready = (await client.get("/health/ready")).json()["models"]
    assert set(ready) == {"writer", "editor", "sketch", "painter"}
    metrics = (await client.get("/metrics")).text
    assert 'fictures_model_memory_bytes{engine="text",model="editor"} 1.073741824e+09' in metrics
    assert 'fictures_engine_state{engine="text",model="writer",state="not_loaded"} 1.0' in metrics


# -- admin: load, unload, adapters -----------------------------------------------------------


async def test_admin_loads_and_unloads_and_memory_comes_back(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    loaded = await client.post("/api/v1/models/painter/load")
    assert loaded.status_code == 200
    assert (loaded.json()["state"], loaded.json()["memory_bytes"]) == ("loaded", GIB)
    assert ledger.used == GIB
    unloaded = await client.post("/api/v1/models/painter/unload")
    assert (unloaded.json()["state"], unloaded.json()["memory_bytes"]) == ("not_loaded", None)
    assert ledger.image["fake-painter"].shut_down
    assert ledger.used == 0
    again = await client.post("/api/v1/images/generate", json={**IMAGE, "model": "painter"})
    assert again.status_code == 200
    assert ledger.loads.count("fake-painter") == 2
    adapter = await client.post("/api/v1/models/writer-brisk/unload")
    assert adapter.status_code == 409
    assert "is an adapter on 'writer'" in adapter.json()["detail"]
    unknown = await client.post("/api/v1/models/nope/load")
    assert unknown.status_code == 404
    # A model called "load" or "unload" has its own routes (they were a 405, found by the fuzz
    # test); "org/load" stays the load route of "org".
    for name in ("load", "unload", "org/load/x"):
        for action in ("load", "unload"):
            answer = await client.post(f"/api/v1/models/{name}/{action}")
            assert answer.status_code == 404, (name, action)
            assert f"no served model '{name}'" in answer.json()["detail"]
        assert (await client.delete(f"/api/v1/models/{name}")).status_code == 404
    assert (await client.delete("/api/v1/models/org/load")).status_code == 405


async def test_a_model_in_use_is_not_unloaded(client: httpx.AsyncClient, ledger: Ledger) -> None:
    await client.post("/api/v1/models/writer/load")
    ledger.text["fake-writer"].token_delay = 0.05
    stream = asyncio.create_task(
        client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 6})
    )
    await asyncio.sleep(0.1)
    busy = await client.post("/api/v1/models/writer/unload")
    assert busy.status_code == 409
    assert "requests in flight" in busy.json()["detail"]
    assert (await stream).status_code == 200
    assert (await client.post("/api/v1/models/writer/unload")).status_code == 200


async def test_a_request_during_an_unload_waits_for_the_reload(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    await client.post("/api/v1/models/editor/load")
    ledger.shutdown_delay = 0.3
    unload = asyncio.create_task(client.post("/api/v1/models/editor/unload"))
    await asyncio.sleep(0.05)
    states = (await client.get("/v1/models/editor")).json()["state"]
    assert states == "unloading"
    answer = await client.post("/api/v1/text/generate", json={"prompt": "x", "model": "editor"})
    assert answer.status_code == 200
    assert answer.json()["text"].startswith("fake-editor")
    assert (await unload).status_code == 200
    assert ledger.loads.count("fake-editor") == 2


async def test_admin_routes_need_the_admin_scope(tmp_path: Path, ledger: Ledger) -> None:
    keys = ApiKeyService(database_url=f"sqlite:///{tmp_path / 'keys.db'}")
    _, writer = keys.create("writer", "stories:write")
    _, admin = keys.create("admin", "admin:all")
    services = replace(
        build_services(settings_for(write_models(tmp_path))), api_keys=KeyStores([keys])
    )
    app = create_app(services=services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for key, status in [(None, 401), (writer, 403), (admin, 200)]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = await http.post("/api/v1/models/editor/load", headers=headers)
            assert response.status_code == status, (key, response.text)
        listing = await http.get("/v1/models", headers={"Authorization": f"Bearer {writer}"})
        assert listing.status_code == 200
        register = await http.post(
            "/api/v1/models",
            json={"name": "x", "base": "writer", "lora": "/abs/lora"},
            headers={"Authorization": f"Bearer {writer}"},
        )
        assert register.status_code == 403
    keys.close()


async def test_adapters_register_at_run_time_and_a_bad_one_leaves_the_name_free(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    lora_off = await client.post(
        "/api/v1/models", json={"name": "noir", "base": "editor", "lora": "/adapters/noir"}
    )
    assert lora_off.status_code == 400
    assert "LoRA adapters are off for the text model 'editor'" in lora_off.json()["detail"]
    assert "fake-editor" not in ledger.text  # refused from the settings, without loading it
    unknown = await client.post(
        "/api/v1/models", json={"name": "noir", "base": "writer", "lora": "bundled:nope"}
    )
    assert unknown.status_code == 400
    assert "the bundled ones are bundled:tiny-smollm2-lora" in unknown.json()["detail"]
    bad = await client.post(
        "/api/v1/models", json={"name": "noir", "base": "writer", "lora": "/adapters/bad"}
    )
    assert bad.status_code == 400
    assert "not a LoRA adapter" in bad.json()["detail"]
    assert (await client.get("/v1/models/noir")).status_code == 404
    made = await client.post(
        "/api/v1/models", json={"name": "noir", "base": "writer", "lora": "/adapters/noir"}
    )
    assert made.status_code == 201
    assert (made.json()["parent"], made.json()["kind"]) == ("writer", "text")
    listed = (await client.get("/v1/models/noir")).json()
    assert listed["parent"] == "writer"
    answer = await client.post("/api/v1/text/generate", json={"prompt": "x", "model": "noir"})
    assert answer.json()["text"].startswith("[noir]")
    taken = await client.post(
        "/api/v1/models", json={"name": "noir", "base": "writer", "lora": "/adapters/x"}
    )
    assert taken.status_code == 409
    relative = await client.post(
        "/api/v1/models", json={"name": "rel", "base": "writer", "lora": "adapters/x"}
    )
    assert relative.status_code == 400
    on_image = await client.post(
        "/api/v1/models", json={"name": "img", "base": "sketch", "lora": "/adapters/x"}
    )
    assert on_image.status_code == 400
    engine = ledger.text["fake-writer"]
    assert [adapter.name for adapter in engine.loras.values()] == ["writer-brisk", "noir"]
    deleted = await client.delete("/api/v1/models/noir")
    assert deleted.json() == {"id": "noir", "object": "model", "deleted": True}
    assert [adapter.name for adapter in engine.loras.values()] == ["writer-brisk"]
    assert (await client.get("/v1/models/noir")).status_code == 404
    for declared in ("writer-brisk", "sketch-ink"):
        refused = await client.delete(f"/api/v1/models/{declared}")
        assert refused.status_code == 409
        assert "declared in the models file" in refused.json()["detail"]
    base = await client.delete("/api/v1/models/writer")
    assert base.status_code == 409
    assert "POST /api/v1/models/writer/unload" in base.json()["detail"]


async def test_an_adapter_the_engine_refuses_is_failed_and_its_base_serves_on(
    tmp_path: Path, ledger: Ledger
) -> None:
    (tmp_path / "bad-adapter").mkdir()  # exists, but the engine refuses it
    path = write_models(
        tmp_path,
        """
        models:
          - {name: writer, kind: text, source: fake-writer}
          - {name: broken, kind: text, base: writer, lora: ./bad-adapter}
        """,
    )
    app = create_app(services=build_services(settings_for(path, generation_mode="text")))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.post("/api/v1/text/generate", json={"prompt": "x"})).status_code == 200
        broken = (await http.get("/v1/models/broken")).json()
        assert broken["state"] == "failed"
        assert "not a LoRA adapter" in broken["reason"]
        refused = await http.post("/api/v1/text/generate", json={"prompt": "x", "model": "broken"})
        assert refused.status_code == 503


# -- budget and keep-alive -------------------------------------------------------------------


async def test_the_budget_unloads_the_least_recently_used_idle_model(
    tmp_path: Path, ledger: Ledger
) -> None:
    ledger.sizes = {"fake-writer": 4 * GIB, "fake-editor": 4 * GIB, "fake-sketch": 3 * GIB}
    services = build_services(settings_for(write_models(tmp_path), model_memory_budget_gb=9))
    app = create_app(services=services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        await http.post("/api/v1/text/generate", json={"prompt": "x", "model": "writer"})
        await http.post("/api/v1/text/generate", json={"prompt": "x", "model": "editor"})
        await http.post("/api/v1/text/generate", json={"prompt": "x", "model": "writer"})
        # 8 GiB loaded; the sketch's 3 GiB pass 9: the editor (used less recently) goes.
        await http.post("/api/v1/images/generate", json=IMAGE)
        states = {m["id"]: m["state"] for m in (await http.get("/v1/models")).json()["data"]}
        assert (states["writer"], states["editor"], states["sketch"]) == (
            "loaded",
            "not_loaded",
            "loaded",
        )
        assert ledger.used == 7 * GIB
        assert ledger.text["fake-editor"].shut_down


async def test_a_load_that_cannot_fit_while_the_others_are_busy_is_a_503(
    tmp_path: Path, ledger: Ledger
) -> None:
    ledger.sizes = {"fake-writer": 6 * GIB, "fake-editor": 6 * GIB}
    services = build_services(
        settings_for(write_models(tmp_path), model_memory_budget_gb=10, generation_mode="text")
    )
    registry: ModelRegistry = services.models
    await registry.load("editor")
    await registry.unload("editor")  # its size is known now
    await registry.load("writer")
    ledger.text["fake-writer"].token_delay = 0.05
    app = create_app(services=services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        busy = asyncio.create_task(
            http.post(
                "/api/v1/text/generate", json={"prompt": "x", "model": "writer", "max_tokens": 6}
            )
        )
        await asyncio.sleep(0.1)
        refused = await http.post("/api/v1/text/generate", json={"prompt": "x", "model": "editor"})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "30"
        assert "would pass MODEL_MEMORY_BUDGET_GB=10.00" in refused.json()["detail"]
        assert "writer (6.00 GiB, 1 in flight)" in refused.json()["detail"]
        # Refused for now, not broken: the model stays not_loaded and the server ready.
        editor = (await http.get("/v1/models/editor")).json()
        assert (editor["state"], editor["reason"]) == ("not_loaded", None)
        assert (await http.get("/health/ready")).status_code == 200
        assert (await busy).status_code == 200
        later = await http.post("/api/v1/text/generate", json={"prompt": "x", "model": "editor"})
        assert later.status_code == 200


async def test_keep_alive_zero_unloads_right_after_each_request(
    tmp_path: Path, ledger: Ledger
) -> None:
    path = write_models(
        tmp_path,
        """
        models:
          - {name: brief, kind: text, source: fake-brief, keep_alive_s: 0}
          - {name: steady, kind: text, source: fake-steady, load: pinned}
        """,
    )
    app = create_app(services=build_services(settings_for(path, generation_mode="text")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            # pinned: loaded at start-up, never unloaded.
            await wait_until(lambda: "fake-steady" in ledger.text)
            answer = await http.post(
                "/api/v1/text/generate", json={"prompt": "x", "model": "brief"}
            )
            assert answer.status_code == 200
            await wait_until(lambda: ledger.text["fake-brief"].shut_down, timeout=5)
            state = (await http.get("/v1/models/brief")).json()["state"]
            assert state == "not_loaded"
            pinned = await http.post("/api/v1/models/steady/unload")
            assert pinned.status_code == 409
            assert "pinned" in pinned.json()["detail"]


def test_without_a_models_file_the_settings_make_one_text_and_one_image_model(
    ledger: Ledger,
) -> None:
    settings = Settings(_env_file=None, require_api_key=False)  # type: ignore[call-arg]
    registry = build_services(settings).models
    assert [(m.name, m.kind, m.source, m.default) for m in registry.models()] == [
        ("SmolLM2-135M-Instruct", "text", "bundled:smollm2-135m-instruct", True),
        ("tiny-sdxl-random", "image", "bundled:tiny-sdxl", True),
    ]
    assert all(m.keep_alive_s is None and m.load == "lazy" for m in registry.models())


@pytest.fixture(autouse=True)
def _no_env_models_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MODELS_FILE in the environment must not change what these tests build."""
    monkeypatch.delenv("MODELS_FILE", raising=False)
