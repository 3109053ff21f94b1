"""Admin routes over the model registry (scope ``admin:all``): load and unload a model now,
register a text LoRA adapter at run time and remove it (as vLLM's runtime adapter loading)."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from fictures_ai.api.auth import require_scope
from fictures_ai.api.dependencies import get_models
from fictures_ai.api.errors import error_responses
from fictures_ai.api.fictures.protocol import ErrorResponse
from fictures_ai.api.model_views import ModelStateFields, state_fields
from fictures_ai.api.unicode_text import UnicodeTextBody
from fictures_ai.services.models.registry import ModelRegistry, ModelStatus

logger = logging.getLogger(__name__)


class ModelNameConvertor(Convertor[str]):
    """A model name in a path: slashes allowed (``Qwen/Qwen3-14B``), but not a trailing
    ``/load`` or ``/unload``, which are the routes' own (the models file refuses such names)."""

    # Segments after the first may not be a final "load"/"unload" ("$": the path's end), so a
    # model called "load" has its own routes (a look-behind here saw the slash before it).
    regex = r"[^/]+(?:/(?!(?:load|unload)$)[^/]+)*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model_name", ModelNameConvertor())

admin_router = APIRouter(
    prefix="/api/v1/models",
    tags=["models"],
    responses=error_responses(ErrorResponse, include_422=False),
    dependencies=[Depends(require_scope("admin:all"))],
)
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]


class _ModelEntryFields(BaseModel):
    """What a model is."""

    name: str
    kind: Literal["text", "image"]
    source: str = Field(description="Hub id, folder or bundled: name; an adapter's path.")
    max_tokens: int | None = Field(None, description="Context window of a text model.")
    device: str | None = Field(None, description="Device of an image model.")


class ModelEntry(ModelStateFields, _ModelEntryFields):
    """One model as the admin routes answer it: what it is, then its state."""


class AdapterRegistration(UnicodeTextBody):
    """Body of ``POST /api/v1/models``: a text LoRA adapter to serve as a model."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(..., min_length=1, max_length=128, description="Its model name.")
    base: str = Field(..., min_length=1, description="The text model it adapts.")
    lora: str = Field(
        ..., min_length=1, description="An absolute PEFT folder on the server, or bundled:..."
    )


class DeletedModel(BaseModel):
    """Answer of ``DELETE /api/v1/models/{name}`` (OpenAI's deleted-object shape)."""

    id: str
    object: Literal["model"] = "model"
    deleted: Literal[True] = True


def model_entry(status: ModelStatus) -> ModelEntry:
    """The admin routes' view of ``status``."""
    return ModelEntry(
        name=status.name,
        kind=status.kind,
        source=status.source,
        max_tokens=status.max_model_len,
        device=status.device,
        **state_fields(status),
    )


@admin_router.post("/{name:model_name}/load", response_model=ModelEntry)
async def load_model(name: str, models: ModelsDep) -> ModelEntry:
    """Load the model now (an adapter: its base) and answer once it is loaded; within
    ``MODEL_MEMORY_BUDGET_GB``, idle models may be unloaded to make room."""
    return model_entry(await models.load(name))


@admin_router.post("/{name:model_name}/unload", response_model=ModelEntry)
async def unload_model(name: str, models: ModelsDep) -> ModelEntry:
    """Unload the model and free its memory; 409 while requests use it, for a pinned model,
    or for an adapter. The next request naming it loads it again."""
    return model_entry(await models.unload(name))


@admin_router.post("", response_model=ModelEntry, status_code=201)
async def register_adapter(body: AdapterRegistration, models: ModelsDep) -> ModelEntry:
    """Serve a text LoRA adapter as a model: checked and loaded into its base's engine first,
    so a bad adapter is a 400 here (and the name stays free); 409 for a taken name."""
    status = await models.register_adapter(body.name, base=body.base, lora=body.lora)
    return model_entry(status)


@admin_router.delete("/{name:model_name}", response_model=DeletedModel)
async def remove_adapter(name: str, models: ModelsDep) -> DeletedModel:
    """Remove an adapter registered at run time and free its engine slot; 409 for base
    models, adapters of the models file, or while requests use it."""
    await models.remove_adapter(name)
    return DeletedModel(id=name)
