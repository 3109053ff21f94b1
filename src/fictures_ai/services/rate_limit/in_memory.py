"""The in-process limiter: each replica counts its own clients."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from fictures_ai.services.rate_limit.decision import UNCHECKED, RateLimitDecision
from fictures_ai.services.rate_limit.window import (
    WINDOW_MS,
    admission_charges,
    admission_needs,
    budget_limits,
    decide,
    refuses,
    tokens_to_record,
)


class _ClientWindow:
    """Counters of one client: the current window's and the previous window's."""

    __slots__ = ("curr", "prev", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.prev = [0, 0, 0]
        self.curr = [0, 0, 0]

    def roll(self, window: int) -> None:
        """Move to ``window``; an older ``window`` (clock skew) keeps the counters as they are."""
        if window <= self.window:
            return
        self.prev = self.curr if window == self.window + 1 else [0, 0, 0]
        self.curr = [0, 0, 0]
        self.window = window


class InMemoryRateLimiter:
    """Rate limits kept in this process (each replica has its own budget).

    Lock-free: every method runs to completion without awaiting, so on the single-threaded event
    loop no other call interleaves. O(1) per call. Memory stays bounded: clients are kept in
    least-recently-seen order and dropped as soon as their usage has faded out (idle for two
    windows), and beyond ``max_clients`` the least recently seen client is dropped early (it then
    starts afresh: a tiny leak of budget rather than unbounded memory).
    """

    def __init__(
        self,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        images_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 100_000,
    ) -> None:
        """Raises ``ValueError`` for a negative budget or ``max_clients`` below 1."""
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self._limits = budget_limits(
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            images_per_minute=images_per_minute,
        )
        self._clock = clock
        self._max_clients = max_clients
        self._clients: OrderedDict[str, _ClientWindow] = OrderedDict()

    def _touch(self, client: str) -> tuple[_ClientWindow, int]:
        """The client's counters rolled to now, and the milliseconds elapsed in this window."""
        current, elapsed_ms = divmod(math.floor(self._clock() * 1000), WINDOW_MS)
        entry = self._clients.get(client)
        if entry is None:
            entry = self._clients[client] = _ClientWindow(current)
        else:
            entry.roll(current)
            self._clients.move_to_end(client)
        # The front is the least recently seen; stop at the first client still counting.
        while self._clients:
            oldest = next(iter(self._clients.values()))
            if oldest.window >= current - 1 and len(self._clients) <= self._max_clients:
                break
            self._clients.popitem(last=False)
        return entry, elapsed_ms

    async def admit(self, client: str, *, images: int = 0) -> RateLimitDecision:
        """See ``RateLimiter.admit``; raises ``InvalidRequestError`` or ``ValueError`` only."""
        needs = admission_needs(self._limits, images)
        if not any(self._limits):
            return UNCHECKED
        entry, elapsed_ms = self._touch(client)
        allowed = not any(
            refuses(self._limits[i], entry.prev[i], entry.curr[i], needs[i], elapsed_ms)
            for i in range(3)
        )
        if allowed:
            for i, charge in enumerate(admission_charges(self._limits, images)):
                entry.curr[i] += charge
        return decide(
            limits=self._limits,
            prev=entry.prev,
            curr=entry.curr,
            elapsed_ms=elapsed_ms,
            needs=needs,
            allowed=allowed,
        )

    async def record_tokens(self, client: str, tokens: int) -> None:
        """See ``RateLimiter.record_tokens``; a no-op when tokens are unlimited."""
        if not tokens_to_record(self._limits, tokens):
            return
        entry, _ = self._touch(client)
        entry.curr[1] += tokens

    async def close(self) -> None:
        """Forget all counters."""
        self._clients.clear()
