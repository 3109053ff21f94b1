"""The Redis rate limiter against a real redis-server, started once for the session.

Window arithmetic is checked on a fake clock passed into the Lua script (no sleeping through
minutes); one test uses the Redis server's own clock, as production does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from fictures_ai.api.auth import rate_limit_headers
from fictures_ai.errors import ServiceUnavailableError
from fictures_ai.services.rate_limit import (
    Budget,
    BudgetState,
    RateLimitDecision,
    RedisRateLimiter,
)
from tests.redis_server import RedisServer
from tests.support import FakeClock, free_port

pytestmark = pytest.mark.integration

WINDOW_START = 60_000.0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def raw_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


MakeLimiter = Callable[..., RedisRateLimiter]


def state(decision: RateLimitDecision, budget: Budget = Budget.REQUESTS) -> BudgetState:
    """Where ``budget`` stands after ``decision``."""
    return next(state for state in decision.budgets if state.budget is budget)


@pytest.fixture
async def make_limiter(redis_server: RedisServer) -> AsyncIterator[MakeLimiter]:
    """Limiters on the session's server, sharing one key prefix per test (as replicas do)."""
    prefix = f"test:{uuid.uuid4().hex}"
    made: list[RedisRateLimiter] = []

    def make(
        *,
        requests: int | None = None,
        tokens: int | None = None,
        images: int | None = None,
        clock: Callable[[], float] | None = None,
        url: str | None = None,
        fail_open: bool = True,
        retry_interval_s: float = 1.0,
    ) -> RedisRateLimiter:
        rl = RedisRateLimiter(
            url=url or redis_server.url,
            requests_per_minute=requests,
            tokens_per_minute=tokens,
            images_per_minute=images,
            prefix=prefix,
            clock=clock,
            fail_open=fail_open,
            retry_interval_s=retry_interval_s,
        )
        made.append(rl)
        return rl

    yield make
    for rl in made:
        await rl.close()


