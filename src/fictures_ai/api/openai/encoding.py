"""What the OpenAI-compatible routes answer, built from engine chunks: whole choices for a plain
response, and the SSE chunks of a streamed one.

Streamed chunks are written from precomputed JSON templates: only the new text is JSON-encoded
per token, which keeps the per-token cost of the HTTP layer small. With a tool-call parser a
choice's text is split into content and OpenAI's ``tool_calls`` as it comes.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

from fictures_ai.api.errors import ErrorReply
from fictures_ai.api.openai.errors import openai_error_event
from fictures_ai.api.openai.protocol import (
    AssistantMessage,
    AssistantToolCall,
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    ToolCallFunction,
    TopLogprob,
    Usage,
)
from fictures_ai.api.sse import encode_json_string
from fictures_ai.engines.base import (
    ParsedDelta,
    TextChunk,
    TokenLogprob,
    ToolCallDelta,
    ToolCallParser,
)
from fictures_ai.services.tool_calls import new_tool_call_id

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


@dataclass
class Choice:
    """What one choice has produced so far; with a tool-call parser, its text is split into
    content and calls as it comes."""

    parser: ToolCallParser | None = None
    text: list[str] = field(default_factory=list)
    calls: list[AssistantToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: OpenAIFinishReason | None = None

    def add(self, chunk: TextChunk) -> None:
        """Take the next engine chunk of this choice."""
        if self.parser is None:
            self.text.append(chunk.delta)
        else:
            parsed = parse_delta(self.parser, chunk)
            self.text.append(parsed.content)
            for piece in parsed.tool_calls:
                if piece.name is not None:
                    self.calls.append(
                        AssistantToolCall(
                            id=piece.id or new_tool_call_id(),
                            function=ToolCallFunction(name=piece.name, arguments=""),
                        )
                    )
                if piece.arguments and piece.index < len(self.calls):
                    self.calls[piece.index].function.arguments += piece.arguments
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        self.finish_reason = finish_reason(chunk, self.parser if self.calls else None)

    def message(self) -> AssistantMessage:
        """The choice's message: no content but calls when it only called tools."""
        content = "".join(self.text)
        return AssistantMessage(
            content=content if content or not self.calls else None,
            tool_calls=self.calls or None,
        )


def parse_delta(parser: ToolCallParser, chunk: TextChunk) -> ParsedDelta:
    """The parser's reading of ``chunk``, with what it still held if the chunk is the last."""
    parsed = parser.feed(chunk)
    if chunk.finish_reason is None:
        return parsed
    rest = parser.finish()
    return ParsedDelta(parsed.content + rest.content, parsed.tool_calls + rest.tool_calls)


def finish_reason(
    chunk: TextChunk, caller: ToolCallParser | None = None
) -> OpenAIFinishReason | None:
    """OpenAI's finish reason of ``chunk`` (None until the last); ``caller`` is the parser that
    read calls in this choice, which says how such a choice ends (``tool_calls``)."""
    # OpenAI knows stop and length; an aborted request is cut short like one at its limit.
    # ``caller``: the parser that read calls in this choice; it says how such a choice ends.
    if chunk.finish_reason is None:
        return None
    if chunk.finish_reason != "stop":
        return "length"
    return "stop" if caller is None else caller.finish_reason


def usage(choices: list[Choice], prompts: int) -> Usage:
    """The token counts of a request of ``prompts`` prompts and these choices."""
    # Every choice of a prompt repeats the prompt; usage counts each prompt once, as OpenAI does.
    per_prompt = len(choices) // prompts
    prompt_tokens = sum(choices[i * per_prompt].prompt_tokens for i in range(prompts))
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def collect_choices(
    streams: AsyncGenerator[tuple[int, TextChunk], None],
    count: int,
    parsers: list[ToolCallParser] | None = None,
) -> list[Choice]:
    """Read merged ``(choice index, chunk)`` streams to the end into ``count`` choices."""
    choices = [Choice(parser=parsers[index] if parsers else None) for index in range(count)]
    async for index, chunk in streams:
        choices[index].add(chunk)
    return choices


def chat_logprobs(entries: list[TokenLogprob]) -> ChatChoiceLogprobs:
    """Chat's ``logprobs.content``: each token with its bytes and top alternatives."""
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(entry.token.encode()),
                top_logprobs=[
                    TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
                    for token, logprob in entry.top
                ],
            )
            for entry in entries
        ]
    )


def completion_logprobs(entries: list[TokenLogprob]) -> CompletionLogprobs:
    """The legacy completions' ``logprobs``: tokens, their log-probs, top alternatives and
    character offsets."""
    offsets, position = [], 0
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[dict(entry.top) for entry in entries],
        text_offset=offsets,
    )


