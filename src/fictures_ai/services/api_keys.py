"""API keys: creation, listing and revocation in a SQL database, and fast verification.

Keys live in the ``api_keys`` table through SQLAlchemy: an SQLite file by default
(:func:`default_database_url`), PostgreSQL when ``DATABASE_URL`` says so
(``postgresql+psycopg://user:password@host/db``; a plain ``postgresql://`` URL is read as
psycopg 3). The table is created on first use.

A key reads ``fai_<prefix>_<secret>``: 8 characters of ``[a-z0-9]`` that identify the key
(shown by ``keys list``, safe to log) and 43 URL-safe characters (256 random bits) that prove
it. The database stores the prefix and an argon2id hash of the whole key, never the key.

Verification (:meth:`ApiKeyService.verify`) is the hot path of every request. A key seen in the
last ``cache_ttl_s`` seconds is answered from memory in microseconds; otherwise the row is read
by prefix and the hash checked (~30 ms of CPU), in a small thread pool of its own so the event
loop never blocks and a flood of bad keys cannot take every thread. A revoked key stops working
within ``cache_ttl_s`` in every process, and at once in the process that revoked it.

Scopes nest: ``admin:all`` ⊃ ``stories:write`` ⊃ ``stories:read``. A key may also carry an
allow-list of models; without one it may use every model.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import enum
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import string
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError
from platformdirs import user_data_dir
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Index,
    String,
    create_engine,
    event,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from fictures_ai.errors import InvalidRequestError, ServiceUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

KEY_PREFIX = "fai"
PREFIX_LENGTH = 8
SECRET_BYTES = 32  # 256 bits: token_urlsafe gives 43 characters
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
# The prefix alphabet has no '_', so a key splits unambiguously even though the secret may
# contain '_' and '-'.
_KEY_PATTERN = re.compile(rf"{KEY_PREFIX}_([a-z0-9]{{{PREFIX_LENGTH}}})_[A-Za-z0-9_-]{{43}}")
_KEY_LENGTH = len(KEY_PREFIX) + 1 + PREFIX_LENGTH + 1 + 43
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,63}")

# OWASP's minimum for argon2id (19 MiB, 2 passes, 1 lane): ~30 ms per check on one core. The
# secrets are 256 random bits, so the hash guards a leaked table rather than weak passwords;
# more memory would only cost the server RAM on every cache miss.
_HASHER = PasswordHasher(
    time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
)

#: Retry-After, in seconds, when the key database cannot be reached.
STORE_RETRY_AFTER_S = 5


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
    needed = _SCOPE_RANK[_to_scope(required).value]
    return any(_SCOPE_RANK.get(scope, 0) >= needed for scope in granted)


def parse_scopes(scopes: str | Iterable[str]) -> tuple[str, ...]:
    """Scopes from ``"a,b"``, ``"a b"`` or an iterable, validated, deduplicated, in order.

    Raises ``ValueError`` naming the valid scopes when one is unknown or none is given.
    """
    items = re.split(r"[\s,]+", scopes) if isinstance(scopes, str) else list(scopes)
    parsed: list[str] = []
    for item in (item.strip() for item in items):
        if item and _to_scope(item).value not in parsed:
            parsed.append(item)
    if not parsed:
        raise ValueError(f"At least one scope is needed; valid scopes: {', '.join(VALID_SCOPES)}")
    return tuple(parsed)


def parse_models(models: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """A model allow-list from ``"m1,m2"`` or an iterable; None means every model.

    Raises ``ValueError`` for an empty list (a key that may use no model is a mistake).
    """
    if models is None:
        return None
    items = models.split(",") if isinstance(models, str) else list(models)
    parsed = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not parsed:
        raise ValueError("The model allow-list is empty; leave it out to allow every model")
    return parsed


def _to_scope(value: str) -> Scope:
    try:
        return Scope(value)
    except ValueError:
        raise ValueError(
            f"Unknown scope '{value}'; valid scopes: {', '.join(VALID_SCOPES)}"
        ) from None


def default_database_url() -> str:
    """The SQLite file in the user data dir (``.../fictures-ai/fictures-ai.db``).

    Free of side effects, so that it can serve as a settings default; the service creates the
    folder when it first opens the database.
    """
    path = Path(user_data_dir("fictures-ai")) / "fictures-ai.db"
    return f"sqlite:///{path}"


def split_key(presented: str) -> str | None:
    """The prefix of a well-formed key, or None when ``presented`` is not shaped like a key."""
    if len(presented) != _KEY_LENGTH:
        return None
    match = _KEY_PATTERN.fullmatch(presented)
    return match.group(1) if match else None


class ApiKeyNotFoundError(InvalidRequestError):
    """No key has the id, prefix or name given to a management command."""

    def __init__(self, ident: str) -> None:
        super().__init__(
            f"No API key has the id, prefix or name '{ident}' (see 'fictures-ai keys list').",
            param="key",
            value=ident,
        )


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """One API key as the rest of the server sees it: never its secret or hash."""

    id: int
    name: str
    prefix: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    @property
    def display_prefix(self) -> str:
        """The public start of the key, ``fai_<prefix>``, as users see it."""
        return f"{KEY_PREFIX}_{self.prefix}"

    @property
    def revoked(self) -> bool:
        """Whether the key has been revoked."""
        return self.revoked_at is not None

    def has_scope(self, required: str) -> bool:
        """Whether this key's scopes include ``required`` (see :func:`scope_allows`)."""
        return scope_allows(self.scopes, required)

    def allows_model(self, model: str) -> bool:
        """Whether this key may use ``model``: any model without an allow-list."""
        return self.models is None or model in self.models


