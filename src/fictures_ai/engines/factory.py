"""Pick and build engines from settings: the one place that knows the concrete classes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fictures_ai.engines.bundled_model import BUNDLED_TEXT_MODEL, BUNDLED_TEXT_MODEL_DISPLAY_NAME

if TYPE_CHECKING:
    from fictures_ai.config import Settings
    from fictures_ai.engines.base import ImageEngine, TextEngine


def text_model_display_name(settings: Settings) -> str:
    """The name the API reports for the text model, known without loading it."""
    if settings.text_served_model_name:
        return settings.text_served_model_name
    if settings.text_model_name == BUNDLED_TEXT_MODEL:
        return BUNDLED_TEXT_MODEL_DISPLAY_NAME
    source = settings.text_model_name.rstrip("/")
    return Path(source).name if Path(source).is_dir() else source


async def create_text_engine(settings: Settings) -> TextEngine:
    """Load the configured text engine (vLLM; imported lazily, it is slow to import)."""
    from fictures_ai.engines.vllm_engine import VllmTextEngine

    return await VllmTextEngine.load(settings)


def image_device(settings: Settings) -> str:
    """The device the image pipeline will use, after checking that the settings can work there.

    Raises ``ValueError`` with a clear message (e.g. CPU offload without a GPU), so that the
    server refuses to start rather than failing a request later.
    """
    from fictures_ai.engines.diffusers_engine import resolve_image_device, validate_image_settings

    device = resolve_image_device(settings)
    validate_image_settings(settings, device)
    return device


def image_model_display_name(settings: Settings, device: str) -> str:
    """The name the API reports for the image model, known without loading it."""
    from fictures_ai.engines.diffusers_engine import DEFAULT_GPU_IMAGE_MODEL, describe_source
    from fictures_ai.engines.tiny_pipeline import TINY_IMAGE_MODEL

    if settings.image_model_name:
        return describe_source(settings.image_model_name).name
    return DEFAULT_GPU_IMAGE_MODEL if device == "cuda" else TINY_IMAGE_MODEL


def image_model_notice(settings: Settings, device: str) -> str | None:
    """What the model info says before the image model loads: the tiny pipeline's warning."""
    from fictures_ai.engines.diffusers_engine import TINY_PIPELINE_NOTICE
    from fictures_ai.engines.tiny_pipeline import TINY_IMAGE_MODEL

    is_tiny = image_model_display_name(settings, device) == TINY_IMAGE_MODEL
    return TINY_PIPELINE_NOTICE if is_tiny else None


async def create_image_engine(settings: Settings) -> ImageEngine:
    """Load the configured image pipeline (diffusers)."""
    from fictures_ai.engines.diffusers_engine import DiffusersImageEngine

    return await DiffusersImageEngine.load(settings=settings)
