"""The web app's keys (``API_KEY_STORE=fictures``) on an SQLite copy of its tables; the chain of
stores; ``fictures-ai keys check``; the server's own table beside the web app's.

The same store runs against a real PostgreSQL in tests/integration/test_fictures_keys_postgres.py
and end to end in tests/e2e/test_fictures_web_app.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from fictures_ai.api.app import create_app
from fictures_ai.services.keys import fictures_store
from fictures_ai.services.keys.base import KeyStoreSchemaError
from fictures_ai.services.keys.fictures_store import FicturesKeyStore
from fictures_ai.services.keys.local_store import LEGACY_TABLE_NAME, TABLE_NAME, ApiKeyService
from fictures_ai.services.keys.stores import KeyStores
from fictures_ai.services.rate_limit import InMemoryRateLimiter
from tests.support import WebAppDatabase
from tests.unit.conftest import make_services
from tests.unit.test_api_keys import run_cli

CACHE_TTL_S = 0.3
ROUNDS = 4  # bcrypt's cheapest cost keeps these tests fast; the e2e test uses the web app's 10


@pytest.fixture
def web_app(tmp_path: Path) -> Iterator[WebAppDatabase]:
    database = WebAppDatabase(f"sqlite:///{tmp_path / 'web-app.db'}")
    database.create_tables()
    database.add_user()
    yield database
    database.dispose()


@pytest.fixture
def store(web_app: WebAppDatabase) -> Iterator[FicturesKeyStore]:
    store = FicturesKeyStore(database_url=web_app.url, cache_ttl_s=CACHE_TTL_S)
    yield store
    store.close()


async def test_a_valid_key_has_its_rows_scopes(
    web_app: WebAppDatabase, store: FicturesKeyStore
) -> None:
    key_id, key = web_app.add_key(scopes=["stories:write", "comics:draw"], rounds=ROUNDS)

    info = await store.verify(key)

    assert info is not None
    assert (info.id, info.store, info.owner, info.name) == (key_id, "fictures", "user_1", "my key")
    assert info.scopes == ("stories:write", "comics:draw")
    assert info.has_scope("stories:read")
    assert not info.has_scope("admin:all")
    assert info.display_prefix == key[:16]
    assert info.client_id == f"key:fictures:{key_id}"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"is_active": False}, "inactive"),
        ({"expires_at": datetime.now(UTC) - timedelta(minutes=1)}, "expired"),
    ],
)
async def test_inactive_and_expired_keys_are_refused(
    web_app: WebAppDatabase, store: FicturesKeyStore, row: dict[str, object], reason: str
) -> None:
    _, key = web_app.add_key(rounds=ROUNDS, **row)  # type: ignore[arg-type]
    assert await store.verify(key) is None
    check = await store.check(key)
    assert check.info is None
    assert reason in (check.reason or "")


async def test_wrong_secret_unknown_prefix_and_other_shapes_are_refused(
    web_app: WebAppDatabase, store: FicturesKeyStore
) -> None:
    _, key = web_app.add_key(rounds=ROUNDS)
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    unknown = "fic_" + "z" * 12 + key[16:]
    assert await store.verify(wrong) is None
    assert (await store.check(wrong)).reason == "the secret does not match"
    assert await store.verify(unknown) is None
    assert "no key has the prefix" in ((await store.check(unknown)).reason or "")
    for malformed in ("fic_" + "a" * 31, "fic_" + "a" * 125, "fai_" + key[4:], key + "+"):
        assert store.lookup_prefix(malformed) is None
        assert await store.verify(malformed) is None
    # An older key shape the web app also accepts: fic_ and 43 characters, no second "_".
    assert store.lookup_prefix("fic_" + "b" * 43) == "fic_" + "b" * 12


async def test_a_key_whose_user_is_gone_is_refused(
    web_app: WebAppDatabase, store: FicturesKeyStore
) -> None:
    _, key = web_app.add_key(user_id="ghost", rounds=ROUNDS)
    assert await store.verify(key) is None
    assert (await store.check(key)).reason == "the key's user ghost does not exist"


async def test_a_key_made_inactive_stops_working_within_the_cache_time(
    web_app: WebAppDatabase, store: FicturesKeyStore
) -> None:
    key_id, key = web_app.add_key(rounds=ROUNDS)
    assert await store.verify(key) is not None

    web_app.set_active(key_id, False)
    await asyncio.sleep(CACHE_TTL_S + 0.05)

    assert await store.verify(key) is None


async def test_a_key_expiring_while_cached_stops_at_its_expiry(
    web_app: WebAppDatabase, tmp_path: Path
) -> None:
    store = FicturesKeyStore(database_url=web_app.url, cache_ttl_s=60)
    try:
        _, key = web_app.add_key(rounds=ROUNDS, expires_at=datetime.now(UTC) + timedelta(seconds=1))
        assert await store.verify(key) is not None
        await asyncio.sleep(1.1)
        assert await store.verify(key) is None  # the cache holds it for 60 s, the expiry wins
    finally:
        store.close()


async def test_a_recheck_skips_bcrypt_while_the_hash_is_unchanged(
    web_app: WebAppDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FicturesKeyStore(database_url=web_app.url, cache_ttl_s=0.0)
    try:
        _, key = web_app.add_key(rounds=ROUNDS)
        assert await store.verify(key) is not None
        monkeypatch.setattr(fictures_store, "_bcrypt_matches", pytest.fail)
        assert await store.verify(key) is not None  # the row is read again; bcrypt is not
    finally:
        store.close()


async def test_last_used_at_is_written_in_batches_and_nothing_else_changes(
    web_app: WebAppDatabase, store: FicturesKeyStore
) -> None:
    key_id, key = web_app.add_key(rounds=ROUNDS)
    before = web_app.key_row(key_id)
    tables = web_app.table_names()

    for _ in range(3):
        assert await store.verify(key) is not None
    assert web_app.key_row(key_id)["last_used_at"] is None  # not on the request path
    await store.flush_usage()

    after = web_app.key_row(key_id)
    assert after["last_used_at"] is not None
    assert abs(after["last_used_at"] - datetime.now(UTC).replace(tzinfo=None)) < timedelta(
        seconds=5
    )  # naive UTC, as the web app's `timestamp` column holds it
    assert {k: v for k, v in after.items() if k != "last_used_at"} == {
        k: v for k, v in before.items() if k != "last_used_at"
    }
    assert web_app.table_names() == tables  # nothing created


def test_prepare_refuses_a_database_without_the_web_apps_tables(tmp_path: Path) -> None:
    store = FicturesKeyStore(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(KeyStoreSchemaError, match="has no table api_keys"):
            store.prepare()
    finally:
        store.close()


def test_prepare_refuses_an_api_keys_table_that_is_not_the_web_apps(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ours.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE api_keys (id integer, prefix text, hash text)"))
        connection.execute(sa.text("CREATE TABLE users (id text)"))
    engine.dispose()
    store = FicturesKeyStore(database_url=url)
    try:
        with pytest.raises(KeyStoreSchemaError, match="lacks the columns"):
            store.prepare()
    finally:
        store.close()


async def test_the_chain_asks_the_store_whose_keys_look_like_the_key(
    web_app: WebAppDatabase, tmp_path: Path
) -> None:
    local = ApiKeyService(database_url=f"sqlite:///{tmp_path / 'ours.db'}")
    fictures = FicturesKeyStore(database_url=web_app.url)
    stores = KeyStores([local, fictures])
    try:
        _, ours = local.create("ops", "admin:all")
        _, theirs = web_app.add_key(rounds=ROUNDS)
        assert stores.store_for(ours) is local
        assert stores.store_for(theirs) is fictures
        assert stores.store_for("sk-something") is None
        assert (await local.verify(ours)).store == "local"  # type: ignore[union-attr]
        assert (await fictures.verify(theirs)).store == "fictures"  # type: ignore[union-attr]
        store, check = await stores.check("sk-something")
        assert store is None
        assert check.reason == "not shaped like a key of the local or fictures store"
    finally:
        stores.close()


async def test_rate_limits_are_per_key_whichever_store_it_came_from(
    web_app: WebAppDatabase, tmp_path: Path
) -> None:
    local = ApiKeyService(database_url=f"sqlite:///{tmp_path / 'ours.db'}")
    fictures = FicturesKeyStore(database_url=web_app.url)
    limiter = InMemoryRateLimiter(requests_per_minute=1, tokens_per_minute=0, images_per_minute=0)
    app = create_app(services=make_services(api_keys=[local, fictures], rate_limiter=limiter))
    _, ours = local.create("ops", "stories:read")
    _, theirs = web_app.add_key(rounds=ROUNDS)
    _, also_theirs = web_app.add_key(rounds=ROUNDS)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            for key in (ours, theirs, also_theirs):
                first = await client.get("/api/v1/models", headers={"x-api-key": key})
                second = await client.get("/api/v1/models", headers={"x-api-key": key})
                assert first.status_code == 200
                assert second.status_code == 429
    finally:
        local.close()
        fictures.close()


# The server's own table beside the web app's


async def start_server(store: ApiKeyService) -> None:
    """Run the app's start-up on ``store``; it must refuse to start."""
    app = create_app(services=make_services(api_keys=store))
    async with app.router.lifespan_context(app):
        pytest.fail("the server started")


