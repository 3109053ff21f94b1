"""Per-client rate limits: requests, tokens and images per minute.

No HTTP here: a limiter returns a ``RateLimitDecision`` and the API layer turns a refusal into a
429 with ``Retry-After`` and the ``X-RateLimit-*`` headers (``RateLimitDecision.headers()``).

Budgets, each per client key per minute; 0 or None means unlimited:

- ``requests``: every admitted request costs 1.
- ``images``: charged up front, ``images`` per request. A request asking for more images than the
  whole budget could ever allow raises ``InvalidRequestError`` (a 429 would be retried forever).
- ``tokens``: prompt plus completion tokens, known only once a request is done. ``admit`` refuses
  while the recorded usage has already used up the budget; ``record_tokens`` adds the actual
  usage afterwards. A request may therefore overshoot the budget once; the overshoot delays the
  client's next requests accordingly.

A refused request is not charged: only admitted requests count.

Window algorithm: a sliding-window approximation (as Cloudflare and nginx-style limiters use).
Counts are kept per fixed one-minute window, the current and the previous one, and the usage
seen at time ``t`` is ``previous * (1 - elapsed / 60 s) + current``: the previous minute's usage
fades out linearly. Unlike plain fixed windows this does not allow twice the budget across a
window edge (10 requests at 0:59 and 10 more at 1:01), and it needs only two counters per budget
and client, so the in-process and the Redis limiter run the same arithmetic (in integer
milliseconds, so both give the same answers). Reported values:

- ``remaining``: whole units left now.
- ``reset_s``: seconds until the usage counted so far has faded out entirely (the budget is full
  again); up to two minutes, since the current minute's usage fades out over the next one.
- ``retry_after_s`` (refusals only, >= 1): seconds until this same request would be admitted.

Backends: ``InMemoryRateLimiter`` (one process; the default) and ``RedisRateLimiter`` (replicas
share one budget through a Lua script that checks and charges atomically). When Redis cannot be
reached, the Redis limiter fails open by default: the request goes through unchecked and a
warning is logged at most once a minute, because serving generation matters more than exact
limits. With ``fail_open=False`` it raises ``ServiceUnavailableError`` (503) instead.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fictures_ai.errors import InvalidRequestError, ServiceUnavailableError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)

WINDOW_S = 60
"""Length of one rate-limit window in seconds (the budgets are per minute)."""

_WINDOW_MS = WINDOW_S * 1000
_WARN_INTERVAL_S = 60.0


class Budget(enum.StrEnum):
    """One of the per-minute budgets a client has."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    IMAGES = "images"


# Index order of the three counters, in memory, in Redis and in the Lua script's arguments.
_BUDGETS = (Budget.REQUESTS, Budget.TOKENS, Budget.IMAGES)
_Triple = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class BudgetState:
    """Where one active budget of a client stands after a decision."""

    budget: Budget
    limit: int
    remaining: int
    reset_s: int


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """The answer to ``RateLimiter.admit``.

    ``budgets`` lists the active (limited) budgets only, in the order requests, tokens, images.
    When refused, ``refused_by`` names the budget that holds the request back longest and
    ``retry_after_s`` (>= 1) says when the same request would be admitted. ``degraded`` is True
    when the backend could not be asked and the request was let through unchecked (fail open).
    """

    allowed: bool
    budgets: tuple[BudgetState, ...] = ()
    refused_by: Budget | None = None
    retry_after_s: int | None = None
    degraded: bool = False

    @property
    def _headline(self) -> BudgetState | None:
        # The budget that speaks for the decision: the refusing one, else requests, else the
        # first active one.
        wanted = self.refused_by or Budget.REQUESTS
        for state in self.budgets:
            if state.budget is wanted:
                return state
        return self.budgets[0] if self.budgets else None

    @property
    def limit(self) -> int | None:
        """Limit of the refusing budget (else of requests, else the first active); None if none."""
        state = self._headline
        return state.limit if state else None

    @property
    def remaining(self) -> int | None:
        """What is left of the budget ``limit`` describes; None when no budget is active."""
        state = self._headline
        return state.remaining if state else None

    @property
    def reset_s(self) -> int | None:
        """Seconds until the budget ``limit`` describes is full again; None when none is active."""
        state = self._headline
        return state.reset_s if state else None

    def headers(self) -> dict[str, str]:
        """HTTP headers describing every active budget (and ``Retry-After`` when refused).

        ``X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens,Images}`` for each active budget,
        plus the plain ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` for the requests budget.
        Reset values are delta seconds. Empty when no budget is active.
        """
        headers: dict[str, str] = {}
        for state in self.budgets:
            suffix = state.budget.value.capitalize()
            headers[f"X-RateLimit-Limit-{suffix}"] = str(state.limit)
            headers[f"X-RateLimit-Remaining-{suffix}"] = str(state.remaining)
            headers[f"X-RateLimit-Reset-{suffix}"] = str(state.reset_s)
            if state.budget is Budget.REQUESTS:
                headers["X-RateLimit-Limit"] = str(state.limit)
                headers["X-RateLimit-Remaining"] = str(state.remaining)
                headers["X-RateLimit-Reset"] = str(state.reset_s)
        if not self.allowed and self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


