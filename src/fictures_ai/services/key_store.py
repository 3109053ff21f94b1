"""Verifying API keys: scopes, key info, and the cached verification every store shares.

A key comes from one of two stores, told apart by its shape (``key_stores.py`` holds the
chain that asks the right one):

- ``local`` (:class:`~fictures_ai.services.api_keys.ApiKeyService`): the server's own keys,
  ``fai_...``, made with ``fictures-ai keys create`` in the server's database;
- ``fictures`` (:class:`~fictures_ai.services.fictures_keys.FicturesKeyStore`): the Fictures
  web app's keys, ``fic_...``, read from the web app's own PostgreSQL (``API_KEY_STORE=fictures``).

Verification (:meth:`KeyStore.verify`) is the hot path of every request. A key seen in the last
``cache_ttl_s`` seconds is answered from memory in microseconds; otherwise the store reads the
key's row by its public prefix and checks the hash (argon2id or bcrypt: tens of milliseconds of
CPU) in a small thread pool of its own, so the event loop never blocks and a flood of bad keys
cannot take every thread. A key revoked, deactivated or expired stops working within
``cache_ttl_s``. When a key was last used is written in batches every ``usage_flush_s`` seconds,
never on the request path.

Scopes nest: ``admin:all`` ⊃ ``stories:write`` ⊃ ``stories:read``.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import enum
import functools
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from fictures_ai.errors import ServiceUnavailableError
from fictures_ai.redaction import mask_credentials

logger = logging.getLogger(__name__)

T = TypeVar("T")

STORE_RETRY_AFTER_S = 5
"""Retry-After, in seconds, when a key database cannot be reached."""

KeyId = int | str
"""A key's id in its store: an integer in ours, text in the web app's."""


class Scope(enum.StrEnum):
    """What a key may do; each scope includes the ones below it."""

    ADMIN_ALL = "admin:all"
    STORIES_WRITE = "stories:write"
    STORIES_READ = "stories:read"


# Keyed by the plain string so that the per-request check needs no enum conversion.
_SCOPE_RANK: dict[str, int] = {
    Scope.STORIES_READ.value: 1,
    Scope.STORIES_WRITE.value: 2,
    Scope.ADMIN_ALL.value: 3,
}
VALID_SCOPES: tuple[str, ...] = tuple(scope.value for scope in Scope)


def scope_allows(granted: Iterable[str], required: str) -> bool:
    """Whether the ``granted`` scopes include ``required`` (admin:all ⊃ stories:write ⊃ read).

    Unknown granted scopes grant nothing; an unknown ``required`` scope is a programming error
    and raises ``ValueError``.
    """
    needed = _SCOPE_RANK[to_scope(required).value]
    return any(_SCOPE_RANK.get(scope, 0) >= needed for scope in granted)


def parse_scopes(scopes: str | Iterable[str]) -> tuple[str, ...]:
    """Scopes from ``"a,b"``, ``"a b"`` or an iterable, validated, deduplicated, in order.

    Raises ``ValueError`` naming the valid scopes when one is unknown or none is given.
    """
    items = re.split(r"[\s,]+", scopes) if isinstance(scopes, str) else list(scopes)
    parsed: list[str] = []
    for item in (item.strip() for item in items):
        if item and to_scope(item).value not in parsed:
            parsed.append(item)
    if not parsed:
        raise ValueError(f"At least one scope is needed; valid scopes: {', '.join(VALID_SCOPES)}")
    return tuple(parsed)


def to_scope(value: str) -> Scope:
    """The scope named ``value``; ``ValueError`` naming the valid ones when there is none."""
    try:
        return Scope(value)
    except ValueError:
        raise ValueError(
            f"Unknown scope '{value}'; valid scopes: {', '.join(VALID_SCOPES)}"
        ) from None


def aware(moment: datetime) -> datetime:
    """``moment`` in UTC. Naive values are read as UTC: that is how both stores write them
    (SQLite keeps no zone; the web app stores UTC in ``timestamp`` columns)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """One API key as the rest of the server sees it: never its secret or hash."""

    id: KeyId
    name: str
    prefix: str
    """The public part that finds the key's row (safe to log)."""
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    created_at: datetime | None
    store: str = "local"
    """Which store holds the key: ``local`` or ``fictures``."""
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    owner: str | None = None
    """The web app's user id, for keys of the ``fictures`` store."""

    @property
    def display_prefix(self) -> str:
        """The public start of the key as users see it (``fai_<prefix>``, ``fic_...``)."""
        return f"fai_{self.prefix}" if self.store == "local" else self.prefix

    @property
    def revoked(self) -> bool:
        """Whether the key has been revoked."""
        return self.revoked_at is not None

    @property
    def client_id(self) -> str:
        """The key's identity across stores (rate limits, access log): ``key:<store>:<id>``."""
        return f"key:{self.store}:{self.id}"

    def expired(self, now: datetime) -> bool:
        """Whether the key's expiry (if any) is at or before ``now``."""
        return self.expires_at is not None and self.expires_at <= now

    def has_scope(self, required: str) -> bool:
        """Whether this key's scopes include ``required`` (see :func:`scope_allows`)."""
        return scope_allows(self.scopes, required)

    def allows_model(self, model: str) -> bool:
        """Whether this key may use ``model``: any model without an allow-list."""
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The outcome of checking one presented key against its store's database."""

    info: ApiKeyInfo | None
    """The key, when it is valid."""
    reason: str | None = None
    """Why it is not, for people (the CLI, logs); never sent to clients, who get one 401."""
    key_hash: str | None = None
    """The stored hash the key passed (never logged): a re-check while it is unchanged skips
    the slow hash."""

    @property
    def accepted(self) -> bool:
        """Whether the key is valid."""
        return self.info is not None


