"""What both surfaces share about models: the state fields of their listings, the ``loras`` of
image requests, and a model's request defaults applied to the fields a request left out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from fictures_ai.services.models.registry import ModelStatus

ModelStateName = Literal["not_loaded", "loading", "loaded", "unloading", "failed"]

BodyT = TypeVar("BodyT", bound=BaseModel)


class ModelStateFields(BaseModel):
    """A model's life-cycle fields in every listing (beyond the contract's)."""

    state: ModelStateName = Field(description="Where the model stands now.")
    reason: str | None = Field(None, description="Why it is `failed`.")
    memory_bytes: int | None = Field(
        None,
        description="What the loaded model costs (RAM on a CPU, GPU memory on CUDA), measured "
        "across its load; null when not loaded (and for adapters: see their parent).",
    )
    last_used_at: int | None = Field(
        None, description="When a request last used it (Unix seconds); null if none has."
    )
    in_flight: int = Field(0, description="Requests using it now.")
    parent: str | None = Field(None, description="The base model of a LoRA adapter.")
    aliases: list[str] = Field(default_factory=list, description="Other names it answers to.")
    default: bool = Field(False, description="Whether requests without `model` use it.")


def state_fields(status: ModelStatus) -> dict[str, Any]:
    """The ``ModelStateFields`` values of ``status``, as keywords."""
    return {
        "state": status.state.value,
        "reason": status.reason,
        "memory_bytes": status.memory_bytes,
        "last_used_at": int(status.last_used) if status.last_used is not None else None,
        "in_flight": status.in_flight,
        "parent": status.parent,
        "aliases": list(status.aliases),
        "default": status.default,
    }


class LoraWeight(BaseModel):
    """One adapter of an image request: a LoRA declared on the model's base, and its weight."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    name: str = Field(..., min_length=1, description="An image adapter's name (`/v1/models`).")
    weight: float = Field(1.0, ge=-10.0, le=10.0, description="Its scale for this image.")


def requested_loras(loras: list[LoraWeight] | None) -> list[tuple[str, float]]:
    """The ``(name, weight)`` pairs of a request's ``loras``."""
    return [(lora.name, lora.weight) for lora in loras or ()]


def with_model_defaults(
    body: BodyT,
    defaults: Mapping[str, Any],
    fields: Mapping[str, tuple[str, ...]] | None = None,
) -> BodyT:
    """``body`` with the model's ``defaults`` (models file) for the fields the client did not
    send.

    ``fields`` maps a default's name to the body's fields for it (the first is filled; any of
    them sent means the client chose); by default the body's field of the same name. Defaults
    the body has no field for are skipped (the surface has no such parameter).
    """
    update = {}
    body_fields = type(body).model_fields
    for name, value in defaults.items():
        names = (fields or {}).get(name, (name,))
        if names[0] not in body_fields or body.model_fields_set.intersection(names):
            continue
        update[names[0]] = value
    return body.model_copy(update=update) if update else body
