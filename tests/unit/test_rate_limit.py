"""The in-process rate limiter, on a fake clock: budgets, sliding windows, headers, memory.

The last tests go through the app: the tokens a request used reach the limiter.
"""

from __future__ import annotations

import asyncio
from importlib import resources

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.api.auth import rate_limit_headers
from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.rate_limit import (
    Budget,
    BudgetState,
    InMemoryRateLimiter,
    RateLimitDecision,
    RedisRateLimiter,
    create_rate_limiter,
)
from tests.support import FakeClock
from tests.unit.conftest import make_services

# A window starts at every multiple of 60 s; tests start at a known offset into one.
WINDOW_START = 60_000.0


def limiter(
    clock: FakeClock,
    *,
    requests: int | None = None,
    tokens: int | None = None,
    images: int | None = None,
    max_clients: int = 100_000,
) -> InMemoryRateLimiter:
    return InMemoryRateLimiter(
        requests_per_minute=requests,
        tokens_per_minute=tokens,
        images_per_minute=images,
        clock=clock,
        max_clients=max_clients,
    )


def state(decision: RateLimitDecision, budget: Budget = Budget.REQUESTS) -> BudgetState:
    """Where ``budget`` stands after ``decision``."""
    return next(state for state in decision.budgets if state.budget is budget)


def tracked_clients(rl: InMemoryRateLimiter) -> int:
    """How many clients have counters in memory (not observable through the interface)."""
    return len(rl._clients)


async def test_eleventh_request_in_a_minute_is_refused_with_retry_after() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=10)
    for i in range(10):
        decision = await rl.admit("key")
        assert decision.allowed
        assert state(decision).remaining == 9 - i
    refused = await rl.admit("key")
    assert not refused.allowed
    assert refused.refused_by is Budget.REQUESTS
    assert refused.retry_after_s is not None
    assert 1 <= refused.retry_after_s <= 60
    # 10 used at 0:30: the 11th fits once 1/10 of them has faded out, 6 s into the next window.
    assert refused.retry_after_s == 36
    assert rate_limit_headers(refused) == {
        "Retry-After": "36",
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "90",
        "X-RateLimit-Limit-Requests": "10",
        "X-RateLimit-Remaining-Requests": "0",
        "X-RateLimit-Reset-Requests": "90",
    }
    assert refused.budgets == (
        BudgetState(budget=Budget.REQUESTS, limit=10, remaining=0, reset_s=90),
    )


async def test_retry_after_is_exact() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=10)
    for _ in range(10):
        await rl.admit("key")
    clock.advance(35)
    assert not (await rl.admit("key")).allowed
    clock.advance(1)
    assert (await rl.admit("key")).allowed


async def test_a_burst_at_the_window_start_waits_into_the_next_window() -> None:
    # The sliding estimate takes the previous minute as evenly spread: a burst at 0:00 is
    # still counted in full at 1:00, so the next request waits until 1:06.
    clock = FakeClock(WINDOW_START)
    rl = limiter(clock, requests=10)
    for _ in range(10):
        assert (await rl.admit("key")).allowed
    refused = await rl.admit("key")
    assert refused.retry_after_s == 66
    clock.advance(66)
    assert (await rl.admit("key")).allowed


async def test_refused_requests_are_not_charged() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=2)
    await rl.admit("key")
    await rl.admit("key")
    for _ in range(5):
        assert not (await rl.admit("key")).allowed
    clock.advance(60)  # the two fade out over the next window: half of them at 1:30
    decision = await rl.admit("key")
    assert decision.allowed
    assert state(decision).remaining == 0


async def test_previous_window_fades_out_and_full_budget_returns() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=10)
    for _ in range(10):
        await rl.admit("key")
    clock.advance(60)  # halfway through the next window: the previous 10 count as 5
    allowed = [(await rl.admit("key")).allowed for _ in range(6)]
    assert allowed == [True] * 5 + [False]
    clock.advance(120)  # two windows later everything has faded out
    decision = await rl.admit("key")
    assert decision.allowed
    assert state(decision).remaining == 9