_UNLIMITED = RateLimitDecision(allowed=True)


class RateLimiter(Protocol):
    """Per-client budgets of requests, tokens and images per minute."""

    async def admit(
        self, client: str, *, images: int = 0, check_tokens: bool | None = None
    ) -> RateLimitDecision:
        """Admit one request of ``client`` (charging 1 request and ``images`` images) or refuse it.

        The tokens budget is checked (not charged) when ``check_tokens`` is true; None means
        "when no images are asked for", so image requests are not held back by a spent token
        budget. Nothing is charged when the request is refused. Raises ``InvalidRequestError``
        when ``images`` exceeds the whole images budget.
        """
        ...

    async def record_tokens(self, client: str, tokens: int) -> None:
        """Add ``tokens`` (prompt + completion) actually used by an admitted request of ``client``.

        Never raises for backend failures: the request is over, nobody could act on them.
        """
        ...

    async def close(self) -> None:
        """Release connections; the limiter is not used afterwards."""
        ...


def _budget(name: str, value: int | None) -> int:
    """A budget as an int, 0 meaning unlimited."""
    if value is None:
        return 0
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 or None means unlimited), got {value}")
    return value


def _tokens_to_record(limits: _Triple, tokens: int) -> bool:
    """Whether ``tokens`` must be charged: a positive count and a tokens budget in force."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return tokens > 0 and bool(limits[1])


def _needs(limits: _Triple, images: int, check_tokens: bool | None) -> _Triple:
    """What must still fit in each budget for a request to be admitted (1 token: not spent)."""
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    if limits[2] and images > limits[2]:
        raise InvalidRequestError(
            f"This request asks for {images} images, but this key may generate at most "
            f"{limits[2]} images per minute.",
            param="n",
            value=images,
        )
    if check_tokens is None:
        check_tokens = images == 0
    return (1, 1 if check_tokens else 0, images)


def _charges(limits: _Triple, images: int) -> _Triple:
    """What an admitted request adds to each counter (nothing to unlimited budgets)."""
    return (1 if limits[0] else 0, 0, images if limits[2] else 0)


def _refuses(limit: int, prev: int, curr: int, need: int, elapsed_ms: int) -> bool:
    """Whether ``need`` more units overflow the budget (the Lua script has the same test).

    Scaled by the window length so that everything stays in integers:
    ``prev * (1 - elapsed / W) + curr + need > limit``.
    """
    if limit <= 0 or need <= 0:
        return False
    return prev * (_WINDOW_MS - elapsed_ms) + (curr + need) * _WINDOW_MS > limit * _WINDOW_MS


def _wait_ms(limit: int, prev: int, curr: int, need: int, elapsed_ms: int) -> int:
    """Milliseconds until ``need`` more units fit (assuming no other usage meanwhile)."""
    room = limit - need - curr
    if room >= 0:
        # Fits later in this window, once enough of the previous window has faded out:
        # the smallest elapsed e with prev * (W - e) <= room * W.
        if prev <= 0:
            return 0
        return max(0, _WINDOW_MS - (room * _WINDOW_MS) // prev - elapsed_ms)
    # Cannot fit in this window: wait for the next one, where the current count becomes the
    # previous one and fades out. limit >= need holds (checked in _needs), so curr > 0 here.
    until_next = _WINDOW_MS - elapsed_ms
    return until_next + _WINDOW_MS - ((limit - need) * _WINDOW_MS) // curr


def _reset_ms(prev: int, curr: int, elapsed_ms: int) -> int:
    """Milliseconds until all usage counted so far has faded out."""
    if curr > 0:
        return 2 * _WINDOW_MS - elapsed_ms
    if prev > 0:
        return _WINDOW_MS - elapsed_ms
    return 0


def _ceil_s(ms: int) -> int:
    return -(-ms // 1000)


def _decide(
    *,
    limits: _Triple,
    prev: Sequence[int],
    curr: Sequence[int],
    elapsed_ms: int,
    needs: _Triple,
    allowed: bool,
) -> RateLimitDecision:
    """Build the decision from the counters (after charging when allowed, untouched if not)."""
    states: list[BudgetState] = []
    waits: list[tuple[int, Budget]] = []
    for i, budget in enumerate(_BUDGETS):
        limit = limits[i]
        if not limit:
            continue
        used = prev[i] * (_WINDOW_MS - elapsed_ms) + curr[i] * _WINDOW_MS
        states.append(
            BudgetState(
                budget=budget,
                limit=limit,
                remaining=max(0, (limit * _WINDOW_MS - used) // _WINDOW_MS),
                reset_s=_ceil_s(_reset_ms(prev[i], curr[i], elapsed_ms)),
            )
        )
        if not allowed and _refuses(limit, prev[i], curr[i], needs[i], elapsed_ms):
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
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self._limits: _Triple = (
            _budget("requests_per_minute", requests_per_minute),
            _budget("tokens_per_minute", tokens_per_minute),
            _budget("images_per_minute", images_per_minute),
        )
        self._clock = clock
        self._max_clients = max_clients
        self._clients: OrderedDict[str, _ClientWindow] = OrderedDict()

    @property
    def tracked_clients(self) -> int:
        """How many clients have counters in memory now."""
        return len(self._clients)

    def _touch(self, client: str) -> tuple[_ClientWindow, int]:
        """The client's counters rolled to now, and the milliseconds elapsed in this window."""
        window, elapsed_ms = divmod(math.floor(self._clock() * 1000), _WINDOW_MS)
        entry = self._clients.get(client)
        if entry is None:
            entry = self._clients[client] = _ClientWindow(window)
        else:
            entry.roll(window)
            self._clients.move_to_end(client)
        # The front is the least recently seen; stop at the first client still counting.
        while self._clients:
            oldest = next(iter(self._clients.values()))
            if oldest.window >= window - 1 and len(self._clients) <= self._max_clients:
                break
            self._clients.popitem(last=False)
        return entry, elapsed_ms

    async def admit(
        self, client: str, *, images: int = 0, check_tokens: bool | None = None
    ) -> RateLimitDecision:
        """See ``RateLimiter.admit``."""
        needs = _needs(self._limits, images, check_tokens)
        if not any(self._limits):
            return _UNLIMITED
        entry, elapsed_ms = self._touch(client)
        allowed = not any(
            _refuses(self._limits[i], entry.prev[i], entry.curr[i], needs[i], elapsed_ms)
            for i in range(3)
        )
        if allowed:
            for i, charge in enumerate(_charges(self._limits, images)):
                entry.curr[i] += charge
        return _decide(
            limits=self._limits,
            prev=entry.prev,
            curr=entry.curr,
            elapsed_ms=elapsed_ms,
            needs=needs,
            allowed=allowed,
        )

    async def record_tokens(self, client: str, tokens: int) -> None:
        """See ``RateLimiter.record_tokens``; a no-op when tokens are unlimited."""
        if not _tokens_to_record(self._limits, tokens):
            return
        entry, _ = self._touch(client)
        entry.curr[1] += tokens

    async def close(self) -> None:
        """Forget all counters."""
        self._clients.clear()


