"""The server's own API keys (the ``local`` store): create, list, revoke, and verify them.

Keys live in the ``fictures_ai_api_keys`` table of the server's database through SQLAlchemy: an
SQLite file by default (:func:`~fictures_ai.database.default_database_url`), PostgreSQL
when ``DATABASE_URL`` says so (``postgresql://user:password@host/db``, read as psycopg 3). The
table is created at start-up (or first use); its name carries the server's prefix, so the same
database may also hold the Fictures web app's own ``api_keys`` table. Keys made by versions that
named the table ``api_keys`` are copied over once, the old table left as it was.

A key reads ``fai_<prefix>_<secret>`` (:mod:`.key_format`); the database stores the prefix
and a keyed digest of the whole key (:mod:`.hashing`), never the key; a row hashed by an earlier
version (argon2id) is rewritten in the current scheme when its key is first verified. A revoked
or wrong key never causes a write. Verification and its cache are
:class:`~fictures_ai.services.keys.base.KeyStore`'s; a revoked key stops working at once in the
process that revoked it. A key may carry an allow-list of models; without one it may use every
model.
"""

from __future__ import annotations

import builtins
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Index,
    String,
    column,
    func,
    insert,
    inspect,
    or_,
    select,
    table,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fictures_ai.database import (
    TABLE_PREFIX,
    create_database_engine,
    masked,
    normalise_url,
    sqlite_file,
)
from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.keys.base import KeyStore, KeyStoreSchemaError
from fictures_ai.services.keys.hashing import HMAC_SHA256, KeyHasher, scheme_of
from fictures_ai.services.keys.info import ApiKeyInfo, KeyCheck, KeyId, aware
from fictures_ai.services.keys.key_format import KEY_PREFIX, display_prefix, new_key, split_key
from fictures_ai.services.keys.scopes import parse_models, parse_scopes

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,63}")

TABLE_NAME = f"{TABLE_PREFIX}api_keys"
LEGACY_TABLE_NAME = "api_keys"
"""Where versions before 0.2 kept the server's keys (the web app's table has the same name)."""


class ApiKeyNotFoundError(InvalidRequestError):
    """No key has the id, prefix or name given to a management command."""

    def __init__(self, ident: str) -> None:
        super().__init__(
            f"No API key has the id, prefix or name '{ident}' (see 'fictures-ai keys list').",
            param="key",
            value=ident,
        )


class _Base(DeclarativeBase):
    pass


