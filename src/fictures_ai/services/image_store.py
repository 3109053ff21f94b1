"""Keeps generated PNGs for a while, under unguessable tokens, for URL responses.

OpenAI's image API can answer with a URL instead of the image itself. The store holds each PNG
in memory for ``ttl_s`` seconds under a random 256-bit token (the token is the capability: no
key is needed to fetch it), within ``max_bytes`` in all: the oldest images go first when full.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_STORED_BYTES = 256 << 20
"""The most PNG bytes kept for URL answers (256 MiB); the oldest go first beyond it."""


class GeneratedImageStore:
    """A bounded, expiring in-memory store of PNG bytes."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_bytes: int = MAX_STORED_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._images: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def put(self, png: bytes) -> str:
        """Store ``png`` and return its token."""
        self._expire()
        while self._images and self._bytes + len(png) > self._max_bytes:
            self._drop_oldest()
        token = secrets.token_urlsafe(32)
        self._images[token] = (self._clock() + self.ttl_s, png)
        self._bytes += len(png)
        return token

    def get(self, token: str) -> bytes | None:
        """The PNG stored under ``token``, or None when unknown or expired."""
        self._expire()
        entry = self._images.get(token)
        return entry[1] if entry else None

    def _expire(self) -> None:
        now = self._clock()
        while self._images:
            expires, _ = next(iter(self._images.values()))
            if expires > now:
                break
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (_, png) = self._images.popitem(last=False)
        self._bytes -= len(png)
