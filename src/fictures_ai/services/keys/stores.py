"""The key stores a server accepts keys from, and the one place that opens them from settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from fictures_ai.database import default_database_url
from fictures_ai.services.keys.base import KeyStore, KeyStoreSchemaError, first_line
from fictures_ai.services.keys.fictures_store import FicturesKeyStore
from fictures_ai.services.keys.info import KeyCheck
from fictures_ai.services.keys.local_store import ApiKeyService

logger = logging.getLogger(__name__)


def open_key_stores(
    *,
    database_url: str | None,
    fictures_database_url: str | None,
    pepper: str | None,
    cache_ttl_s: float,
) -> KeyStores:
    """The server's own store (``database_url``, else the default SQLite file; its keys
    hashed with ``pepper``, ``API_KEY_PEPPER``) and, when ``fictures_database_url`` is given,
    the web app's.

    Raises ``sqlalchemy.exc.ArgumentError`` when a URL is not a database URL.
    """
    stores: list[KeyStore] = [
        ApiKeyService(
            database_url=database_url or default_database_url(),
            pepper=pepper,
            beside_web_app_keys=fictures_database_url is not None,
            cache_ttl_s=cache_ttl_s,
        )
    ]
    if fictures_database_url:
        stores.append(FicturesKeyStore(database_url=fictures_database_url, cache_ttl_s=cache_ttl_s))
    return KeyStores(stores)


class KeyStores:
    """The stores the server accepts keys from, each asked only for keys of its shape."""

    def __init__(self, stores: Sequence[KeyStore]) -> None:
        if not stores:
            raise ValueError("At least one key store is needed")
        self.stores = tuple(stores)

    def store_for(self, presented: str) -> KeyStore | None:
        """The store that would hold ``presented``, judged by its shape; None if none would."""
        for store in self.stores:
            if store.lookup_prefix(presented) is not None:
                return store
        return None

    async def check(self, presented: str) -> tuple[KeyStore | None, KeyCheck]:
        """Which store would hold ``presented``, and what it says of it now (uncached)."""
        store = self.store_for(presented)
        if store is None:
            kinds = " or ".join(store.kind for store in self.stores)
            return None, KeyCheck(info=None, reason=f"not shaped like a key of the {kinds} store")
        return store, await store.check(presented)

    async def prepare(self) -> None:
        """Create or check every store's tables before the server takes requests.

        Raises ``KeyStoreSchemaError`` (the server must not start) when a database holds the
        wrong tables or answers with an error (a wrong password, a missing database, a user
        that may not read a table or create ours). A database that cannot be reached now is only
        logged: key checks answer 503 until it can, and the tables are checked then.
        """
        for store in self.stores:
            try:
                await asyncio.to_thread(store.prepare)
            except OperationalError as exc:
                # The server answered with a refusal: the settings are wrong, not the network,
                # and waiting will not help. No answer at all (refused connection, time-out)
                # may pass: it is only logged.
                if _is_refusal(exc):
                    raise _refused(store, exc) from exc
                logger.error(
                    "The %s key database at %s cannot be reached (%s); key checks answer 503 "
                    "until it can",
                    store.kind,
                    store.description,
                    first_line(exc),
                )
            except SQLAlchemyError as exc:
                raise _refused(store, exc) from exc

    async def record_usage(self) -> None:
        """Write every store's last-use times in batches until cancelled."""
        await asyncio.gather(*(store.record_usage() for store in self.stores))

    def close(self) -> None:
        """Close every store."""
        for store in self.stores:
            store.close()


def _refused(store: KeyStore, exc: SQLAlchemyError) -> KeyStoreSchemaError:
    return KeyStoreSchemaError(
        f"The {store.kind} key store ({store.description}) failed its start-up checks: "
        f"{first_line(exc)}. Check the URL and its user's rights (the README lists them), or "
        "point it at another database."
    )


# libpq's words for a server that answered and said no (it sends no SQLSTATE before a session
# exists, so the message is all there is to go by).
_REFUSALS = (
    "password authentication failed",
    "authentication failed",
    "does not exist",  # database or role
    "no pg_hba.conf entry",
    "permission denied",
)


def _is_refusal(exc: OperationalError) -> bool:
    if getattr(exc.orig, "sqlstate", None):
        return True
    message = str(exc.orig).lower()
    return any(words in message for words in _REFUSALS)
