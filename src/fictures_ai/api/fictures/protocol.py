"""Request and response models of the Fictures surface (``/api/v1``), per ``api-contract.md``.

Field names, defaults and ranges are fixed by existing clients. Range violations become 400
(see ``errors.py``); wrong types and missing fields stay 422.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from fictures_ai.api.json_schema import to_json_schema
from fictures_ai.api.model_views import LoraWeight, ModelStateFields
from fictures_ai.api.unicode_text import UnicodeTextBody
from fictures_ai.config import GenerationMode
from fictures_ai.engines.base import (
    MAX_SEED,
    FinishReason,
    ImageGenerationParams,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextGenerationParams,
    TextPrompt,
    is_greedy,
    random_seed,
)
from fictures_ai.errors import InvalidRequestError
from fictures_ai.shared import PromptFormat

MAX_PROMPT_CHARS = 50_000
MAX_TEXT_TOKENS = 40_960
PROMPT_TOO_LONG = f"Prompt too long (max {MAX_PROMPT_CHARS} characters)"

ResponseFinishReason = Literal["stop", "length", "error"]


def contract_finish_reason(reason: FinishReason | None) -> ResponseFinishReason | None:
    """The contract knows stop, length and error; an aborted request reports error."""
    if reason is None or reason in ("stop", "length"):
        return reason
    return "error"


class ErrorResponse(BaseModel):
    """The Fictures surface's error body."""

    detail: str


class _Request(BaseModel):
    # Strict types: "top_p": false or "max_tokens": "12" is a malformed body (422), not 0/12.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class _Body(_Request, UnicodeTextBody):
    """A whole request body (its strings checked once, nested models included)."""


class _TextSampling(_Body):
    prompt: str = Field(
        ...,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description=f"The prompt (1..{MAX_PROMPT_CHARS} characters).",
    )
    max_tokens: int = Field(
        2048,
        ge=1,
        le=MAX_TEXT_TOKENS,
        description=(
            "Most tokens to generate; lowered to what the model's context leaves after the "
            "prompt (finish_reason 'length' when the output fills it)."
        ),
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(
        0.9, ge=0.0, le=1.0, description="Nucleus sampling mass; 0 keeps only the likeliest token."
    )
    min_tokens: int | None = Field(
        None,
        ge=0,
        le=MAX_TEXT_TOKENS,
        description="No end (end of text or a stop sequence) before this many tokens.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="The text model (see /api/v1/models); default: the server's.",
    )
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        description="Sampling seed (a signed 64-bit integer): the same seed, the same text.",
    )

    @model_validator(mode="after")
    def _check_min_tokens(self) -> _TextSampling:
        if self.min_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    @property
    def deterministic(self) -> bool:
        """Whether the client asked for a reproducible answer (the response cache serves
        only those): greedy sampling it chose (an explicit ``temperature`` under
        ``GREEDY_TEMPERATURE`` or ``top_p`` of 0), or a ``seed``. The default temperature is
        not a choice of the client's."""
        chosen = self.model_fields_set
        explicit_greedy = is_greedy(
            self.temperature if "temperature" in chosen else 1.0,
            self.top_p if "top_p" in chosen else 1.0,
        )
        return explicit_greedy or self.seed is not None

    def to_prompt(self, prompt_format: PromptFormat) -> TextPrompt:
        """The engine prompt, formatted as the server is configured."""
        return TextPrompt(text=self.prompt, format=prompt_format)

    def _params(
        self, *, stop: tuple[str, ...] = (), structured: StructuredOutputSpec | None = None
    ) -> TextGenerationParams:
        return TextGenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            structured=structured,
            min_tokens=self.min_tokens or 0,
            seed=self.seed,
            # The contract: more than the context holds is lowered to what fits, not refused.
            fit_to_context=True,
        )


class TextGenerationRequest(_TextSampling):
    """Body of ``/api/v1/text/generate`` and ``/api/v1/text/stream``."""

    stop_sequences: list[str] | None = Field(
        None, description="Stop when one of these appears ([] or null: none)."
    )
    response_format: Literal["text", "json"] | None = Field(
        None,
        description=(
            "'json': the output is JSON, constrained while sampling to response_schema (or to "
            "any JSON object without one)."
        ),
    )
    response_schema: dict[str, Any] | None = Field(
        None,
        description=(
            "JSON schema of the output (JSON Schema, or OpenAPI 3.0's dialect as Zod writes "
            "it: nullable, exclusiveMinimum flags)."
        ),
    )

    def to_generation_params(self) -> TextGenerationParams:
        """The engine's sampling parameters for this request."""
        return self._params(
            stop=tuple(s for s in self.stop_sequences or () if s), structured=self._structured()
        )

    def _structured(self) -> StructuredOutputSpec | None:
        if self.response_format == "text" and self.response_schema is not None:
            raise InvalidRequestError(
                'response_schema constrains JSON output: send it with response_format "json" '
                "(or leave response_format out).",
                param="response_schema",
            )
        if self.response_format != "json" and self.response_schema is None:
            return None
        schema = (
            to_json_schema(self.response_schema, param="response_schema")
            if self.response_schema is not None
            else {"type": "object"}
        )
        return StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=schema)


