"""The request being handled: its id, its tracer, and what the access log will say about it.

The HTTP middleware binds one ``RequestContext`` per request in a context variable; every
task and generator that works for the request sees it (asyncio copies the context into the
tasks it starts, and the copy holds the same object). Services read it without knowing HTTP:
they add the tokens a request used (``usage``: the access line reports it and the rate limiter
charges it), image sizes for the access log, and start their spans under the request's tracer.
Outside a request (start-up, preloading, the CLI) there is none.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from contextvars import Context, ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Tracer

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

LoggedPrompt = str | list[dict[str, str]]
"""A prompt as the access line shows it: its text, or its messages' roles and contents."""


def accept_request_id(value: str | None) -> str:
    """The client's request id if it looks sane (1..128 of ``[A-Za-z0-9._-]``), else a new one.

    A rejected or missing id is replaced by a uuid4 hex string, so an id never carries
    characters that could forge log lines or headers.
    """
    if value is not None and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The tokens a request used, summed over its generations."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens: what the tokens budget is charged."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


@dataclass(slots=True)
class RequestContext:
    """One request in flight, as the logs, traces and access log see it.

    ``fields`` collects what the access line reports beyond method, route, status, latency and
    token usage (image size, the prompt when ``log_prompts`` allows it). ``usage`` stays None
    until a generation has finished: a request that generated nothing reports no token counts.
    """

    request_id: str
    tracer: Tracer | None = None
    log_prompts: bool = False
    fields: dict[str, Any] = field(default_factory=dict)
    usage: TokenUsage | None = None
    client: str | None = None
    """The API key's name (never the key), for the access line."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Headers added to the response when it starts (rate-limit budgets)."""
    on_finish: list[Callable[[RequestContext], Awaitable[None]]] = field(default_factory=list)
    """Called once the response is complete, e.g. to charge the tokens it used."""

    def add_tokens(self, *, prompt_tokens: int, completion_tokens: int) -> None:
        """Count the tokens of one generation (a request may run several) into ``usage``."""
        used = TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        self.usage = used if self.usage is None else self.usage + used

    def note_prompt(self, prompt: LoggedPrompt) -> None:
        """Keep the prompt for the access line, only when prompts may be logged."""
        if self.log_prompts:
            self.fields["prompt"] = prompt


_current: ContextVar[RequestContext | None] = ContextVar("fictures_request", default=None)


def current_request() -> RequestContext | None:
    """The request being handled in this context, or None outside a request."""
    return _current.get()


def request_in(context: Context) -> RequestContext | None:
    """The request bound in ``context`` (a copied context, such as a queued task's), or
    None; unlike ``context.run(current_request)`` this works while the context runs."""
    return context.get(_current)


def current_request_id() -> str | None:
    """The id of the request being handled, or None outside a request."""
    request = _current.get()
    return request.request_id if request is not None else None


def bind_request(request: RequestContext) -> Token[RequestContext | None]:
    """Make ``request`` the current one; pass the token to ``unbind_request`` at the end."""
    return _current.set(request)


def unbind_request(token: Token[RequestContext | None]) -> None:
    """Restore the context as it was before ``bind_request``."""
    _current.reset(token)
