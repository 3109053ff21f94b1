"""Request and response models of the OpenAI-compatible surface, after OpenAI's API reference.

Unknown request fields are accepted and ignored, as OpenAI's own server does for fields a model
does not use. Extension fields (``ignore_eos``, and ``negative_prompt``, ``steps``,
``guidance_scale``, ``seed`` for images) follow vLLM's naming where vLLM has one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fictures_ai.api.json_schema import to_json_schema
from fictures_ai.api.model_views import LoraWeight, ModelStateFields
from fictures_ai.api.unicode_text import UnicodeTextBody
from fictures_ai.engines.base import (
    MAX_SEED,
    ChatMessage,
    ImageGenerationParams,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextGenerationParams,
    TextPrompt,
    ToolCall,
    ToolDefinition,
    is_greedy,
    random_seed,
)
from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.tool_calls import named_tool_call_spec, required_tool_calls_spec
from fictures_ai.shared import PromptFormat

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")
MIN_TEXT_SEED = -(2**63)
MAX_TEXT_SEED = 2**63 - 1
"""Text seeds are signed 64-bit integers, as vLLM's own server takes them."""


class _Request(BaseModel):
    # Unknown fields are ignored as OpenAI does; known ones must have their JSON type.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Body(_Request, UnicodeTextBody):
    """A whole request body (its strings checked once, nested models included)."""


class _Response(BaseModel):
    pass


class JsonSchemaFormat(_Request):
    """``response_format.json_schema``."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(
        extra="ignore", strict=True, populate_by_name=True, allow_inf_nan=False
    )


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

    include_usage: bool | None = False
    include_obfuscation: bool | None = Field(
        None, description="Accepted; this server adds no obfuscation padding."
    )


class _Sampling(_Body):
    """What chat and legacy completions share. OpenAI's reference marks every optional
    parameter nullable: ``null`` means the default, as leaving the field out does."""

    model: str = Field(..., min_length=1, description="The model's id, as in GET /v1/models.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 1.")
    top_p: float | None = Field(
        None, ge=0.0, le=1.0, description="Default 1; 0 keeps only the most likely token."
    )
    n: int | None = Field(None, ge=1, le=16, description="How many choices (default 1).")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop sequences.")
    seed: int | None = Field(
        None,
        ge=MIN_TEXT_SEED,
        le=MAX_TEXT_SEED,
        description="A signed 64-bit integer; choice i samples with seed + i.",
    )
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Default 0.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Default 0.")
    logit_bias: dict[str, float] | None = Field(
        None,
        description="Token id (as a string) to a bias in -100..100 added to its logit.",
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted; not used by this server.")
    ignore_eos: bool | None = Field(
        False, description="Extension: keep generating past end-of-text."
    )
    min_tokens: int | None = Field(
        None,
        ge=0,
        description="Extension (vLLM's): no end of text or stop before this many tokens.",
    )

    @model_validator(mode="before")
    @classmethod
    def _note_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - _field_names(cls))
            if unknown:
                # As vLLM's server: served, and said where an operator can see it.
                logger.info("Ignored unknown request fields: %s", ", ".join(unknown))
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids such as \"1234\", not '{token}'")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {token} must be in -100..100, not {bias}")
        return value

    @model_validator(mode="after")
    def _check_seed_range(self) -> _Sampling:
        if self.seed is not None and self.seed + self.choices - 1 > MAX_TEXT_SEED:
            raise ValueError(
                f"seed: with n={self.choices}, seed + n - 1 must stay a signed 64-bit integer "
                f"(at most {MAX_TEXT_SEED})"
            )
        return self

    @property
    def choices(self) -> int:
        """How many choices each prompt gets."""
        return 1 if self.n is None else self.n

    @property
    def deterministic(self) -> bool:
        """Whether the client asked for reproducible answers (the response cache serves only
        those): greedy sampling (``temperature`` under ``GREEDY_TEMPERATURE``, or ``top_p``
        0; null or left out: the defaults, 1) or a ``seed``."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        return is_greedy(temperature, top_p) or self.seed is not None

    @property
    def streams(self) -> bool:
        """Whether the answer is a stream of server-sent events."""
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    def _params(
        self,
        *,
        max_tokens: int | None,
        logprobs: int | None,
        structured: StructuredOutputSpec | None,
    ) -> list[TextGenerationParams]:
        min_tokens = self.min_tokens or 0
        if max_tokens is not None and min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens}).",
                param="min_tokens",
                value=min_tokens,
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logit_bias = tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())
        return [
            TextGenerationParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                stop=tuple(s for s in stop if s),
                seed=None if self.seed is None else self.seed + index,
                ignore_eos=bool(self.ignore_eos),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                logprobs=logprobs,
                structured=structured,
                min_tokens=min_tokens,
                logit_bias=logit_bias,
            )
            for index in range(self.choices)
        ]


