"""What each engine is built from: small frozen option objects, as vLLM engines take
``AsyncEngineArgs``.

The engines never read the server's settings. ``services.engine_factory`` builds these objects
from the settings (``TEXT_...`` and ``IMAGE_...``); anything else that describes a model (a
models file) can build them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fictures_ai.shared import (
    BUNDLED_TEXT_MODEL,
    BUNDLED_TEXT_MODEL_DISPLAY_NAME,
    CpuOffload,
    ImageDevice,
    ImageDtype,
    ImageScheduler,
    SpeculativeMethod,
    StructuredOutputsBackend,
    TextDtype,
    speculative_problem,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmEngineOptions:
    """One vLLM text engine: the model and the ``AsyncEngineArgs`` the server sets.

    ``model`` is a Hugging Face hub id, a local folder, or ``BUNDLED_TEXT_MODEL``;
    ``cache_dir`` is where the bundled model is converted. Sizes are in tokens but
    ``cpu_kv_cache_mb`` (MiB, used only on the CPU platform).
    """

    model: str
    served_model_name: str | None
    cache_dir: Path
    max_model_len: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_num_seqs: int
    max_num_batched_tokens: int | None
    trust_remote_code: bool
    dtype: TextDtype
    quantization: str | None
    enforce_eager: bool
    cpu_kv_cache_mb: int
    structured_outputs_backend: StructuredOutputsBackend
    disable_any_whitespace: bool
    tool_call_parser: str | None
    """vLLM's parser for calls the model writes itself (``hermes``...); None: no parser."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a prompt's start that an earlier request computed (vLLM's
    ``enable_prefix_caching``)."""
    enable_lora: bool = False
    """Serve LoRA adapters on this model (vLLM's ``enable_lora``)."""
    max_loras: int = 1
    """Adapters in one batch at once (vLLM's ``max_loras``): each takes a slot."""
    max_lora_rank: int = 16
    """The largest adapter rank the engine accepts (vLLM's ``max_lora_rank``)."""
    speculative_method: SpeculativeMethod = "none"
    """How vLLM proposes tokens ahead to check several in one step (its
    ``speculative_config.method``); greedy output stays the model's own (see docs/benchmarks.md)."""
    num_speculative_tokens: int = 4
    """Tokens proposed per step (vLLM's ``num_speculative_tokens``)."""
    prompt_lookup_min: int = 2
    """Shortest run of the latest tokens the ``ngram`` method looks up in the prompt."""
    prompt_lookup_max: int = 4
    """Longest such run; the longest that matches wins (vLLM's ``prompt_lookup_max``)."""
    speculative_model: str | None = None
    """The draft model of ``draft_model`` (hub id or folder; it must share the tokenizer)."""
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    """How vLLM starts its tensor-parallel workers (None: vLLM's choice); ``ray`` in a Ray
    Serve replica, whose placement group holds their GPUs."""

    def __post_init__(self) -> None:
        problem = speculative_problem(
            method=self.speculative_method,
            model=self.speculative_model,
            num_tokens=self.num_speculative_tokens,
            lookup_min=self.prompt_lookup_min,
            lookup_max=self.prompt_lookup_max,
        )
        if problem:
            raise ValueError(problem)

    @property
    def display_name(self) -> str:
        """The name the API reports for the model, known without loading it: the served name
        when set, the bundled model's own name, a folder's last part, or the hub id."""
        if self.served_model_name:
            return self.served_model_name
        if self.model == BUNDLED_TEXT_MODEL:
            return BUNDLED_TEXT_MODEL_DISPLAY_NAME
        source = self.model.rstrip("/")
        return Path(source).name if Path(source).is_dir() else source


@dataclass(frozen=True, slots=True, kw_only=True)
class DiffusersEngineOptions:
    """One diffusers image pipeline and how it is placed and sped up.

    ``model`` is a hub id, a local folder, ``BUNDLED_TINY_SDXL`` or ``BUNDLED_TINY_SD15`` (tiny
    pipelines built offline under ``cache_dir``); None means SDXL base on a GPU and the tiny
    SDXL pipeline on a CPU. ``torch_threads`` is the number of
    CPU threads per render thread (None: torch's default); ``max_concurrency`` the renders
    run at once, one thread each.
    """

    model: str | None
    cache_dir: Path
    device: ImageDevice
    dtype: ImageDtype
    scheduler: ImageScheduler
    attention_slicing: bool
    vae_slicing: bool
    vae_tiling: bool
    cpu_offload: CpuOffload
    compile: bool
    torch_threads: int | None
    max_concurrency: int
