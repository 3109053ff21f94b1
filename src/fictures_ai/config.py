"""Server settings, read from environment variables and ``.env`` (pydantic-settings).

Each field's environment variable is its name in upper case (``text_model_name`` is
``TEXT_MODEL_NAME``); names the original deployment used (``VLLM_TENSOR_PARALLEL_SIZE``,
``VLLM_MAX_NUM_SEQS``, ``VLLM_QUANTIZATION``, ``AI_SERVER_GENERATION_MODE``) are accepted as
aliases so its ``.env`` still works. The server's own names stay out of vLLM's ``VLLM_``
namespace, which vLLM reads (and warns about when it does not know a name).
The CLI flags of ``fictures-ai serve`` and ``.env.example`` are generated from / checked
against these fields, so they cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from platformdirs import user_cache_dir, user_data_dir
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import ArgumentError

from fictures_ai.database import SUPPORTED_BACKENDS, parse_database_url
from fictures_ai.observability.logs import LogFormat
from fictures_ai.redaction import MASK, mask_credentials, mask_setting
from fictures_ai.shared import (
    BUNDLED_TEXT_MODEL,
    CpuOffload,
    ImageDevice,
    ImageDtype,
    ImageScheduler,
    PromptFormat,
    SpeculativeMethod,
    StructuredOutputsBackend,
    TextDtype,
    speculative_problem,
)

logger = logging.getLogger(__name__)

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

GenerationMode = Literal["all", "text", "image"]
ApiKeyStoreKind = Literal["local", "fictures"]

ENV_FILE = Path(".env")
"""The file settings are read from after the environment (in the working directory)."""

SECRET: dict[str, Any] = {"secret": True}
"""``json_schema_extra`` of a setting that may hold a credential: its value is only ever shown
masked (start-up log, ``repr``, error messages)."""
WHOLE_SECRET: dict[str, Any] = {"secret": "whole"}
"""``json_schema_extra`` of a setting that is a credential through and through, never a URL
(the pepper): its value is always shown as ``***``, even when it looks like a URL."""


class Settings(BaseSettings):
    """Every setting of the server, with its default and a one-line description."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILE,
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        # VAR= (docker compose passes ${VAR} through empty) means unset, not "".
        env_ignore_empty=True,
        # A ValidationError's text would quote every input, passwords in URLs too;
        # describe_settings_error shows them masked.
        hide_input_in_errors=True,
    )

    # HTTP
    api_host: str = Field("0.0.0.0", description="Interface the HTTP server binds to.")
    api_port: int = Field(8000, ge=1, le=65535, description="TCP port of the HTTP server.")
    cors_origins: str = Field(
        "http://localhost:3000,http://localhost:8000",
        description="Comma-separated origins allowed by CORS ('*' allows any, without cookies).",
    )
    log_level: LogLevel = Field("INFO", description="Log level of the server.")
    log_format: LogFormat = Field(
        "json", description="Log lines as JSON objects (json, for log pipelines) or plain text."
    )
    log_prompts: bool = Field(
        False, description="Put prompts into the access log (they may hold private text)."
    )
    otlp_endpoint: str | None = Field(
        None,
        description=(
            "OTLP/HTTP collector URL for traces (e.g. http://collector:4318); unset: "
            "OTEL_EXPORTER_OTLP_ENDPOINT if set, else no tracing."
        ),
        json_schema_extra=SECRET,
    )
    health_window_s: int = Field(
        300, ge=1, description="Seconds of recent requests behind /health's latency and errors."
    )
    generation_mode: GenerationMode = Field(
        "all",
        # The original ai-server read AI_SERVER_GENERATION_MODE (image | text | both) from the
        # web app's .env.local; both names and 'both' still work.
        validation_alias=AliasChoices("generation_mode", "ai_server_generation_mode"),
        description=(
            "What this server generates: all, or only text or only images (the other half's "
            "routes are not mounted and its model is never loaded)."
        ),
    )
    preload_models: bool = Field(
        False,
        description="Load the models at start-up instead of on the first request (lazy).",
    )
    model_cache_dir: Path = Field(
        Path(user_cache_dir("fictures-ai")) / "models",
        description="Where converted and generated models are cached (outside the repository).",
    )
    models_file: Path | None = Field(
        None,
        description=(
            "A YAML file declaring the models to serve (names, sources, LoRA adapters, load "
            "policy, defaults; see docs/models.md). Unset: one text and one image model from "
            "the TEXT_ and IMAGE_ settings."
        ),
    )
    model_memory_budget_gb: float | None = Field(
        None,
        gt=0,
        description=(
            "Memory the loaded models may use together (GiB; RAM on a CPU, GPU memory on "
            "CUDA), measured after each load; idle models are unloaded, least recently used "
            "first, to stay under it. Unset: no budget."
        ),
    )

    # Security and limits
    require_api_key: bool = Field(
        True,
        description="Require an API key on /api/v1 and /v1 (false: development only).",
    )
    database_url: str | None = Field(
        None,
        description=(
            "The server's own database, for its keys (SQLAlchemy URL, e.g. "
            "postgresql://user:pw@host/db); unset: an SQLite file in the user data folder."
        ),
        json_schema_extra=SECRET,
    )
    api_key_pepper: str | None = Field(
        None,
        min_length=32,
        description=(
            "Secret key (32+ characters) of the HMAC-SHA-256 the server's own keys are stored "
            "as; changing it invalidates every one of them; unset: plain SHA-256."
        ),
        json_schema_extra=WHOLE_SECRET,
    )
    api_key_store: ApiKeyStoreKind = Field(
        "local",
        description=(
            "Where keys come from: local (the server's own, fai_...) or fictures (also the "
            "web app's fic_... keys, from FICTURES_DATABASE_URL)."
        ),
    )
    fictures_database_url: str | None = Field(
        None,
        description=(
            "The Fictures web app's PostgreSQL, whose api_keys table is read with "
            "API_KEY_STORE=fictures (never written, but for last_used_at)."
        ),
        json_schema_extra=SECRET,
    )
    api_key_cache_s: float = Field(
        5.0, ge=0.0, description="Seconds a verified key is trusted before a revocation shows."
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests per minute per key (per address without keys); 0: none."
    )
    rate_limit_tokens_per_minute: int = Field(
        0, ge=0, description="Prompt plus generated tokens per minute per key; 0: no limit."
    )
    rate_limit_images_per_minute: int = Field(
        0, ge=0, description="Images per minute per key; 0: no limit."
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL to share rate limits between replicas; unset: in-process.",
        json_schema_extra=SECRET,
    )
    image_url_ttl_s: int = Field(
        3600, ge=1, description="How long an image answered by URL (OpenAI API) stays fetchable."
    )
    max_request_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body accepted (413 beyond it)."
    )
    request_timeout_s: float = Field(
        600.0, gt=0.0, description="A generation running longer is stopped (504 / error event)."
    )
    response_cache_max_bytes: int = Field(
        64 << 20,
        ge=0,
        description="Bytes of answers to deterministic requests kept per model (0: no cache).",
    )
    text_max_pending: int = Field(
        512, ge=1, description="Text requests running or waiting at once; beyond: 429."
    )
    image_max_queue: int = Field(
        16, ge=0, description="Image requests a new one may wait behind; beyond: 429."
    )
    engine_health_interval_s: float = Field(
        5.0, gt=0.0, description="How often a loaded engine is checked (and restarted if dead)."
    )
    shutdown_grace_s: int = Field(
        30, ge=0, description="On SIGTERM, how long in-flight requests may finish."
    )

    # Scaling out: `fictures-ai serve --ray` (docs/scaling.md)
    ray_address: str | None = Field(
        None,
        description=(
            "The Ray cluster `serve --ray` deploys on (host:port of its head, or auto for the "
            "one running on this machine); unset: a Ray started for this server."
        ),
    )
    ray_ingress_replicas: int = Field(
        1,
        ge=1,
        description=(
            "Replicas of the HTTP ingress (auth, limits, routing, SSE) with `serve --ray`; "
            "more than one needs DATABASE_URL (PostgreSQL) and REDIS_URL."
        ),
    )
    ray_model_replicas: int = Field(
        1,
        ge=1,
        description=(
            "Replicas of each model with `serve --ray`, for models the models file does not "
            "size (its `replicas`)."
        ),
    )
    ray_stream_interval_ms: float = Field(
        50.0,
        ge=0.0,
        description=(
            "With `serve --ray`, a text replica sends a stream's tokens at most this often "
            "(ms), several per message when they come faster; the first and last at once. "
            "Each message through Ray costs CPU; 0: one message per engine output."
        ),
    )
    ray_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=(
            "With `serve --ray`, each ingress replica also serves its /metrics on this port "
            "plus its replica rank (0, 1, ...), for Prometheus to scrape every replica."
        ),
    )

    # Text generation (vLLM)
    text_model_name: str = Field(
        BUNDLED_TEXT_MODEL,
        description="Text model: a Hugging Face hub id, a local folder, or the bundled SmolLM2.",
    )
    text_served_model_name: str | None = Field(
        None, description="Name the API reports for the text model (default: derived from it)."
    )
    text_prompt_format: PromptFormat = Field(
        PromptFormat.CHAT,
        description="'chat' wraps a prompt as a user message with the chat template; 'raw' not.",
    )
    text_max_model_len: int = Field(
        8192, ge=16, description="Context window in tokens (prompt plus output)."
    )
    text_gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="Fraction of GPU memory vLLM may use (GPU only)."
    )
    text_tensor_parallel_size: int = Field(
        1,
        ge=1,
        validation_alias=AliasChoices("text_tensor_parallel_size", "vllm_tensor_parallel_size"),
        description="GPUs one model is split across (with CUDA_VISIBLE_DEVICES).",
    )
    text_max_num_seqs: int = Field(
        256,
        ge=1,
        validation_alias=AliasChoices("text_max_num_seqs", "vllm_max_num_seqs"),
        description="Most sequences vLLM batches together (continuous batching).",
    )
    text_max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        description=(
            "Most tokens one engine step processes (chunked prefill); lower keeps streams "
            "moving while a long prompt is read; unset: vLLM's default."
        ),
    )
    text_trust_remote_code: bool = Field(
        False, description="Allow models that ship their own Python code (only trusted models)."
    )
    text_dtype: TextDtype = Field(
        "auto", description="Weight and activation dtype of the text model."
    )
    text_quantization: str | None = Field(
        None,
        validation_alias=AliasChoices("text_quantization", "vllm_quantization"),
        description="vLLM quantization method (e.g. awq, gptq, fp8); none by default.",
    )
    text_enforce_eager: bool = Field(
        False,
        description=(
            "Skip vLLM's graph compilation: starts ~65 s sooner on the CPU, but decodes a long "
            "story ~25% slower (docs/benchmarks.md)."
        ),
    )
    text_cpu_kv_cache_mb: int = Field(
        512, ge=16, description="KV-cache size in MiB when vLLM runs on the CPU."
    )
    text_structured_outputs_backend: StructuredOutputsBackend = Field(
        "xgrammar",
        description=(
            "Library that constrains JSON, regex, choice and grammar output (auto: vLLM "
            "picks per request, but cannot keep JSON compact)."
        ),
    )
    text_disable_any_whitespace: bool = Field(
        True,
        description=(
            "Constrained JSON is compact: no free whitespace between its tokens, so a small "
            "model cannot run on in newlines (xgrammar and guidance only)."
        ),
    )
    text_tool_call_parser: str | None = Field(
        None,
        description=(
            "vLLM's parser for the tool calls a model writes on its own (tool_choice auto): "
            "hermes (Qwen, Hermes), llama3_json, pythonic, mistral... Unset: tool_choice "
            "auto with tools is refused; required and a named function work with any model."
        ),
    )
    text_enable_prefix_caching: bool = Field(
        True,
        description=(
            "Reuse the KV cache of a prompt's start that an earlier request computed (vLLM's "
            "enable_prefix_caching): requests that repeat a long story context skip reading it."
        ),
    )
    text_speculative_method: SpeculativeMethod = Field(
        "none",
        description=(
            "Speculative decoding (vLLM's speculative_config): ngram proposes the tokens that "
            "followed the latest ones in the prompt (wins at temperature 0, loses at 0.7: "
            "docs/benchmarks.md), draft_model asks TEXT_SPECULATIVE_MODEL, none is off. Greedy "
            "output stays the model's own up to floating-point ties; logit_bias is refused "
            "while it is on."
        ),
    )
    text_num_speculative_tokens: int = Field(
        4, ge=1, description="Tokens proposed per engine step (vLLM's num_speculative_tokens)."
    )
    text_prompt_lookup_min: int = Field(
        2, ge=1, description="ngram: shortest run of the latest tokens looked up in the prompt."
    )
    text_prompt_lookup_max: int = Field(
        4, ge=1, description="ngram: longest run looked up (the longest that matches wins)."
    )
    text_speculative_model: str | None = Field(
        None,
        description="draft_model: the draft model (hub id or folder, same tokenizer, smaller).",
    )
    text_enable_lora: bool = Field(
        False,
        description=(
            "Serve LoRA adapters on the text model (vLLM's enable_lora): adapters declared in "
            "the models file or registered with POST /api/v1/models."
        ),
    )
    text_max_loras: int = Field(
        1, ge=1, description="LoRA adapters in one engine batch at once (vLLM's max_loras)."
    )
    text_max_lora_rank: int = Field(
        16,
        ge=1,
        description=(
            "The largest LoRA rank the engine accepts (vLLM's max_lora_rank; vLLM sizes its "
            "slots to the next of 8, 16, 32, 64, ...)."
        ),
    )

    # Image generation (diffusers)
    image_model_name: str | None = Field(
        None,
        description=(
            "Image model: hub id or local folder; unset means SDXL base on a GPU and the tiny "
            "offline pipeline (random weights, draws noise) on a CPU."
        ),
    )
    image_device: ImageDevice = Field("auto", description="Device of the image pipeline.")
    image_dtype: ImageDtype = Field(
        "auto", description="Pipeline dtype; auto is float16 on CUDA and float32 on the CPU."
    )
    image_scheduler: ImageScheduler = Field(
        "dpm_multistep", description="Sampler of the image pipeline."
    )
    image_attention_slicing: bool = Field(
        False, description="Compute attention in slices (less memory, a little slower)."
    )
    image_vae_slicing: bool = Field(False, description="Decode images one at a time in the VAE.")
    image_vae_tiling: bool = Field(
        False, description="Decode large images tile by tile in the VAE (less memory)."
    )
    image_cpu_offload: CpuOffload = Field(
        "none", description="Offload idle submodules to the CPU (accelerators only)."
    )
    image_compile: bool = Field(
        False, description="torch.compile the UNet (slow first image, faster later ones)."
    )
    image_torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads for image rendering (default: torch's own)."
    )
    image_max_concurrency: int = Field(
        1, ge=1, description="Images rendered at once; further requests wait in a queue."
    )
    image_max_batch: int = Field(
        8,
        ge=1,
        description=(
            "Most waiting image requests of one size, steps, guidance and LoRAs rendered in "
            "one pipeline call (1: one at a time)."
        ),
    )
    image_batch_wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="How long an idle renderer waits for more requests to fill a batch.",
    )

    # Durable jobs and batches (/api/v1/jobs, /v1/files, /v1/batches): docs/jobs.md
    jobs_dir: Path = Field(
        default_factory=lambda: Path(user_data_dir("fictures-ai")) / "jobs",
        description="Folder of uploaded files, batch output files and rendered job images.",
    )
    job_max_requests: int = Field(
        1000, ge=1, description="Requests one job or batch may hold; more: 400."
    )
    job_max_active_per_key: int = Field(
        20, ge=1, description="Unfinished jobs and batches per key; more: 429."
    )
    job_max_stored_bytes: int = Field(
        2 << 30, ge=1 << 20, description="Bytes of files and job results kept per key; more: 413."
    )
    job_max_file_bytes: int = Field(
        100 << 20, ge=1 << 20, description="Largest file uploaded to /v1/files; larger: 413."
    )
    job_text_concurrency: int = Field(
        4, ge=1, description="Text requests of jobs run at once per server (below max_num_seqs)."
    )
    job_image_concurrency: int | None = Field(
        None,
        ge=1,
        description=(
            "Image requests of jobs rendered or waiting at once per server (default: twice "
            "IMAGE_MAX_BATCH, so a full batch waits while one renders; 1 without batching)."
        ),
    )
    job_lease_s: float = Field(
        30.0, ge=1.0, description="A job request whose server stopped runs again after this."
    )
    job_result_ttl_s: int = Field(
        7 * 86400, ge=60, description="How long a finished job's results and files are kept."
    )
    webhook_secret: str | None = Field(
        None,
        description="Standard Webhooks secret (whsec_...) signing job webhooks; unset: refused.",
        json_schema_extra=WHOLE_SECRET,
    )
    webhook_allowed_hosts: str = Field(
        "",
        description="Comma-separated webhook hosts allowed although internal (e.g. localhost).",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0.0, description="How long one webhook attempt may take."
    )
    webhook_max_attempts: int = Field(
        12, ge=1, description="Attempts to deliver one webhook event before giving up."
    )
    webhook_retry_base_s: float = Field(
        5.0, gt=0.0, description="Longest back-off after the 1st failure (doubling, jittered)."
    )
    webhook_retry_max_s: float = Field(
        3600.0, gt=0.0, description="Longest back-off between two webhook attempts."
    )

    @field_validator("generation_mode", mode="before")
    @classmethod
    def _both_means_all(cls, value: object) -> object:
        # The web app's AI_SERVER_GENERATION_MODE says both for all, in any case.
        if not isinstance(value, str):
            return value
        value = value.strip().lower()
        return "all" if value == "both" else value

    @field_validator("database_url", "fictures_database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            backend: str | None = parse_database_url(value).get_backend_name()
            problem = ""
        except ArgumentError as exc:
            backend, problem = None, f" ({exc})"
        if backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                "must be a PostgreSQL URL (postgresql://user:password@host:5432/db) or an "
                f"SQLite one (sqlite:///path/to/file.db), not '{mask_setting(value)}'{problem}"
            )
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_otlp_endpoint(cls, value: str | None) -> str | None:
        # Checked here: the exporter would log a URL it cannot parse whole, password and all.
        if value is None:
            return value
        try:
            parts = urlsplit(value)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(
                "must be an http:// or https:// URL with a host (e.g. "
                f"http://collector:4318), not '{mask_setting(value)}'"
            )
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: str | None) -> str | None:
        # Standard Webhooks: "whsec_" + base64 of a 24- to 64-byte key (the specification's
        # signature scheme). Checked here so a bad secret stops start-up, not a delivery.
        if value is None:
            return value
        encoded = value.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not value.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError(
                "must be whsec_ followed by the base64 of 24 to 64 random bytes (make one "
                'with: python -c "from fictures_ai.services.jobs.webhooks import '
                'generate_webhook_secret as g; print(g())")'
            )
        return value

    @model_validator(mode="after")
    def _check_webhook_backoff(self) -> Settings:
        if self.webhook_retry_max_s < self.webhook_retry_base_s:
            raise ValueError(
                f"WEBHOOK_RETRY_MAX_S={self.webhook_retry_max_s:g} must be at least "
                f"WEBHOOK_RETRY_BASE_S={self.webhook_retry_base_s:g}"
            )
        return self

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: str) -> str:
        for origin in (item.strip() for item in value.split(",")):
            if origin and origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(
                    f"CORS origin '{origin}' must start with http:// or https:// (or be '*')"
                )
        return value

    @model_validator(mode="after")
    def _check_tensor_parallel_devices(self) -> Settings:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible and self.text_tensor_parallel_size > 1:
            count = len([device for device in visible.split(",") if device.strip()])
            if count < self.text_tensor_parallel_size:
                raise ValueError(
                    f"TEXT_TENSOR_PARALLEL_SIZE={self.text_tensor_parallel_size} needs at least "
                    f"that many GPUs, but CUDA_VISIBLE_DEVICES={visible} lists {count}"
                )
        return self

    @model_validator(mode="after")
    def _check_key_store(self) -> Settings:
        if self.api_key_store == "fictures" and not self.fictures_database_url:
            raise ValueError(
                "API_KEY_STORE=fictures needs FICTURES_DATABASE_URL, the URL of the Fictures "
                "web app's PostgreSQL (e.g. postgresql://user:password@host/fictures)"
            )
        return self

    @model_validator(mode="after")
    def _check_structured_outputs(self) -> Settings:
        if self.text_disable_any_whitespace and self.text_structured_outputs_backend == "auto":
            raise ValueError(
                "TEXT_DISABLE_ANY_WHITESPACE=true needs TEXT_STRUCTURED_OUTPUTS_BACKEND=xgrammar "
                "or guidance (vLLM cannot keep JSON compact when it picks the backend itself)"
            )
        return self

    @model_validator(mode="after")
    def _check_speculative_decoding(self) -> Settings:
        problem = speculative_problem(
            method=self.text_speculative_method,
            model=self.text_speculative_model,
            num_tokens=self.text_num_speculative_tokens,
            lookup_min=self.text_prompt_lookup_min,
            lookup_max=self.text_prompt_lookup_max,
            prefix="TEXT_",
        )
        if problem:
            raise ValueError(problem)
        return self

    @property
    def serves_text(self) -> bool:
        """Whether this server generates text (GENERATION_MODE all or text)."""
        return self.generation_mode != "image"

    @property
    def serves_images(self) -> bool:
        """Whether this server generates images (GENERATION_MODE all or image)."""
        return self.generation_mode != "text"

    @property
    def job_image_slots(self) -> int:
        """``JOB_IMAGE_CONCURRENCY``, or what it defaults to with ``IMAGE_MAX_BATCH``."""
        if self.job_image_concurrency is not None:
            return self.job_image_concurrency
        return 1 if self.image_max_batch == 1 else 2 * self.image_max_batch

    @property
    def webhook_allowed_hosts_list(self) -> list[str]:
        """The hosts of ``WEBHOOK_ALLOWED_HOSTS``, lower-cased."""
        return [
            host.strip().lower() for host in self.webhook_allowed_hosts.split(",") if host.strip()
        ]

    @property
    def cors_origins_list(self) -> list[str]:
        """The CORS origins as a list."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @classmethod
    def secret_fields(cls) -> frozenset[str]:
        """The settings that may hold a credential (a URL with a password, a token)."""
        return frozenset(
            name
            for name, info in cls.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("secret")
        )

    def non_default_items(self) -> dict[str, Any]:
        """The settings that differ from their defaults, credentials masked."""
        changed: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value == info.get_default(call_default_factory=True):
                continue
            changed[name] = _shown(name, value)
        return changed

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr(settings) (a debugger, a log line, a traceback) shows credentials masked.
        for name, value in super().__repr_args__():
            yield name, _shown(name, value) if name else value


RETIRED_NAMES = {
    f"VLLM_{name}": f"TEXT_{name}"
    for name in (
        "DTYPE",
        "ENFORCE_EAGER",
        "CPU_KV_CACHE_MB",
        "TRUST_REMOTE_CODE",
        "MAX_NUM_BATCHED_TOKENS",
        "STRUCTURED_OUTPUTS_BACKEND",
        "DISABLE_ANY_WHITESPACE",
    )
}
"""Names this server read before its settings left vLLM's namespace (0.1 → TEXT_...), and are
not aliases: left to vLLM, which does not know them."""


def setting_name_warnings(
    environ: Mapping[str, str], env_file: Path | None = ENV_FILE
) -> list[str]:
    """What to tell an operator about the names in ``environ`` and ``env_file``: a retired
    ``VLLM_...`` name that is no longer read (the setting silently keeps its default), and an
    original name set beside its new one (the new one wins)."""
    names = {name.upper() for name in environ}
    if env_file is not None and env_file.is_file():
        names |= {name.upper() for name in dotenv_values(env_file)}
    warnings = [
        f"{old} is no longer read by this server (set {new} instead); it is left to vLLM, "
        "which does not know it"
        for old, new in RETIRED_NAMES.items()
        if old in names and new not in names
    ]
    for field, info in Settings.model_fields.items():
        if not isinstance(info.validation_alias, AliasChoices):
            continue
        aliases = [str(choice).upper() for choice in info.validation_alias.choices]
        given = [alias for alias in aliases if alias in names]
        if field.upper() in given and len(given) > 1:
            ignored = ", ".join(alias for alias in given if alias != field.upper())
            warnings.append(f"{field.upper()} and {ignored} are both set: {field.upper()} is used")
    return warnings


def describe_settings_error(exc: ValidationError) -> str:
    """The errors of invalid settings, one a line, each naming its environment variable(s)
    (``GENERATION_MODE or AI_SERVER_GENERATION_MODE='x': Input should be ...``), values masked
    as in :meth:`Settings.non_default_items` (the validators' own messages mask them too)."""
    lines = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        field = str(error["loc"][0]) if error["loc"] else None
        info = Settings.model_fields.get(field) if field else None
        if field is None or info is None:
            lines.append(message)
            continue
        names = [field.upper()]
        if isinstance(info.validation_alias, AliasChoices):
            names = [str(choice).upper() for choice in info.validation_alias.choices]
        value = error.get("input")
        shown = f"={_shown(field, value)!r}" if isinstance(value, str) else ""
        lines.append(f"{' or '.join(names)}{shown}: {message}")
    return "\n".join(lines)


def _shown(name: str, value: Any) -> Any:
    """A setting's value as logs and messages may show it: a credential setting's masked, and
    any string cleared of what looks like a credential."""
    if not isinstance(value, str):
        return value
    if name not in Settings.secret_fields():
        return mask_credentials(value)
    extra = Settings.model_fields[name].json_schema_extra
    return MASK if extra == WHOLE_SECRET else mask_setting(value)
