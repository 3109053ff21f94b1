"""SQL databases through SQLAlchemy: URLs, engines, and the name space of the server's tables.

Two databases may be in play: the server's own (``DATABASE_URL``; an SQLite file in the user
data folder by default) and, with ``API_KEY_STORE=fictures``, the Fictures web app's PostgreSQL
(``FICTURES_DATABASE_URL``), which the server only reads (and where it may update
``api_keys.last_used_at``). Both URLs may name the same database, so every table of the server
is named with :data:`TABLE_PREFIX`: the web app's tables (``api_keys``, ``users``, ...) can never
be taken for ours, nor ours for theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from platformdirs import user_data_dir
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from fictures_ai.redaction import mask_url

TABLE_PREFIX = "fictures_ai_"
"""Start of the name of every table the server creates in its own database."""

CONNECT_TIMEOUT_S = 10
"""How long opening a PostgreSQL connection may take before it counts as unreachable."""

SUPPORTED_BACKENDS = ("postgresql", "sqlite")
"""The databases whose drivers are installed."""

_ENCODING_HINT = "(@ is %40, : is %3A, / is %2F, # is %23, % is %25)"


def default_database_url() -> str:
    """The SQLite file in the user data dir (``.../fictures-ai/fictures-ai.db``).

    Free of side effects, so that it can serve as a settings default; the store creates the
    folder when it first opens the database.
    """
    path = Path(user_data_dir("fictures-ai")) / "fictures-ai.db"
    return f"sqlite:///{path}"


def parse_database_url(database_url: str) -> URL:
    """The SQLAlchemy URL of ``database_url``, of any database.

    Raises ``sqlalchemy.exc.ArgumentError`` for a string that is not one, with a message that
    never quotes it: SQLAlchemy's own errors may quote a piece of a password (an unencoded
    ``@`` makes the rest of the password the host, and a ``:`` in it the port).
    """
    try:
        url = make_url(database_url)
    except ValueError:  # the port is not a number
        raise ArgumentError(
            "its port is not a number, or a special character in its user name or password "
            f"is not percent-encoded {_ENCODING_HINT}"
        ) from None
    if url.host and "@" in url.host:
        raise ArgumentError(
            f"an @ in its user name or password is not percent-encoded {_ENCODING_HINT}"
        )
    return url


def normalise_url(database_url: str) -> URL:
    """The SQLAlchemy URL; a plain ``postgresql://`` URL uses psycopg 3 (psycopg2 is absent).

    Raises ``sqlalchemy.exc.ArgumentError`` for a string that is not a database URL, or one of
    a database other than PostgreSQL and SQLite (the only drivers installed).
    """
    url = parse_database_url(database_url)
    if url.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ArgumentError(
            f"{url.get_backend_name()} is not supported: use a PostgreSQL URL "
            "(postgresql://user:password@host:5432/db) or an SQLite one (sqlite:///path)"
        )
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def masked(url: URL) -> str:
    """The URL with its password hidden (safe to log and to print), and a password given as a
    query parameter (``?password=...``, which psycopg accepts too)."""
    return mask_url(url.render_as_string(hide_password=True))


def sqlite_file(url: URL) -> Path | None:
    """The file of an SQLite URL; None for other databases, in-memory SQLite and URIs."""
    if url.get_backend_name() != "sqlite" or _sqlite_in_memory(url) or url.database is None:
        return None
    if url.database.startswith("file:"):  # an SQLite URI filename: SQLite resolves it
        return None
    return Path(url.database).expanduser()


def create_database_engine(url: URL) -> Engine:
    """An engine for ``url``: pooled and pre-pinged for servers, WAL mode for SQLite files.

    ``hide_parameters``: a failed statement would otherwise print its parameters (a key's hash)
    in the exception text, and from there in the logs.
    """
    if url.get_backend_name() != "sqlite":
        connect_args = (
            {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
        )
        return create_engine(
            url, pool_pre_ping=True, hide_parameters=True, connect_args=connect_args
        )
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


def _sqlite_in_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
