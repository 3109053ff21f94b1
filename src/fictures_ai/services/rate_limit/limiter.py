"""The ``RateLimiter`` interface, and the one place that picks its backend from the settings."""

from __future__ import annotations

import logging
from typing import Protocol

from fictures_ai.services.rate_limit.decision import RateLimitDecision
from fictures_ai.services.rate_limit.in_memory import InMemoryRateLimiter
from fictures_ai.services.rate_limit.redis_backed import RedisRateLimiter
from fictures_ai.services.rate_limit.window import BUDGETS, budget_limits

# One logger for the package, under the name it had as a single module.
logger = logging.getLogger(__package__)


class RateLimiter(Protocol):
    """Per-client budgets of requests, tokens and images per minute."""

    async def admit(self, client: str, *, images: int = 0) -> RateLimitDecision:
        """Admit one request of ``client`` (charging 1 request and ``images`` images) or refuse it.

        A request that renders no images is also refused while the tokens budget is spent; an
        image request is not held back by it. Nothing is charged when the request is refused.

        Raises ``InvalidRequestError`` when ``images`` exceeds the whole images budget (no wait
        would help), ``ValueError`` when ``images`` is negative, and ``ServiceUnavailableError``
        when the backend cannot be asked and the limiter fails closed.
        """
        ...

    async def record_tokens(self, client: str, tokens: int) -> None:
        """Add ``tokens`` (prompt + completion) actually used by an admitted request of ``client``.

        Raises ``ValueError`` when ``tokens`` is negative, never for backend failures: the
        request is over, nobody could act on them.
        """
        ...

    async def close(self) -> None:
        """Release connections; the limiter is not used afterwards."""
        ...


def create_rate_limiter(
    *,
    redis_url: str | None,
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    images_per_minute: int | None,
    fail_open: bool = True,
) -> RateLimiter:
    """The limiter the settings ask for: in-process without ``redis_url``, else Redis-backed.

    With every budget unlimited the in-process limiter is returned whatever ``redis_url`` says:
    there is nothing to count, so Redis is never contacted. ``fail_open`` applies to Redis only.
    Raises ``ValueError`` for a negative budget.
    """
    limits = budget_limits(
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        images_per_minute=images_per_minute,
    )
    described = ", ".join(
        f"{budget.value} {limit or 'unlimited'}"
        for budget, limit in zip(BUDGETS, limits, strict=True)
    )
    if not any(limits):
        logger.info("Rate limiting is off (no budget set)")
        return InMemoryRateLimiter(
            requests_per_minute=None, tokens_per_minute=None, images_per_minute=None
        )
    if redis_url is None:
        logger.info("Rate limits per key per minute, in this process: %s", described)
        return InMemoryRateLimiter(
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            images_per_minute=images_per_minute,
        )
    # The URL may carry a password: it is not logged.
    logger.info(
        "Rate limits per key per minute, shared through Redis (fail %s): %s",
        "open" if fail_open else "closed",
        described,
    )
    return RedisRateLimiter(
        url=redis_url,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        images_per_minute=images_per_minute,
        fail_open=fail_open,
    )
