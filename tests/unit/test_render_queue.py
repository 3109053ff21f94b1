"""``RenderQueue`` and the image service over it: priority order, positions, cancellation,
overload. Interactive requests (priority 0) go before batch items (priority 1) waiting for a
slot; a batch of images yields the renderer to them between its items."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from fictures_ai.engines.base import BATCH_PRIORITY, INTERACTIVE_PRIORITY, ImageGenerationParams
from fictures_ai.errors import OverloadedError
from fictures_ai.services.image_generation import (
    ImageGenerationService,
    QueuePosition,
    RenderProgress,
)
from fictures_ai.services.render_queue import RenderQueue
from tests.unit.conftest import wait_until
from tests.unit.fake_engines import FakeImageEngine


class Recorder:
    """Requests through one queue: the order they got their slot in, and the positions each
    was told."""

    def __init__(self, queue: RenderQueue) -> None:
        self.queue = queue
        self.started: list[str] = []
        self.positions: dict[str, list[int]] = {}
        self.release: dict[str, asyncio.Event] = {}

    def request(self, name: str, priority: int) -> asyncio.Task[None]:
        """A request that holds its slot until ``release[name]`` is set."""
        self.positions[name] = []
        self.release[name] = asyncio.Event()

        async def run() -> None:
            async with self.queue.slot(priority=priority, on_position=self.positions[name].append):
                self.started.append(name)
                await self.release[name].wait()

        return asyncio.create_task(run())

    async def finish(self, name: str, task: asyncio.Task[None]) -> None:
        self.release[name].set()
        await task


async def settle() -> None:
    """Let every task that can run do so."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_free_slot_is_taken_at_once_without_a_position() -> None:
    queue = RenderQueue(2)
    recorder = Recorder(queue)
    first, second = recorder.request("a", BATCH_PRIORITY), recorder.request("b", 0)
    await settle()
    assert recorder.started == ["a", "b"]
    assert recorder.positions == {"a": [], "b": []}
    assert (queue.running, queue.waiting, queue.full) == (2, 0, True)
    await recorder.finish("a", first)
    await recorder.finish("b", second)
    assert (queue.running, queue.waiting, queue.full) == (0, 0, False)


async def test_interactive_requests_start_before_batch_items_then_arrival_order() -> None:
    queue = RenderQueue(1)
    recorder = Recorder(queue)
    tasks = {"holder": recorder.request("holder", BATCH_PRIORITY)}
    await settle()
    for name, priority in [
        ("batch-1", BATCH_PRIORITY),
        ("batch-2", BATCH_PRIORITY),
        ("chat-1", INTERACTIVE_PRIORITY),
        ("chat-2", INTERACTIVE_PRIORITY),
    ]:
        tasks[name] = recorder.request(name, priority)
        await settle()
    assert (queue.running, queue.waiting) == (1, 4)
    for name in ["holder", "chat-1", "chat-2", "batch-1", "batch-2"]:
        await recorder.finish(name, tasks[name])
    assert recorder.started == ["holder", "chat-1", "chat-2", "batch-1", "batch-2"]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_each_waiter_is_told_its_position_and_every_change() -> None:
    queue = RenderQueue(1)
    recorder = Recorder(queue)
    tasks = {"holder": recorder.request("holder", INTERACTIVE_PRIORITY)}
    await settle()
    for name, priority in [("b1", BATCH_PRIORITY), ("b2", BATCH_PRIORITY), ("i1", 0)]:
        tasks[name] = recorder.request(name, priority)
        await settle()
    assert recorder.positions == {"holder": [], "b1": [1, 2], "b2": [2, 3], "i1": [1]}
    assert queue.ahead(INTERACTIVE_PRIORITY) == 1  # i1
    assert queue.ahead(BATCH_PRIORITY) == 3
    for name in ["holder", "i1", "b1", "b2"]:
        await recorder.finish(name, tasks[name])
    # i1 went ahead of both batch items (each told so), then each moved up as others started.
    assert recorder.positions == {"holder": [], "b1": [1, 2, 1], "b2": [2, 3, 2, 1], "i1": [1]}


async def test_a_cancelled_waiter_leaves_without_its_slot_and_the_others_move_up() -> None:
    queue = RenderQueue(1)
    recorder = Recorder(queue)
    holder = recorder.request("holder", INTERACTIVE_PRIORITY)
    await settle()
    leaving = recorder.request("leaving", INTERACTIVE_PRIORITY)
    await settle()
    staying = recorder.request("staying", BATCH_PRIORITY)
    await settle()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert queue.waiting == 1
    assert recorder.positions["staying"] == [2, 1]
    await recorder.finish("holder", holder)
    await recorder.finish("staying", staying)
    assert recorder.started == ["holder", "staying"]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_the_slot_on() -> None:
    queue = RenderQueue(1)
    await queue.acquire()
    started: list[str] = []

    async def wait(name: str) -> None:
        await queue.acquire()
        started.append(name)

    unlucky = asyncio.create_task(wait("unlucky"))
    await settle()
    next_one = asyncio.create_task(wait("next"))
    await settle()
    queue.release()  # hands the slot to "unlucky", which has not run yet
    unlucky.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    await next_one
    assert started == ["next"]
    assert (queue.running, queue.waiting) == (1, 0)
    queue.release()
    assert (queue.running, queue.waiting) == (0, 0)


