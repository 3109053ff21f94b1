"""Batched images (``IMAGE_MAX_BATCH``): which waiting requests share one engine call, in
what order, and what happens to a batch when one of its requests leaves or the call fails.

The queue is tested alone, then the image service over a fake engine that renders a batch
in one call (``FakeImageEngine(batching=True)``); the real pipeline's "alone == batched" is in
``tests/integration/test_diffusers_engine.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Hashable
from typing import Any

import pytest

from fictures_ai.engines.base import (
    BATCH_PRIORITY,
    INTERACTIVE_PRIORITY,
    ImageGenerationParams,
    ImageLora,
)
from fictures_ai.errors import GenerationError
from fictures_ai.observability.context import (
    RequestContext,
    bind_request,
    current_request,
    unbind_request,
)
from fictures_ai.services.image_generation import (
    ImageGenerationService,
    QueuePosition,
    RenderProgress,
)
from fictures_ai.services.render_queue import RenderQueue
from tests.unit.conftest import wait_until
from tests.unit.fake_engines import FakeImageEngine
from tests.unit.test_render_queue import service as queue_service

# -- the queue ------------------------------------------------------------------------------


class Batches:
    """Items submitted to one queue, and the batches they started in."""

    def __init__(self, queue: RenderQueue[str]) -> None:
        self.queue = queue
        self.started: list[tuple[str, ...]] = []

    def submit(
        self, name: str, *, key: Hashable | None = "k", priority: int = 0, images: int = 1
    ) -> object:
        return self.queue.submit(
            name, start=self.started.append, priority=priority, batch_key=key, images=images
        )


def test_a_free_slot_starts_the_first_request_alone_and_the_waiters_batch() -> None:
    batches = Batches(RenderQueue(1, max_batch=4))
    for name in "abcdef":
        batches.submit(name)
    assert batches.started == [("a",)]
    batches.queue.release()
    assert batches.started[1] == ("b", "c", "d", "e")  # max_batch images
    batches.queue.release()
    assert batches.started[2] == ("f",)
    batches.queue.release()
    assert (batches.queue.running, batches.queue.waiting) == (0, 0)


def test_only_equal_keys_share_a_batch_and_the_head_keeps_its_turn() -> None:
    batches = Batches(RenderQueue(1, max_batch=8))
    batches.submit("holder")
    for name, key in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("none", None), ("b2", "b")]:
        batches.submit(name, key=key)
    for _ in range(4):
        batches.queue.release()
    assert batches.started == [("holder",), ("a1", "a2"), ("b1", "b2"), ("none",)]


def test_a_batch_counts_images_and_never_exceeds_max_batch() -> None:
    batches = Batches(RenderQueue(1, max_batch=4))
    batches.submit("holder")
    batches.submit("two", images=2)
    batches.submit("three", images=3)  # does not fit beside "two"
    batches.submit("one", images=1)
    batches.queue.release()
    assert batches.started[1] == ("two", "one")
    batches.queue.release()
    assert batches.started[2] == ("three",)


def test_a_batch_takes_only_requests_of_its_head_priority() -> None:
    batches = Batches(RenderQueue(1, max_batch=8))
    batches.submit("holder")
    batches.submit("job-1", priority=BATCH_PRIORITY)
    batches.submit("chat-1", priority=INTERACTIVE_PRIORITY)
    batches.submit("job-2", priority=BATCH_PRIORITY)
    batches.submit("chat-2", priority=INTERACTIVE_PRIORITY)
    batches.queue.release()
    batches.queue.release()
    # Interactive requests first, together; the job's renders never ride in their batch.
    assert batches.started[1:] == [("chat-1", "chat-2"), ("job-1", "job-2")]


def test_without_batching_every_request_starts_alone() -> None:
    batches = Batches(RenderQueue(1, max_batch=1))
    for name in "abc":
        batches.submit(name)
    batches.queue.release()
    batches.queue.release()
    assert batches.started == [("a",), ("b",), ("c",)]


def test_a_withdrawn_request_never_starts() -> None:
    batches = Batches(RenderQueue(1, max_batch=8))
    batches.submit("holder")
    gone = batches.submit("gone")
    batches.submit("stays")
    assert batches.queue.withdraw(gone)
    assert not batches.queue.withdraw(gone)
    batches.queue.release()
    assert batches.started[1] == ("stays",)


async def test_a_batch_wait_holds_an_idle_renderer_for_companions() -> None:
    batches = Batches(RenderQueue(1, max_batch=3, batch_wait_s=0.05))
    batches.submit("a")
    assert batches.started == []  # held back: the batch is not full
    batches.submit("b")
    await asyncio.sleep(0.1)
    assert batches.started == [("a", "b")]
    batches.submit("c")
    batches.submit("d")
    batches.submit("e")
    batches.queue.release()
    assert batches.started[1] == ("c", "d", "e")  # a full batch starts at once


# -- the image service over a batching engine ------------------------------------------------


def service(engine: FakeImageEngine, *, max_batch: int = 8) -> ImageGenerationService:
    return queue_service(engine, max_batch=max_batch)


async def busy(images: ImageGenerationService, engine: FakeImageEngine, steps: int = 3) -> Any:
    """A request that holds the renderer, once it renders: what comes next waits together."""
    holder = asyncio.create_task(images.generate(params("holder", steps=steps)))
    await wait_until(lambda: bool(engine.batch_calls))
    return holder


def params(
    prompt: str, *, seed: int = 1, steps: int = 3, **fields: object
) -> ImageGenerationParams:
    return ImageGenerationParams(
        prompt=prompt,
        seed=seed,
        width=256,
        height=256,
        num_inference_steps=steps,
        **fields,  # type: ignore[arg-type]
    )


def prompts(engine: FakeImageEngine) -> list[tuple[str, ...]]:
    return [tuple(item.prompt for item in call) for call in engine.batch_calls]


async def test_concurrent_requests_share_calls_and_each_gets_its_own_image() -> None:
    engine = FakeImageEngine(step_delay=0.01, batching=True)
    images = service(engine, max_batch=4)
    tasks = [asyncio.create_task(images.generate(params(f"p{i}", seed=i + 1))) for i in range(6)]
    results = await asyncio.gather(*tasks)
    assert prompts(engine) == [("p0",), ("p1", "p2", "p3", "p4"), ("p5",)]
    assert [image.seed for image in results] == [1, 2, 3, 4, 5, 6]
    assert len({image.png for image in results}) == 6
    assert (images.info().waiting, images.info().running) == (0, 0)


async def test_loras_and_weights_never_share_a_call_with_others() -> None:
    engine = FakeImageEngine(step_delay=0.01, batching=True)
    images = service(engine)
    style = ImageLora(name="style", path="/loras/style", weight=1.0)
    first = asyncio.create_task(images.generate(params("holder")))
    await wait_until(lambda: bool(engine.batch_calls))
    variants = {
        "base-1": params("base-1"),
        "lora-1": params("lora-1", loras=(style,)),
        "half-1": params(
            "half-1", loras=(ImageLora(name="style", path="/loras/style", weight=0.5),)
        ),
        "base-2": params("base-2"),
        "lora-2": params("lora-2", loras=(style,)),
        "other-size": ImageGenerationParams(
            prompt="other-size", seed=1, width=512, height=256, num_inference_steps=3
        ),
        "negative": params("negative", negative_prompt="blur"),
    }
    tasks = [asyncio.create_task(images.generate(p)) for p in variants.values()]
    await asyncio.gather(first, *tasks)
    assert prompts(engine) == [
        ("holder",),
        ("base-1", "base-2"),
        ("lora-1", "lora-2"),
        ("half-1",),
        ("other-size",),
        ("negative",),
    ]
    for call in engine.batch_calls:
        assert len({item.batch_key() for item in call}) == 1


async def test_a_request_leaving_a_batch_does_not_stop_the_others() -> None:
    engine = FakeImageEngine(step_delay=0.02, batching=True)
    images = service(engine)
    holder = await busy(images, engine, steps=2)
    members = {
        name: asyncio.create_task(images.generate(params(name, steps=10)))
        for name in ("a", "b", "c")
    }
    await holder
    await wait_until(lambda: len(engine.batch_calls) == 2)
    members["b"].cancel()
    with pytest.raises(asyncio.CancelledError):
        await members["b"]
    a, c = await asyncio.gather(members["a"], members["c"])
    assert (a.seed, c.seed) == (1, 1)
    assert prompts(engine)[1] == ("a", "b", "c")
    assert engine.cancelled == []  # the call ran to its end; b's image was thrown away
    assert (images.info().waiting, images.info().running) == (0, 0)


async def test_a_batch_whose_every_request_left_stops_the_render() -> None:
    engine = FakeImageEngine(step_delay=0.02, batching=True)
    images = service(engine)
    holder = await busy(images, engine, steps=2)
    members = [asyncio.create_task(images.generate(params(n, steps=50))) for n in "ab"]
    await holder
    await wait_until(lambda: len(engine.batch_calls) == 2)
    for task in members:
        task.cancel()
    for task in members:
        with pytest.raises(asyncio.CancelledError):
            await task
    # Both gone: the call was stopped, and the last one returned once the engine let go.
    assert [item.prompt for item in engine.cancelled] == ["a", "b"]
    assert (images.info().waiting, images.info().running) == (0, 0)
    assert (await images.generate(params("after"))).seed == 1  # the slot was given back


async def test_a_failed_batch_is_retried_one_image_at_a_time() -> None:
    engine = FakeImageEngine(step_delay=0.01, batching=True, fail_batches=True)
    images = service(engine)
    holder = await busy(images, engine)
    tasks = [asyncio.create_task(images.generate(params(n))) for n in "abc"]
    await asyncio.gather(holder, *tasks)
    assert prompts(engine) == [("holder",), ("a", "b", "c"), ("a",), ("b",), ("c",)]


async def test_an_image_that_fails_alone_fails_every_request_of_its_call_with_that_error() -> None:
    engine = FakeImageEngine(step_delay=0.01, batching=True, fail=True)
    images = service(engine)
    holder = await busy(images, engine)
    tasks = [asyncio.create_task(images.generate(params(n))) for n in "ab"]
    outcomes = await asyncio.gather(holder, *tasks, return_exceptions=True)
    assert all(isinstance(outcome, GenerationError) for outcome in outcomes)
    assert {str(outcome) for outcome in outcomes} == {"The fake pipeline failed."}
    assert (images.info().waiting, images.info().running) == (0, 0)


async def test_each_streamed_request_of_a_batch_gets_its_positions_and_steps() -> None:
    engine = FakeImageEngine(step_delay=0.01, batching=True)
    images = service(engine)
    holder = await busy(images, engine, steps=3)

    async def stream(name: str) -> list[object]:
        return [item async for item in images.stream(params(name, steps=2))]

    first = asyncio.create_task(stream("first"))
    await wait_until(lambda: images.info().waiting == 1)
    second = asyncio.create_task(stream("second"))
    await wait_until(lambda: images.info().waiting == 2)
    await holder
    events = await asyncio.gather(first, second)
    assert prompts(engine)[1] == ("first", "second")
    steps = [RenderProgress(1, 2), RenderProgress(2, 2)]
    assert events[0][:-1] == [QueuePosition(1), *steps]
    assert events[1][:-1] == [QueuePosition(2), *steps]


async def test_batch_items_wait_behind_interactive_requests_and_batch_among_themselves() -> None:
    engine = FakeImageEngine(step_delay=0.01, batching=True)
    images = service(engine)
    holder = await busy(images, engine)
    jobs = [
        asyncio.create_task(images.generate(params(f"job-{i}"), priority=BATCH_PRIORITY))
        for i in range(3)
    ]
    await wait_until(lambda: images.info().waiting == 3)
    chat = asyncio.create_task(images.generate(params("chat")))
    await asyncio.gather(holder, chat, *jobs)
    assert prompts(engine) == [("holder",), ("chat",), ("job-0", "job-1", "job-2")]


async def test_an_engine_without_batch_calls_renders_one_request_per_call() -> None:
    engine = FakeImageEngine(step_delay=0.01)  # batching off: like Ray Serve replicas
    images = service(engine)
    tasks = [asyncio.create_task(images.generate(params(f"p{i}"))) for i in range(3)]
    await asyncio.gather(*tasks)
    assert prompts(engine) == [("p0",), ("p1",), ("p2",)]


async def test_a_render_of_one_request_runs_in_its_context_and_a_shared_one_in_none() -> None:
    # What an engine records for the request it serves (the Ray engine names its replica on
    # the response) must reach that request; a render shared by several belongs to none.
    requester: contextvars.ContextVar[str] = contextvars.ContextVar("requester", default="none")
    seen: list[str] = []

    class RecordingEngine(FakeImageEngine):
        async def generate_batch(self, batch: Any, *, progress: Any = None) -> Any:
            seen.append(requester.get())
            return await super().generate_batch(batch, progress=progress)

    engine = RecordingEngine(batching=True, step_delay=0.01)
    images = queue_service(engine, max_batch=4)

    async def render(name: str, seed: int) -> None:
        requester.set(name)
        await images.generate(ImageGenerationParams(prompt=name, seed=seed))

    await render("alone", 1)
    # The first starts alone (its own context); the two behind it share one call.
    await asyncio.gather(render("first", 2), render("second", 3), render("third", 4))
    assert seen == ["alone", "first", "none"]


async def test_headers_the_engine_records_on_a_shared_render_reach_every_request() -> None:
    # The Ray engine names the replica that rendered (X-Fictures-Replica) on the response
    # of the request it serves; a batch's requests each get it, and the render itself runs
    # as a request of its own (its logs carry a batch id, not one of theirs).
    renders: list[str] = []

    class RecordingEngine(FakeImageEngine):
        async def generate_batch(self, batch: Any, *, progress: Any = None) -> Any:
            request = current_request()
            assert request is not None
            renders.append(request.request_id)
            request.response_headers["X-Fictures-Replica"] = f"replica for {len(batch)}"
            return await super().generate_batch(batch, progress=progress)

    images = queue_service(RecordingEngine(batching=True, step_delay=0.01), max_batch=4)

    async def render(name: str, seed: int) -> dict[str, str]:
        request = RequestContext(request_id=name)
        token = bind_request(request)
        try:
            await images.generate(ImageGenerationParams(prompt=name, seed=seed))
        finally:
            unbind_request(token)
        return request.response_headers

    headers = await asyncio.gather(render("first", 1), render("second", 2), render("third", 3))
    assert [header["X-Fictures-Replica"] for header in headers] == [
        "replica for 1",
        "replica for 2",
        "replica for 2",
    ]
    assert renders[0] == "first"
    assert renders[1].startswith("batch-")
