"""Pick and build engines from settings: the one place that knows the concrete classes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fictures_ai.engines.bundled_model import BUNDLED_TEXT_MODEL, BUNDLED_TEXT_MODEL_DISPLAY_NAME

if TYPE_CHECKING:
    from fictures_ai.config import Settings
    from fictures_ai.engines.base import TextEngine


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
