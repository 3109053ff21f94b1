"""Engines from settings: the one place that maps the ``TEXT_...``/``IMAGE_...`` settings onto
each engine's options and knows the concrete engine classes.

The engine modules are imported when an engine is built, not with this module: vLLM and
diffusers take seconds to import, and a server that serves one half never needs the other.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import TypeAdapter, ValidationError

from fictures_ai.config import Settings
from fictures_ai.engines.options import DiffusersEngineOptions, VllmEngineOptions
from fictures_ai.shared import BUNDLED_TINY_SDXL

if TYPE_CHECKING:
    from fictures_ai.engines.base import ImageEngine, TextEngine
    from fictures_ai.services.models.spec import ModelSpec

TextLoader = Callable[[], Awaitable["TextEngine"]]
ImageLoader = Callable[[], Awaitable["ImageEngine"]]


def text_engine_options(settings: Settings) -> VllmEngineOptions:
    """The text engine's options from the ``TEXT_...`` settings."""
    return VllmEngineOptions(
        model=settings.text_model_name,
        served_model_name=settings.text_served_model_name,
        cache_dir=settings.model_cache_dir,
        max_model_len=settings.text_max_model_len,
        gpu_memory_utilization=settings.text_gpu_memory_utilization,
        tensor_parallel_size=settings.text_tensor_parallel_size,
        max_num_seqs=settings.text_max_num_seqs,
        max_num_batched_tokens=settings.text_max_num_batched_tokens,
        trust_remote_code=settings.text_trust_remote_code,
        dtype=settings.text_dtype,
        quantization=settings.text_quantization,
        enforce_eager=settings.text_enforce_eager,
        cpu_kv_cache_mb=settings.text_cpu_kv_cache_mb,
        structured_outputs_backend=settings.text_structured_outputs_backend,
        disable_any_whitespace=settings.text_disable_any_whitespace,
        tool_call_parser=settings.text_tool_call_parser,
        enable_prefix_caching=settings.text_enable_prefix_caching,
        speculative_method=settings.text_speculative_method,
        num_speculative_tokens=settings.text_num_speculative_tokens,
        prompt_lookup_min=settings.text_prompt_lookup_min,
        prompt_lookup_max=settings.text_prompt_lookup_max,
        speculative_model=settings.text_speculative_model,
        enable_lora=settings.text_enable_lora,
        max_loras=settings.text_max_loras,
        max_lora_rank=settings.text_max_lora_rank,
    )


def image_engine_options(settings: Settings) -> DiffusersEngineOptions:
    """The image engine's options from the ``IMAGE_...`` settings."""
    return DiffusersEngineOptions(
        model=settings.image_model_name,
        cache_dir=settings.model_cache_dir,
        device=settings.image_device,
        dtype=settings.image_dtype,
        scheduler=settings.image_scheduler,
        attention_slicing=settings.image_attention_slicing,
        vae_slicing=settings.image_vae_slicing,
        vae_tiling=settings.image_vae_tiling,
        cpu_offload=settings.image_cpu_offload,
        compile=settings.image_compile,
        torch_threads=settings.image_torch_threads,
        max_concurrency=settings.image_max_concurrency,
    )


async def create_text_engine(options: VllmEngineOptions) -> TextEngine:
    """Load a vLLM text engine; raises ``ModelLoadError`` when it cannot load."""
    from fictures_ai.engines.vllm_engine import VllmTextEngine

    return await VllmTextEngine.load(options)


async def create_image_engine(options: DiffusersEngineOptions) -> ImageEngine:
    """Load a diffusers image engine; raises ``ModelLoadError`` when it cannot load."""
    from fictures_ai.engines.diffusers_engine import DiffusersImageEngine

    return await DiffusersImageEngine.load(options)


class EngineLoaders(Protocol):
    """Where a model's engine comes from: built in this process (:class:`LocalEngines`), or
    reached in Ray Serve replicas (``fictures_ai.cluster``). The registry asks once per base
    model, with its entry and its resolved options; calling the loader loads the engine."""

    remote: bool
    """The engines run elsewhere (Ray Serve): this process neither measures nor unloads them."""

    def text(self, spec: ModelSpec, options: VllmEngineOptions) -> TextLoader:
        """The loader of the text model ``spec``."""
        ...

    def image(self, spec: ModelSpec, options: DiffusersEngineOptions) -> ImageLoader:
        """The loader of the image model ``spec``."""
        ...

    def replicas(self, spec: ModelSpec) -> int:
        """How many engines serve ``spec`` at most (its capacity is that many engines')."""
        ...


