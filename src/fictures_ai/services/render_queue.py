"""``RenderQueue``: a fixed number of render slots, handed out by priority, then arrival, to
batches of compatible requests.

A counting semaphore whose waiters are ordered by ``(priority, arrival)`` (lower priority
first, vLLM's convention; ``INTERACTIVE_PRIORITY`` before ``BATCH_PRIORITY``). A slot that
frees goes straight to the first waiter, so an interactive request that arrives while a batch
of images renders starts with the next free slot, ahead of the batch items still waiting: a
batch job yields the renderer between its renders (it never interrupts a render that started).

Batches (``max_batch`` above 1): a waiter may carry a ``batch_key`` (the settings one pipeline
call takes as single values) and a number of ``images``. The waiter a slot goes to takes with
it the waiters behind it with the same priority and the same key, in queue order, as long as
the batch holds at most ``max_batch`` images; they all start at once and hold that one slot
together. Only the same priority rides along, so an interactive batch never carries a job's
renders (which would lengthen it), and a waiter never starts before one of a lower priority
value. Nobody is held back to fill a batch unless ``batch_wait_s`` is set: a batch is formed
from what waits when a slot frees (a burst that arrives while the renderer is busy is batched;
the request that found it idle starts alone at once).

Each waiter knows its position: 1 plus the waiters that will start before it, as far as is
known now (waiters that will ride in an earlier batch are counted as if each started alone).
It changes when a waiter ahead starts or leaves, or when a request of a lower priority value
arrives and goes ahead; a waiter may ask to be told each change. A cancelled waiter leaves the
queue; one cancelled just as it was handed a slot passes the slot on.

Everything runs on the event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fictures_ai.engines.base import INTERACTIVE_PRIORITY

PositionCallback = Callable[[int], None]
"""Called on the event loop with a waiter's new position (1-based); it must not block or raise."""

T = TypeVar("T")

StartCallback = Callable[[tuple[T, ...]], None]
"""Called on the event loop with the items of a batch that starts (the first is the one the
slot went to); it must not block or raise. The batch holds one slot until ``release``."""


@dataclass(eq=False, slots=True)
class _Waiter(Generic[T]):
    key: tuple[int, int]
    """(priority, arrival number): the queue's order."""
    item: T | None
    start: Callable[[tuple[T, ...]], None]
    on_position: PositionCallback | None
    batch_key: Hashable | None = None
    images: int = 1
    gone: Callable[[], bool] | None = None
    """True once the waiter was cancelled without having left yet: it is skipped."""
    arrived: float = field(default_factory=time.monotonic)
    position: int = 0