def _field_names(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def _refuse_unless(value: object, allowed: object, *, field: str, why: str) -> None:
    """Refuse an OpenAI parameter this server cannot honour, rather than ignore it."""
    if value is not None and value != allowed:
        raise ValueError(f"{field}: {why}")


class ContentPart(_Request):
    """A part of a message's content: this server's models read text parts only."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _check_text(self) -> ContentPart:
        if self.type not in ("text", "refusal") or self.text is None:
            raise ValueError(
                f"content parts of type '{self.type}' are not supported: this server's "
                'models read text; send {"type": "text", "text": ...} parts or a string'
            )
        return self


class FunctionCall(_Request):
    """A call's function: its name and the JSON text of its arguments."""

    name: str
    arguments: str


class MessageToolCall(_Request):
    """A tool call in an assistant message of the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(_Request):
    """One message of ``messages``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(
        None, description="The calls an assistant message made."
    )
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatCompletionMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def to_message(self) -> ChatMessage:
        """The engine's message: text parts joined; 'developer' is the system role."""
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content)
        return ChatMessage(
            role="system" if self.role == "developer" else self.role,
            content=content,
            tool_calls=tuple(
                ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
                for call in self.tool_calls or ()
            ),
            tool_call_id=self.tool_call_id,
            name=self.name,
        )


class FunctionDefinition(_Request):
    """``tools[].function``: a function the model may call."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="JSON schema of the arguments (default: any object)."
    )
    strict: bool | None = Field(
        None, description="Accepted; forced calls always follow the schema here."
    )

    @field_validator("parameters")
    @classmethod
    def _check_object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError('a function\'s arguments are an object: use "type": "object"')
        return value


class ChatCompletionTool(_Request):
    """One of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    """The function a named ``tool_choice`` forces."""

    name: str