# Atomic check-and-charge on one client's hash {w, p1..p3, c1..c3} (window index, previous and
# current counters). The same arithmetic as _ClientWindow.roll and _refuses, in integers.
# KEYS[1]: the client's key. ARGV: now in ms (negative: use the Redis server's clock, which all
# replicas share), window length in ms, limits x3 (0 = unlimited), needs x3, charges x3.
# Returns {allowed, elapsed_ms, prev x3, curr x3}; the counters are after charging if allowed.
_LUA_ADMIT = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local size = tonumber(ARGV[2])
local window = math.floor(now / size)
local elapsed = now - window * size
local stored = redis.call('HMGET', KEYS[1], 'w', 'p1', 'p2', 'p3', 'c1', 'c2', 'c3')
local prev = {0, 0, 0}
local curr = {0, 0, 0}
local last = tonumber(stored[1])
if last ~= nil then
  if last >= window then
    window = last
    for i = 1, 3 do
      prev[i] = tonumber(stored[1 + i]) or 0
      curr[i] = tonumber(stored[4 + i]) or 0
    end
  elseif last == window - 1 then
    for i = 1, 3 do
      prev[i] = tonumber(stored[4 + i]) or 0
    end
  end
end
local allowed = 1
for i = 1, 3 do
  local limit = tonumber(ARGV[2 + i])
  local need = tonumber(ARGV[5 + i])
  if limit > 0 and need > 0
      and prev[i] * (size - elapsed) + (curr[i] + need) * size > limit * size then
    allowed = 0
  end