async def test_eleventh_request_is_refused_with_retry_after(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = make_limiter(requests=10, clock=clock)
    for i in range(10):
        decision = await rl.admit("key")
        assert decision.allowed
        assert state(decision).remaining == 9 - i
    refused = await rl.admit("key")
    assert not refused.allowed
    assert refused.refused_by is Budget.REQUESTS
    assert refused.retry_after_s == 36
    headers = rate_limit_headers(refused)
    assert headers["Retry-After"] == "36"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["X-RateLimit-Reset"] == "90"
    clock.advance(35)
    assert not (await rl.admit("key")).allowed
    clock.advance(1)
    assert (await rl.admit("key")).allowed


async def test_windows_roll_over(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = make_limiter(requests=10, clock=clock)
    for _ in range(10):
        await rl.admit("key")
    clock.advance(60)  # the previous 10 count as 5 halfway through the next window
    allowed = [(await rl.admit("key")).allowed for _ in range(6)]
    assert allowed == [True] * 5 + [False]
    clock.advance(120)
    decision = await rl.admit("key")
    assert decision.allowed
    assert state(decision).remaining == 9


async def test_tokens_budget(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = make_limiter(tokens=100, clock=clock)
    assert (await rl.admit("key")).allowed
    await rl.record_tokens("key", 60)
    decision = await rl.admit("key")
    assert state(decision, Budget.TOKENS).remaining == 40
    await rl.record_tokens("key", 50)
    refused = await rl.admit("key")
    assert not refused.allowed
    assert refused.refused_by is Budget.TOKENS
    assert refused.retry_after_s == 36
    assert (await rl.admit("key", images=1)).allowed  # image requests use no tokens


async def test_images_budget(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = make_limiter(requests=100, images=4, clock=clock)
    decision = await rl.admit("key", images=3)
    assert state(decision).remaining == 99
    assert rate_limit_headers(decision)["X-RateLimit-Remaining-Images"] == "1"
    refused = await rl.admit("key", images=2)
    assert not refused.allowed
    assert refused.refused_by is Budget.IMAGES
    assert state(refused, Budget.IMAGES).remaining == 1
    assert (await rl.admit("key", images=1)).allowed
    assert (await rl.admit("key")).allowed  # a text request is not held back by images


async def test_clients_are_independent(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START)
    rl = make_limiter(requests=2, clock=clock)
    await rl.admit("a")
    await rl.admit("a")
    assert not (await rl.admit("a")).allowed
    assert (await rl.admit("b")).allowed


async def test_two_replicas_share_one_budget(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(WINDOW_START + 30)
    first = make_limiter(requests=10, clock=clock)
    second = make_limiter(requests=10, clock=clock)
    for _ in range(6):
        assert (await first.admit("key")).allowed
    for _ in range(4):
        assert (await second.admit("key")).allowed
    refused = await second.admit("key")  # the 11th request in all
    assert not refused.allowed
    assert not (await first.admit("key")).allowed


async def test_concurrent_requests_across_replicas_never_exceed_the_budget(
    make_limiter: MakeLimiter,
) -> None:
    clock = FakeClock(WINDOW_START)
    replicas = [make_limiter(requests=10, clock=clock) for _ in range(3)]
    decisions = await asyncio.gather(*(replicas[i % 3].admit("key") for i in range(30)))
    assert sum(d.allowed for d in decisions) == 10


async def test_server_clock_and_key_expiry(
    make_limiter: MakeLimiter, raw_redis: redis.Redis
) -> None:
    rl = make_limiter(requests=3)  # no clock: the Redis server's, as in production
    for _ in range(3):
        assert (await rl.admit("secret-api-key")).allowed
    refused = await rl.admit("secret-api-key")
    assert not refused.allowed
    assert refused.retry_after_s is not None
    assert 1 <= refused.retry_after_s <= 120
    keys = [key.decode() for key in raw_redis.scan_iter(f"{rl._prefix}:*")]
    digest = hashlib.sha256(b"secret-api-key").hexdigest()[:32]
    assert keys == [f"{rl._prefix}:{digest}"]  # the API key itself is not stored
    ttl_ms = raw_redis.pttl(keys[0])
    assert isinstance(ttl_ms, int)
    assert 60_000 < ttl_ms <= 120_000


async def test_script_is_reloaded_after_a_script_flush(
    make_limiter: MakeLimiter, raw_redis: redis.Redis
) -> None:
    rl = make_limiter(requests=5, clock=FakeClock(WINDOW_START))
    assert state(await rl.admit("key")).remaining == 4
    raw_redis.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    assert state(await rl.admit("key")).remaining == 3  # counted, not let through unchecked


async def test_redis_down_fails_open_by_default(
    make_limiter: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    rl = make_limiter(requests=1, url=f"redis://127.0.0.1:{free_port()}/0", retry_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="fictures_ai.services.rate_limit"):
        for _ in range(3):
            # Let through unchecked: no budget to report.
            assert await rl.admit("key") == RateLimitDecision(allowed=True)
        await rl.record_tokens("key", 10)  # never raises
    warnings = [r for r in caplog.records if "Redis is unavailable" in r.getMessage()]
    assert len(warnings) == 1  # at most once a minute


async def test_redis_down_fails_closed_when_asked(make_limiter: MakeLimiter) -> None:
    rl = make_limiter(requests=1, url=f"redis://127.0.0.1:{free_port()}/0", fail_open=False)
    with pytest.raises(ServiceUnavailableError) as excinfo:
        await rl.admit("key")
    assert excinfo.value.retry_after == 1
    # During the retry interval Redis is not asked again; the answer is the same.
    with pytest.raises(ServiceUnavailableError):
        await rl.admit("key")


async def test_limits_resume_when_redis_comes_back(
    make_limiter: MakeLimiter, tmp_path: Path
) -> None:
    port = free_port()
    rl = make_limiter(requests=1, url=f"redis://127.0.0.1:{port}/0", retry_interval_s=0)
    assert (await rl.admit("key")).budgets == ()  # unchecked
    server = RedisServer(tmp_path, port=port)
    try:
        first = await rl.admit("key")
        assert first.allowed
        assert state(first).remaining == 0  # counted again
        assert not (await rl.admit("key")).allowed
    finally:
        server.stop()
