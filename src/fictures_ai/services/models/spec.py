"""The models file (``MODELS_FILE``): which models a server serves, checked whole at start-up.

A file declares base models (``source``: a hub id, a local folder or a ``bundled:`` name) and
LoRA adapters on them (``base`` + ``lora``). Every mistake is reported with the entry and the
field (``models[1] (writer-brisk): options.max_model_len: ...``), so a bad file stops the server
before it serves anything. The format is documented in ``docs/models.md``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fictures_ai.shared import (
    BUNDLED_TEXT_LORA,
    BUNDLED_TEXT_MODEL,
    BUNDLED_TINY_SD15,
    BUNDLED_TINY_SDXL,
    BUNDLED_TINY_SDXL_LORA,
)

ModelKind = Literal["text", "image"]
LoadPolicy = Literal["lazy", "preload", "pinned"]
"""``lazy``: load on first use; ``preload``: load at start-up; ``pinned``: load at start-up and
never unload (neither by ``keep_alive_s`` nor by the memory budget)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


BUNDLED_SOURCES: dict[str, tuple[str, ...]] = {
    "text": (BUNDLED_TEXT_MODEL,),
    "image": (BUNDLED_TINY_SDXL, BUNDLED_TINY_SD15),
}
"""The ``bundled:`` base models of each kind."""
BUNDLED_LORAS: dict[str, tuple[str, ...]] = {
    "text": (BUNDLED_TEXT_LORA,),
    "image": (BUNDLED_TINY_SDXL_LORA,),
}
"""The ``bundled:`` adapters of each kind."""


def check_bundled(value: str, kind: str, field: str) -> None:
    """Raise ``ValueError`` for a ``bundled:`` name that is no ``kind`` model or adapter."""
    known = (BUNDLED_LORAS if field == "lora" else BUNDLED_SOURCES)[kind]
    if value.startswith("bundled:") and value not in known:
        raise ValueError(
            f"{field}: there is no {kind} {'adapter' if field == 'lora' else 'model'} "
            f"'{value}'; the bundled ones are {', '.join(known)}"
        )


class ModelsFileError(ValueError):
    """The models file cannot be read or says something the server cannot serve; the message
    names the entry and the field."""