async def test_reset_counts_until_the_usage_has_faded_out() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=10, tokens=1000)
    decision = await rl.admit("key")
    # Usage of this window fades out over the next one: 30 s here plus 60 s.
    assert state(decision).reset_s == 90
    await rl.record_tokens("key", 10)
    clock.advance(40)  # 10 s into the next window
    decision = await rl.admit("key")  # charges a request in this window, but no tokens
    assert rate_limit_headers(decision)["X-RateLimit-Reset-Requests"] == "110"
    assert rate_limit_headers(decision)["X-RateLimit-Reset-Tokens"] == "50"


async def test_tokens_budget_refuses_once_recorded_usage_reaches_it() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, tokens=100)
    decision = await rl.admit("key")
    assert decision.allowed
    assert rate_limit_headers(decision) == {
        "X-RateLimit-Limit-Tokens": "100",
        "X-RateLimit-Remaining-Tokens": "100",
        "X-RateLimit-Reset-Tokens": "0",
    }
    await rl.record_tokens("key", 60)
    decision = await rl.admit("key")
    assert decision.allowed
    assert state(decision, Budget.TOKENS).remaining == 40
    await rl.record_tokens("key", 50)  # a request may overshoot: its usage is known afterwards
    refused = await rl.admit("key")
    assert not refused.allowed
    assert refused.refused_by is Budget.TOKENS
    assert state(refused, Budget.TOKENS).remaining == 0
    # 110 at 0:30: room for one more token once 11 of the 110 have faded out, 6 s into the next
    # window.
    assert refused.retry_after_s == 36
    # Image requests use no tokens: a spent token budget does not hold them back, and
    # admitting one leaves text requests waiting as before.
    assert (await rl.admit("key", images=1)).allowed
    assert (await rl.admit("key")).retry_after_s == 36


async def test_images_are_charged_per_image_up_front() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, images=4)
    decision = await rl.admit("key", images=3)
    assert decision.allowed
    assert state(decision, Budget.IMAGES).remaining == 1
    refused = await rl.admit("key", images=2)
    assert not refused.allowed
    assert refused.refused_by is Budget.IMAGES
    headers = rate_limit_headers(refused)
    assert headers["X-RateLimit-Remaining-Images"] == "1"
    assert "X-RateLimit-Limit" not in headers  # the plain ones speak for requests
    assert (await rl.admit("key", images=1)).allowed
    # A text request asks for no images: a spent image budget does not hold it back.
    assert (await rl.admit("key")).allowed
    with pytest.raises(InvalidRequestError) as excinfo:
        await rl.admit("key", images=5)
    assert excinfo.value.param == "n"


async def test_the_budget_holding_the_request_back_longest_is_reported() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=10, images=2)
    await rl.admit("key", images=2)
    refused = await rl.admit("key", images=1)
    assert refused.refused_by is Budget.IMAGES
    assert set(rate_limit_headers(refused)) >= {"X-RateLimit-Limit", "X-RateLimit-Limit-Images"}


async def test_clients_are_independent() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=3)
    for _ in range(3):
        await rl.admit("a")
    assert not (await rl.admit("a")).allowed
    decision = await rl.admit("b")
    assert decision.allowed
    assert state(decision).remaining == 2


async def test_unlimited_budgets_count_nothing() -> None:
    clock = FakeClock(WINDOW_START)
    rl = limiter(clock)
    for _ in range(1000):
        decision = await rl.admit("key", images=10)
        assert decision.allowed
    await rl.record_tokens("key", 10**9)
    assert decision.budgets == ()
    assert rate_limit_headers(decision) == {}
    assert tracked_clients(rl) == 0


async def test_only_active_budgets_appear() -> None:
    rl = limiter(FakeClock(WINDOW_START), requests=5)
    await rl.record_tokens("key", 100)  # tokens unlimited: nothing to count
    headers = rate_limit_headers(await rl.admit("key", images=3))
    assert sorted(headers) == [
        "X-RateLimit-Limit",
        "X-RateLimit-Limit-Requests",
        "X-RateLimit-Remaining",
        "X-RateLimit-Remaining-Requests",
        "X-RateLimit-Reset",
        "X-RateLimit-Reset-Requests",
    ]