class TextGenerationResponse(BaseModel):
    """Answer of ``/api/v1/text/generate``."""

    text: str
    model: str
    tokens_used: int = Field(description="Generated tokens.")
    finish_reason: ResponseFinishReason


class TextStreamResponse(BaseModel):
    """One SSE event of ``/api/v1/text/stream`` (documents the event shape)."""

    text: str = Field(description="The whole text so far.")
    delta: str = Field(description="The text new in this event.")
    model: str
    tokens_used: int
    finish_reason: ResponseFinishReason | None
    done: bool
    error: str | None = None


class GuidedDecoding(_Request):
    """The constraint of a structured request."""

    type: Literal["json", "regex", "choice", "grammar"]
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="JSON schema.")
    pattern: str | None = Field(None, description="Regular expression the output matches.")
    choices: list[str] | None = Field(None, description="The output is one of these.")
    grammar: str | None = Field(None, description="EBNF (GBNF) grammar of the output.")

    model_config = ConfigDict(strict=True, populate_by_name=True, allow_inf_nan=False)

    def to_spec(self) -> StructuredOutputSpec:
        """Check that the field the type needs is there and build the engine constraint."""
        kind = StructuredOutputKind(self.type)
        needed = {
            StructuredOutputKind.JSON: ("schema", self.schema_),
            StructuredOutputKind.REGEX: ("pattern", self.pattern),
            StructuredOutputKind.CHOICE: ("choices", self.choices),
            StructuredOutputKind.GRAMMAR: ("grammar", self.grammar),
        }
        field, value = needed[kind]
        if not value:
            raise InvalidRequestError(
                f"guided_decoding of type '{self.type}' needs a non-empty '{field}'.",
                param=f"guided_decoding.{field}",
            )
        json_schema = None
        if kind is StructuredOutputKind.JSON and self.schema_ is not None:
            json_schema = to_json_schema(self.schema_, param="guided_decoding.schema")
        return StructuredOutputSpec(
            kind=kind,
            json_schema=json_schema,
            regex=self.pattern,
            choices=tuple(self.choices) if self.choices else None,
            grammar=self.grammar,
        )


class StructuredGenerationRequest(_TextSampling):
    """Body of ``/api/v1/text/structured``."""

    guided_decoding: GuidedDecoding

    def to_generation_params(self) -> TextGenerationParams:
        """The engine's sampling parameters, with the output constraint."""
        return self._params(structured=self.guided_decoding.to_spec())


class StructuredGenerationResponse(BaseModel):
    """Answer of ``/api/v1/text/structured``."""

    output: str
    parsed_output: Any = None
    model: str
    tokens_used: int
    finish_reason: ResponseFinishReason
    is_valid: bool


class _TextModelInfoFields(BaseModel):
    """TEXT_INFO's contract fields."""

    name: str
    type: Literal["text-generation"] = "text-generation"
    framework: str = "vLLM"
    max_tokens: int
    initialized: bool


class TextModelInfo(ModelStateFields, _TextModelInfoFields):
    """TEXT_INFO of the contract, then the model's state (the contract's fields first)."""


class _ImageModelInfoFields(BaseModel):
    """IMAGE_INFO's contract fields."""

    name: str
    type: Literal["image-generation"] = "image-generation"
    framework: str = "diffusers"
    device: str
    initialized: bool
    notice: str | None = None


class ImageModelInfo(ModelStateFields, _ImageModelInfoFields):
    """IMAGE_INFO of the contract, then the model's state."""


