"""Errors raised by the services and engines of the Fictures AI server.

Engines and services raise these; each HTTP surface has exactly one exception handler that maps
them to a status code and its own error shape. Nothing below the API layer knows HTTP.

Exception tree::

    FicturesError                      base class, never raised itself
    ├── InvalidRequestError            the request cannot be served as asked (400)
    │   └── ContextLengthExceededError prompt plus max_tokens exceed the model's context (400)
    ├── AuthenticationError            no key, or an unknown or revoked one (401)
    ├── PermissionDeniedError          the key lacks the scope or the model (403)
    ├── ModelNotFoundError             the request names a model this server does not serve (404)
    ├── NotFoundError                  no such job, batch or file for this key (404)
    ├── ConflictError                  the model is busy, loading, pinned, or the name taken (409)
    ├── RequestTooLargeError           the body is over MAX_REQUEST_BYTES (413)
    ├── TooManyRequestsError           try again later; carries ``retry_after`` and headers (429)
    │   ├── RateLimitedError           the key's per-minute budget is spent
    │   └── OverloadedError            the engine's queue is full
    ├── ServiceUnavailableError        try again later; carries ``retry_after`` seconds (503)
    │   ├── ModelLoadError             the model failed to load (a later request retries)
    │   └── EngineDeadError            the engine died; it is being restarted
    ├── GenerationTimeoutError         the request ran past REQUEST_TIMEOUT_S and was aborted (504)
    └── GenerationError                the engine failed while generating (500)
"""

from __future__ import annotations

from typing import Any


class FicturesError(Exception):
    """Base class of every error the server raises on purpose.

    Picklable with every attribute (``param``, ``retry_after``...), whatever the subclass's
    constructor takes: errors raised in a Ray Serve model replica reach the ingress whole.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_error, (type(self), self.args, self.__dict__)


def _rebuild_error(
    cls: type[FicturesError], args: tuple[Any, ...], state: dict[str, Any]
) -> FicturesError:
    """``cls`` with ``args`` and attributes ``state``, without calling its constructor."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidRequestError(FicturesError):
    """The request is well formed but cannot be served as asked."""

    def __init__(self, message: str, *, param: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.param = param
        self.value = value


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus the requested output do not fit the model's context window.

    ``max_tokens`` is None when the prompt alone leaves no room for a single output token.
    """

    def __init__(self, *, prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        if max_tokens is None:
            message = (
                f"The prompt has {prompt_tokens} tokens, but this model's context is "
                f"{max_model_len} tokens for prompt and output together: the prompt does not "
                "fit even without output. Shorten the prompt."
            )
        else:
            message = (
                f"This model's context is {max_model_len} tokens, but the prompt has "
                f"{prompt_tokens} tokens and max_tokens asks for {max_tokens} more "
                f"({prompt_tokens + max_tokens} in all). Shorten the prompt or lower max_tokens."
            )
        super().__init__(
            message,
            param="prompt" if max_tokens is None else "max_tokens",
            value=max_tokens,
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class AuthenticationError(FicturesError):
    """No API key, or one the server does not know (or has revoked)."""


class PermissionDeniedError(FicturesError):
    """The API key is valid but lacks the scope or the model the request needs."""


class RequestTooLargeError(FicturesError):
    """The request body is larger than the server accepts."""

    def __init__(
        self, *, limit: int, setting: str = "MAX_REQUEST_BYTES", what: str = "body"
    ) -> None:
        """``setting`` names the limit that applies; ``what`` is what was too large."""
        super().__init__(f"Request {what} too large: the limit is {limit} bytes ({setting}).")
        self.limit = limit
        self.setting = setting


class TooManyRequestsError(FicturesError):
    """Refused for now; retrying after ``retry_after`` seconds can succeed."""

    def __init__(
        self, message: str, *, retry_after: int, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers or {}


class RateLimitedError(TooManyRequestsError):
    """The client's per-minute budget of requests, tokens or images is spent."""


class OverloadedError(TooManyRequestsError):
    """The engine already holds as many requests as it may queue."""


class GenerationTimeoutError(FicturesError):
    """The request took longer than the configured timeout and was aborted in the engine."""

    def __init__(self, *, timeout_s: float) -> None:
        super().__init__(
            f"Generation took longer than {timeout_s:g} s (REQUEST_TIMEOUT_S) and was stopped."
        )
        self.timeout_s = timeout_s


class ModelNotFoundError(FicturesError):
    """The request names a model this server does not serve."""

    def __init__(self, model: str, *, kind: str, available: list[str]) -> None:
        """``kind`` is what the route generates (``text``, ``image``); ``available`` the models
        of that kind this server serves."""
        super().__init__(
            f"There is no {kind} model '{model}' on this server. "
            f"{kind.capitalize()} models here: {', '.join(available) or 'none'}."
        )
        self.model = model
        self.kind = kind
        self.available = available


class NotFoundError(FicturesError):
    """The job, batch or file does not exist, or belongs to another key (which is not told
    apart: a key cannot learn of others' jobs)."""

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"No {what} '{ident}' exists for this API key.")
        self.what = what
        self.ident = ident


class ConflictError(FicturesError):
    """The request conflicts with the model's current state (requests in flight, a load under
    way, a name already taken); it may succeed once that changes."""

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.model = model


class ServiceUnavailableError(FicturesError):
    """The server cannot serve the request now; retrying after ``retry_after`` seconds may."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoadError(ServiceUnavailableError):
    """The model could not be loaded; the next request tries again."""

    def __init__(self, message: str, *, model: str, retry_after: int | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.model = model


class EngineDeadError(ServiceUnavailableError):
    """The engine stopped working mid-request; the service restarts it."""


class GenerationError(FicturesError):
    """The engine failed while producing output."""
