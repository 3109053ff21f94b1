"""The model replicas of ``serve --ray``: one engine (vLLM or diffusers) per Ray Serve replica.

Each class is made a deployment per model by ``fictures_ai.cluster.application`` (its options
from the models file); the ingress reaches it through ``fictures_ai.engines.ray_engine``. A
replica loads its engine in its constructor, so Ray Serve routes to it only once it can serve;
its ``check_health`` is Ray Serve's health check, so a replica whose engine died is replaced.
Streams start with the replica's name (``X-Fictures-Replica``).

Each replica reports what it runs through Ray's metrics (``ray.util.metrics``), which every
node's metrics agent serves to Prometheus (``ray start --metrics-export-port``), prefixed
``ray_``: ``fictures_replica_running_requests`` (gauge) and, for text,
``fictures_replica_generation_tokens_total``, labelled with ``deployment`` and ``replica``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from fictures_ai.config import Settings
from fictures_ai.engines.base import (
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ImageLora,
    ImageModelInfo,
    LoraAdapter,
    StructuredOutputSpec,
    TextChunk,
    TextEngine,
    TextGenerationParams,
    TextModelInfo,
    TextPrompt,
    merge_chunks,
)
from fictures_ai.observability.logs import configure_logging
from fictures_ai.services.engine_factory import ImageLoader, TextLoader

logger = logging.getLogger(__name__)


def replica_name() -> str:
    """``<deployment>#<replica id> pid=<pid> node=<ip>``: which replica, and where its process
    runs (what an operator needs to find it)."""
    import ray

    node = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return f"{replica_id()} pid={os.getpid()} node={node}"


def replica_id() -> str:
    """``<deployment>#<replica id>``: the ``replica`` label of the replica's metrics."""
    from ray import serve

    context = serve.get_replica_context()
    return f"{context.deployment}#{context.replica_id.unique_id}"


class ReplicaMetrics:
    """This replica's series in Ray's metrics (see the module docstring)."""

    def __init__(self) -> None:
        from ray import serve
        from ray.util.metrics import Counter, Gauge

        tags = {"deployment": serve.get_replica_context().deployment, "replica": replica_id()}
        self._running = Gauge(
            "fictures_replica_running_requests",
            description="Requests this model replica is generating now.",
            tag_keys=tuple(tags),
        )
        self._running.set_default_tags(tags)
        self._tokens = Counter(
            "fictures_replica_generation_tokens_total",
            description="Tokens this text model replica generated.",
            tag_keys=tuple(tags),
        )
        self._tokens.set_default_tags(tags)
        self.running = 0
        self._running.set(0)

    def started(self, count: int = 1) -> None:
        """``count`` requests started (the images of a batch each count)."""
        self.running += count
        self._running.set(self.running)

    def finished(self, tokens: int = 0, *, count: int = 1) -> None:
        """``count`` requests ended, having generated ``tokens`` tokens (text)."""
        self.running -= count
        self._running.set(self.running)
        if tokens:
            self._tokens.inc(tokens)


async def coalesce(chunks: AsyncIterator[TextChunk], interval_s: float) -> AsyncIterator[TextChunk]:
    """``chunks``, with those that arrive within ``interval_s`` of the last one sent merged
    into one (:func:`merge_chunks`): the first and the last chunk go at once, the others at
    most every ``interval_s``. Every item crossing Ray costs the replica, the ingress and the
    proxy CPU (about 1.7 ms a token on 2 cores, docs/benchmarks.md), so a fast stream sends
    a few tokens per item. Closing the iterator closes ``chunks`` (the engine aborts)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TextChunk | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    queue.put_nowait(chunk)
        except Exception as exc:  # raised where the stream is read
            queue.put_nowait(exc)
        else:
            queue.put_nowait(None)

    task = asyncio.ensure_future(pump())
    pending: list[TextChunk] = []
    sent_at = -math.inf
    try:
        while True:
            deadline = sent_at + interval_s if pending else None
            try:
                async with asyncio.timeout_at(deadline):
                    item = await queue.get()
            except TimeoutError:  # the window closed with chunks waiting
                yield merge_chunks(pending)
                pending, sent_at = [], loop.time()
                continue
            if not isinstance(item, TextChunk):  # the end, or the engine's error
                if pending:
                    yield merge_chunks(pending)
                if item is not None:
                    raise item
                return
            pending.append(item)
            if item.finish_reason is not None or loop.time() >= sent_at + interval_s:
                yield merge_chunks(pending)
                pending, sent_at = [], loop.time()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


EngineT = TypeVar("EngineT", TextEngine, ImageEngine)


class _EngineReplica(Generic[EngineT]):
    """What every model replica does with its engine: Ray Serve's health check (raising makes
    Ray replace the replica) and the engine's shutdown when Ray stops the replica."""

    _engine: EngineT

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def __del__(self) -> None:
        engine = getattr(self, "_engine", None)  # None: the constructor failed to load it
        if engine is not None:
            await engine.shutdown()


