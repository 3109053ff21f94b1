"""The sliding-window arithmetic both limiters share, in integer milliseconds.

Counts are kept per fixed one-minute window, the current and the previous one, and the usage
seen at time ``t`` is ``previous * (1 - elapsed / 60 s) + current``: the previous minute's usage
fades out linearly. Everything is scaled by the window length so that it stays in integers and
the Lua script (``admit.lua``) gives the same answers as this module.

Counters come in triples, one per budget, in the order of ``BUDGETS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.rate_limit.decision import Budget, BudgetState, RateLimitDecision

WINDOW_MS = 60_000
"""Length of one rate-limit window in milliseconds (the budgets are per minute)."""

BUDGETS = (Budget.REQUESTS, Budget.TOKENS, Budget.IMAGES)
"""Index order of the three counters, in memory, in Redis and in the Lua script's arguments."""

Triple = tuple[int, int, int]
"""One value per budget, in the order of ``BUDGETS``."""


def budget_limits(
    *,
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    images_per_minute: int | None,
) -> Triple:
    """The three limits, 0 meaning unlimited (as None does); raises ``ValueError`` if negative."""
    given = {
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
        "images_per_minute": images_per_minute,
    }
    for name, value in given.items():
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 (0 or None means unlimited), got {value}")
    return (requests_per_minute or 0, tokens_per_minute or 0, images_per_minute or 0)


def tokens_to_record(limits: Triple, tokens: int) -> bool:
    """Whether ``tokens`` must be charged: a positive count and a tokens budget in force."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return tokens > 0 and bool(limits[1])


def admission_needs(limits: Triple, images: int) -> Triple:
    """What must still fit in each budget for a request to be admitted.

    A request needs 1 request, and its ``images``. The tokens budget (whose usage is known only
    afterwards) needs 1 token, i.e. not to be spent, from requests that render no images: a
    spent token budget does not hold image requests back.
    """
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    if limits[2] and images > limits[2]:
        raise InvalidRequestError(
            f"This request asks for {images} images, but this key may generate at most "
            f"{limits[2]} images per minute.",
            param="n",
            value=images,
        )
    return (1, 1 if images == 0 else 0, images)


def admission_charges(limits: Triple, images: int) -> Triple:
    """What an admitted request adds to each counter (nothing to unlimited budgets)."""
    return (1 if limits[0] else 0, 0, images if limits[2] else 0)


def refuses(limit: int, prev: int, curr: int, need: int, elapsed_ms: int) -> bool:
    """Whether ``need`` more units overflow the budget (``admit.lua`` has the same test).

    ``prev * (1 - elapsed / W) + curr + need > limit``, scaled by the window length ``W``.
    """
    if limit <= 0 or need <= 0:
        return False
    return prev * (WINDOW_MS - elapsed_ms) + (curr + need) * WINDOW_MS > limit * WINDOW_MS


def _wait_ms(limit: int, prev: int, curr: int, need: int, elapsed_ms: int) -> int:
    """Milliseconds until ``need`` more units fit (assuming no other usage meanwhile)."""
    room = limit - need - curr
    if room >= 0:
        # Fits later in this window, once enough of the previous window has faded out:
        # the smallest elapsed e with prev * (W - e) <= room * W.
        if prev <= 0:
            return 0
        return max(0, WINDOW_MS - (room * WINDOW_MS) // prev - elapsed_ms)
    # Cannot fit in this window: wait for the next one, where the current count becomes the
    # previous one and fades out. limit >= need holds (checked in admission_needs), so
    # curr > 0 here.
    until_next = WINDOW_MS - elapsed_ms
    return until_next + WINDOW_MS - ((limit - need) * WINDOW_MS) // curr


def _reset_ms(prev: int, curr: int, elapsed_ms: int) -> int:
    """Milliseconds until all usage counted so far has faded out."""
    if curr > 0:
        return 2 * WINDOW_MS - elapsed_ms
    if prev > 0:
        return WINDOW_MS - elapsed_ms
    return 0


def _ceil_s(ms: int) -> int:
    return -(-ms // 1000)


def decide(
    *,
    limits: Triple,
    prev: Sequence[int],
    curr: Sequence[int],
    elapsed_ms: int,
    needs: Triple,
    allowed: bool,
) -> RateLimitDecision:
    """Build the decision from the counters (after charging when allowed, untouched if not)."""
    states: list[BudgetState] = []
    waits: list[tuple[int, Budget]] = []
    for i, budget in enumerate(BUDGETS):
        limit = limits[i]
        if not limit:
            continue
        used = prev[i] * (WINDOW_MS - elapsed_ms) + curr[i] * WINDOW_MS
        states.append(
            BudgetState(
                budget=budget,
                limit=limit,
                remaining=max(0, (limit * WINDOW_MS - used) // WINDOW_MS),
                reset_s=_ceil_s(_reset_ms(prev[i], curr[i], elapsed_ms)),
            )
        )
        if not allowed and refuses(limit, prev[i], curr[i], needs[i], elapsed_ms):
            waits.append((_wait_ms(limit, prev[i], curr[i], needs[i], elapsed_ms), budget))
    if allowed:
        return RateLimitDecision(allowed=True, budgets=tuple(states))
    # The longest wait wins: the request passes only once every budget has room.
    wait_ms, refused_by = max(waits, key=lambda item: item[0]) if waits else (0, Budget.REQUESTS)
    return RateLimitDecision(
        allowed=False,
        budgets=tuple(states),
        refused_by=refused_by,
        retry_after_s=max(1, _ceil_s(wait_ms)),
    )