def test_both_urls_may_name_one_database(web_app: WebAppDatabase) -> None:
    local = ApiKeyService(database_url=web_app.url, beside_web_app_keys=True)
    try:
        info, _ = local.create("ops", "admin:all")
        assert [key.id for key in local.list()] == [info.id]
    finally:
        local.close()
    assert web_app.table_names() == {"users", "api_keys", TABLE_NAME}
    with web_app.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM api_keys")).scalar_one() == 0


def test_keys_of_an_earlier_versions_table_are_taken_over_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = ApiKeyService(database_url=url)
    try:
        info, key = old.create("kept", "stories:write")
    finally:
        old.close()
    engine = sa.create_engine(url)  # what 0.1 had: the same table under the name api_keys
    with engine.begin() as connection:
        connection.execute(sa.text(f"ALTER TABLE {TABLE_NAME} RENAME TO {LEGACY_TABLE_NAME}"))
        connection.execute(sa.text("DROP INDEX IF EXISTS ux_fictures_ai_api_keys_active_name"))
        connection.execute(sa.text("DROP INDEX IF EXISTS ix_fictures_ai_api_keys_prefix"))
    engine.dispose()

    caplog.set_level(logging.WARNING)
    for _ in range(2):
        upgraded = ApiKeyService(database_url=url)
        try:
            assert [key_info.name for key_info in upgraded.list()] == ["kept"]
            assert asyncio.run(upgraded.verify(key)) is not None
        finally:
            upgraded.close()
    assert caplog.text.count("Copied 1 API keys from the table api_keys") == 1