class TextModelReplica(_EngineReplica[TextEngine]):
    """One vLLM engine. Adapters named by requests are loaded on their first use here, so a
    replica started after an adapter was registered serves it too. Chunks are sent at most
    every ``RAY_STREAM_INTERVAL_MS`` (:func:`coalesce`)."""

    async def __init__(self, loader: TextLoader, settings: Settings) -> None:  # type: ignore[misc]
        configure_logging(level=settings.log_level, log_format=settings.log_format)
        self._interval_s = settings.ray_stream_interval_ms / 1000
        self._engine = await loader()
        self._name = replica_name()
        self._adapters: set[int] = set()
        self._adapter_lock = asyncio.Lock()
        self._metrics = ReplicaMetrics()
        logger.info("Replica %s serves %s", self._name, self._engine.model_info().name)

    def model_info(self) -> TextModelInfo:
        return self._engine.model_info()

    async def _with_adapter(self, adapter: LoraAdapter | None) -> None:
        if adapter is None or adapter.id in self._adapters:
            return
        async with self._adapter_lock:
            if adapter.id not in self._adapters:
                await self._engine.add_lora(adapter)
                self._adapters.add(adapter.id)

    async def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, request_id: str
    ) -> AsyncIterator[str | TextChunk]:
        """The replica's name, then the request's chunks. Cancelled (the client left, the
        ingress timed out): the request is aborted in vLLM."""
        yield self._name
        self._metrics.started()
        tokens = 0
        try:
            await self._with_adapter(params.lora)
            if params.structured is not None:
                await asyncio.to_thread(self._engine.check_structured, params.structured)
            chunks = self._engine.generate(prompt, params, request_id=request_id)
            if self._interval_s > 0:
                chunks = coalesce(chunks, self._interval_s)
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    tokens = chunk.completion_tokens
                    yield chunk
        finally:
            self._metrics.finished(tokens)

    async def tokenize(self, prompt: TextPrompt) -> list[int]:
        return await self._engine.tokenize(prompt)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self._engine.detokenize(token_ids)

    def check_structured(self, spec: StructuredOutputSpec) -> None:
        self._engine.check_structured(spec)

    async def add_lora(self, adapter: LoraAdapter) -> None:
        await self._with_adapter(adapter)


class ImageModelReplica(_EngineReplica[ImageEngine]):
    """One diffusers pipeline."""

    async def __init__(self, loader: ImageLoader, settings: Settings) -> None:  # type: ignore[misc]
        configure_logging(level=settings.log_level, log_format=settings.log_format)
        self._engine = await loader()
        self._name = replica_name()
        self._metrics = ReplicaMetrics()
        logger.info("Replica %s serves %s", self._name, self._engine.model_info().name)

    def model_info(self) -> ImageModelInfo:
        return self._engine.model_info()

    def batches(self) -> bool:
        """Whether the engine renders a batch in one pipeline call (``ImageEngine.batches``)."""
        return self._engine.batches

    async def render(
        self, batch: list[ImageGenerationParams]
    ) -> AsyncIterator[str | tuple[int, int] | list[GeneratedImage]]:
        """The replica's name, ``(step, total)`` after each denoising step (the renders of a
        batch step together), then the images in ``batch``'s order. Cancelled: the render
        stops at its next step."""
        yield self._name
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def progress(step: int, total: int) -> None:  # called from the render thread
            loop.call_soon_threadsafe(steps.put_nowait, (step, total))

        # One callback for the call: a batching engine steps every render of it at once.
        callbacks = [progress, *[None] * (len(batch) - 1)]
        render = asyncio.ensure_future(self._engine.generate_batch(batch, progress=callbacks))
        self._metrics.started(len(batch))
        try:
            while not render.done():
                step = asyncio.ensure_future(steps.get())
                await asyncio.wait({render, step}, return_when=asyncio.FIRST_COMPLETED)
                if step.done():
                    yield step.result()
                else:
                    step.cancel()
            while not steps.empty():
                yield steps.get_nowait()
            yield render.result()
        finally:
            self._metrics.finished(count=len(batch))
            if not render.done():
                render.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await render

    async def add_lora(self, lora: ImageLora) -> None:
        await self._engine.add_lora(lora)
