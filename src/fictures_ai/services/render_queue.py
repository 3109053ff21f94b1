"""``RenderQueue``: a fixed number of render slots, handed out by priority, then arrival.

A counting semaphore whose waiters are ordered by ``(priority, arrival)`` (lower priority
first, vLLM's convention; ``INTERACTIVE_PRIORITY`` before ``BATCH_PRIORITY``). A slot that
frees goes straight to the first waiter, so an interactive request that arrives while a batch
of images renders starts with the next free slot, ahead of the batch items still waiting: a
batch yields the renderer between its items (it never interrupts a render that started).

Each waiter knows its position: 1 plus the waiters that will start before it, as far as is
known now. It changes when a waiter ahead starts or leaves, or when a request of a lower
priority value arrives and goes ahead; a waiter may ask to be told each change. A cancelled
waiter leaves the queue; one cancelled just as it was handed a slot passes the slot on.

Everything runs on the event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fictures_ai.engines.base import INTERACTIVE_PRIORITY

PositionCallback = Callable[[int], None]
"""Called on the event loop with a waiter's new position (1-based); it must not block or raise."""


@dataclass(eq=False, slots=True)
class _Waiter:
    key: tuple[int, int]
    """(priority, arrival number): the queue's order."""
    future: asyncio.Future[None]
    on_position: PositionCallback | None
    position: int = 0


class RenderQueue:
    """``slots`` renders at once; the rest wait in ``(priority, arrival)`` order."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"A render queue needs at least one slot, not {slots}.")
        self._slots = slots
        self._running = 0
        self._waiters: list[_Waiter] = []  # sorted by key
        self._arrivals = itertools.count()

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
        """Take a slot, waiting for one first if all are held (see :meth:`slot`); every
        ``acquire`` that returns needs one :meth:`release`. Cancelled while it waits: it
        leaves the queue and holds nothing."""
        if self._running < self._slots:  # then nobody waits: a freed slot goes to a waiter
            self._running += 1
            return
        waiter = _Waiter(
            (priority, next(self._arrivals)),
            asyncio.get_running_loop().create_future(),
            on_position,
        )
        bisect.insort(self._waiters, waiter, key=lambda entry: entry.key)
        self._report_positions()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # handed a slot as it was cancelled: the next one takes it
            elif waiter in self._waiters:  # else a release dropped it already
                self._waiters.remove(waiter)
                self._report_positions()
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter, if any."""
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.future.done():  # done: cancelled, and about to leave by itself
                waiter.future.set_result(None)  # the slot passes on: running stays the same
                self._report_positions()
                return
        self._running -= 1

    def _report_positions(self) -> None:
        for index, waiter in enumerate(self._waiters, start=1):
            if waiter.position != index:
                waiter.position = index
                if waiter.on_position is not None:
                    waiter.on_position(index)
