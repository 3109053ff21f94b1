"""The Fictures web app's API keys (the ``fictures`` store), read from the web app's PostgreSQL.

The web app issues keys to its users and keeps them in its own table ``api_keys``
(``api-contract.md``, "Keys from the web app's database"): ``id text``, ``user_id text``,
``name``, ``key_hash`` (bcrypt, cost 10, made with bcryptjs: ``$2a$``/``$2b$``), ``key_prefix``
(the key's first 16 characters), ``scopes json`` (a list of scope strings), ``last_used_at``,
``expires_at`` (null: never), ``is_active``, ``created_at``, ``updated_at``; ``users`` has
``id``. A key reads ``fic_`` + 12 characters + ``_`` + 43 characters of URL-safe base64; like the
web app (``isValidApiKeyFormat``), any ``fic_`` + 32 or more URL-safe characters is looked up.

A key is valid when a row with its prefix is active, not expired, its hash matches and its user
still exists (the web app's own check, ``dual-auth.ts``, joins ``users`` too); its scopes are the
row's. This store never creates, alters or deletes anything in that database:
it reads rows by prefix and, in batches off the request path, sets ``last_used_at`` (if the
database user may not, it logs that once and stops trying).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

import bcrypt
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    MetaData,
    Select,
    String,
    Table,
    Text,
    bindparam,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from fictures_ai.database import create_database_engine, masked, normalise_url
from fictures_ai.services.keys.base import KeyStore, KeyStoreSchemaError
from fictures_ai.services.keys.info import ApiKeyInfo, KeyCheck, KeyId, aware

logger = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"fic_[A-Za-z0-9_-]{32,124}")
"""The keys the web app accepts (its ``isValidApiKeyFormat``), up to 128 characters."""
PREFIX_LENGTH = 16
"""``key_prefix`` holds the key's first 16 characters: ``fic_`` and the 12 after it."""
BCRYPT_MAX_BYTES = 72
"""bcrypt reads at most 72 bytes of a key; bcryptjs drops the rest, and so do we."""
TABLE_NAME = "api_keys"
USERS_TABLE_NAME = "users"
_INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE for "permission denied"

# Declared here, never created: the web app owns this table (see prepare()).
_API_KEYS = Table(
    TABLE_NAME,
    MetaData(),
    Column("id", Text, primary_key=True),
    Column("user_id", Text),
    Column("name", String(255)),
    Column("key_hash", String(64)),
    Column("key_prefix", String(16)),
    Column("scopes", JSON),
    Column("last_used_at", DateTime),
    Column("expires_at", DateTime),
    Column("is_active", Boolean),
    Column("created_at", DateTime),
)
_USERS = Table(USERS_TABLE_NAME, MetaData(), Column("id", Text, primary_key=True))
_COLUMNS = tuple(column.name for column in _API_KEYS.columns)


