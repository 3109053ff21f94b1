"""Run several generation streams at once and interleave their items as they come.

Used for requests that ask for several choices (``n``) or prompts at once: each choice is its
own engine request, so continuous batching serves them together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import TypeVar, cast

T = TypeVar("T")

_DONE = object()


async def merge_streams(
    streams: Sequence[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Yield ``(index of the stream, item)`` from all ``streams`` in arrival order.

    One stream yields directly, without tasks. With several, an error in one stops them all
    and is raised; closing or cancelling the merged stream closes every source stream (which
    aborts their engine requests).
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return

    # Each pump forwards its stream's items, then a done marker or its error.
    queue: asyncio.Queue[tuple[int, object, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
        except Exception as exc:
            await queue.put((index, _DONE, exc))
            return
        finally:
            await stream.aclose()
        await queue.put((index, _DONE, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            position, produced, error = await queue.get()
            if error is not None:
                raise error
            if produced is _DONE:
                remaining -= 1
            else:
                yield position, cast(T, produced)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
