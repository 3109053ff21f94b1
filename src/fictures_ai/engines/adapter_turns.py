"""``AdapterTurns``: requests with the same adapter run together; different adapters take turns.

vLLM's CPU build (0.32) mixes LoRA adapters up when one batch holds requests with different
adapters (or some with none): a base-model request answered with the adapter's words (measured;
``tests/integration/test_model_registry.py``). On the CPU the text engine therefore lets only
requests of one adapter (the base model counts as one) into the engine at a time. Turns are
fair: first come, first served, and a request never overtakes an earlier one of another
adapter, so no adapter starves. This runs on the event loop (the diffusers engine has its own,
thread-side gate for the same purpose).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class AdapterTurns:
    """A fair gate keyed by adapter (see the module docstring)."""

    def __init__(self) -> None:
        self._key: Hashable = None
        self._running = 0
        self._waiting: deque[tuple[Hashable, asyncio.Future[None]]] = deque()

    @property
    def running(self) -> int:
        """Requests inside their turn now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for their adapter's turn."""
        return len(self._waiting)

    @asynccontextmanager
    async def turn(self, key: Hashable) -> AsyncIterator[None]:
        """Hold a turn for ``key`` for the length of the block (waiting first if another
        adapter runs, or one waits ahead). Cancelling the wait leaves the line."""
        if not self._waiting and (self._running == 0 or self._key == key):
            self._enter(key)
        else:
            admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (key, admitted)
            self._waiting.append(entry)
            try:
                await admitted
            except asyncio.CancelledError:
                if admitted.done() and not admitted.cancelled():
                    self._leave()  # admitted just as it was cancelled: give the turn back
                else:
                    self._waiting.remove(entry)
                    self._admit_next()
                raise
        try:
            yield
        finally:
            self._leave()

    def _enter(self, key: Hashable) -> None:
        self._key = key
        self._running += 1

    def _leave(self) -> None:
        self._running -= 1
        self._admit_next()

    def _admit_next(self) -> None:
        """Let in the waiters at the head of the line that share the running adapter (or, with
        nothing running, the head's adapter)."""
        while self._waiting:
            key, admitted = self._waiting[0]
            if self._running and key != self._key:
                return
            self._waiting.popleft()
            self._enter(key)
            admitted.set_result(None)
