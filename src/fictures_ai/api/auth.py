"""Who is calling, what they may do, and how much of their budget is left.

Every API route declares the scope it needs with ``require_scope`` (None: any valid key, as
the contract has it for model listings); the dependency reads the key from ``Authorization:
Bearer KEY`` or ``x-api-key: KEY``, checks it against the key stores (cached: microseconds on
the hot path), checks the scope (``admin:all`` ⊃ ``stories:write`` ⊃ ``stories:read``), then
charges the caller's per-minute budget, whose state goes out as ``X-RateLimit-*`` headers
(``rate_limit_headers``). Once the response is complete, the tokens the request used (the
request context's ``usage``) are charged to the tokens budget. With ``REQUIRE_API_KEY=false``
there is no key check and the budget is per client address.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request

from fictures_ai.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from fictures_ai.observability.context import RequestContext, current_request
from fictures_ai.services.keys.info import ApiKeyInfo
from fictures_ai.services.rate_limit import Budget, RateLimitDecision

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

    def check_model(self, model: str) -> None:
        """Raise ``PermissionDeniedError`` when the key's model allow-list excludes ``model``."""
        if self.key is not None and not self.key.allows_model(model):
            raise PermissionDeniedError(
                f"This API key may not use the model '{model}'. "
                f"Allowed: {', '.join(self.key.models or ())}."
            )


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


ImageCount = int | Literal["n"]
ModelSource = Literal["text", "image", "body"]


def require_scope(
    scope: str | None, *, images: ImageCount = 0, model: ModelSource | None = None
) -> Callable[[Request], Coroutine[Any, Any, Client]]:
    """The dependency of a route that needs ``scope`` (None: any valid key).

    Of the keys a request carries, the first shaped like a key of one of the stores is checked:
    a proxy's or a browser's unrelated ``Authorization: Bearer`` token does not hide the
    ``x-api-key`` the Fictures web app sends.

    ``images`` is how many images the request renders, charged to the images budget: a fixed
    number, or ``"n"`` to read the body's ``n`` field (OpenAI's image API). ``model`` names the
    model the route uses, checked against the key's allow-list: the served ``"text"`` or
    ``"image"`` model, or the body's ``model`` field (OpenAI's text APIs).
    """

    async def authorize(request: Request) -> Client:
        services = request.app.state.services
        if services.api_keys is None:
            address = request.client.host if request.client else "unknown"
            client = Client(id=f"address:{address}", name=None, key=None)
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
            client = Client(id=info.client_id, name=info.name, key=info)
            if model is not None:
                client.check_model(await _model_name(request, model))
        count = await _image_count(request) if images == "n" else images
        decision = await services.rate_limiter.admit(client.id, images=count)
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
            context.client = client.name
            context.response_headers.update(headers)
            context.on_finish.append(functools.partial(_charge_tokens, services, client.id))
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


async def _charge_tokens(services: Any, client_id: str, context: RequestContext) -> None:
    """Add the tokens a finished request used to its client's tokens budget."""
    usage = context.usage
    if usage is not None and usage.total_tokens:
        await services.rate_limiter.record_tokens(client_id, usage.total_tokens)


async def _model_name(request: Request, source: ModelSource) -> str:
    services = request.app.state.services
    if source == "text":
        name: str = services.text.model_name
        return name
    if source == "image":
        name = services.image.info().name
        return name
    body = await _json_body(request)
    requested = body.get("model")
    return requested if isinstance(requested, str) else ""


async def _json_body(request: Request) -> dict[str, Any]:
    """The JSON body as a dict ({} when it is not one: validation reports that later)."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def _image_count(request: Request) -> int:
    """The body's ``n`` (default 1); a malformed body counts 1 and fails validation later."""
    n = (await _json_body(request)).get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
