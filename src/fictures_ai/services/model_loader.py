"""Lazy, load-once access to an engine, shared by the text and image services.

The first caller starts the load; concurrent callers wait for the same load; a failed load is
reported as ``ModelLoadError`` (with ``retry_after``) and the next caller tries again. The load
runs in its own task, so a client that disconnects while waiting never cancels it.

Requests hold the engine with ``use()``: while any does, the model is never unloaded. An
``unload()`` frees an idle engine; a request that arrives during it waits, and the model loads
again for it.

It also counts what the metrics read at scrape time: callers waiting for the load, failed
loads, and the last load's duration; each wait is a ``queue.model_load`` span of the request.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

from fictures_ai.errors import (
    ConflictError,
    FicturesError,
    ModelLoadError,
    ServiceUnavailableError,
)
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
    LOADED = "loaded"
    UNLOADING = "unloading"
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
    in_flight: int = 0
    """Requests holding the engine now (waiting for its load included)."""
    last_used: float | None = None
    """When a request last held the engine (Unix time, seconds), None if none has."""
    memory_bytes: int | None = None
    """What the loaded engine costs, measured after its load (see ``services.models.memory``)."""


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
        self.in_flight = 0
        """Requests inside ``use()`` now."""
        self.last_used: float | None = None
        self.idle_since = time.monotonic()
        """When the last request left ``use()`` (monotonic clock): the idle-time reference."""
        self.memory_bytes: int | None = None
        """Set by whoever measures loads (the model registry); None while not loaded."""
        self.on_idle: Callable[[], None] | None = None
        """Called when the last request in flight leaves ``use()``."""
        self.generation = 0
        """Counts the engines this model has had: it changes whenever the engine does (load,
        restart, unload), so that what was made by one engine is told from the next's."""
        self.on_engine_change: list[Callable[[], None]] = []
        """Called whenever the engine changes (the services empty their response caches)."""
        self._unload_task: asyncio.Task[None] | None = None

    def load_info(self) -> dict[str, Any]:
        """The ``ModelLoadInfo`` fields as keywords, for the services' info objects."""
        return asdict(
            ModelLoadInfo(
                state=self.state,
                waiting_for_load=self.waiting,
                load_seconds=self.load_seconds,
                load_failures=self.load_failures,
                last_error=self.last_error,
                in_flight=self.in_flight,
                last_used=self.last_used,
                memory_bytes=self.memory_bytes,
            )
        )

    def wrap_loader(
        self,
        wrapper: Callable[[Callable[[], Awaitable[EngineT]]], Callable[[], Awaitable[EngineT]]],
    ) -> None:
        """Load through ``wrapper(loader)`` from now on (the registry measures loads, keeps
        them within its memory budget and adds adapters to the fresh engine)."""
        self._loader = wrapper(self._loader)

    @property
    def idle(self) -> bool:
        """Loaded and held by no request: what an unload may take."""
        return self._engine is not None and self.in_flight == 0 and self.waiting == 0

    @asynccontextmanager
    async def use(self) -> AsyncIterator[EngineT]:
        """Hold the engine (loading it if needed) for the length of the block; the model is
        not unloaded meanwhile. Raises what :meth:`get` raises."""
        self.in_flight += 1
        self.last_used = time.time()
        try:
            yield await self.get()
        finally:
            self.in_flight -= 1
            self.last_used = time.time()
            if self.in_flight == 0:
                self.idle_since = time.monotonic()
                if self.on_idle is not None:
                    self.on_idle()

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
        unloading = self._unload_task
        if unloading is not None:  # a request arrived while the model unloaded: load it again
            await asyncio.shield(unloading)
        self.state = LoadState.LOADING
        started = time.perf_counter()
        try:
            engine = await self._loader()
        except Exception as exc:
            if isinstance(exc, ServiceUnavailableError) and not isinstance(exc, ModelLoadError):
                # Refused for now (the memory budget is held by busy models): not a failure.
                self.state = LoadState.NOT_LOADED
                self._load_task = None
                raise
            error = self._failed(exc)
            if error is exc:
                raise
            raise error from exc
        self.load_seconds = time.perf_counter() - started
        self._engine = engine
        self._engine_changed()
        self.idle_since = time.monotonic()
        self.state = LoadState.LOADED
        self.last_error = None
        logger.info("Loaded %s in %.1f s", self.name, self.load_seconds)
        return engine

    def _engine_changed(self) -> None:
        self.generation += 1
        for callback in self.on_engine_change:
            callback()

    def _failed(self, exc: Exception) -> FicturesError:
        """Record a failed load; the error to raise (``ModelLoadError``, with ``retry_after``)."""
        self.state = LoadState.FAILED
        self.last_error = str(exc)
        self.load_failures += 1
        self._load_task = None
        logger.exception("Loading %s failed: %s", self.name, exc)
        if isinstance(exc, ModelLoadError):
            exc.retry_after = exc.retry_after or self._retry_after
            return exc
        message = exc.message if isinstance(exc, FicturesError) else str(exc)
        return ModelLoadError(
            f"The model '{self.name}' failed to load: {message}",
            model=self.name,
            retry_after=self._retry_after,
        )

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
        self.memory_bytes = None
        self._engine_changed()
        if engine is not None:
            logger.warning("Discarding %s: %s", self.name, reason)
            try:
                await engine.shutdown()
            except Exception:
                logger.warning("Shutting down the broken %s failed", self.name, exc_info=True)

    async def unload(self) -> bool:
        """Shut the engine down and free its memory; the next request loads it again.

        Returns False when nothing was loaded. Raises ``ConflictError`` while requests hold
        the engine or a load is under way (a model in use is never unloaded).
        """
        if self._unload_task is not None:
            await asyncio.shield(self._unload_task)
            return True
        if self._load_task is not None and self._engine is None:
            raise ConflictError(
                f"The model '{self.name}' is loading; unload it once it has loaded.",
                model=self.name,
            )
        if self._engine is None:
            return False
        if not self.idle:
            raise ConflictError(
                f"The model '{self.name}' has {self.in_flight} requests in flight; it is "
                "unloaded only when idle. Try again once they have finished.",
                model=self.name,
            )
        engine, self._engine = self._engine, None
        self._load_task = None
        self.state = LoadState.UNLOADING
        self._engine_changed()
        # In its own task: the caller (an admin request, the budget) leaving must not stop it
        # half-way, and requests arriving meanwhile wait for it.
        self._unload_task = asyncio.create_task(
            self._shutdown_engine(engine), name=f"unload {self.name}", context=contextvars.Context()
        )
        await asyncio.shield(self._unload_task)
        return True

    async def _shutdown_engine(self, engine: EngineT) -> None:
        started = time.perf_counter()
        try:
            await engine.shutdown()
        except Exception:
            logger.warning("Shutting down %s failed", self.name, exc_info=True)
        finally:
            self.memory_bytes = None
            self._unload_task = None
            if self.state is LoadState.UNLOADING:
                self.state = LoadState.NOT_LOADED
        logger.info("Unloaded %s in %.1f s", self.name, time.perf_counter() - started)

    async def shutdown(self) -> None:
        """Release the engine (waiting for a load in progress to finish first)."""
        task = self._load_task
        if task is not None and not task.done():
            try:
                await task
            except Exception:
                logger.debug("Load of %s failed during shutdown", self.name)
        if self._unload_task is not None:
            await asyncio.shield(self._unload_task)
        engine, self._engine = self._engine, None
        self._load_task = None
        self.state = LoadState.NOT_LOADED
        self.memory_bytes = None
        if engine is not None:
            self._engine_changed()
            await engine.shutdown()
