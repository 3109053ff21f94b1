"""The store interface, :class:`KeyStore`: cached verification in the store's own threads, and
last use written in batches.

Verification (:meth:`KeyStore.verify`) is the hot path of every request. A key seen in the last
``cache_ttl_s`` seconds is answered from memory (:mod:`.cache`); otherwise the store reads the
key's row by its public prefix and checks the hash in a small thread pool of its own, so the
event loop never blocks and a flood of bad keys cannot take every thread. When a key was last
used is written in batches every ``usage_flush_s`` seconds, never on the request path.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from fictures_ai.errors import ServiceUnavailableError
from fictures_ai.redaction import mask_credentials
from fictures_ai.services.keys.cache import VerificationCache, fingerprint
from fictures_ai.services.keys.info import ApiKeyInfo, KeyCheck, KeyId

logger = logging.getLogger(__name__)

T = TypeVar("T")

STORE_RETRY_AFTER_S = 5
"""Retry-After, in seconds, when a key database cannot be reached."""


class KeyStoreSchemaError(Exception):
    """A key database does not hold the tables the server expects (a start-up error)."""


class KeyStore(abc.ABC):
    """A database of API keys, verified through a cache.

    Subclasses say which keys they hold (:meth:`lookup_prefix`), read and check one key's row
    (:meth:`_check_blocking`), write last-use times (:meth:`_write_last_used`) and check their
    tables (:meth:`prepare`); the caching, the thread pool and the batching are here.
    """

    kind: ClassVar[str]
    """The store's name in ``ApiKeyInfo.store``, logs and the CLI."""

    def __init__(
        self,
        *,
        cache_ttl_s: float = 5.0,
        negative_ttl_s: float | None = None,
        max_cache_entries: int = 10_000,
        verify_threads: int | None = None,
        usage_flush_s: float = 30.0,
    ) -> None:
        """``cache_ttl_s`` bounds how long a revoked (or deactivated, or expired) key keeps
        working; ``negative_ttl_s`` (default: ``cache_ttl_s``) how long a rejected key is
        rejected without a new check; ``max_cache_entries`` bounds each of the two caches;
        ``verify_threads`` bounds the hash checks running at once; ``usage_flush_s`` is how
        often last-use times are written."""
        if cache_ttl_s < 0:
            raise ValueError("cache_ttl_s must be >= 0")
        self.usage_flush_s = usage_flush_s
        self._cache = VerificationCache(
            ttl_s=cache_ttl_s,
            negative_ttl_s=cache_ttl_s if negative_ttl_s is None else negative_ttl_s,
            max_entries=max_cache_entries,
        )
        self._inflight: dict[bytes, asyncio.Future[KeyCheck]] = {}
        # Key id -> when it was last used (epoch seconds), written by flush_usage().
        self._last_used: dict[KeyId, float] = {}
        self._prepared = False
        self._prepare_lock = threading.Lock()
        threads = verify_threads or max(2, min(4, os.cpu_count() or 2))
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"api-keys-{self.kind}"
        )

    # What a store says about itself

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the keys live, for people (the database URL with its password masked)."""

    @abc.abstractmethod
    def lookup_prefix(self, presented: str) -> str | None:
        """The prefix that finds ``presented``'s row, or None when this store cannot hold it."""

    @property
    def prepared(self) -> bool:
        """Whether the store's tables have been created or checked."""
        return self._prepared

    def prepare(self) -> None:
        """Create or check the store's tables, once (blocking; later calls return at once).

        Raises ``KeyStoreSchemaError`` when the database holds something else under the names
        the store needs, and ``SQLAlchemyError`` when it cannot be reached (a later call tries
        again).
        """
        if self._prepared:
            return
        with self._prepare_lock:
            if not self._prepared:
                self._prepare()
                self._prepared = True

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Create or check the store's tables (see :meth:`prepare`)."""

    @abc.abstractmethod
    def _check_blocking(
        self, *, prefix: str, presented: str, checked_hash: str | None, rewrite: bool
    ) -> KeyCheck:
        """Read the key's row and check it (in a worker thread). ``checked_hash`` is the stored
        hash the key passed before: while the row still holds it, the hash check is skipped.
        ``rewrite``: whether an accepted key's hash, stored in an outdated scheme, may be
        rewritten in the current one (``verify``: yes; ``check``, which changes nothing: no).
        Raises ``SQLAlchemyError`` when the database fails."""

    @abc.abstractmethod
    def _write_last_used(self, uses: dict[KeyId, datetime]) -> None:
        """Write when each key was last used (in a worker thread; raises ``SQLAlchemyError``)."""

    def _dispose(self) -> None:  # noqa: B027 - optional hook: stores with an engine dispose it
        """Release the store's database connections."""

    # Verification (async, the hot path)

    async def verify(self, presented: str) -> ApiKeyInfo | None:
        """The key's info if ``presented`` is a valid key of this store, else None.

        Answered from memory for a key verified (or rejected) in the last ``cache_ttl_s``
        (``negative_ttl_s``) seconds; otherwise checked against the database in a worker
        thread. Concurrent checks of the same key share one database read and hash check.
        Raises ``ServiceUnavailableError`` when the database cannot be reached.
        """
        prefix = self.lookup_prefix(presented)
        if prefix is None:
            return None
        digest = fingerprint(presented)
        now = time.monotonic()
        entry = self._cache.accepted(prefix, digest)
        if entry is not None and now < entry.expires_at:
            info = entry.check.info
            if info is not None and (info.expires_at is None or not info.expired(_utcnow())):
                self._last_used[info.id] = time.time()
                return info
        if self._cache.rejected(digest, now):
            return None
        future = self._inflight.get(digest)
        if future is None:
            checked_hash = entry.check.key_hash if entry is not None else None
            future = asyncio.ensure_future(
                self._run(
                    self._check_blocking,
                    prefix=prefix,
                    presented=presented,
                    checked_hash=checked_hash,
                    rewrite=True,
                )
            )
            self._inflight[digest] = future
            future.add_done_callback(functools.partial(self._check_done, digest))
        # shield: one caller's cancellation (client gone) must not cancel the shared check.
        check = await asyncio.shield(future)
        info = self._cache.record(prefix, digest, check, time.monotonic())
        if info is not None:
            self._last_used[info.id] = time.time()
        return info

    async def check(self, presented: str) -> KeyCheck:
        """Check ``presented`` against the database now, bypassing the cache, and say why it
        is refused if it is (for ``fictures-ai keys check``; records no use).

        Raises ``ServiceUnavailableError`` when the database cannot be reached.
        """
        prefix = self.lookup_prefix(presented)
        if prefix is None:
            return KeyCheck(info=None, reason=f"not shaped like a key of the {self.kind} store")
        return await self._run(
            self._check_blocking,
            prefix=prefix,
            presented=presented,
            checked_hash=None,
            rewrite=False,
        )

    def clear_cache(self) -> None:
        """Forget every cached verification (the next request of each key re-checks it)."""
        self._cache.clear()

    def forget(self, prefix: str) -> None:
        """Drop a key revoked by this process from the cache, and keep it out."""
        self._cache.forget(prefix)

    # Last use, written in batches

    async def flush_usage(self) -> None:
        """Write the last-use times recorded since the last flush (failures are logged)."""
        if not self._last_used:
            return
        batch, self._last_used = self._last_used, {}
        uses = {key_id: datetime.fromtimestamp(moment, UTC) for key_id, moment in batch.items()}
        try:
            await self._run(self._write_last_used, uses)
        except ServiceUnavailableError:
            logger.warning("Could not record when %d API keys were last used", len(uses))

    async def record_usage(self) -> None:
        """Flush last-use times every ``usage_flush_s`` seconds until cancelled (then once
        more)."""
        try:
            while True:
                await asyncio.sleep(self.usage_flush_s)
                await self.flush_usage()
        finally:
            await asyncio.shield(self.flush_usage())

    def close(self) -> None:
        """Release the verification threads and the database connections."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._dispose()

    # Internals

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking database call in the store's threads, with the request's context
        (request id, tracer); a database failure becomes ``ServiceUnavailableError``."""
        loop = asyncio.get_running_loop()
        bound = functools.partial(contextvars.copy_context().run, call, *args, **kwargs)
        try:
            return await loop.run_in_executor(self._executor, bound)
        except OperationalError as exc:  # unreachable: one line, not a traceback per request
            logger.error(
                "The %s key database at %s cannot be reached: %s",
                self.kind,
                self.description,
                first_line(exc),
            )
            raise ServiceUnavailableError(
                "The API key store is unavailable; try again shortly.",
                retry_after=STORE_RETRY_AFTER_S,
            ) from exc
        except (SQLAlchemyError, KeyStoreSchemaError) as exc:
            logger.exception("The %s key database at %s failed", self.kind, self.description)
            raise ServiceUnavailableError(
                "The API key store is unavailable; try again shortly.",
                retry_after=STORE_RETRY_AFTER_S,
            ) from exc

    def _check_done(self, digest: bytes, future: asyncio.Future[KeyCheck]) -> None:
        self._inflight.pop(digest, None)
        # Mark the outcome as seen even when every waiter was cancelled (no stray warning).
        if not future.cancelled():
            future.exception()


def first_line(exc: BaseException) -> str:
    """The first line of a database error: the driver's message, without SQLAlchemy's
    statement and background link, and without any credential it might quote."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip()
    return mask_credentials(text.splitlines()[0]) if text else type(exc).__name__


def _utcnow() -> datetime:
    return datetime.now(UTC)
