"""Who is calling, what they may do, and how much of their budget is left.

Every API route declares the scope it needs with ``require_scope`` (None: any valid key, as
the contract has it for model listings); the dependency reads the key from ``Authorization:
Bearer KEY`` or ``x-api-key: KEY``, checks it against the key stores (cached: microseconds on
the hot path) and checks the scope (``admin:all`` ⊃ ``stories:write`` ⊃ ``stories:read``).

Then the request is admitted (``Client.admit``): the model it uses is checked against the
key's allow-list and the caller's per-minute budgets are charged, whose state goes out as
``X-RateLimit-*`` headers (``rate_limit_headers``). Listings are admitted by the dependency;
a generation route admits its request itself once FastAPI has parsed the body, with the
model and the image count read from the parsed body (the body is parsed once). Once the
response is complete, the tokens the request used (the request context's ``usage``) are
charged to the tokens budget. With ``REQUIRE_API_KEY=false`` there is no key check and the
budget is per client address.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from fictures_ai.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from fictures_ai.observability.context import RequestContext, current_request
from fictures_ai.services.keys.info import ApiKeyInfo
from fictures_ai.services.rate_limit import Budget, RateLimitDecision, RateLimiter

logger = logging.getLogger(__name__)

MISSING_KEY = (
    "Missing or invalid API key. Send it as 'Authorization: Bearer YOUR_KEY' "
    "or as 'x-api-key: YOUR_KEY'."
)


@dataclass(frozen=True, slots=True)
class Client:
    """The caller of a request: a verified key, or an address when keys are not required."""

    id: str
    name: str | None
    key: ApiKeyInfo | None
    rate_limiter: RateLimiter = field(repr=False, compare=False)

    def check_model(self, model: str) -> None:
        """Raise ``PermissionDeniedError`` when the key's model allow-list excludes ``model``."""
        if self.key is not None and not self.key.allows_model(model):
            raise PermissionDeniedError(
                f"This API key may not use the model '{model}'. "
                f"Allowed: {', '.join(self.key.models or ())}."
            )

    async def admit(self, *, model: str | None = None, images: int = 0) -> None:
        """Admit one request that uses ``model`` (None: no model) and renders ``images``.

        Checks the key's model allow-list, then charges the requests and images budgets; the
        tokens the request uses are charged when its response is complete. Raises
        ``PermissionDeniedError`` for a model the key may not use, ``RateLimitedError`` (with
        the budgets' headers) when a budget is spent, and ``ServiceUnavailableError`` when a
        shared limiter cannot be reached and fails closed.
        """
        if model is not None:
            self.check_model(model)
        decision = await self.rate_limiter.admit(self.id, images=images)
        headers = rate_limit_headers(decision)
        if not decision.allowed:
            budget = decision.refused_by.value if decision.refused_by else "requests"
            raise RateLimitedError(
                f"Rate limit reached: this client's {budget} budget for the minute is spent. "
                f"Retry after {decision.retry_after_s} s.",
                retry_after=decision.retry_after_s or 1,
                headers=headers,
            )
        context = current_request()
        if context is not None:
            context.response_headers.update(headers)
            context.on_finish.append(functools.partial(_charge_tokens, self))


def presented_keys(request: Request) -> list[str]:
    """The keys the request carries: ``Authorization: Bearer``'s, then ``x-api-key``'s."""
    keys = []
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        keys.append(credentials.strip())
    api_key = request.headers.get("x-api-key", "").strip()
    if api_key:
        keys.append(api_key)
    return keys


def require_scope(
    scope: str | None, *, admit: bool = True
) -> Callable[[Request], Coroutine[Any, Any, Client]]:
    """The dependency of a route that needs ``scope`` (None: any valid key).

    Of the keys a request carries, the first shaped like a key of one of the stores is checked:
    a proxy's or a browser's unrelated ``Authorization: Bearer`` token does not hide the
    ``x-api-key`` the Fictures web app sends. Raises ``AuthenticationError`` without a known
    key, ``PermissionDeniedError`` without the scope.

    With ``admit`` the request is admitted here (a route without a model or images: listings,
    tokenizing); without it the route calls ``Client.admit`` with the model and image count of
    the body FastAPI parsed.
    """

    async def authorize(request: Request) -> Client:
        services = request.app.state.services
        if services.api_keys is None:
            address = request.client.host if request.client else "unknown"
            client = Client(f"address:{address}", None, None, services.rate_limiter)
        else:
            info = None
            for presented in presented_keys(request):
                store = services.api_keys.store_for(presented)
                if store is not None:
                    info = await store.verify(presented)
                    break
            if info is None:
                raise AuthenticationError(MISSING_KEY)
            if scope is not None and not info.has_scope(scope):
                raise PermissionDeniedError(f"Insufficient permissions. Required scope: {scope}")
            client = Client(info.client_id, info.name, info, services.rate_limiter)
        context = current_request()
        if context is not None:
            context.client = client.name
        if admit:
            await client.admit()
        return client

    return authorize


def rate_limit_headers(decision: RateLimitDecision) -> dict[str, str]:
    """HTTP headers describing every active budget (and ``Retry-After`` when refused).

    ``X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens,Images}`` for each active budget,
    plus the plain ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` for the requests budget.
    Reset values are delta seconds. Empty when no budget is active.
    """
    headers: dict[str, str] = {}
    for state in decision.budgets:
        suffix = state.budget.value.capitalize()
        headers[f"X-RateLimit-Limit-{suffix}"] = str(state.limit)
        headers[f"X-RateLimit-Remaining-{suffix}"] = str(state.remaining)
        headers[f"X-RateLimit-Reset-{suffix}"] = str(state.reset_s)
        if state.budget is Budget.REQUESTS:
            headers["X-RateLimit-Limit"] = str(state.limit)
            headers["X-RateLimit-Remaining"] = str(state.remaining)
            headers["X-RateLimit-Reset"] = str(state.reset_s)
    if not decision.allowed and decision.retry_after_s is not None:
        headers["Retry-After"] = str(decision.retry_after_s)
    return headers


async def _charge_tokens(client: Client, context: RequestContext) -> None:
    """Add the tokens a finished request used to its client's tokens budget."""
    usage = context.usage
    if usage is not None and usage.total_tokens:
        await client.rate_limiter.record_tokens(client.id, usage.total_tokens)
