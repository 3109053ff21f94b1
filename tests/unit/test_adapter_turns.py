"""``AdapterTurns``: one adapter at a time in the engine, fairly, and cancellation-safe."""

from __future__ import annotations

import asyncio

import pytest

from fictures_ai.engines.adapter_turns import AdapterTurns


async def hold(
    turns: AdapterTurns, key: str | None, log: list[str], name: str, release: asyncio.Event
) -> None:
    async with turns.turn(key):
        log.append(f"+{name}")
        await release.wait()
        log.append(f"-{name}")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_of_one_adapter_run_together_and_another_waits() -> None:
    turns, log, release = AdapterTurns(), [], asyncio.Event()
    base1 = asyncio.create_task(hold(turns, None, log, "base1", release))
    base2 = asyncio.create_task(hold(turns, None, log, "base2", release))
    lora = asyncio.create_task(hold(turns, "noir", log, "noir", release))
    await settle()
    assert log == ["+base1", "+base2"]
    assert (turns.running, turns.waiting) == (2, 1)
    release.set()
    await asyncio.gather(base1, base2, lora)
    assert log.index("+noir") > max(log.index("-base1"), log.index("-base2"))
    assert (turns.running, turns.waiting) == (0, 0)


async def test_turns_are_first_come_first_served() -> None:
    turns, log = AdapterTurns(), []
    first = asyncio.Event()
    running = asyncio.create_task(hold(turns, "a", log, "a1", first))
    await settle()
    other = asyncio.Event()
    waiting_b = asyncio.create_task(hold(turns, "b", log, "b1", other))
    await settle()
    # Another "a" arrives while "a" runs, but "b" waits ahead of it: it does not overtake.
    late_a = asyncio.create_task(hold(turns, "a", log, "a2", other))
    await settle()
    assert log == ["+a1"]
    first.set()
    await running
    await settle()
    assert log[-1] == "+b1"
    other.set()
    await asyncio.gather(waiting_b, late_a)
    assert log.index("+a2") > log.index("-b1")


async def test_a_request_cancelled_while_waiting_leaves_the_line() -> None:
    turns, log = AdapterTurns(), []
    release = asyncio.Event()
    running = asyncio.create_task(hold(turns, "a", log, "a", release))
    await settle()
    waiting = asyncio.create_task(hold(turns, "b", log, "b", asyncio.Event()))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert turns.waiting == 0
    release.set()
    await running
    assert (turns.running, turns.waiting) == (0, 0)
    # The gate is free for anyone afterwards.
    async with turns.turn("c"):
        assert turns.running == 1
