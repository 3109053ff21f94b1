"""Request and response models of the OpenAI-compatible surface, after OpenAI's API reference.

Unknown request fields are accepted and ignored, as OpenAI's own server does for fields a model
does not use. Extension fields (``ignore_eos``, and ``negative_prompt``, ``steps``,
``guidance_scale``, ``seed`` for images) follow vLLM's naming where vLLM has one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fictures_ai.api.json_schema import to_json_schema
from fictures_ai.engines.base import (
    ChatMessage,
    ImageGenerationParams,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextGenerationParams,
)
from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.image_generation import MAX_SEED, random_seed

_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


class _Request(BaseModel):
    # Unknown fields are ignored as OpenAI does; known ones must have their JSON type.
    model_config = ConfigDict(extra="ignore", strict=True)


class _Response(BaseModel):
    pass


class JsonSchemaFormat(_Request):
    """``response_format.json_schema``."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class ResponseFormat(_Request):
    """``response_format``: plain text, any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def to_spec(self) -> StructuredOutputSpec | None:
        """The engine constraint: JSON output is enforced while sampling, not just asked for."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputSpec(StructuredOutputKind.JSON, json_schema={"type": "object"})
        if self.json_schema is None:
            raise InvalidRequestError(
                "response_format of type 'json_schema' needs a 'json_schema' object.",
                param="response_format.json_schema",
            )
        schema = self.json_schema.schema_ or {"type": "object"}
        return StructuredOutputSpec(
            StructuredOutputKind.JSON,
            json_schema=to_json_schema(schema, param="response_format.json_schema.schema"),
        )


class StreamOptions(_Request):
    """``stream_options``."""

    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(..., min_length=1, description="The model's id, as in GET /v1/models.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="How many choices to generate.")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop sequences.")
    seed: int | None = Field(None, description="Choice i samples with seed + i.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-text.")
    min_tokens: int = Field(
        0, ge=0, description="Extension (vLLM's): no end of text or stop before this many tokens."
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _params(
        self,
        *,
        max_tokens: int | None,
        logprobs: int | None,
        structured: StructuredOutputSpec | None,
    ) -> list[TextGenerationParams]:
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens}).",
                param="min_tokens",
                value=self.min_tokens,
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return [
            TextGenerationParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                stop=tuple(s for s in stop if s),
                seed=None if self.seed is None else self.seed + index,
                ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logprobs=logprobs,
                structured=structured,
                min_tokens=self.min_tokens,
            )
            for index in range(self.n)
        ]


class TextContentPart(_Request):
    """A text part of a message's content (other part types are not supported)."""

    type: Literal["text"]
    text: str


class ChatCompletionMessage(_Request):
    """One message of ``messages``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def to_message(self) -> ChatMessage:
        """The engine's message: text parts joined; 'developer' is the system role."""
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return ChatMessage(
            role="system" if self.role == "developer" else self.role, content=content
        )


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatCompletionMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; still honoured.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def to_messages(self) -> tuple[ChatMessage, ...]:
        """The conversation, for the model's chat template."""
        return tuple(message.to_message() for message in self.messages)

    def to_generation_params(self) -> list[TextGenerationParams]:
        """One engine parameter set per choice."""
        return self._params(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            structured=self.response_format.to_spec() if self.response_format else None,
        )


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] = Field(..., description="A prompt, or a list of prompts.")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        return self

    def prompts(self) -> list[str]:
        """The prompts, one or many."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_generation_params(self) -> list[TextGenerationParams]:
        """One engine parameter set per choice of each prompt."""
        return self._params(max_tokens=self.max_tokens, logprobs=self.logprobs, structured=None)


class Usage(_Response):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    """An alternative token at one position."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """A generated token's log-probability, with the most likely alternatives."""

    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(_Response):
    """``choices[].logprobs`` of a chat completion."""

    content: list[ChatTokenLogprob] | None


class AssistantMessage(_Response):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatCompletionChoice(_Response):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(_Response):
    """Answer of ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(_Response):
    """``choices[].logprobs`` of a legacy completion."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(_Response):
    """One choice of a completion."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(_Response):
    """Answer of ``POST /v1/completions``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Model(_Response):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fictures-ai"


class ModelList(_Response):
    """Answer of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[Model]


class ImageGenerationRequest(_Request):
    """Body of ``POST /v1/images/generations``."""

    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="The image model's id; default: the served one.")
    n: int = Field(1, ge=1, le=10)
    size: str = Field(
        "1024x1024", description="WIDTHxHEIGHT, each in 256..2048; the PNG has exactly this size."
    )
    response_format: Literal["url", "b64_json"] = "url"
    negative_prompt: str | None = Field(None, description="Extension: what to keep out.")
    steps: int = Field(30, ge=1, le=100, description="Extension: denoising steps.")
    guidance_scale: float = Field(7.5, ge=1.0, le=20.0, description="Extension.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Extension: image i: seed + i.")

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"size must look like 1024x1024, not '{value}'")
        for side in (int(match.group(1)), int(match.group(2))):
            if not 256 <= side <= 2048:
                raise ValueError(f"size '{value}': width and height must be in 256..2048")
        return value

    def to_generation_params(self) -> list[ImageGenerationParams]:
        """One engine parameter set per image; without a seed, a random one."""
        width, height = (int(side) for side in self.size.split("x"))
        seed = self.seed if self.seed is not None else random_seed()
        return [
            ImageGenerationParams(
                prompt=self.prompt,
                negative_prompt=self.negative_prompt or None,
                width=width,
                height=height,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                seed=(seed + index) % (MAX_SEED + 1) or 1,
            )
            for index in range(self.n)
        ]


class ImageData(_Response):
    """One generated image: a URL or base64 PNG (and, as an extension, its seed)."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(_Response):
    """Answer of ``POST /v1/images/generations``."""

    created: int
    data: list[ImageData]


class ErrorDetail(_Response):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """OpenAI's error body."""

    error: ErrorDetail
