"""Per-client rate limits: requests, tokens and images per minute.

No HTTP here: a limiter returns a ``RateLimitDecision`` and the API layer (``api/auth.py``)
turns it into the ``X-RateLimit-*`` headers, and a refusal into a 429 with ``Retry-After``.

Budgets, each per client key per minute; 0 or None means unlimited:

- ``requests``: every admitted request costs 1.
- ``images``: charged up front, ``images`` per request. A request asking for more images than the
  whole budget could ever allow raises ``InvalidRequestError`` (a 429 would be retried forever).
- ``tokens``: prompt plus completion tokens, known only once a request is done. ``admit`` refuses
  while the recorded usage has already used up the budget; ``record_tokens`` adds the actual
  usage afterwards. A request may therefore overshoot the budget once; the overshoot delays the
  client's next requests accordingly.

A refused request is not charged: only admitted requests count.

Window algorithm (``window.py``): a sliding-window approximation (as Cloudflare and nginx-style
limiters use). Counts are kept per fixed one-minute window, the current and the previous one,
and the previous minute's usage fades out linearly. Unlike plain fixed windows this does not
allow twice the budget across a window edge (10 requests at 0:59 and 10 more at 1:01), and it
needs only two counters per budget and client, so the in-process and the Redis limiter run the
same arithmetic (in integer milliseconds, so both give the same answers).

Modules:

- ``decision.py``: what a limiter answers (``RateLimitDecision``, ``BudgetState``, ``Budget``).
- ``window.py``: the arithmetic both backends share.
- ``in_memory.py``: ``InMemoryRateLimiter``, one process (the default).
- ``redis_backed.py`` and ``admit.lua``: ``RedisRateLimiter``, replicas share one budget through
  a Lua script that checks and charges atomically. When Redis cannot be reached it fails open by
  default: the request goes through unchecked and a warning is logged at most once a minute,
  because serving generation matters more than exact limits. With ``fail_open=False`` it raises
  ``ServiceUnavailableError`` (503) instead.
- ``limiter.py``: the ``RateLimiter`` interface and ``create_rate_limiter``, which picks the
  backend from the settings.
"""

from fictures_ai.services.rate_limit.decision import Budget, BudgetState, RateLimitDecision
from fictures_ai.services.rate_limit.in_memory import InMemoryRateLimiter
from fictures_ai.services.rate_limit.limiter import RateLimiter, create_rate_limiter
from fictures_ai.services.rate_limit.redis_backed import RedisRateLimiter

__all__ = [
    "Budget",
    "BudgetState",
    "InMemoryRateLimiter",
    "RateLimitDecision",
    "RateLimiter",
    "RedisRateLimiter",
    "create_rate_limiter",
]