class RenderQueue(Generic[T]):
    """``slots`` batches at once; the rest wait in ``(priority, arrival)`` order."""

    def __init__(self, slots: int, *, max_batch: int = 1, batch_wait_s: float = 0.0) -> None:
        """``max_batch``: the most images one batch holds (1: no batching); ``batch_wait_s``:
        how long a batch that is not full may wait for more compatible requests before it
        starts while a slot is free (0: it starts at once)."""
        if slots < 1:
            raise ValueError(f"A render queue needs at least one slot, not {slots}.")
        if max_batch < 1:
            raise ValueError(f"A batch holds at least one image, not {max_batch}.")
        self._slots = slots
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_s
        self._running = 0
        self._waiters: list[_Waiter[T]] = []  # sorted by key
        self._arrivals = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> int:
        """Slots held now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """Whether a request arriving now would wait."""
        return self._running >= self._slots

    @property
    def max_batch(self) -> int:
        """The most images one batch holds."""
        return self._max_batch

    def ahead(self, priority: int) -> int:
        """How many waiters a request of ``priority`` arriving now would wait behind."""
        return sum(1 for waiter in self._waiters if waiter.key[0] <= priority)

    @asynccontextmanager
    async def slot(
        self,
        *,
        priority: int = INTERACTIVE_PRIORITY,
        on_position: PositionCallback | None = None,
    ) -> AsyncIterator[None]:
        """Hold a slot for the length of the block, waiting for one first if all are held.

        ``on_position`` is called with the request's position when it starts to wait and
        again each time the position changes (never when a slot is free at once).
        """
        await self.acquire(priority=priority, on_position=on_position)
        try:
            yield
        finally:
            self.release()

    async def acquire(
        self,
        *,
        priority: int = INTERACTIVE_PRIORITY,
        on_position: PositionCallback | None = None,
    ) -> None:
        """Take a slot for this caller alone, waiting for one first if all are held (see
        :meth:`slot`); every ``acquire`` that returns needs one :meth:`release`. Cancelled
        while it waits: it leaves the queue and holds nothing."""
        if self._running < self._slots and not self._waiters:
            self._running += 1
            return
        future = asyncio.get_running_loop().create_future()
        waiter: _Waiter[T] = _Waiter(
            (priority, next(self._arrivals)),
            None,
            lambda _: future.set_result(None),
            on_position,
            gone=future.done,  # cancelled, and about to leave by itself
        )
        self._enqueue(waiter)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot as it was cancelled: the next one takes it
            else:
                self._withdraw(waiter)
            raise

    def submit(
        self,
        item: T,
        *,
        start: StartCallback[T],
        priority: int = INTERACTIVE_PRIORITY,
        batch_key: Hashable | None = None,
        images: int = 1,
        on_position: PositionCallback | None = None,
        gone: Callable[[], bool] | None = None,
    ) -> object:
        """Queue ``item``; when its batch starts, ``start`` is called with the batch's items
        (the one the slot went to calls its own ``start``, its companions' are not called).
        Items batch with others of the same ``priority`` and equal, non-None ``batch_key``;
        ``images`` is what the item adds to a batch (up to ``max_batch``); ``gone`` says
        that the item's caller was cancelled and is about to withdraw it: it is dropped then.

        Returns a handle for :meth:`withdraw`. ``start`` may run before this returns (a
        slot was free). Exactly one :meth:`release` is owed per started batch.
        """
        waiter: _Waiter[T] = _Waiter(
            (priority, next(self._arrivals)),
            item,
            start,
            on_position,
            batch_key=batch_key,
            images=max(1, images),
            gone=gone,
        )
        self._enqueue(waiter)
        return waiter

    def withdraw(self, handle: object) -> bool:
        """Take a submitted item out of the queue before it starts; False when it has
        started already (or was withdrawn)."""
        return isinstance(handle, _Waiter) and self._withdraw(handle)

    def _withdraw(self, waiter: _Waiter[T]) -> bool:
        if waiter not in self._waiters:
            return False
        self._waiters.remove(waiter)
        self._report_positions()
        self._dispatch()  # a held-back batch may be complete without it
        return True

    def release(self) -> None:
        """Give a slot back: to the first waiter (and its batch), if any."""
        self._running -= 1
        self._dispatch()

    def _enqueue(self, waiter: _Waiter[T]) -> None:
        bisect.insort(self._waiters, waiter, key=lambda entry: entry.key)
        self._dispatch()
        if waiter in self._waiters:
            self._report_positions()

    def _dispatch(self) -> None:
        """Start batches while slots are free and waiters wait."""
        while self._running < self._slots and self._waiters:
            head = self._waiters[0]
            if head.gone is not None and head.gone():
                self._waiters.pop(0)
                continue
            batch = self._batch_of(head)
            if self._hold_back(head, batch):
                return
            for waiter in batch:
                self._waiters.remove(waiter)
            self._running += 1
            self._report_positions()
            items = tuple(waiter.item for waiter in batch if waiter.item is not None)
            head.start(items)

    def _batch_of(self, head: _Waiter[T]) -> list[_Waiter[T]]:
        batch = [head]
        if head.batch_key is None or self._max_batch == 1:
            return batch
        images = head.images
        for waiter in self._waiters[1:]:
            if waiter.key[0] != head.key[0]:
                break  # sorted by priority: nobody further on has the head's
            if waiter.gone is not None and waiter.gone():
                continue
            if waiter.batch_key == head.batch_key and images + waiter.images <= self._max_batch:
                batch.append(waiter)
                images += waiter.images
                if images == self._max_batch:
                    break
        return batch

    def _hold_back(self, head: _Waiter[T], batch: list[_Waiter[T]]) -> bool:
        """Whether a batch that is not full waits a little longer for companions (only with
        ``batch_wait_s``, and only while nothing else runs: a busy renderer batches anyway)."""
        if self._batch_wait_s <= 0 or head.batch_key is None or self._running > 0:
            return False
        if sum(waiter.images for waiter in batch) >= self._max_batch:
            return False
        remaining = head.arrived + self._batch_wait_s - time.monotonic()
        if remaining <= 0:
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(remaining, self._wake)
        return True

    def _wake(self) -> None:
        self._timer = None
        self._dispatch()

    def _report_positions(self) -> None:
        for index, waiter in enumerate(self._waiters, start=1):
            if waiter.position != index:
                waiter.position = index
                if waiter.on_position is not None:
                    waiter.on_position(index)