class HealthModels(BaseModel):
    """The models block of ``/health``; a half the server does not serve is left out."""

    text: TextModelInfo | None = None
    image: ImageModelInfo | None = None

    @model_serializer(mode="wrap")
    def _leave_out_unserved(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        served: dict[str, Any] = handler(self)
        return {kind: info for kind, info in served.items() if info is not None}


class HealthRequests(BaseModel):
    """Recent requests in ``/health`` (probes and metric scrapes are left out)."""

    window_s: float = Field(description="The sliding window, in seconds.")
    count: int = Field(description="Requests answered within the window.")
    latency_p50_ms: float | None = Field(description="Median latency (whole streams); null: none.")
    latency_p95_ms: float | None = Field(description="95th percentile latency; null: none.")
    error_rate: float | None = Field(description="Share of 5xx answers (0..1); null: none.")


class HealthGpu(BaseModel):
    """Memory of one CUDA device in ``/health``."""

    index: int
    name: str
    used_bytes: int = Field(description="In use on the device, by every process (vLLM too).")
    total_bytes: int
    allocated_bytes: int = Field(description="Allocated by this process's tensors.")


class HealthImageQueue(BaseModel):
    """The image requests of ``/health``'s ``queues``, summed over the image models."""

    waiting: int = Field(description="Requests waiting for a render slot.")
    running: int = Field(description="Renders running now.")


class HealthTextQueue(BaseModel):
    """The text requests of ``/health``'s ``queues``, summed over the text models."""

    running: int = Field(
        description="Requests in the text engines, those vLLM's scheduler holds back included."
    )


class HealthJobQueue(BaseModel):
    """The requests of unfinished jobs and batches of one kind, in ``/health``'s ``queues``."""

    queued: int = Field(description="Requests of jobs not started yet (every server's).")
    running: int = Field(description="Requests of jobs running now (every server's).")


class HealthQueues(BaseModel):
    """Queue lengths in ``/health``, one block per kind of work; a half the server does not
    serve is left out. Each block is a model of its own, so that other queues (batch jobs)
    join as further optional fields."""

    images: HealthImageQueue | None = None
    text: HealthTextQueue | None = None
    jobs: dict[Literal["text", "images"], HealthJobQueue] | None = Field(
        None,
        description="Requests of jobs and batches by kind, as of the job runner's last look "
        "(it refreshes every second).",
    )

    @model_serializer(mode="wrap")
    def _leave_out_unserved(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        served: dict[str, Any] = handler(self)
        return {kind: queue for kind, queue in served.items() if queue is not None}


class HealthResponse(BaseModel):
    """Answer of ``/health``: always 200 while the process serves."""

    status: Literal["healthy"] = "healthy"
    version: str
    generation_mode: GenerationMode
    models: HealthModels
    requests: HealthRequests | None = Field(
        None, description="Latency and error rate of recent requests (added to the contract)."
    )
    gpu: list[HealthGpu] | None = Field(
        None, description="GPU memory per device; null unless this process uses CUDA."
    )
    queues: HealthQueues | None = Field(
        None, description="Requests waiting and running now, per kind (added to the contract)."
    )


class ModelsResponse(BaseModel):
    """Answer of ``/api/v1/models``: the half the server does not serve has an empty list."""

    generation_mode: GenerationMode
    text_generation: list[TextModelInfo]
    image_generation: list[ImageModelInfo]


class _TextModelEntryFields(BaseModel):
    """The contract's fields of a ``/api/v1/text/models`` entry."""

    id: str
    name: str
    type: Literal["text-generation"] = "text-generation"
    framework: str = "vLLM"
    max_tokens: int
    status: Literal["initialized", "not_loaded"]


class TextModelEntry(ModelStateFields, _TextModelEntryFields):
    """One entry of ``/api/v1/text/models``."""


class TextModelsResponse(BaseModel):
    """Answer of ``/api/v1/text/models``."""

    models: list[TextModelEntry]


class RootEndpoints(BaseModel):
    """Links listed by ``/``."""

    docs: str = "/docs"
    redoc: str = "/redoc"
    health: str = "/health"
    models: str = "/api/v1/models"


class RootResponse(BaseModel):
    """Answer of ``/``."""

    message: str = "Fictures AI Server"
    version: str
    description: str
    endpoints: RootEndpoints = RootEndpoints()


class ImageGenerationRequest(_Body):
    """Body of ``/api/v1/images/generate``."""

    prompt: str = Field(..., min_length=1, description="What to draw.")
    negative_prompt: str | None = Field(None, description="What to keep out of the image.")
    width: int = Field(
        1344, ge=256, le=2048, description="Width in pixels, any; the PNG has exactly this width."
    )
    height: int = Field(
        768, ge=256, le=2048, description="Height in pixels, any; the PNG has exactly this height."
    )
    num_inference_steps: int = Field(30, ge=1, le=100, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=1.0, le=20.0, description="Prompt adherence.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Same seed and request, same image; random if unset."
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="The image model (see /api/v1/models); default: the server's.",
    )
    loras: list[LoraWeight] | None = Field(
        None,
        max_length=8,
        description="LoRA adapters declared on the model's base, with their weights.",
    )

    @property
    def deterministic(self) -> bool:
        """Whether the image is reproducible (the response cache serves only those): the
        request names its ``seed``."""
        return self.seed is not None

    def to_generation_params(self) -> ImageGenerationParams:
        """The engine's parameters; a request without a seed gets a random one (> 0)."""
        return ImageGenerationParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or None,
            width=self.width,
            height=self.height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed if self.seed is not None else random_seed(),
        )


class ImageGenerationResponse(BaseModel):
    """Answer of ``/api/v1/images/generate``."""

    image_url: str = Field(description="The PNG as a data URL (data:image/png;base64,...).")
    model: str
    width: int
    height: int
    seed: int


class _ImageModelEntryFields(BaseModel):
    """The contract's fields of an ``/api/v1/images/models`` entry."""

    id: str
    name: str
    type: Literal["image-generation"] = "image-generation"
    framework: str = "diffusers"
    device: str
    status: Literal["initialized", "not_loaded"]
    notice: str | None = None


class ImageModelEntry(ModelStateFields, _ImageModelEntryFields):
    """One entry of ``/api/v1/images/models``."""


class ImageModelsResponse(BaseModel):
    """Answer of ``/api/v1/images/models``."""

    models: list[ImageModelEntry]