end
if allowed == 1 then
  local charged = false
  for i = 1, 3 do
    local charge = tonumber(ARGV[8 + i])
    if charge > 0 then
      curr[i] = curr[i] + charge
      charged = true
    end
  end
  if charged then
    redis.call('HSET', KEYS[1], 'w', window, 'p1', prev[1], 'p2', prev[2], 'p3', prev[3],
      'c1', curr[1], 'c2', curr[2], 'c3', curr[3])
    -- Gone once the current window's usage has faded out too.
    redis.call('PEXPIRE', KEYS[1], 2 * size - elapsed)
  end
end
return {allowed, elapsed, prev[1], prev[2], prev[3], curr[1], curr[2], curr[3]}
"""


class RedisRateLimiter:
    """Rate limits kept in Redis, so that several replicas share one budget per client.

    Each call is one EVALSHA of a Lua script that rolls the windows, checks and charges
    atomically; the client's hash expires by itself once its usage has faded out. Keys are
    ``{prefix}:{sha256(client)[:32]}``: API keys never appear in Redis. Time comes from the Redis
    server's clock (shared by all replicas) unless ``clock`` (seconds) is given, for tests.
    Needs Redis >= 5.

    When Redis cannot be reached (or errs), ``fail_open=True`` (the default) lets the request
    through unchecked (``degraded=True`` on the decision); ``fail_open=False`` raises
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
        # Imported here so that the in-process limiter works where redis is not installed.
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._limits: _Triple = (
            _budget("requests_per_minute", requests_per_minute),
            _budget("tokens_per_minute", tokens_per_minute),
            _budget("images_per_minute", images_per_minute),
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
        self._script: AsyncScript = self._redis.register_script(_LUA_ADMIT)
        self._skip_until = 0.0
        self._warned_at: float | None = None

    def _key(self, client: str) -> str:
        return f"{self._prefix}:{hashlib.sha256(client.encode()).hexdigest()[:32]}"

    def _now_arg(self) -> int:
        return -1 if self._clock is None else math.floor(self._clock() * 1000)

    async def _run(self, client: str, needs: _Triple, charges: _Triple) -> list[int] | None:
        """Run the script; None when Redis failed (or is being skipped after a failure)."""
        from redis.exceptions import RedisError

        now = time.monotonic()
        if now < self._skip_until:
            return None
        try:
            reply: Any = await self._script(
                keys=[self._key(client)],
                args=[self._now_arg(), _WINDOW_MS, *self._limits, *needs, *charges],
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

    async def admit(
        self, client: str, *, images: int = 0, check_tokens: bool | None = None
    ) -> RateLimitDecision:
        """See ``RateLimiter.admit``; raises ``ServiceUnavailableError`` only if fail-closed."""
        needs = _needs(self._limits, images, check_tokens)
        if not any(self._limits):
            return _UNLIMITED
        reply = await self._run(client, needs, _charges(self._limits, images))
        if reply is None:
            if self._fail_open:
                return RateLimitDecision(allowed=True, degraded=True)
            raise ServiceUnavailableError(
                "Rate limiting is unavailable (its Redis cannot be reached); try again shortly.",
                retry_after=max(1, math.ceil(self._retry_interval_s)),
            )
        allowed, elapsed_ms = reply[0] == 1, reply[1]
        return _decide(
            limits=self._limits,
            prev=reply[2:5],
            curr=reply[5:8],
            elapsed_ms=elapsed_ms,
            needs=needs,
            allowed=allowed,
        )

    async def record_tokens(self, client: str, tokens: int) -> None:
        """See ``RateLimiter.record_tokens``; a no-op when tokens are unlimited."""
        if not _tokens_to_record(self._limits, tokens):
            return
        # Needs of zero: the script checks nothing and always charges.
        await self._run(client, (0, 0, 0), (0, tokens, 0))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


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
    """
    budgets = {
        "requests": _budget("requests_per_minute", requests_per_minute),
        "tokens": _budget("tokens_per_minute", tokens_per_minute),
        "images": _budget("images_per_minute", images_per_minute),
    }
    described = ", ".join(f"{name} {value or 'unlimited'}" for name, value in budgets.items())
    if not any(budgets.values()):
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
