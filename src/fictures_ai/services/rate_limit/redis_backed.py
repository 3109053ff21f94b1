"""The Redis limiter: replicas share one budget per client through one Lua script."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from fictures_ai.errors import ServiceUnavailableError
from fictures_ai.services.rate_limit.decision import UNCHECKED, RateLimitDecision
from fictures_ai.services.rate_limit.window import (
    WINDOW_MS,
    Triple,
    admission_charges,
    admission_needs,
    budget_limits,
    decide,
    tokens_to_record,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

# One logger for the package, under the name it had as a single module.
logger = logging.getLogger(__package__)

_ADMIT_SCRIPT = resources.files(__package__).joinpath("admit.lua").read_text(encoding="utf-8")
"""The Lua script that rolls a client's windows, checks and charges (package data)."""

_WARN_INTERVAL_S = 60.0


class RedisRateLimiter:
    """Rate limits kept in Redis, so that several replicas share one budget per client.

    Each call is one EVALSHA of ``admit.lua``, which rolls the windows, checks and charges
    atomically; the client's hash expires by itself once its usage has faded out. Keys are
    ``{prefix}:{sha256(client)[:32]}``: API keys never appear in Redis. Time comes from the Redis
    server's clock (shared by all replicas) unless ``clock`` (seconds) is given, for tests.
    Needs Redis >= 5.

    When Redis cannot be reached (or errs), ``fail_open=True`` (the default) lets the request
    through unchecked (a decision with no budgets); ``fail_open=False`` raises
    ``ServiceUnavailableError``. Either way a warning is logged at most once a minute, and for
    ``retry_interval_s`` after a failure Redis is not asked at all, so that a dead Redis does not
    add a timeout to every request.
    """

    def __init__(
        self,
        *,
        url: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        images_per_minute: int | None,
        prefix: str = "fictures:rl",
        fail_open: bool = True,
        socket_timeout_s: float = 0.5,
        retry_interval_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Connects lazily (on the first call); raises ``ValueError`` for a negative budget."""
        # Imported when a Redis limiter is made: redis.asyncio takes ~0.1 s to import, which a
        # server counting in process need not pay.
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._limits = budget_limits(
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            images_per_minute=images_per_minute,
        )
        self._prefix = prefix
        self._fail_open = fail_open
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        # One quick retry covers a pooled connection that went stale (Redis restarted);
        # more, with backoff, would only add latency to the request waiting on us.
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        # register_script runs EVALSHA and loads the script on NOSCRIPT (after a Redis restart).
        self._script: AsyncScript = self._redis.register_script(_ADMIT_SCRIPT)
        self._skip_until = 0.0
        self._warned_at: float | None = None

    def _key(self, client: str) -> str:
        return f"{self._prefix}:{hashlib.sha256(client.encode()).hexdigest()[:32]}"

    def _now_arg(self) -> int:
        return -1 if self._clock is None else math.floor(self._clock() * 1000)

    async def _run(self, client: str, needs: Triple, charges: Triple) -> list[int] | None:
        """Run the script; None when Redis failed (or is being skipped after a failure)."""
        from redis.exceptions import RedisError

        now = time.monotonic()
        if now < self._skip_until:
            return None
        try:
            reply: Any = await self._script(
                keys=[self._key(client)],
                args=[self._now_arg(), WINDOW_MS, *self._limits, *needs, *charges],
            )
            return [int(value) for value in reply]
        except (RedisError, OSError) as exc:
            self._skip_until = now + self._retry_interval_s
            if self._warned_at is None or now - self._warned_at >= _WARN_INTERVAL_S:
                self._warned_at = now
                logger.warning(
                    "Rate limiter: Redis is unavailable (%s: %s); %s until it answers again "
                    "(this warning repeats at most once a minute)",
                    type(exc).__name__,
                    exc,
                    "admitting requests unchecked" if self._fail_open else "refusing requests",
                )
            return None

    async def admit(self, client: str, *, images: int = 0) -> RateLimitDecision:
        """See ``RateLimiter.admit``; ``ServiceUnavailableError`` only when fail-closed."""
        needs = admission_needs(self._limits, images)
        if not any(self._limits):
            return UNCHECKED
        reply = await self._run(client, needs, admission_charges(self._limits, images))
        if reply is None:
            if self._fail_open:
                return UNCHECKED
            raise ServiceUnavailableError(
                "Rate limiting is unavailable (its Redis cannot be reached); try again shortly.",
                retry_after=max(1, math.ceil(self._retry_interval_s)),
            )
        allowed, elapsed_ms = reply[0] == 1, reply[1]
        return decide(
            limits=self._limits,
            prev=reply[2:5],
            curr=reply[5:8],
            elapsed_ms=elapsed_ms,
            needs=needs,
            allowed=allowed,
        )

    async def record_tokens(self, client: str, tokens: int) -> None:
        """See ``RateLimiter.record_tokens``; a no-op when tokens are unlimited."""
        if not tokens_to_record(self._limits, tokens):
            return
        # Needs of zero: the script checks nothing and always charges.
        await self._run(client, (0, 0, 0), (0, tokens, 0))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
