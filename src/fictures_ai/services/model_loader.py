"""Lazy, load-once access to an engine, shared by the text and image services.

The first caller starts the load; concurrent callers wait for the same load; a failed load is
reported as ``ModelLoadError`` (with ``retry_after``) and the next caller tries again. The load
runs in its own task, so a client that disconnects while waiting never cancels it.

It also counts what the metrics read at scrape time: callers waiting for the load, failed
loads, and the last load's duration; each wait is a ``queue.model_load`` span of the request.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

from fictures_ai.errors import FicturesError, ModelLoadError, ModelNotFoundError
from fictures_ai.observability.tracing import child_span

logger = logging.getLogger(__name__)

LOAD_RETRY_AFTER_S = 30
"""``Retry-After`` (seconds) of a request refused while a model loads or after its load failed."""


class _Engine(Protocol):
    async def check_health(self) -> None: ...

    async def shutdown(self) -> None: ...


EngineT = TypeVar("EngineT", bound=_Engine)


class LoadState(enum.StrEnum):
    """Where a lazily loaded model stands."""

    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelLoadInfo:
    """How a lazily loaded model stands; the services' info objects extend it."""

    state: LoadState
    waiting_for_load: int = 0
    """Callers waiting for the load to finish now."""
    load_seconds: float | None = None
    load_failures: int = 0
    last_error: str | None = None
    """Why the model is not available, when its state is ``failed`` (or it is reloading)."""


def check_model_name(requested: str | None, served: str, *, kind: str) -> str:
    """``served`` when ``requested`` is None (the default model) or names it.

    Raises ``ModelNotFoundError`` (listing ``served`` as the ``kind`` models) for another name.
    """
    if requested is not None and requested != served:
        raise ModelNotFoundError(requested, kind=kind, available=[served])
    return served


class LazyModel(Generic[EngineT]):
    """Holds one engine, loading it on first use with ``loader``."""

    def __init__(
        self, *, name: str, loader: Callable[[], Awaitable[EngineT]], retry_after: int
    ) -> None:
        self.name = name
        self._loader = loader
        self._retry_after = retry_after
        self._engine: EngineT | None = None
        self._load_task: asyncio.Task[EngineT] | None = None
        self.state = LoadState.NOT_LOADED
        self.last_error: str | None = None
        self.load_seconds: float | None = None
        self.load_failures = 0
        self.waiting = 0
        """Callers waiting for the load to finish now."""

    def load_info(self) -> dict[str, Any]:
        """The ``ModelLoadInfo`` fields as keywords, for the services' info objects."""
        return asdict(
            ModelLoadInfo(
                state=self.state,
                waiting_for_load=self.waiting,
                load_seconds=self.load_seconds,
                load_failures=self.load_failures,
                last_error=self.last_error,
            )
        )

    @property
    def engine(self) -> EngineT | None:
        """The loaded engine, or None; never starts a load."""
        return self._engine

    async def get(self) -> EngineT:
        """Return the engine, loading it first if needed (once, whatever the concurrency)."""
        if self._engine is not None:
            return self._engine
        self.waiting += 1
        try:
            with child_span("queue.model_load", {"fictures.model": self.name}):
                # shield: a waiter's cancellation (client gone) must not cancel the shared load.
                return await asyncio.shield(self._start_load())
        finally:
            self.waiting -= 1

    def _start_load(self) -> asyncio.Task[EngineT]:
        if self._load_task is None:
            # A fresh context: the load, and the engine tasks it starts (vLLM's output handler
            # lives on), must not carry the first request's id and trace.
            self._load_task = asyncio.create_task(
                self._load(), name=f"load {self.name}", context=contextvars.Context()
            )
        return self._load_task

    async def _load(self) -> EngineT:
        self.state = LoadState.LOADING
        started = time.perf_counter()
        try:
            engine = await self._loader()
        except Exception as exc:
            self.state = LoadState.FAILED
            self.last_error = str(exc)
            self.load_failures += 1
            self._load_task = None
            logger.exception("Loading %s failed: %s", self.name, exc)
            if isinstance(exc, ModelLoadError):
                exc.retry_after = exc.retry_after or self._retry_after
                raise
            message = exc.message if isinstance(exc, FicturesError) else str(exc)
            raise ModelLoadError(
                f"The model '{self.name}' failed to load: {message}",
                model=self.name,
                retry_after=self._retry_after,
            ) from exc
        self.load_seconds = time.perf_counter() - started
        self._engine = engine
        self.state = LoadState.READY
        self.last_error = None
        logger.info("Loaded %s in %.1f s", self.name, self.load_seconds)
        return engine

    async def restart(self, broken: EngineT, reason: str) -> None:
        """Replace ``broken`` by a fresh engine, loading in the background.

        Requests that fail together on the same dead engine all call this; only the first
        restarts it. Callers arriving during the reload wait for it like for a first load.
        """
        if self._engine is not broken:
            return
        await self.discard(reason)
        task = self._start_load()
        # The load logs its own failure; the next request retries it.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def supervise(self, interval_s: float, *, broken: type[FicturesError]) -> None:
        """Check the loaded engine every ``interval_s``; restart it when the check raises
        ``broken`` (each service names the error that means its engine stopped working)."""
        while True:
            await asyncio.sleep(interval_s)
            engine = self._engine
            if engine is None:
                continue
            try:
                await engine.check_health()
            except broken as exc:
                await self.restart(engine, exc.message)

    async def discard(self, reason: str) -> None:
        """Drop a broken engine so that the next ``get`` loads a fresh one."""
        engine, self._engine = self._engine, None
        self._load_task = None
        self.state = LoadState.FAILED
        self.last_error = reason
        if engine is not None:
            logger.warning("Discarding %s: %s", self.name, reason)
            try:
                await engine.shutdown()
            except Exception:
                logger.warning("Shutting down the broken %s failed", self.name, exc_info=True)

    async def shutdown(self) -> None:
        """Release the engine (waiting for a load in progress to finish first)."""
        task = self._load_task
        if task is not None and not task.done():
            try:
                await task
            except Exception:
                logger.debug("Load of %s failed during shutdown", self.name)
        engine, self._engine = self._engine, None
        self._load_task = None
        self.state = LoadState.NOT_LOADED
        if engine is not None:
            await engine.shutdown()