def test_a_queue_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        RenderQueue(0)


# -- the image service over the queue -----------------------------------------------------


def service(
    engine: FakeImageEngine, *, max_queue: int | None = None, max_batch: int = 1
) -> ImageGenerationService:
    async def load() -> FakeImageEngine:
        return engine

    return ImageGenerationService(
        model_name="fake-image-model",
        device="cpu",
        max_concurrency=1,
        loader=load,
        max_queue=max_queue,
        max_batch=max_batch,
    )


def params(prompt: str, *, steps: int = 3) -> ImageGenerationParams:
    return ImageGenerationParams(
        prompt=prompt, seed=1, width=256, height=256, num_inference_steps=steps
    )


def rendering(engine: FakeImageEngine, prompt: str) -> Callable[[], bool]:
    return lambda: any(call.prompt == prompt for call in engine.calls)


async def test_a_batch_yields_the_renderer_to_an_interactive_request_between_items() -> None:
    engine = FakeImageEngine(step_delay=0.01)
    images = service(engine)

    async def batch() -> None:  # one item after the other, as a batch job runs them
        for index in range(3):
            await images.generate(params(f"batch-{index}"), priority=BATCH_PRIORITY)

    job = asyncio.create_task(batch())
    await wait_until(rendering(engine, "batch-0"))
    interactive = asyncio.create_task(images.generate(params("chat")))
    await asyncio.gather(job, interactive)
    assert [call.prompt for call in engine.calls] == ["batch-0", "chat", "batch-1", "batch-2"]


async def test_queued_batch_items_wait_behind_a_later_interactive_request() -> None:
    engine = FakeImageEngine(step_delay=0.01)
    images = service(engine)
    first = asyncio.create_task(images.generate(params("first")))
    await wait_until(rendering(engine, "first"))
    batch = [
        asyncio.create_task(images.generate(params(f"batch-{i}"), priority=BATCH_PRIORITY))
        for i in range(2)
    ]
    await wait_until(lambda: images.info().waiting == 2)
    chat = asyncio.create_task(images.generate(params("chat")))
    await wait_until(lambda: images.info().waiting == 3)
    assert images.info().running == 1
    await asyncio.gather(first, chat, *batch)
    assert [call.prompt for call in engine.calls] == ["first", "chat", "batch-0", "batch-1"]
    assert (images.info().waiting, images.info().running) == (0, 0)


async def test_the_queue_bound_counts_only_the_requests_ahead() -> None:
    engine = FakeImageEngine(step_delay=0.02)
    images = service(engine, max_queue=1)
    first = asyncio.create_task(images.generate(params("first", steps=10)))
    await wait_until(rendering(engine, "first"))
    queued_batch = asyncio.create_task(images.generate(params("b1"), priority=BATCH_PRIORITY))
    await wait_until(lambda: images.info().waiting == 1)
    # A batch item waiting never fills the queue for an interactive request...
    chat = asyncio.create_task(images.generate(params("chat")))
    await wait_until(lambda: images.info().waiting == 2)
    # ...but one interactive request ahead does, for both kinds.
    with pytest.raises(OverloadedError, match="queue is full") as refused:
        await images.generate(params("chat-2"))
    assert refused.value.retry_after == 5
    with pytest.raises(OverloadedError):
        await images.generate(params("b2"), priority=BATCH_PRIORITY)
    await asyncio.gather(first, chat, queued_batch)
    assert [call.prompt for call in engine.calls] == ["first", "chat", "b1"]


async def test_a_request_cancelled_while_queued_is_never_rendered() -> None:
    engine = FakeImageEngine(step_delay=0.01)
    images = service(engine)
    first = asyncio.create_task(images.generate(params("first")))
    await wait_until(rendering(engine, "first"))
    gone = asyncio.create_task(images.generate(params("gone")))
    await wait_until(lambda: images.info().waiting == 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert images.info().waiting == 0
    await first
    assert [call.prompt for call in engine.calls] == ["first"]
    assert (images.info().waiting, images.info().running) == (0, 0)


async def test_stream_reports_the_place_in_the_queue_before_the_steps() -> None:
    engine = FakeImageEngine(step_delay=0.01)
    images = service(engine)
    first = asyncio.create_task(images.generate(params("first")))
    await wait_until(rendering(engine, "first"))
    second = asyncio.create_task(images.generate(params("second")))
    await wait_until(lambda: images.info().waiting == 1)
    items = [item async for item in images.stream(params("streamed", steps=2))]
    await asyncio.gather(first, second)
    assert items[:-1] == [
        QueuePosition(2),
        QueuePosition(1),
        RenderProgress(1, 2),
        RenderProgress(2, 2),
    ]
    assert items[-1].seed == 1  # type: ignore[union-attr]


async def test_stream_without_a_wait_reports_no_place() -> None:
    images = service(FakeImageEngine())
    items = [item async for item in images.stream(params("x", steps=2))]
    assert not any(isinstance(item, QueuePosition) for item in items)
    assert items[:-1] == [RenderProgress(1, 2), RenderProgress(2, 2)]
