"""The web app's keys on a real PostgreSQL holding its tables, made from the contract's columns.

Keys are made the web app's way (bcrypt, cost 10, ``$2a$``). The store must only read, and
write ``last_used_at``; a database user that may only read is enough for it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from fictures_ai.services.keys.base import KeyStoreSchemaError
from fictures_ai.services.keys.fictures_store import FicturesKeyStore
from fictures_ai.services.keys.local_store import TABLE_NAME, ApiKeyService
from fictures_ai.services.keys.stores import KeyStores, open_key_stores
from tests.postgres import PostgresServer
from tests.support import WebAppDatabase

pytestmark = pytest.mark.integration

CATALOG = """
SELECT c.relkind, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' ORDER BY 1, 2
"""


@pytest.fixture
def web_app(postgres_server: PostgresServer) -> Iterator[WebAppDatabase]:
    name = f"fictures_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    database = WebAppDatabase(postgres_server.url(name))
    database.create_tables()
    database.add_user()
    yield database
    database.dispose()


def catalog(database: WebAppDatabase) -> list[tuple[str, str]]:
    """Every table, index and sequence in the database's public schema."""
    with database.engine.connect() as connection:
        rows = connection.exec_driver_sql(CATALOG).all()
    return [(str(kind), str(name)) for kind, name in rows]


async def test_keys_made_the_web_apps_way_are_checked_as_the_contract_says(
    web_app: WebAppDatabase,
) -> None:
    valid_id, valid = web_app.add_key(scopes=["stories:write"])
    _, expired = web_app.add_key(expires_at=datetime.now(UTC) - timedelta(days=1))
    _, inactive = web_app.add_key(is_active=False)
    _, reader = web_app.add_key(scopes=["stories:read"])
    _, future = web_app.add_key(expires_at=datetime.now(UTC) + timedelta(days=1))
    before = catalog(web_app)
    store = FicturesKeyStore(database_url=web_app.url, cache_ttl_s=0.0)
    try:
        store.prepare()
        info = await store.verify(valid)
        assert info is not None
        assert (info.id, info.scopes, info.owner) == (valid_id, ("stories:write",), "user_1")
        assert await store.verify(valid[:-1] + ("x" if valid[-1] != "x" else "y")) is None
        assert await store.verify(expired) is None
        assert await store.verify(inactive) is None
        reader_info = await store.verify(reader)
        assert reader_info is not None
        assert not reader_info.has_scope("stories:write")
        assert await store.verify(future) is not None

        await store.flush_usage()
    finally:
        store.close()
    assert web_app.key_row(valid_id)["last_used_at"] is not None
    assert catalog(web_app) == before  # nothing created, altered or dropped


async def test_a_read_only_database_user_is_enough(
    web_app: WebAppDatabase, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    key_id, key = web_app.add_key()
    database = web_app.url.rsplit("/", 1)[1]
    postgres_server.execute(
        database,
        "CREATE ROLE reader LOGIN PASSWORD 'reader'",
        "GRANT SELECT ON api_keys, users TO reader",
    )
    url = f"postgresql://reader:reader@127.0.0.1:{postgres_server.port}/{database}"
    store = FicturesKeyStore(database_url=url, cache_ttl_s=0.0)
    caplog.set_level(logging.WARNING)
    try:
        assert await store.verify(key) is not None
        await store.flush_usage()  # refused: logged once, then no more attempts
        assert await store.verify(key) is not None
        await store.flush_usage()
    finally:
        store.close()
    assert caplog.text.count("may not update api_keys.last_used_at") == 1
    assert web_app.key_row(key_id)["last_used_at"] is None


async def test_the_servers_own_keys_may_live_in_the_web_apps_database(
    web_app: WebAppDatabase,
) -> None:
    _, theirs = web_app.add_key()
    ours = ApiKeyService(database_url=web_app.url, beside_web_app_keys=True)
    fictures = FicturesKeyStore(database_url=web_app.url)
    try:
        ours.prepare()
        fictures.prepare()
        _, own_key = ours.create("ops", "admin:all")
        assert await ours.verify(own_key) is not None
        assert await fictures.verify(theirs) is not None
    finally:
        ours.close()
        fictures.close()
    tables = {name for kind, name in catalog(web_app) if kind == "r"}
    assert tables == {"users", "api_keys", TABLE_NAME}


async def test_a_database_user_that_may_not_create_our_table_stops_start_up(
    web_app: WebAppDatabase, postgres_server: PostgresServer
) -> None:
    # Both URLs on the web app's database with a user that may only read: the server's own
    # table cannot be made there, which is a settings error, not an outage.
    database = web_app.url.rsplit("/", 1)[1]
    postgres_server.execute(
        database,
        "CREATE ROLE onlyreads LOGIN PASSWORD 'onlyreads'",
        "GRANT SELECT ON api_keys, users TO onlyreads",
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    )
    url = f"postgresql://onlyreads:onlyreads@127.0.0.1:{postgres_server.port}/{database}"
    stores = open_key_stores(
        database_url=url, fictures_database_url=url, pepper=None, cache_ttl_s=0.0
    )
    try:
        with pytest.raises(KeyStoreSchemaError, match="permission denied for schema public"):
            await stores.prepare()
    finally:
        stores.close()


@pytest.mark.parametrize(
    ("grants", "password", "message"),
    [
        ([], "secret", "permission denied for table api_keys"),
        (["GRANT SELECT ON api_keys TO {role}"], "secret", "permission denied for table users"),
        (["GRANT SELECT ON api_keys, users TO {role}"], "wrong", "password authentication"),
    ],
)
async def test_a_web_app_database_user_without_the_rights_stops_start_up(
    web_app: WebAppDatabase,
    postgres_server: PostgresServer,
    grants: list[str],
    password: str,
    message: str,
) -> None:
    database = web_app.url.rsplit("/", 1)[1]
    role = f"role_{uuid.uuid4().hex[:8]}"  # roles belong to the whole server
    postgres_server.execute(
        database,
        f"CREATE ROLE {role} LOGIN PASSWORD 'secret'",
        *(grant.format(role=role) for grant in grants),
    )
    url = f"postgresql://{role}:{password}@127.0.0.1:{postgres_server.port}/{database}"
    store = FicturesKeyStore(database_url=url)
    stores = KeyStores([store])
    try:
        with pytest.raises(KeyStoreSchemaError, match=message):
            await stores.prepare()
    finally:
        stores.close()


async def test_the_narrowest_grant_is_enough(
    web_app: WebAppDatabase, postgres_server: PostgresServer
) -> None:
    _, key = web_app.add_key()
    database = web_app.url.rsplit("/", 1)[1]
    postgres_server.execute(
        database,
        "CREATE ROLE narrow LOGIN PASSWORD 'narrow'",
        "GRANT SELECT ON api_keys TO narrow",
        "GRANT SELECT (id) ON users TO narrow",
        "GRANT UPDATE (last_used_at) ON api_keys TO narrow",
    )
    store = FicturesKeyStore(
        database_url=f"postgresql://narrow:narrow@127.0.0.1:{postgres_server.port}/{database}"
    )
    try:
        store.prepare()
        assert await store.verify(key) is not None
        await store.flush_usage()
    finally:
        store.close()