class LocalEngines:
    """Engines loaded in this process: vLLM and diffusers, one per base model."""

    remote = False

    def text(self, spec: ModelSpec, options: VllmEngineOptions) -> TextLoader:
        return functools.partial(create_text_engine, options)

    def image(self, spec: ModelSpec, options: DiffusersEngineOptions) -> ImageLoader:
        return functools.partial(create_image_engine, options)

    def replicas(self, spec: ModelSpec) -> int:
        return 1


def image_device(options: DiffusersEngineOptions) -> str:
    """The device the image pipeline will use, after checking that the options can work there.

    Raises ``ValueError`` with a clear message (e.g. CPU offload without a GPU), so that the
    server refuses to start rather than failing a request later.
    """
    from fictures_ai.engines.diffusers_engine import resolve_image_device, validate_image_options

    device = resolve_image_device(options)
    validate_image_options(options, device)
    return device


def default_image_source(device: str) -> str:
    """What an unset ``IMAGE_MODEL_NAME`` means on ``device``: SDXL base on a GPU, the tiny
    offline pipeline (``BUNDLED_TINY_SDXL``) on a CPU."""
    from fictures_ai.engines.diffusers_engine import DEFAULT_GPU_IMAGE_MODEL

    return DEFAULT_GPU_IMAGE_MODEL if device == "cuda" else BUNDLED_TINY_SDXL


def image_model_display_name(options: DiffusersEngineOptions, device: str) -> str:
    """The name the API reports for the image model, known without loading it."""
    from fictures_ai.engines.diffusers_engine import DEFAULT_GPU_IMAGE_MODEL, describe_source
    from fictures_ai.engines.tiny_pipeline import TINY_IMAGE_MODEL

    if options.model:
        return describe_source(options.model).name
    return DEFAULT_GPU_IMAGE_MODEL if device == "cuda" else TINY_IMAGE_MODEL


def image_model_notice(options: DiffusersEngineOptions, device: str) -> str | None:
    """What the model info says before the image model loads: the tiny pipeline's warning."""
    from fictures_ai.engines.diffusers_engine import TINY_PIPELINE_NOTICE, describe_source
    from fictures_ai.engines.tiny_pipeline import TINY_IMAGE_MODEL

    if options.model:
        is_tiny = describe_source(options.model).is_tiny
    else:
        is_tiny = image_model_display_name(options, device) == TINY_IMAGE_MODEL
    return TINY_PIPELINE_NOTICE if is_tiny else None


_NOT_OPTIONS = frozenset(
    {"model", "served_model_name", "cache_dir", "distributed_executor_backend"}
)
"""Option fields a models file sets through its own keys (source, name), or ``serve --ray``
sets, not ``options``."""

OptionsT = TypeVar("OptionsT", VllmEngineOptions, DiffusersEngineOptions)


def override_options(options: OptionsT, overrides: Mapping[str, Any]) -> OptionsT:
    """``options`` with ``overrides`` (a models file's ``options``: the settings' names without
    their ``TEXT_``/``IMAGE_`` prefix), type-checked as the settings are.

    Raises ``ValueError`` naming the option (``options.max_model_len: ...``) for an unknown
    name or a value of the wrong type.
    """
    allowed = sorted(field.name for field in fields(options) if field.name not in _NOT_OPTIONS)
    for name in overrides:
        if name not in allowed:
            raise ValueError(
                f"options.{name}: not an engine option of this kind; the options are "
                f"{', '.join(allowed)}"
            )
    merged = {**{field.name: getattr(options, field.name) for field in fields(options)}}
    merged.update(overrides)
    try:
        return TypeAdapter(type(options)).validate_python(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = "".join(f".{part}" for part in error["loc"])
        # A rule across options (the options' own check) has no field: its message names them.
        cause = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
        if cause is not None:
            cause = f"{cause} (options the entry leaves out are the settings': TEXT_/IMAGE_...)"
        raise ValueError(f"options{where}: {cause or error['msg']}") from None