class _ApiKeyRow(_Base):
    __tablename__ = TABLE_NAME
    # Names are unique among active keys only, so a revoked key's name can be reused and
    # "revoke NAME" always means one key.
    __table_args__ = (
        Index(
            f"ux_{TABLE_NAME}_active_name",
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
            created_at=aware(self.created_at),
            store=ApiKeyService.kind,
            revoked_at=aware(self.revoked_at) if self.revoked_at else None,
            last_used_at=aware(self.last_used_at) if self.last_used_at else None,
        )


_COLUMNS = tuple(column.name for column in _ApiKeyRow.__table__.columns)


def _now() -> datetime:
    return datetime.now(UTC)


class ApiKeyService(KeyStore):
    """The server's own key store: create, list and revoke keys (blocking), verify them (async).

    ``create``, ``list`` and ``revoke`` block on the database: async code calls them through
    ``asyncio.to_thread``. ``verify`` is meant for one event loop (the server's).
    """

    kind = "local"

    def __init__(
        self,
        *,
        database_url: str,
        pepper: str | None = None,
        beside_web_app_keys: bool = False,
        **options: Any,
    ) -> None:
        """Open (lazily) the database at ``database_url``; ``options`` are
        :class:`~fictures_ai.services.keys.base.KeyStore`'s (cache TTLs, threads, batching).

        ``pepper``: ``API_KEY_PEPPER``, the secret key of the HMAC-SHA-256 the keys are stored
        as; None stores them as SHA-256 (see :mod:`.hashing`).

        ``beside_web_app_keys``: the web app's keys are accepted too (``API_KEY_STORE=
        fictures``), so this database may be the web app's. Without it, a database holding the
        web app's ``api_keys`` table is refused when the store is prepared: that is the original
        ai-server's set-up, where every key of the web app would now get 401.

        Raises ``sqlalchemy.exc.ArgumentError`` when ``database_url`` is not a database URL,
        and ``ValueError`` for an empty pepper.
        """
        super().__init__(**options)
        self._hasher = KeyHasher(pepper)
        self._url = normalise_url(database_url)
        self._beside_web_app_keys = beside_web_app_keys
        self._engine = create_database_engine(self._url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        logger.debug("API key store at %s", self.database_url)

    @property
    def database_url(self) -> str:
        """The database URL, password masked (safe to log)."""
        return masked(self._url)

    @property
    def description(self) -> str:
        """The server's own table and its database."""
        return f"the server's table {TABLE_NAME} at {self.database_url}"

    def lookup_prefix(self, presented: str) -> str | None:
        """The 8-character prefix of a ``fai_`` key."""
        return split_key(presented)

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
        self.prepare()
        for _ in range(5):  # a prefix collision (1 in 2.8e12 per pair) just draws again
            prefix, plaintext = new_key()
            row = _ApiKeyRow(
                name=name,
                prefix=prefix,
                key_hash=self._hasher.hash(plaintext),
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
        self.prepare()
        query = select(_ApiKeyRow).order_by(_ApiKeyRow.id)
        if not include_revoked:
            query = query.where(_ApiKeyRow.revoked_at.is_(None))
        with self._sessions() as session:
            return [row.to_info() for row in session.scalars(query)]

    def revoke(self, ident: str) -> tuple[ApiKeyInfo, bool]:
        """Revoke the key with this id, prefix (``abcd1234`` or ``fai_abcd1234``, or the whole
        key) or active name; return it and whether this call revoked it (False: it already was,
        and revoking it again changed nothing).

        Takes effect at once in this process and within ``cache_ttl_s`` in the others. Raises
        ``ApiKeyNotFoundError`` when nothing matches and ``InvalidRequestError`` when ``ident``
        names one key and is the prefix of another.
        """
        self.prepare()
        with self._sessions.begin() as session:
            row = self._find(session, ident.strip())
            newly = row.revoked_at is None
            if newly:
                row.revoked_at = _now()
                logger.info("Revoked API key '%s' (fai_%s)", row.name, row.prefix)
            else:
                logger.info("API key '%s' (fai_%s) was already revoked", row.name, row.prefix)
            info = row.to_info()
        self.forget(info.prefix)
        return info, newly

    # The store's side of verification (worker threads)

    def _check_blocking(
        self, *, prefix: str, presented: str, checked_hash: str | None, rewrite: bool
    ) -> KeyCheck:
        self.prepare()
        with self._sessions.begin() as session:
            row = session.scalars(
                select(_ApiKeyRow).where(_ApiKeyRow.prefix == prefix)
            ).one_or_none()
            # An unknown prefix is answered without a hash check: prefixes are public
            # (listed, logged), so timing reveals nothing, and bad keys stay cheap.
            if row is None:
                return KeyCheck(info=None, reason=f"no key has the prefix {display_prefix(prefix)}")
            if row.revoked_at is not None:
                return KeyCheck(info=None, reason=f"revoked at {aware(row.revoked_at):%c} UTC")
            stored = row.key_hash
            if checked_hash is None or stored != checked_hash:
                if not self._hasher.matches(stored, presented):
                    reason = self._hasher.mismatch_reason(stored)
                    if rewrite:  # a request's check; `keys check` prints the reason itself
                        # A missing pepper refuses every peppered key: the operator's to fix.
                        level = (
                            logging.WARNING
                            if self._hasher.lacks_pepper_for(stored)
                            else logging.INFO
                        )
                        logger.log(level, "Rejected API key fai_%s: %s", prefix, reason)
                    return KeyCheck(info=None, reason=reason)
                if rewrite and not self._hasher.is_current(stored):
                    # The migration from earlier versions' argon2id, in place: only a key that
                    # matched rewrites its row, so a guess can never change a hash.
                    row.key_hash = self._hasher.hash(presented)
                    logger.info(
                        "Rewrote the hash of API key fai_%s from %s to %s",
                        prefix,
                        scheme_of(stored),
                        self._hasher.scheme,
                    )
            return KeyCheck(info=row.to_info(), key_hash=row.key_hash)

    def _write_last_used(self, uses: dict[KeyId, datetime]) -> None:
        self.prepare()
        with self._sessions.begin() as session:
            for key_id, moment in uses.items():
                session.execute(
                    update(_ApiKeyRow).where(_ApiKeyRow.id == key_id).values(last_used_at=moment)
                )

    def _prepare(self) -> None:
        """Create the table (or check the one there), then take over keys of the old table."""
        database_file = sqlite_file(self._url)
        if database_file is not None:
            database_file.parent.mkdir(parents=True, exist_ok=True)
        inspector = inspect(self._engine)
        legacy: set[str] = set()
        if inspector.has_table(LEGACY_TABLE_NAME):
            legacy = {column["name"] for column in inspector.get_columns(LEGACY_TABLE_NAME)}
        if {"key_prefix", "key_hash"} <= legacy and not self._beside_web_app_keys:
            raise KeyStoreSchemaError(
                f"DATABASE_URL ({self.database_url}) holds the Fictures web app's api_keys "
                "table, but API_KEY_STORE=local accepts only the server's own keys, so the web "
                "app's keys would be refused. To accept them, set API_KEY_STORE=fictures and "
                "FICTURES_DATABASE_URL to that URL, and point DATABASE_URL at a database of the "
                "server's own (or leave it: the server's tables are named fictures_ai_*)."
            )
        try:
            _Base.metadata.create_all(self._engine)
        except SQLAlchemyError:
            # Another process may have created the table between our check and our CREATE;
            # only a table that is still missing is an error.
            if not inspect(self._engine).has_table(TABLE_NAME):
                raise
        found = {column["name"] for column in inspect(self._engine).get_columns(TABLE_NAME)}
        missing = [name for name in _COLUMNS if name not in found]
        if missing:
            raise KeyStoreSchemaError(
                f"The table {TABLE_NAME} at {self.database_url} is not the server's key table "
                f"(it lacks the columns {', '.join(missing)}). Point DATABASE_URL at another "
                "database, or move that table out of the way."
            )
        if legacy == set(_COLUMNS):
            self._take_over_legacy_keys()
        if not self._hasher.peppered:
            self._warn_of_peppered_keys()

    def _warn_of_peppered_keys(self) -> None:
        """Say once, at start-up, that keys hashed with a pepper cannot verify without one
        (otherwise each is only refused, one request at a time)."""
        with self._sessions() as session:
            peppered = session.scalar(
                select(func.count())
                .select_from(_ApiKeyRow)
                .where(
                    _ApiKeyRow.key_hash.startswith(f"${HMAC_SHA256}$", autoescape=True),
                    _ApiKeyRow.revoked_at.is_(None),
                )
            )
        if peppered:
            logger.warning(
                "API_KEY_PEPPER is not set, but %d active API key(s) in %s are hashed with it: "
                "they cannot verify (each gets 401) until API_KEY_PEPPER is set to the value "
                "they were made with",
                peppered,
                self.description,
            )

    def _take_over_legacy_keys(self) -> None:
        """Copy the keys of a pre-0.2 ``api_keys`` table of ours, once, when ours is empty.

        A table of that name with other columns (the Fictures web app's, when both URLs name
        one database) is not ours and is never read here.
        """
        legacy = table(LEGACY_TABLE_NAME, *(column(name) for name in _COLUMNS))
        with self._engine.begin() as connection:
            if connection.execute(select(func.count()).select_from(_ApiKeyRow)).scalar_one():
                return
            copied = connection.execute(
                insert(_ApiKeyRow).from_select(_COLUMNS, select(*legacy.columns))
            ).rowcount
        logger.warning(
            "Copied %d API keys from the table %s (an earlier version's) to %s; the old table "
            "is left as it was and may be dropped",
            copied,
            LEGACY_TABLE_NAME,
            TABLE_NAME,
        )

    def _dispose(self) -> None:
        self._engine.dispose()

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


def _check_name(name: str) -> str:
    name = name.strip()
    if not _NAME_PATTERN.fullmatch(name) or name.isdecimal():
        raise ValueError(
            f"Invalid key name '{name}': use 1 to 64 letters, digits, spaces, '.', '_' or '-', "
            "starting with a letter or digit, and not only digits"
        )
    return name