async def test_concurrent_requests_never_exceed_the_budget() -> None:
    rl = limiter(FakeClock(WINDOW_START), requests=10)
    decisions = await asyncio.gather(*(rl.admit("key") for _ in range(25)))
    assert sum(d.allowed for d in decisions) == 10


async def test_idle_clients_are_dropped() -> None:
    clock = FakeClock(WINDOW_START + 30)
    rl = limiter(clock, requests=10)
    for i in range(1000):
        await rl.admit(f"client-{i}")
    assert tracked_clients(rl) == 1000
    clock.advance(60)  # their usage still counts in the next window
    await rl.admit("client-0")
    assert tracked_clients(rl) == 1000
    clock.advance(60)  # client-0's usage still counts; everyone else's has faded out
    await rl.admit("newcomer")
    assert tracked_clients(rl) == 2
    await rl.close()
    assert tracked_clients(rl) == 0


async def test_memory_is_capped() -> None:
    rl = limiter(FakeClock(WINDOW_START), requests=1, max_clients=10)
    for i in range(50):
        await rl.admit(f"client-{i}")
    assert tracked_clients(rl) == 10
    assert not (await rl.admit("client-49")).allowed  # recent ones keep their usage
    assert (await rl.admit("client-0")).allowed  # dropped early: starts afresh


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests": -1}, "requests_per_minute"),
        ({"tokens": -5}, "tokens_per_minute"),
        ({"images": -1}, "images_per_minute"),
        ({"max_clients": 0}, "max_clients"),
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        limiter(FakeClock(0), **kwargs)


async def test_invalid_arguments_are_rejected() -> None:
    rl = limiter(FakeClock(0), requests=1, tokens=1)
    with pytest.raises(ValueError, match="images"):
        await rl.admit("key", images=-1)
    with pytest.raises(ValueError, match="tokens"):
        await rl.record_tokens("key", -1)


async def test_factory_picks_the_backend() -> None:
    in_process = create_rate_limiter(
        redis_url=None, requests_per_minute=10, tokens_per_minute=None, images_per_minute=None
    )
    assert isinstance(in_process, InMemoryRateLimiter)
    # Creating the Redis limiter does not connect yet.
    shared = create_rate_limiter(
        redis_url="redis://127.0.0.1:1/0",
        requests_per_minute=10,
        tokens_per_minute=0,
        images_per_minute=None,
    )
    assert isinstance(shared, RedisRateLimiter)
    await shared.close()
    # Nothing to count: Redis is never contacted.
    off = create_rate_limiter(
        redis_url="redis://127.0.0.1:1/0",
        requests_per_minute=0,
        tokens_per_minute=None,
        images_per_minute=None,
    )
    assert isinstance(off, InMemoryRateLimiter)
    assert (await off.admit("key")).allowed


def test_the_lua_script_is_package_data() -> None:
    script = resources.files("fictures_ai.services.rate_limit").joinpath("admit.lua")
    assert "redis.call('HMGET'" in script.read_text(encoding="utf-8")


async def test_the_tokens_a_request_used_are_charged_to_its_client() -> None:
    # The fake engine counts a word per token: 3 prompt tokens and 4 completion tokens.
    limiter = InMemoryRateLimiter(
        requests_per_minute=None, tokens_per_minute=10, images_per_minute=None
    )
    app = create_app(services=make_services(rate_limiter=limiter))
    body = {"prompt": "one two three", "max_tokens": 4}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.post("/api/v1/text/generate", json=body)
        assert first.headers["x-ratelimit-remaining-tokens"] == "10"
        async with client.stream("POST", "/api/v1/text/stream", json=body) as second:
            assert second.headers["x-ratelimit-remaining-tokens"] == "3"
            await second.aread()
        refused = await client.post("/api/v1/text/generate", json=body)
        image = await client.post(
            "/api/v1/images/generate",
            json={"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1},
        )
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "tokens budget" in refused.json()["detail"]
    assert image.status_code == 200  # images use no tokens