class ChunkEncoder:
    """Writes the SSE events of one streamed completion from precomputed JSON pieces.

    It also keeps each choice's token counts (not its text), for the usage chunk at the end.
    """

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        chat: bool,
        usage: bool,
        count: int,
        prompts: int = 1,
        parsers: list[ToolCallParser] | None = None,
    ) -> None:
        """``count`` choices in all, over ``prompts`` prompts (a completion may send several);
        ``usage``: end with the usage chunk (``stream_options.include_usage``)."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            f'data: {{"id":"{request_id}","object":"{obj}","created":{int(time.time())},'
            f'"model":{json.dumps(model)},"choices":['
        ).encode()
        self._tail = b'],"usage":null}\n\n' if usage else b"]}\n\n"
        self.chat = chat
        self.usage = usage
        self._prompts = prompts
        self._started = [False] * count
        self._choices = [Choice() for _ in range(count)]
        self._parsers = parsers
        self._called = [False] * count

    def event(self, item: tuple[int, TextChunk]) -> bytes:
        """The event of one engine chunk of one choice (see :meth:`chunk`)."""
        return self.chunk(*item)

    def end(self) -> bytes:
        """The usage chunk when it was asked for, else nothing."""
        return self.usage_chunk() if self.usage else b""

    def error(self, reply: ErrorReply) -> bytes:
        """The event of a failure after the stream started: OpenAI's error object."""
        return openai_error_event(reply)

    def chunk(self, index: int, chunk: TextChunk) -> bytes:
        """One event for one engine chunk of choice ``index`` (log-probs when it has them);
        empty when a tool-call parser holds the chunk's text back."""
        counts = self._choices[index]
        counts.prompt_tokens = chunk.prompt_tokens
        counts.completion_tokens = chunk.completion_tokens
        logprobs_json = "null"
        if chunk.logprobs:
            entries = list(chunk.logprobs)
            model = chat_logprobs(entries) if self.chat else completion_logprobs(entries)
            logprobs_json = model.model_dump_json()
        if self._parsers is not None:
            return self._tool_chunk(index, chunk, logprobs_json)
        text = encode_json_string(chunk.delta)
        finish = finish_reason(chunk)
        finish_json = "null" if finish is None else f'"{finish}"'
        if self.chat:
            if self._started[index]:
                role = ""
            else:
                role = '"role":"assistant",'
                self._started[index] = True
            choice = (
                f'{{"index":{index},"delta":{{{role}"content":{text}}},'
                f'"logprobs":{logprobs_json},"finish_reason":{finish_json}}}'
            )
        else:
            choice = (
                f'{{"index":{index},"text":{text},"logprobs":{logprobs_json},'
                f'"finish_reason":{finish_json}}}'
            )
        return self._head + choice.encode() + self._tail

    def _tool_chunk(self, index: int, chunk: TextChunk, logprobs_json: str) -> bytes:
        """A chat chunk of a request that may call tools: content and OpenAI's tool-call
        deltas (index, id, type and name first; then argument pieces)."""
        assert self._parsers is not None
        parser = self._parsers[index]
        parsed = parse_delta(parser, chunk)
        self._called[index] = self._called[index] or any(p.name for p in parsed.tool_calls)
        finish = finish_reason(chunk, parser if self._called[index] else None)
        delta: dict[str, Any] = {}
        if not self._started[index]:
            delta["role"] = "assistant"
            self._started[index] = True
        if parsed.content:
            delta["content"] = parsed.content
        if parsed.tool_calls:
            delta["tool_calls"] = [tool_call_delta(piece) for piece in parsed.tool_calls]
        if not delta and finish is None and logprobs_json == "null":
            return b""
        choice = (
            f'{{"index":{index},"delta":{json.dumps(delta)},"logprobs":{logprobs_json},'
            f'"finish_reason":{json.dumps(finish)}}}'
        )
        return self._head + choice.encode() + self._tail

    def usage_chunk(self) -> bytes:
        """The last chunk when usage was asked for: no choices, the request's token counts."""
        counts = usage(self._choices, self._prompts)
        return self._head + b'],"usage":' + counts.model_dump_json().encode() + b"}\n\n"


def tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed ``tool_calls`` entry: index, id, type and name first; then argument
    pieces alone."""
    if piece.name is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {
        "index": piece.index,
        "id": piece.id or new_tool_call_id(),
        "type": "function",
        "function": {"name": piece.name, "arguments": piece.arguments},
    }