class FicturesKeyStore(KeyStore):
    """Verifies the web app's ``fic_`` keys against its ``api_keys`` table (read-only)."""

    kind = "fictures"

    def __init__(self, *, database_url: str, **options: Any) -> None:
        """Connect (lazily) to the web app's database at ``database_url``; ``options`` are
        :class:`~fictures_ai.services.keys.base.KeyStore`'s (cache TTLs, threads, batching).

        Raises ``sqlalchemy.exc.ArgumentError`` when ``database_url`` is not a database URL.
        """
        super().__init__(**options)
        self._url = normalise_url(database_url)
        self._engine = create_database_engine(self._url)
        self._last_used_has_zone = False
        self._record_last_used = True

    @property
    def description(self) -> str:
        """The web app's table and its database."""
        return f"the web app's table {TABLE_NAME} at {masked(self._url)}"

    def lookup_prefix(self, presented: str) -> str | None:
        """The first 16 characters of a ``fic_`` key, as the web app stores them."""
        if len(presented) > 128 or not KEY_PATTERN.fullmatch(presented):
            return None
        return presented[:PREFIX_LENGTH]

    def _prepare(self) -> None:
        """Check that the database holds the web app's ``api_keys`` and ``users`` tables and
        that this user may read what a key check reads (reads only).

        Raises ``KeyStoreSchemaError`` for missing tables or columns; a user without the rights
        makes the test query raise ``sqlalchemy.exc.ProgrammingError``.
        """
        inspector = inspect(self._engine)
        for table in (TABLE_NAME, USERS_TABLE_NAME):
            if not inspector.has_table(table):
                raise KeyStoreSchemaError(
                    f"FICTURES_DATABASE_URL={masked(self._url)} has no table {table}: is it "
                    "the Fictures web app's database?"
                )
        columns = {column["name"]: column for column in inspector.get_columns(TABLE_NAME)}
        missing = [name for name in _COLUMNS if name not in columns]
        if missing:
            raise KeyStoreSchemaError(
                f"The table {TABLE_NAME} at FICTURES_DATABASE_URL={masked(self._url)} lacks "
                f"the columns {', '.join(missing)} that the web app's keys have: is it the "
                "Fictures web app's database?"
            )
        self._last_used_has_zone = bool(getattr(columns["last_used_at"]["type"], "timezone", False))
        with self._engine.connect() as connection:  # the key check's own query, reading nothing
            connection.execute(self._key_query("").limit(0)).all()

    def _check_blocking(
        self, *, prefix: str, presented: str, checked_hash: str | None, rewrite: bool
    ) -> KeyCheck:
        # Never rewrites: the hashes are the web app's (bcrypt), and its table is only read.
        self.prepare()
        with self._engine.connect() as connection:
            rows = connection.execute(self._key_query(prefix)).all()
        if not rows:
            return KeyCheck(info=None, reason=f"no key has the prefix {prefix}")
        # Prefixes are not unique in the web app's schema: the hash decides between rows.
        row = next((row for row in rows if checked_hash and row.key_hash == checked_hash), None)
        if row is None:
            row = next((row for row in rows if _bcrypt_matches(row.key_hash, presented)), None)
        if row is None:
            logger.info("Rejected a wrong secret for web app key %s", prefix)
            return KeyCheck(info=None, reason="the secret does not match")
        if not row.is_active:
            return KeyCheck(info=None, reason="the key is inactive (is_active is false)")
        if row.user_exists is None:
            return KeyCheck(info=None, reason=f"the key's user {row.user_id} does not exist")
        expires_at = aware(row.expires_at) if row.expires_at is not None else None
        if expires_at is not None and expires_at <= datetime.now(UTC):
            return KeyCheck(info=None, reason=f"the key expired at {expires_at:%Y-%m-%d %H:%M}Z")
        info = ApiKeyInfo(
            id=str(row.id),
            name=row.name or "",
            prefix=prefix,
            scopes=_scopes(row.scopes, prefix),
            models=None,
            created_at=aware(row.created_at) if row.created_at is not None else None,
            store=self.kind,
            last_used_at=aware(row.last_used_at) if row.last_used_at is not None else None,
            expires_at=expires_at,
            owner=row.user_id,
        )
        return KeyCheck(info=info, key_hash=row.key_hash)

    @staticmethod
    def _key_query(prefix: str) -> Select[Any]:
        """The rows of ``prefix``, each with ``user_exists`` (its user's id, or null)."""
        return (
            select(_API_KEYS, _USERS.c.id.label("user_exists"))
            .select_from(_API_KEYS.outerjoin(_USERS, _USERS.c.id == _API_KEYS.c.user_id))
            .where(_API_KEYS.c.key_prefix == prefix)
        )

    def _write_last_used(self, uses: dict[KeyId, datetime]) -> None:
        if not self._record_last_used:
            return
        self.prepare()
        statement = (
            update(_API_KEYS)
            .where(_API_KEYS.c.id == bindparam("key_id"))
            .values(last_used_at=bindparam("moment"))
        )
        rows = [
            {
                "key_id": str(key_id),
                # A `timestamp` column (no zone) holds UTC wall time, as the web app writes it.
                "moment": moment if self._last_used_has_zone else moment.replace(tzinfo=None),
            }
            for key_id, moment in uses.items()
        ]
        try:
            with self._engine.begin() as connection:
                connection.execute(statement, rows)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != _INSUFFICIENT_PRIVILEGE:
                raise
            self._record_last_used = False
            logger.warning(
                "The database user of FICTURES_DATABASE_URL may not update %s.last_used_at; "
                "the server stops recording when web app keys were last used",
                TABLE_NAME,
            )

    def _dispose(self) -> None:
        self._engine.dispose()


def _bcrypt_matches(stored: str | None, presented: str) -> bool:
    if not stored:
        return False
    try:
        return bcrypt.checkpw(presented.encode()[:BCRYPT_MAX_BYTES], stored.encode())
    except ValueError:  # not a bcrypt hash
        logger.warning("A web app key row holds a key_hash that is not a bcrypt hash")
        return False


def _scopes(value: object, prefix: str) -> tuple[str, ...]:
    """The row's scopes: a JSON list of strings (text holding one is read too)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if isinstance(value, list) and all(isinstance(scope, str) for scope in value):
        return tuple(value)
    logger.warning("Web app key %s has scopes that are not a list of strings: none granted", prefix)
    return ()