class KeyStoreSchemaError(Exception):
    """A key database does not hold the tables the server expects (a start-up error)."""


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    digest: bytes
    check: KeyCheck
    expires_at: float


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
        self.cache_ttl_s = cache_ttl_s
        self.negative_ttl_s = cache_ttl_s if negative_ttl_s is None else negative_ttl_s
        self.usage_flush_s = usage_flush_s
        self._max_entries = max_cache_entries
        # Keyed by the public prefix, holding the sha256 of the full key: a hit is compared in
        # constant time, and a wrong secret for a known prefix misses.
        self._positive: OrderedDict[str, _CacheEntry] = OrderedDict()
        # Keyed by the sha256 of a rejected key: dict lookup timing can leak only digest bits.
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[KeyCheck]] = {}
        # Prefixes revoked by this process: a check that read the row just before the
        # revocation must not put the key back in the cache.
        self._revoked_here: set[str] = set()
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
    def _check_blocking(self, *, prefix: str, presented: str, checked_hash: str | None) -> KeyCheck:
        """Read the key's row and check it (in a worker thread). ``checked_hash`` is the stored
        hash the key passed before: while the row still holds it, the hash check is skipped.
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
        digest = hashlib.sha256(presented.encode()).digest()
        now = time.monotonic()
        entry = self._positive.get(prefix)
        known = entry is not None and hmac.compare_digest(entry.digest, digest)
        if entry is not None and known and now < entry.expires_at:
            info = entry.check.info
            if info is not None and (info.expires_at is None or not info.expired(_utcnow())):
                self._last_used[info.id] = time.time()
                return info
        rejected_until = self._negative.get(digest)
        if rejected_until is not None:
            if now < rejected_until:
                return None
            self._negative.pop(digest, None)
        future = self._inflight.get(digest)
        if future is None:
            checked_hash = entry.check.key_hash if entry is not None and known else None
            future = asyncio.ensure_future(
                self._run(
                    self._check_blocking,
                    prefix=prefix,
                    presented=presented,
                    checked_hash=checked_hash,
                )
            )
            self._inflight[digest] = future
            future.add_done_callback(functools.partial(self._check_done, digest))
        # shield: one caller's cancellation (client gone) must not cancel the shared check.
        check = await asyncio.shield(future)
        now = time.monotonic()
        if check.info is None or prefix in self._revoked_here:
            current = self._positive.get(prefix)
            if current is not None and hmac.compare_digest(current.digest, digest):
                self._positive.pop(prefix, None)
            _put(self._negative, digest, now + self.negative_ttl_s, self._max_entries)
            return None
        entry = _CacheEntry(digest=digest, check=check, expires_at=now + self.cache_ttl_s)
        _put(self._positive, prefix, entry, self._max_entries)
        self._last_used[check.info.id] = time.time()
        return check.info

    async def check(self, presented: str) -> KeyCheck:
        """Check ``presented`` against the database now, bypassing the cache, and say why it
        is refused if it is (for ``fictures-ai keys check``; records no use).

        Raises ``ServiceUnavailableError`` when the database cannot be reached.
        """
        prefix = self.lookup_prefix(presented)
        if prefix is None:
            return KeyCheck(info=None, reason=f"not shaped like a key of the {self.kind} store")
        return await self._run(
            self._check_blocking, prefix=prefix, presented=presented, checked_hash=None
        )

    def clear_cache(self) -> None:
        """Forget every cached verification (the next request of each key re-checks it)."""
        self._positive.clear()
        self._negative.clear()

    def forget(self, prefix: str) -> None:
        """Drop a key revoked by this process from the cache, and keep it out."""
        self._revoked_here.add(prefix)
        self._positive.pop(prefix, None)

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


def _put(cache: OrderedDict[Any, T], key: Any, value: T, limit: int) -> None:
    # Oldest insertion goes first: entries are re-inserted every TTL, so this is close to LRU
    # without paying for move_to_end on every hit.
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)