def test_a_foreign_table_under_our_name_stops_the_server_at_start_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'clash.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {TABLE_NAME} (id integer, secret text)"))
    engine.dispose()
    with pytest.raises(KeyStoreSchemaError, match="is not the server's key table"):
        asyncio.run(start_server(ApiKeyService(database_url=url)))


def test_the_original_ai_servers_set_up_is_a_clear_start_up_error(
    web_app: WebAppDatabase,
) -> None:
    # DATABASE_URL pointed at the web app's database, as the original ai-server had it, and no
    # API_KEY_STORE: the web app's keys would all be refused, so the server does not start.
    with pytest.raises(KeyStoreSchemaError, match="set API_KEY_STORE=fictures"):
        asyncio.run(start_server(ApiKeyService(database_url=web_app.url)))
    assert web_app.table_names() == {"users", "api_keys"}  # refused before creating anything


# fictures-ai keys check


def test_keys_check_says_which_store_accepts_a_key_and_its_scopes(
    web_app: WebAppDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours_url = f"sqlite:///{tmp_path / 'ours.db'}"
    key_id, theirs = web_app.add_key(scopes=["stories:write"], rounds=ROUNDS)
    assert run_cli("keys", "create", "--name", "ops", "--scopes", "admin:all",
                   "--database-url", ours_url) == 0  # fmt: skip
    ours = capsys.readouterr().out.splitlines()[-1]
    common = ["--database-url", ours_url, "--fictures-database-url", web_app.url]

    assert run_cli("keys", "check", theirs, *common) == 0
    out = capsys.readouterr().out
    assert out.startswith("Accepted by the fictures store (the web app's table api_keys at")
    assert f"(id {key_id}, name 'my key', user user_1)" in out
    assert "scopes:  stories:write" in out
    assert theirs[16:] not in out

    assert run_cli("keys", "check", ours, *common) == 0
    assert "Accepted by the local store" in capsys.readouterr().out

    web_app.set_active(key_id, False)
    assert run_cli("keys", "check", theirs, *common) == 3
    assert "Refused by the fictures store" in capsys.readouterr().out

    # Without the web app's database the key's store is not asked.
    assert run_cli("keys", "check", theirs, "--database-url", ours_url) == 3
    assert "not shaped like a key of the local store" in capsys.readouterr().out
    assert web_app.key_row(key_id)["last_used_at"] is None  # a check records no use


# What the routes make of the web app's keys


@pytest.fixture
async def app_client(
    web_app: WebAppDatabase, store: FicturesKeyStore
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services=make_services(api_keys=store))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


@pytest.mark.parametrize("scopes", [[], ["ai:use"], ["stories:read"]])
async def test_model_listings_take_any_valid_key(
    web_app: WebAppDatabase, app_client: httpx.AsyncClient, scopes: list[str]
) -> None:
    _, key = web_app.add_key(scopes=scopes, rounds=ROUNDS)
    headers = {"x-api-key": key}
    for path in ("/api/v1/models", "/api/v1/text/models", "/api/v1/images/models", "/v1/models"):
        assert (await app_client.get(path, headers=headers)).status_code == 200, path
    generate = await app_client.post("/api/v1/text/generate", json={"prompt": "x"}, headers=headers)
    assert generate.status_code == 403
    assert generate.json() == {"detail": "Insufficient permissions. Required scope: stories:write"}


async def test_an_unrelated_bearer_token_does_not_hide_the_x_api_key(
    web_app: WebAppDatabase, app_client: httpx.AsyncClient
) -> None:
    _, key = web_app.add_key(rounds=ROUNDS)
    body = {"prompt": "x", "max_tokens": 2}
    headers = {"Authorization": "Bearer a-session-token-of-someone-else", "x-api-key": key}
    assert (
        await app_client.post("/api/v1/text/generate", json=body, headers=headers)
    ).status_code == 200
    # A key-shaped but wrong Bearer is the key presented: it is refused.
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    headers = {"Authorization": f"Bearer {wrong}", "x-api-key": key}
    assert (
        await app_client.post("/api/v1/text/generate", json=body, headers=headers)
    ).status_code == 401


def test_keys_commands_report_bad_settings_and_hint_at_the_web_apps_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_KEY_STORE", "Fictures")
    assert run_cli("keys", "list", "--database-url", f"sqlite:///{tmp_path / 'k.db'}") == 2
    assert "API_KEY_STORE='Fictures': Input should be 'local' or 'fictures'" in (
        capsys.readouterr().err
    )
    monkeypatch.delenv("API_KEY_STORE")
    assert run_cli("keys", "list", "--database-url", "mysql://u:p@db/keys") == 2
    assert "mysql is not supported" in capsys.readouterr().err
    key = "fic_" + "a" * 12 + "_" + "b" * 43
    assert run_cli("keys", "check", key, "--database-url", f"sqlite:///{tmp_path / 'k.db'}") == 3
    assert "set API_KEY_STORE=fictures and FICTURES_DATABASE_URL" in capsys.readouterr().out