class TextDefaults(BaseModel):
    """Request defaults a text model may set: used for the fields a request leaves out, on
    both surfaces (the ranges are the requests')."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, ge=0.0, le=1.0)
    max_tokens: int = Field(2048, ge=1)
    min_tokens: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: list[str] = Field(default_factory=list, max_length=4)


class ImageDefaults(BaseModel):
    """Request defaults an image model may set (a distilled model's few steps, say)."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int = Field(30, ge=1, le=100)
    guidance_scale: float = Field(7.5, ge=1.0, le=20.0)
    negative_prompt: str | None = None
    width: int = Field(1344, ge=256, le=2048)
    height: int = Field(768, ge=256, le=2048)


DEFAULTS_MODELS: dict[str, type[BaseModel]] = {"text": TextDefaults, "image": ImageDefaults}


class ReplicaScaling(BaseModel):
    """How many Ray Serve replicas a model runs (``serve --ray``): ``min`` to ``max``,
    autoscaled towards ``target_ongoing_requests`` per replica (Ray Serve's
    ``autoscaling_config``); ``min == max`` is a fixed count. ``min: 0`` scales an unused
    model to nothing (its next request waits for a replica to start)."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=0)
    max: int = Field(1, ge=1)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Requests in flight per replica the autoscaler aims at."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> ReplicaScaling:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class ReplicaResources(BaseModel):
    """What one replica of a model takes from the Ray cluster: logical CPUs and GPUs (a text
    model with ``tensor_parallel_size`` > 1 gets that many GPUs, in one placement group)."""

    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(None, ge=0)
    gpus: float | None = Field(None, ge=0)


class ModelSpec(BaseModel):
    """One entry of the models file: a base model (``source``) or an adapter (``base`` +
    ``lora``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="What clients pass as `model`.")
    kind: ModelKind
    source: str | None = Field(None, description="Hub id, local folder or bundled:... name.")
    base: str | None = Field(None, description="The model a LoRA adapter applies to.")
    lora: str | None = Field(None, description="The adapter: a local path or bundled:... name.")
    lora_weight: float | None = Field(
        None, ge=-10.0, le=10.0, description="Image adapters: their weight (default 1.0)."
    )
    default: bool = Field(False, description="The default of its kind (no `model` given).")
    load: LoadPolicy = "lazy"
    keep_alive_s: float | None = Field(
        None, ge=0, description="Unload after this long unused (0: after each request)."
    )
    aliases: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(
        default_factory=dict, description="Engine options: the settings' names without prefix."
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Request defaults for this model."
    )
    replicas: ReplicaScaling | None = Field(
        None, description="Ray Serve replicas (serve --ray): a count, or autoscaling bounds."
    )
    resources: ReplicaResources | None = Field(
        None, description="What one Ray Serve replica takes: cpus, gpus."
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests one Ray Serve replica takes at once."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_count(cls, value: Any) -> Any:
        """A count N is the bounds {min: N, max: N}."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("at least 1 (or {min: 0, max: N} to scale to zero)")
            return {"min": value, "max": value}
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                "a count (2) or bounds ({min: 1, max: 4, target_ongoing_requests: 32}), "
                f"not {value!r}"
            )
        return value

    @field_validator("aliases")
    @classmethod
    def _check_aliases(cls, value: list[str]) -> list[str]:
        return [check_model_name(alias) for alias in value]

    @model_validator(mode="after")
    def _check_shape(self) -> ModelSpec:
        if self.lora is None and self.base is None:
            if not self.source:
                raise ValueError("source: a base model needs a source (hub id, folder, bundled:)")
        elif self.lora is None or self.base is None:
            missing = "lora" if self.lora is None else "base"
            raise ValueError(f"{missing}: an adapter needs both base and lora")
        else:
            for field in ("source", "options"):
                if getattr(self, field):
                    raise ValueError(
                        f"{field}: an adapter runs on its base model's engine; set {field} on "
                        f"'{self.base}'"
                    )
            for field in ("replicas", "resources", "max_ongoing_requests"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{field}: an adapter runs on its base model's replicas; set {field} "
                        f"on '{self.base}'"
                    )
            if self.load != "lazy" or self.keep_alive_s is not None:
                raise ValueError(
                    "load: an adapter is loaded and unloaded with its base model; set load and "
                    f"keep_alive_s on '{self.base}'"
                )
        if self.lora_weight is not None and (self.kind != "image" or self.lora is None):
            raise ValueError(
                "lora_weight: only an image adapter has a weight (a text adapter applies whole)"
            )
        for field in ("source", "lora"):
            value = getattr(self, field)
            if value is not None:
                check_bundled(value, self.kind, field)
        if self.load == "pinned" and self.keep_alive_s is not None:
            raise ValueError("keep_alive_s: a pinned model is never unloaded; leave it out")
        try:
            checked = DEFAULTS_MODELS[self.kind].model_validate(self.defaults)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(
                f"defaults.{where}: {first['msg']} (a {self.kind} model's defaults: "
                f"{', '.join(DEFAULTS_MODELS[self.kind].model_fields)})"
            ) from None
        # The values as the requests take them (1 -> 1.0 for a float field).
        self.defaults = checked.model_dump(include=set(self.defaults))
        return self

    @property
    def is_adapter(self) -> bool:
        """Whether this entry is a LoRA adapter on another entry."""
        return self.base is not None


class ModelsFile(BaseModel):
    """The whole file: ``models:`` and its entries."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> ModelsFile:
        seen: dict[str, str] = {}
        for index, spec in enumerate(self.models):
            for name in (spec.name, *spec.aliases):
                if name in seen:
                    raise _entry_error(
                        index,
                        spec,
                        "name" if name == spec.name else "aliases",
                        f"'{name}' is already the name or an alias of '{seen[name]}'",
                    )
                seen[name] = spec.name
        bases = {spec.name: spec for spec in self.models if not spec.is_adapter}
        for index, spec in enumerate(self.models):
            if spec.base is None:
                continue
            base = bases.get(spec.base)
            if base is None:
                raise _entry_error(
                    index,
                    spec,
                    "base",
                    f"no base model '{spec.base}' in this file (an adapter's base is the name "
                    "of an entry with a source)",
                )
            if base.kind != spec.kind:
                raise _entry_error(
                    index, spec, "kind", f"'{spec.base}' is a {base.kind} model, not {spec.kind}"
                )
        for kind in ("text", "image"):
            defaults = [spec.name for spec in self.models if spec.kind == kind and spec.default]
            if len(defaults) > 1:
                raise ValueError(
                    f"default: one {kind} model may be the default, not {len(defaults)} "
                    f"({', '.join(defaults)})"
                )
        return self


def check_model_name(value: str) -> str:
    """``value`` when it can be a model name; raises ``ValueError`` saying why not."""
    if not _NAME.match(value) or value.endswith(("/load", "/unload")):
        raise ValueError(
            f"'{value}' is not a usable model name: 1 to 128 letters, digits and . _ : / @ + -, "
            "starting with a letter or digit, not ending in /load or /unload (the admin "
            "routes' own)"
        )
    return value


def _entry_error(index: int, spec: ModelSpec, field: str, message: str) -> ValueError:
    return ValueError(f"models[{index}] ({spec.name}): {field}: {message}")


def load_models_file(path: Path, *, check_paths: bool = True) -> ModelsFile:
    """Read and check ``path``.

    Relative local paths in ``source`` and ``lora`` are taken from the file's folder and
    written back absolute. With ``check_paths``, a path that looks local (absolute, or starting
    with ``.``) must exist. Raises ``ModelsFileError`` naming the entry and field.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsFileError(f"MODELS_FILE={path}: cannot read it: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ModelsFileError(f"MODELS_FILE={path}: not valid YAML: {exc}") from exc
    try:
        models = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        raise ModelsFileError(
            f"MODELS_FILE={path}: {describe_validation_error(exc, raw)}"
        ) from None
    folder = path.resolve().parent
    for index, spec in enumerate(models.models):
        for field in ("source", "lora"):
            value = getattr(spec, field)
            if value is None or not _looks_local(value):
                continue
            local = (folder / Path(value).expanduser()).resolve()
            if check_paths and not local.exists():
                raise ModelsFileError(
                    f"MODELS_FILE={path}: models[{index}] ({spec.name}): {field}: {local} "
                    "does not exist"
                )
            setattr(spec, field, str(local))
    return models


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def describe_validation_error(exc: ValidationError, raw: Any) -> str:
    """The first error of ``exc`` as ``models[i] (name): field: message``."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith("models["):
        return message
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        index = loc[1]
        entries = raw.get("models") if isinstance(raw, dict) else None
        entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        field = ".".join(str(part) for part in loc[2:])
        prefix = f"models[{index}]" + (f" ({name})" if isinstance(name, str) else "")
        return f"{prefix}: {field + ': ' if field else ''}{message}"
    field = ".".join(str(part) for part in loc)
    return f"{field + ': ' if field else ''}{message}"