class _Base(DeclarativeBase):
    pass


class _ApiKeyRow(_Base):
    __tablename__ = "api_keys"
    # Names are unique among active keys only, so a revoked key's name can be reused and
    # "revoke NAME" always means one key.
    __table_args__ = (
        Index(
            "ux_api_keys_active_name",
            "name",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column("hash", String(255))
    scopes: Mapped[str] = mapped_column(String(255))
    models: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def to_info(self) -> ApiKeyInfo:
        return ApiKeyInfo(
            id=self.id,
            name=self.name,
            prefix=self.prefix,
            scopes=tuple(self.scopes.split()),
            models=tuple(self.models) if self.models is not None else None,
            created_at=_aware(self.created_at),
            revoked_at=_aware(self.revoked_at) if self.revoked_at else None,
            last_used_at=_aware(self.last_used_at) if self.last_used_at else None,
        )


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes (everything we write is UTC); PostgreSQL hands back
    # the session's time zone.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Verified:
    info: ApiKeyInfo
    key_hash: str  # the stored hash the key was checked against (never logged)


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    digest: bytes
    verified: _Verified
    expires_at: float


class ApiKeyService:
    """The API-key store: create, list and revoke keys (blocking), verify them (async).

    ``create``, ``list`` and ``revoke`` block on the database: async code calls them through
    ``asyncio.to_thread``. ``verify`` is meant for one event loop (the server's).
    """

    def __init__(
        self,
        *,
        database_url: str,
        cache_ttl_s: float = 5.0,
        negative_ttl_s: float | None = None,
        max_cache_entries: int = 10_000,
        verify_threads: int | None = None,
    ) -> None:
        """Open (lazily) the database at ``database_url``.

        ``cache_ttl_s`` bounds how long a revoked key keeps working in other processes;
        ``negative_ttl_s`` (default: ``cache_ttl_s``) how long a rejected key is rejected
        without a new check; ``max_cache_entries`` bounds each of the two caches;
        ``verify_threads`` bounds the hash checks running at once (and their memory, 19 MiB
        each).
        """
        if cache_ttl_s < 0:
            raise ValueError("cache_ttl_s must be >= 0")
        self._url = _normalise_url(database_url)
        self.cache_ttl_s = cache_ttl_s
        self.negative_ttl_s = cache_ttl_s if negative_ttl_s is None else negative_ttl_s
        self._max_entries = max_cache_entries
        self._engine = _create_engine(self._url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        # Keyed by the public prefix, holding the sha256 of the full key: a hit is compared in
        # constant time, and a wrong secret for a known prefix misses.
        self._positive: OrderedDict[str, _CacheEntry] = OrderedDict()
        # Keyed by the sha256 of a rejected key: dict lookup timing can leak only digest bits.
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[_Verified | None]] = {}
        # Prefixes revoked by this process: a check that read the row just before the
        # revocation must not put the key back in the cache. Revocations are rare, so the set
        # stays small.
        self._revoked_here: set[str] = set()
        threads = verify_threads or max(2, min(4, os.cpu_count() or 2))
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="api-keys")
        logger.debug("API key store at %s", self.database_url)

    @property
    def database_url(self) -> str:
        """The database URL, password masked (safe to log)."""
        return self._url.render_as_string(hide_password=True)

    # Management (blocking)

    def create(
        self, name: str, scopes: str | Iterable[str], models: str | Iterable[str] | None = None
    ) -> tuple[ApiKeyInfo, str]:
        """Create a key; return its info and its plaintext, which is never available again.

        ``scopes`` and ``models`` accept ``"a,b"`` strings or iterables; ``models=None`` allows
        every model. Raises ``ValueError`` for a bad name, an unknown scope, an empty model
        list, or a name an active key already has.
        """
        name = _check_name(name)
        granted = parse_scopes(scopes)
        allowed = parse_models(models)
        self._ensure_schema()
        for _ in range(5):  # a prefix collision (1 in 2.8e12 per pair) just draws again
            prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
            plaintext = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
            row = _ApiKeyRow(
                name=name,
                prefix=prefix,
                key_hash=_HASHER.hash(plaintext),
                scopes=" ".join(granted),
                models=list(allowed) if allowed is not None else None,
                created_at=_now(),
            )
            try:
                with self._sessions.begin() as session:
                    if self._active_by_name(session, name) is not None:
                        raise ValueError(
                            f"An active API key named '{name}' already exists; "
                            "revoke it first or choose another name"
                        )
                    session.add(row)
                    session.flush()
                    info = row.to_info()
            except IntegrityError:
                with self._sessions() as session:
                    if self._active_by_name(session, name) is not None:
                        raise ValueError(
                            f"An active API key named '{name}' already exists"
                        ) from None
                continue
            logger.info(
                "Created API key '%s' (%s) with scopes %s",
                info.name,
                info.display_prefix,
                ",".join(info.scopes),
            )
            return info, plaintext
        raise RuntimeError("Could not draw an unused key prefix")  # pragma: no cover

    def list(self, *, include_revoked: bool = True) -> builtins.list[ApiKeyInfo]:
        """Every key, oldest first (without the revoked ones if ``include_revoked`` is false)."""
        self._ensure_schema()
        query = select(_ApiKeyRow).order_by(_ApiKeyRow.id)
        if not include_revoked:
            query = query.where(_ApiKeyRow.revoked_at.is_(None))
        with self._sessions() as session:
            return [row.to_info() for row in session.scalars(query)]

    def revoke(self, ident: str) -> ApiKeyInfo:
        """Revoke the key with this id, prefix (``abcd1234`` or ``fai_abcd1234``, or the whole
        key) or active name, and return it; revoking a revoked key changes nothing.

        Takes effect at once in this process and within ``cache_ttl_s`` in the others. Raises
        ``ApiKeyNotFoundError`` when nothing matches and ``InvalidRequestError`` when ``ident``
        names one key and is the prefix of another.
        """
        self._ensure_schema()
        with self._sessions.begin() as session:
            row = self._find(session, ident.strip())
            if row.revoked_at is None:
                row.revoked_at = _now()
                logger.info("Revoked API key '%s' (fai_%s)", row.name, row.prefix)
            else:
                logger.info("API key '%s' (fai_%s) was already revoked", row.name, row.prefix)
            info = row.to_info()
        self._revoked_here.add(info.prefix)
        self._positive.pop(info.prefix, None)
        return info

    # Verification (async, the hot path)

    async def verify(self, presented: str) -> ApiKeyInfo | None:
        """The key's info if ``presented`` is a valid, unrevoked key, else None.

        Answered from memory for a key verified (or rejected) in the last ``cache_ttl_s``
        (``negative_ttl_s``) seconds; otherwise checked against the database in a worker
        thread. Concurrent checks of the same key share one database read and hash check.
        Raises ``ServiceUnavailableError`` when the database cannot be reached.
        """
        prefix = split_key(presented)
        if prefix is None:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        now = time.monotonic()
        entry = self._positive.get(prefix)
        known = entry is not None and hmac.compare_digest(entry.digest, digest)
        if entry is not None and known and now < entry.expires_at:
            return entry.verified.info
        rejected_until = self._negative.get(digest)
        if rejected_until is not None:
            if now < rejected_until:
                return None
            self._negative.pop(digest, None)
        future = self._inflight.get(digest)
        if future is None:
            # A key verified before only needs its row re-read (revoked? hash changed?): the
            # hash check is skipped while the stored hash is the one it passed.
            checked_hash = entry.verified.key_hash if entry is not None and known else None
            future = asyncio.ensure_future(
                self._check(prefix=prefix, presented=presented, checked_hash=checked_hash)
            )
            self._inflight[digest] = future
            future.add_done_callback(functools.partial(self._check_done, digest))
        # shield: one caller's cancellation (client gone) must not cancel the shared check.
        verified = await asyncio.shield(future)
        now = time.monotonic()
        if verified is None or prefix in self._revoked_here:
            current = self._positive.get(prefix)
            if current is not None and hmac.compare_digest(current.digest, digest):
                self._positive.pop(prefix, None)
            _put(self._negative, digest, now + self.negative_ttl_s, self._max_entries)
            return None
        entry = _CacheEntry(digest=digest, verified=verified, expires_at=now + self.cache_ttl_s)
        _put(self._positive, prefix, entry, self._max_entries)
        return verified.info

    def clear_cache(self) -> None:
        """Forget every cached verification (the next request of each key re-checks it)."""
        self._positive.clear()
        self._negative.clear()

    def close(self) -> None:
        """Release the database connections and the verification threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._engine.dispose()

    # Internals

    def _check_done(self, digest: bytes, future: asyncio.Future[_Verified | None]) -> None:
        self._inflight.pop(digest, None)
        # Mark the outcome as seen even when every waiter was cancelled (no stray warning).
        if not future.cancelled():
            future.exception()

    async def _check(
        self, *, prefix: str, presented: str, checked_hash: str | None
    ) -> _Verified | None:
        loop = asyncio.get_running_loop()
        # Carry the request's context (request id, tracer) into the worker thread.
        call: Callable[[], _Verified | None] = functools.partial(
            contextvars.copy_context().run,
            self._check_blocking,
            prefix=prefix,
            presented=presented,
            checked_hash=checked_hash,
        )
        return await loop.run_in_executor(self._executor, call)

    def _check_blocking(
        self, *, prefix: str, presented: str, checked_hash: str | None
    ) -> _Verified | None:
        try:
            self._ensure_schema()
            with self._sessions.begin() as session:
                row = session.scalars(
                    select(_ApiKeyRow).where(_ApiKeyRow.prefix == prefix)
                ).one_or_none()
                # An unknown prefix is answered without a hash check: prefixes are public
                # (listed, logged), so timing reveals nothing, and bad keys stay cheap.
                if row is None or row.revoked_at is not None:
                    return None
                stored = row.key_hash
                if checked_hash is None or not hmac.compare_digest(stored, checked_hash):
                    if not _hash_matches(stored, presented):
                        logger.info("Rejected a wrong secret for API key fai_%s", prefix)
                        return None
                    if _HASHER.check_needs_rehash(stored):
                        row.key_hash = _HASHER.hash(presented)
                row.last_used_at = _now()
                return _Verified(info=row.to_info(), key_hash=row.key_hash)
        except SQLAlchemyError as exc:
            logger.exception("The API key database at %s failed", self.database_url)
            raise ServiceUnavailableError(
                "The API key store is unavailable; try again shortly.",
                retry_after=STORE_RETRY_AFTER_S,
            ) from exc

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            database_file = _sqlite_file(self._url)
            if database_file is not None:
                database_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                _Base.metadata.create_all(self._engine)
            except SQLAlchemyError:
                # Another process may have created the table between our check and our
                # CREATE; only a table that is still missing is an error.
                if not inspect(self._engine).has_table(_ApiKeyRow.__tablename__):
                    raise
            self._schema_ready = True

    @staticmethod
    def _active_by_name(session: Session, name: str) -> _ApiKeyRow | None:
        return session.scalars(
            select(_ApiKeyRow).where(_ApiKeyRow.name == name, _ApiKeyRow.revoked_at.is_(None))
        ).one_or_none()

    @staticmethod
    def _find(session: Session, ident: str) -> _ApiKeyRow:
        if not ident:
            raise ApiKeyNotFoundError(ident)
        if ident.isdecimal():  # names cannot be all digits, so this is an id
            row = session.get(_ApiKeyRow, int(ident))
            if row is None:
                raise ApiKeyNotFoundError(ident)
            return row
        prefix = split_key(ident) or ident.removeprefix(f"{KEY_PREFIX}_")
        candidates = session.scalars(
            select(_ApiKeyRow).where(
                or_(
                    _ApiKeyRow.prefix == prefix,
                    (_ApiKeyRow.name == ident) & _ApiKeyRow.revoked_at.is_(None),
                )
            )
        ).all()
        if not candidates:
            # Revoking a revoked key by its name again is a no-op, like by id or prefix.
            revoked = session.scalars(
                select(_ApiKeyRow)
                .where(_ApiKeyRow.name == ident)
                .order_by(_ApiKeyRow.revoked_at.desc())
                .limit(1)
            ).one_or_none()
            if revoked is None:
                raise ApiKeyNotFoundError(ident)
            return revoked
        if len(candidates) > 1:
            raise InvalidRequestError(
                f"'{ident}' is both the name of one API key and the prefix of another; "
                "give the id instead (see 'fictures-ai keys list').",
                param="key",
                value=ident,
            )
        return candidates[0]


def _hash_matches(stored: str, presented: str) -> bool:
    try:
        return _HASHER.verify(stored, presented)
    except (VerificationError, InvalidHashError):
        return False


def _put(cache: OrderedDict[Any, T], key: Any, value: T, limit: int) -> None:
    # Oldest insertion goes first: entries are re-inserted every TTL, so this is close to LRU
    # without paying for move_to_end on every hit.
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def _check_name(name: str) -> str:
    name = name.strip()
    if not _NAME_PATTERN.fullmatch(name) or name.isdecimal():
        raise ValueError(
            f"Invalid key name '{name}': use 1 to 64 letters, digits, spaces, '.', '_' or '-', "
            "starting with a letter or digit, and not only digits"
        )
    return name


def _normalise_url(database_url: str) -> URL:
    url = make_url(database_url)
    # Plain postgresql:// would pick psycopg2, which is not installed; psycopg 3 is.
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _sqlite_in_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _sqlite_file(url: URL) -> Path | None:
    """The file of an SQLite URL; None for other databases, in-memory SQLite and URIs."""
    if url.get_backend_name() != "sqlite" or _sqlite_in_memory(url) or url.database is None:
        return None
    if url.database.startswith("file:"):  # an SQLite URI filename: SQLite resolves it
        return None
    return Path(url.database).expanduser()


def _create_engine(url: URL) -> Engine:
    # hide_parameters: a failed INSERT or UPDATE would otherwise print the key's hash in the
    # exception text, and from there in the logs.
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)
    in_memory = _sqlite_in_memory(url)
    if in_memory:
        # One shared connection: every worker thread must see the same in-memory database.
        engine = create_engine(
            url,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            hide_parameters=True,
        )
    else:
        engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the server read while `fictures-ai keys` writes from another process.
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine
