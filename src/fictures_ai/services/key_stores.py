"""The key stores a server accepts keys from, and the one place that opens them from settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from fictures_ai.services.api_keys import ApiKeyService
from fictures_ai.services.database import default_database_url
from fictures_ai.services.fictures_keys import FicturesKeyStore
from fictures_ai.services.key_store import ApiKeyInfo, KeyCheck, KeyStore

logger = logging.getLogger(__name__)


def open_key_stores(
    *, database_url: str | None, fictures_database_url: str | None, cache_ttl_s: float
) -> KeyStores:
    """The server's own store (``database_url``, else the default SQLite file) and, when
    ``fictures_database_url`` is given, the web app's.

    Raises ``sqlalchemy.exc.ArgumentError`` when a URL is not a database URL.
    """
    stores: list[KeyStore] = [
        ApiKeyService(
            database_url=database_url or default_database_url(),
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

    async def verify(self, presented: str) -> ApiKeyInfo | None:
        """The key's info if it is valid in its store, else None (see ``KeyStore.verify``)."""
        store = self.store_for(presented)
        return await store.verify(presented) if store is not None else None

    async def check(self, presented: str) -> tuple[KeyStore | None, KeyCheck]:
        """Which store would hold ``presented``, and what it says of it now (uncached)."""
        store = self.store_for(presented)
        if store is None:
            kinds = " or ".join(store.kind for store in self.stores)
            return None, KeyCheck(info=None, reason=f"not shaped like a key of the {kinds} store")
        return store, await store.check(presented)

    async def prepare(self) -> None:
        """Create or check every store's tables before the server takes requests.

        Raises ``KeyStoreSchemaError`` (the server must not start). A database that cannot be
        reached now is only logged: key checks answer 503 until it can, and the tables are
        checked then.
        """
        for store in self.stores:
            try:
                await asyncio.to_thread(store.prepare)
            except SQLAlchemyError as exc:
                logger.error(
                    "The %s key database at %s cannot be reached (%s); key checks answer 503 "
                    "until it can",
                    store.kind,
                    store.description,
                    type(exc).__name__,
                )

    async def record_usage(self) -> None:
        """Write every store's last-use times in batches until cancelled."""
        await asyncio.gather(*(store.record_usage() for store in self.stores))

    def close(self) -> None:
        """Close every store."""
        for store in self.stores:
            store.close()