class NamedToolChoice(_Request):
    """``tool_choice`` naming one function: the model must call it."""

    type: Literal["function"]
    function: ToolChoiceFunction


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a chat request uses tools: ``choice`` is none, auto, required or named."""

    tools: tuple[ToolDefinition, ...] = ()
    choice: Literal["none", "auto", "required", "named"] = "none"
    name: str | None = None
    parallel: bool = True

    def structured(self) -> StructuredOutputSpec | None:
        """The constraint that forces the calls (required and named)."""
        if self.choice == "required":
            return required_tool_calls_spec(self.tools, parallel=self.parallel)
        if self.choice == "named":
            return named_tool_call_spec(next(t for t in self.tools if t.name == self.name))
        return None


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatCompletionMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; still honoured.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ChatCompletionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto with tools, none without."
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one call (default true)."
    )
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = Field(None, description="Accepted; not stored.")
    store: bool | None = Field(None, description="Accepted; this server stores nothing.")
    service_tier: str | None = Field(None, description="Accepted; one tier here.")
    prediction: dict[str, Any] | None = Field(
        None, description="Accepted; predicted outputs only speed up OpenAI's models."
    )

    @model_validator(mode="after")
    def _check_request(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        _refuse_unless(
            self.modalities, ["text"], field="modalities", why="this server answers text only"
        )
        _refuse_unless(self.audio, None, field="audio", why="this server has no audio output")
        for legacy in ("functions", "function_call"):
            _refuse_unless(
                getattr(self, legacy),
                None,
                field=legacy,
                why="deprecated by OpenAI and not served here; send tools and tool_choice",
            )
        _refuse_unless(
            self.reasoning_effort,
            None,
            field="reasoning_effort",
            why="this server's models do not reason before answering",
        )
        _refuse_unless(
            self.web_search_options, None, field="web_search_options", why="no web search here"
        )
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or ()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"tools: each function needs its own name; twice: {duplicates}")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice: names the function '{choice.function.name}', which is not in "
                f"tools ({', '.join(names) or 'none sent'})"
            )
        if choice in ("required", "auto") and not names:
            raise ValueError(f"tool_choice: '{choice}' needs tools")
        forced = isinstance(choice, NamedToolChoice) or (choice == "required" and names)
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                "response_format: a forced tool call already fixes the output's format; send "
                "response_format or tool_choice required/named, not both"
            )
        if forced and self.stop:
            raise ValueError(
                "stop: a stop sequence would cut a forced tool call's JSON; leave stop out "
                "with tool_choice required or a named function"
            )

    def tool_plan(self) -> ToolPlan:
        """The tools (schemas converted and checked) and how they are chosen.

        Raises ``InvalidRequestError`` naming the tool whose parameters are not a schema.
        """
        tools = tuple(
            ToolDefinition(
                name=tool.function.name,
                description=tool.function.description,
                parameters=(
                    None
                    if tool.function.parameters is None
                    else to_json_schema(
                        tool.function.parameters,
                        param=f"tools[{index}].function.parameters",
                        subject=f"tool '{tool.function.name}'",
                    )
                ),
            )
            for index, tool in enumerate(self.tools or ())
        )
        parallel = self.parallel_tool_calls is not False
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return ToolPlan(tools, "named", choice.function.name, parallel)
        if choice == "none" or not tools:
            return ToolPlan(tools, "none", parallel=parallel)
        return ToolPlan(tools, choice or "auto", parallel=parallel)

    def to_messages(self) -> tuple[ChatMessage, ...]:
        """The conversation, for the model's chat template."""
        return tuple(message.to_message() for message in self.messages)

    def to_generation_params(self, plan: ToolPlan) -> list[TextGenerationParams]:
        """One engine parameter set per choice, under ``plan``'s constraint if it forces calls."""
        structured = plan.structured()
        if structured is None and self.response_format is not None:
            structured = self.response_format.to_spec()
        return self._params(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            structured=structured,
        )


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A prompt or a list of prompts, as text or as token ids."
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(
        cls, value: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and any(not p for p in value):
            raise ValueError("no prompt of the list may be empty")
        return value

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        _refuse_unless(self.echo, False, field="echo", why="echoing the prompt is not supported")
        _refuse_unless(
            self.suffix or None,
            None,
            field="suffix",
            why="inserting before a suffix is not supported",
        )
        if self.best_of is not None and self.best_of != self.choices:
            raise ValueError(
                "best_of: sampling more choices than n and keeping the best is not supported; "
                "send n"
            )
        return self

    def prompts(self) -> list[TextPrompt]:
        """The prompts, one or many, sent as they are (no chat template)."""
        value = self.prompt
        if isinstance(value, str):
            return [TextPrompt(text=value, format=PromptFormat.RAW)]
        if all(isinstance(item, int) for item in value):
            return [TextPrompt(token_ids=tuple(cast(list[int], value)))]
        return [
            TextPrompt(token_ids=tuple(item))
            if isinstance(item, list)
            else TextPrompt(text=str(item), format=PromptFormat.RAW)
            for item in value
        ]

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


class ToolCallFunction(_Response):
    """The function a generated tool call calls, with the JSON text of its arguments."""

    name: str
    arguments: str


class AssistantToolCall(_Response):
    """A tool call the model made."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(_Response):
    """The generated message: text, tool calls, or (rarely) both."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[AssistantToolCall] | None = None


class ChatCompletionChoice(_Response):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


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


class _ModelCard(_Response):
    """OpenAI's model object, with vLLM's ``root`` and ``max_model_len``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fictures-ai"
    root: str | None = Field(None, description="What the model is made from (vLLM's root).")
    max_model_len: int | None = Field(None, description="Context window of a text model.")
    kind: Literal["text", "image"] | None = None


class Model(ModelStateFields, _ModelCard):
    """One entry of ``GET /v1/models``: OpenAI's fields, vLLM's ``root``, ``parent`` and
    ``max_model_len``, and the model's kind and state."""


class ModelList(_Response):
    """Answer of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[Model]


class ImageGenerationRequest(_Body):
    """Body of ``POST /v1/images/generations``. OpenAI's optional parameters are nullable
    (null: the default); those this server cannot honour are refused, not ignored."""

    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="The image model's id; default: the served one.")
    n: int | None = Field(None, ge=1, le=10, description="How many images (default 1).")
    size: str | None = Field(
        None,
        description=(
            "WIDTHxHEIGHT, each in 256..2048; the PNG has exactly this size (default and "
            "'auto': 1024x1024)."
        ),
    )
    response_format: Literal["url", "b64_json"] | None = Field(None, description="Default url.")
    quality: Literal["auto", "standard"] | None = Field(
        None, description="One quality here; set steps for more or fewer denoising steps."
    )
    output_format: Literal["png"] | None = Field(None, description="PNG only.")
    background: Literal["auto", "opaque"] | None = Field(
        None, description="Opaque only: the models here draw no transparency."
    )
    user: str | None = Field(None, description="Accepted; not used by this server.")
    moderation: Literal["auto", "low"] | None = Field(
        None, description="Accepted; this server runs no moderation model."
    )
    negative_prompt: str | None = Field(None, description="Extension: what to keep out.")
    steps: int | None = Field(None, ge=1, le=100, description="Extension: denoising steps (30).")
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, description="Extension (7.5).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Extension: image i: seed + i.")
    loras: list[LoraWeight] | None = Field(
        None, max_length=8, description="Extension: LoRA adapters of the model, with weights."
    )

    @model_validator(mode="before")
    @classmethod
    def _check_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for field, why in _UNSUPPORTED_IMAGE_FIELDS.items():
                if data.get(field) not in (None, False, 0):
                    raise ValueError(f"{field}: {why}")
            unknown = sorted(set(data) - _field_names(cls) - set(_UNSUPPORTED_IMAGE_FIELDS))
            if unknown:
                logger.info("Ignored unknown request fields: %s", ", ".join(unknown))
        return data

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"size must look like 1024x1024 (or be 'auto'), not '{value}'")
        for side in (int(match.group(1)), int(match.group(2))):
            if not 256 <= side <= 2048:
                raise ValueError(f"size '{value}': width and height must be in 256..2048")
        return value

    @property
    def wants_base64(self) -> bool:
        """Whether the answer carries base64 PNGs rather than URLs."""
        return self.response_format == "b64_json"

    @property
    def deterministic(self) -> bool:
        """Whether the images are reproducible (the response cache serves only those): the
        request names its ``seed``."""
        return self.seed is not None

    def to_generation_params(self) -> list[ImageGenerationParams]:
        """One engine parameter set per image; without a seed, a random one."""
        size = self.size if self.size not in (None, "auto") else "1024x1024"
        width, height = (int(side) for side in str(size).split("x"))
        seed = self.seed if self.seed is not None else random_seed()
        return [
            ImageGenerationParams(
                prompt=self.prompt,
                negative_prompt=self.negative_prompt or None,
                width=width,
                height=height,
                num_inference_steps=30 if self.steps is None else self.steps,
                guidance_scale=7.5 if self.guidance_scale is None else self.guidance_scale,
                seed=(seed + index) % (MAX_SEED + 1) or 1,
            )
            for index in range(1 if self.n is None else self.n)
        ]


_UNSUPPORTED_IMAGE_FIELDS = {
    "stream": "streamed partial images are not served here; POST /api/v1/images/stream "
    "streams progress",
    "partial_images": "streamed partial images are not served here",
    "output_compression": "images are PNG, which this server does not compress lossily",
    "style": "not supported by the models here; describe the style in the prompt",
}


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


class TokenizeRequest(_Body):
    """Body of ``POST /tokenize`` (vLLM's): a prompt, or chat messages to render first."""

    model: str | None = Field(None, description="The text model's id; default: the served one.")
    prompt: str | None = Field(None, description="Text, tokenized as /v1/completions sends it.")
    messages: list[ChatCompletionMessage] | None = Field(
        None, description="A conversation, rendered as /v1/chat/completions renders it."
    )
    tools: list[ChatCompletionTool] | None = Field(
        None, max_length=128, description="Tools the chat template shows the model."
    )

    @model_validator(mode="after")
    def _check_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        return self

    def to_prompt(self) -> TextPrompt:
        """The prompt as the generation routes would send it."""
        if self.messages is not None:
            return TextPrompt(
                messages=tuple(message.to_message() for message in self.messages),
                tools=tuple(
                    ToolDefinition(
                        name=tool.function.name,
                        description=tool.function.description,
                        parameters=tool.function.parameters,
                    )
                    for tool in self.tools or ()
                ),
            )
        return TextPrompt(text=self.prompt, format=PromptFormat.RAW)


class TokenizeResponse(_Response):
    """Answer of ``POST /tokenize``."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    """Body of ``POST /detokenize`` (vLLM's)."""

    model: str | None = Field(None, description="The text model's id; default: the served one.")
    tokens: list[int] = Field(..., description="Token ids of the model's vocabulary.")


class DetokenizeResponse(_Response):
    """Answer of ``POST /detokenize``."""

    prompt: str
