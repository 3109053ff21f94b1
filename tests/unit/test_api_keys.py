"""The API-key store on SQLite: keys, hashes, scopes, models, revocation, cache, CLI.

``StoreContract`` holds the tests every database must pass; ``TestStoreOnSqlite`` runs them on
an SQLite file here, and tests/integration/test_api_keys_postgres.py on a real PostgreSQL.
Among them, the migration of earlier versions' argon2id rows to the keyed digest.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher, Type

from fictures_ai import database
from fictures_ai.cli.keys import add_key_commands, run_key_command
from fictures_ai.database import default_database_url, normalise_url
from fictures_ai.errors import InvalidRequestError, ServiceUnavailableError
from fictures_ai.services.keys import base, hashing, local_store
from fictures_ai.services.keys.hashing import KeyHasher
from fictures_ai.services.keys.info import ApiKeyInfo
from fictures_ai.services.keys.local_store import ApiKeyNotFoundError, ApiKeyService
from fictures_ai.services.keys.scopes import Scope, parse_models, parse_scopes, scope_allows

KEY_FORMAT = re.compile(r"fai_[a-z0-9]{8}_[A-Za-z0-9_-]{43}")
DIGEST_FORMAT = re.compile(r"\$(sha256|hmac-sha256)\$[0-9a-f]{64}")
CACHE_TTL_S = 0.5
PEPPER = "pepper-0123456789abcdef0123456789abcdef"
OTHER_PEPPER = "pepper-fedcba9876543210fedcba9876543210"
# What versions before the keyed digest stored: argon2id with OWASP's minimum parameters.
LEGACY_HASHER = PasswordHasher(
    time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
)
REPO_ROOT = Path(__file__).resolve().parents[2]

# `fictures-ai keys ...` without the rest of the CLI: the same parser the real command mounts.
CLI_SNIPPET = (
    "import argparse, sys\n"
    "from fictures_ai.cli.keys import add_key_commands, run_key_command\n"
    "parser = argparse.ArgumentParser(prog='fictures-ai')\n"
    "add_key_commands(parser.add_subparsers(dest='command', required=True))\n"
    "sys.exit(run_key_command(parser.parse_args(sys.argv[1:])))\n"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fictures-ai")
    add_key_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def run_cli(*argv: str) -> int:
    return run_key_command(build_parser().parse_args(list(argv)))


def run_cli_process(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", CLI_SNIPPET, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def read_rows(database_url: str) -> list[dict[str, Any]]:
    """The server's key table as stored, read around the service."""
    engine = sa.create_engine(normalise_url(database_url))
    try:
        with engine.connect() as connection:
            result = connection.execute(
                sa.text(f"SELECT * FROM {local_store.TABLE_NAME} ORDER BY id")
            )
            return [dict(row) for row in result.mappings()]
    finally:
        engine.dispose()


def write_hash(database_url: str, key_id: object, stored: str) -> None:
    """Put ``stored`` in a key's row, around the service (as an earlier version wrote it)."""
    engine = sa.create_engine(normalise_url(database_url))
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(f"UPDATE {local_store.TABLE_NAME} SET hash = :stored WHERE id = :id"),
                {"stored": stored, "id": key_id},
            )
    finally:
        engine.dispose()


class NoArgon2:
    """Stands in for argon2 where it must not be called again."""

    def verify(self, stored: str, presented: str) -> bool:
        pytest.fail("argon2 was called for a row already migrated")


def secret_of(key: str) -> str:
    """The 43-character secret of ``fai_<prefix>_<secret>``; it may itself contain '_'."""
    return key.split("_", 2)[2]


def other_secret(key: str) -> str:
    """The same prefix with a different secret of the right shape."""
    last = "A" if key[-1] != "A" else "B"
    return key[:-1] + last


class StoreContract:
    """Store behaviour every database backend must show; subclasses give ``database_url``."""

    @pytest.fixture
    def service(self, database_url: str) -> Iterator[ApiKeyService]:
        service = ApiKeyService(database_url=database_url, cache_ttl_s=CACHE_TTL_S)
        yield service
        service.close()

    @pytest.fixture
    def open_service(self, database_url: str) -> Iterator[Callable[..., ApiKeyService]]:
        """Opens services on the database with other options (a pepper, another TTL)."""
        opened: list[ApiKeyService] = []

        def open_one(**options: Any) -> ApiKeyService:
            opened.append(ApiKeyService(database_url=database_url, **options))
            return opened[-1]

        yield open_one
        for service in opened:
            service.close()

    @pytest.fixture
    def other_process(self, database_url: str) -> Iterator[ApiKeyService]:
        """A second service on the same database, as another server process would have."""
        service = ApiKeyService(database_url=database_url, cache_ttl_s=CACHE_TTL_S)
        yield service
        service.close()

    async def test_create_then_verify(self, service: ApiKeyService) -> None:
        info, key = service.create("writer", "stories:write")

        assert KEY_FORMAT.fullmatch(key)
        assert key.startswith(info.display_prefix + "_")
        assert info.name == "writer"
        assert info.scopes == ("stories:write",)
        assert info.models is None
        assert info.created_at.tzinfo is not None
        assert not info.revoked
        verified = await service.verify(key)
        assert verified is not None
        assert (verified.id, verified.prefix, verified.scopes) == (
            info.id,
            info.prefix,
            info.scopes,
        )
        assert verified.has_scope(Scope.STORIES_READ)
        assert not verified.has_scope(Scope.ADMIN_ALL)

    @pytest.mark.parametrize(("pepper", "scheme"), [(None, "$sha256$"), (PEPPER, "$hmac-sha256$")])
    async def test_database_holds_a_digest_not_the_key(
        self,
        open_service: Callable[..., ApiKeyService],
        database_url: str,
        pepper: str | None,
        scheme: str,
    ) -> None:
        service = open_service(pepper=pepper)
        first, key = service.create("first", "stories:read")
        service.create("second", "stories:read")

        rows = read_rows(database_url)
        secret = secret_of(key)
        assert rows[0]["prefix"] == first.prefix
        assert rows[0]["hash"] == KeyHasher(pepper).hash(key)
        for row in rows:
            assert row["hash"].startswith(scheme)
            assert DIGEST_FORMAT.fullmatch(row["hash"])
            for value in row.values():
                assert key not in str(value)
                assert secret not in str(value)
        assert rows[0]["hash"] != rows[1]["hash"]
        assert await service.verify(key) is not None

    async def test_a_pepper_is_needed_to_verify_keys_made_with_it(
        self, open_service: Callable[..., ApiKeyService]
    ) -> None:
        peppered = open_service(pepper=PEPPER, cache_ttl_s=0.0)
        info, key = peppered.create("peppered", "stories:read")

        assert await peppered.verify(key) is not None
        assert await open_service(pepper=PEPPER).verify(key) is not None  # another process
        assert await open_service(pepper=OTHER_PEPPER).verify(key) is None
        assert await open_service().verify(key) is None
        unpeppered = await open_service().check(key)
        assert unpeppered.reason == "the key's hash needs API_KEY_PEPPER, which is not set"
        changed = await open_service(pepper=OTHER_PEPPER).check(key)
        assert changed.reason is not None
        assert "API_KEY_PEPPER changed" in changed.reason
        assert await peppered.verify(other_secret(key)) is None
        # Failed checks under another pepper rewrote nothing.
        assert await peppered.verify(key) is not None

    async def test_the_log_says_why_peppered_keys_are_refused(
        self, open_service: Callable[..., ApiKeyService], caplog: pytest.LogCaptureFixture
    ) -> None:
        peppered = open_service(pepper=PEPPER)
        info, key = peppered.create("peppered", "stories:read")
        peppered.create("revoked", "stories:read")
        peppered.revoke("revoked")
        caplog.set_level(logging.INFO, logger=local_store.__name__)

        def logged() -> list[tuple[int, str]]:
            records = [r for r in caplog.records if r.name == local_store.__name__]
            caplog.clear()
            return [(record.levelno, record.getMessage()) for record in records]

        # Without the pepper: one warning at start-up (the revoked key is not counted)...
        unpeppered = open_service()
        unpeppered.prepare()
        ((level, start_up),) = logged()
        assert level == logging.WARNING
        assert start_up.startswith("API_KEY_PEPPER is not set, but 1 active API key(s) in ")
        assert "cannot verify (each gets 401) until API_KEY_PEPPER is set" in start_up
        # ... and each refusal says why, as a warning: the set-up is wrong, not the key.
        assert await unpeppered.verify(key) is None
        assert logged() == [
            (
                logging.WARNING,
                f"Rejected API key {info.display_prefix}: "
                "the key's hash needs API_KEY_PEPPER, which is not set",
            )
        ]
        # Another pepper cannot be told from a wrong key: no start-up warning, info per key.
        other = open_service(pepper=OTHER_PEPPER)
        other.prepare()
        assert logged() == []
        assert await other.verify(key) is None
        assert logged() == [
            (
                logging.INFO,
                f"Rejected API key {info.display_prefix}: "
                "the secret does not match (or API_KEY_PEPPER changed since the key was made)",
            )
        ]
        # `keys check` prints the reason itself; the log stays quiet.
        assert (await unpeppered.check(key)).reason is not None
        assert logged() == []

    async def test_no_pepper_warning_without_peppered_keys(
        self, open_service: Callable[..., ApiKeyService], caplog: pytest.LogCaptureFixture
    ) -> None:
        _, key = open_service().create("plain", "stories:read")
        caplog.set_level(logging.INFO, logger=local_store.__name__)
        open_service().prepare()
        assert await open_service().verify(other_secret(key)) is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    @pytest.mark.parametrize(("pepper", "scheme"), [(None, "$sha256$"), (PEPPER, "$hmac-sha256$")])
    async def test_an_argon2_row_is_migrated_on_its_first_verification(
        self,
        open_service: Callable[..., ApiKeyService],
        database_url: str,
        monkeypatch: pytest.MonkeyPatch,
        pepper: str | None,
        scheme: str,
    ) -> None:
        service = open_service(pepper=pepper, cache_ttl_s=0.0)
        info, key = service.create("legacy", "stories:write")
        legacy = LEGACY_HASHER.hash(key)
        write_hash(database_url, info.id, legacy)

        verified = await service.verify(key)

        assert verified is not None
        assert verified.scopes == ("stories:write",)
        (row,) = read_rows(database_url)
        assert row["hash"].startswith(scheme)
        assert row["hash"] == KeyHasher(pepper).hash(key)
        # From now on argon2 is never called for this key: not on a re-check of the row that
        # the cache remembers, not on a check from scratch, not in another process.
        monkeypatch.setattr(hashing, "_ARGON2", NoArgon2())
        assert await service.verify(key) is not None
        service.clear_cache()
        assert await service.verify(key) is not None
        assert await open_service(pepper=pepper).verify(key) is not None
        assert await service.verify(other_secret(key)) is None
        (again,) = read_rows(database_url)
        assert again["hash"] == row["hash"]

    async def test_a_wrong_key_never_migrates_an_argon2_row(
        self, open_service: Callable[..., ApiKeyService], database_url: str
    ) -> None:
        service = open_service(pepper=PEPPER, cache_ttl_s=0.0)
        info, key = service.create("legacy", "stories:read")
        legacy = LEGACY_HASHER.hash(key)
        write_hash(database_url, info.id, legacy)

        assert await service.verify(other_secret(key)) is None
        assert (await service.check(other_secret(key))).reason == "the secret does not match"
        service.revoke("legacy")
        assert await service.verify(key) is None  # revoked: not even checked

        (row,) = read_rows(database_url)
        assert row["hash"] == legacy

    async def test_keys_check_accepts_an_argon2_row_without_rewriting_it(
        self, service: ApiKeyService, database_url: str
    ) -> None:
        info, key = service.create("legacy", "stories:read")
        legacy = LEGACY_HASHER.hash(key)
        write_hash(database_url, info.id, legacy)

        check = await service.check(key)

        assert check.accepted
        assert read_rows(database_url)[0]["hash"] == legacy

    async def test_a_pepper_set_later_keeps_sha256_rows_working_and_rewrites_them(
        self, open_service: Callable[..., ApiKeyService], database_url: str
    ) -> None:
        _, key = open_service().create("early", "stories:read")
        assert read_rows(database_url)[0]["hash"].startswith("$sha256$")

        assert await open_service(pepper=PEPPER).verify(key) is not None

        assert read_rows(database_url)[0]["hash"] == KeyHasher(PEPPER).hash(key)
        assert await open_service().verify(key) is None  # the pepper is needed from now on

    async def test_logs_never_hold_a_key_or_hash(
        self, service: ApiKeyService, database_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # statements and parameters
        info, key = service.create("logged", "stories:write")
        await service.verify(key)
        await service.verify(other_secret(key))
        service.clear_cache()
        await service.verify(key)
        service.list()
        service.revoke(info.name)
        await service.verify(key)

        (row,) = read_rows(database_url)
        secret = secret_of(key)
        assert info.display_prefix in caplog.text
        assert f"INSERT INTO {local_store.TABLE_NAME}" in caplog.text  # the statement log was on
        for forbidden in (secret, other_secret(key), row["hash"], row["hash"].split("$")[-1]):
            assert forbidden not in caplog.text

    async def test_wrong_or_malformed_keys_fail(self, service: ApiKeyService) -> None:
        info, key = service.create("client", "stories:read")
        assert await service.verify(key) is not None  # cached: must not excuse a wrong secret

        assert await service.verify(other_secret(key)) is None
        assert await service.verify(f"fai_zzzzzzzz_{key.rsplit('_', 1)[1]}") is None
        for bad in ("", "fai_", key[:-1], key + "x", key.upper(), f"Bearer {key}", "x" * 10_000):
            assert await service.verify(bad) is None
        assert await service.verify(key) is not None

    async def test_revoked_key_fails_at_once_in_the_revoking_service(
        self, service: ApiKeyService
    ) -> None:
        info, key = service.create("soon-gone", "stories:write")
        assert await service.verify(key) is not None  # now cached

        revoked, _ = service.revoke(info.name)

        assert revoked.revoked_at is not None
        assert await service.verify(key) is None

    async def test_revocation_during_a_check_wins(
        self, service: ApiKeyService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        info, key = service.create("racing", "stories:write")
        real_check = service._hasher.matches

        def revoke_meanwhile(stored: str, presented: str) -> bool:
            service.revoke(info.name)  # lands after the check read the still-active row
            return real_check(stored, presented)

        monkeypatch.setattr(service._hasher, "matches", revoke_meanwhile)

        assert await service.verify(key) is None
        monkeypatch.undo()
        assert await service.verify(key) is None

    async def test_revoked_key_fails_within_the_ttl_elsewhere(
        self, service: ApiKeyService, other_process: ApiKeyService
    ) -> None:
        info, key = service.create("shared", "stories:write")
        assert await other_process.verify(key) is not None  # cached over there

        service.revoke(info.prefix)
        revoked_at = time.monotonic()
        while await other_process.verify(key) is not None:
            assert time.monotonic() - revoked_at < CACHE_TTL_S + 1.0, "revocation never seen"
            await asyncio.sleep(0.05)
        assert time.monotonic() - revoked_at <= CACHE_TTL_S + 1.0

    async def test_revoke_by_id_prefix_or_name(self, service: ApiKeyService) -> None:
        by_id, _ = service.create("by-id", "stories:read")
        by_prefix, _ = service.create("by-prefix", "stories:read")
        by_name, key = service.create("by-name", "stories:read")

        assert service.revoke(str(by_id.id))[0].id == by_id.id
        assert service.revoke(by_prefix.display_prefix)[0].id == by_prefix.id
        first, newly = service.revoke("by-name")
        assert (first.id, newly) == (by_name.id, True)
        # Again: a no-op that keeps the first revocation time, and says so.
        again, newly = service.revoke("by-name")
        assert (again.revoked_at, newly) == (first.revoked_at, False)
        assert service.revoke(str(by_name.id)) == (again, False)
        assert all(info.revoked for info in service.list())
        with pytest.raises(ApiKeyNotFoundError, match="nobody"):
            service.revoke("nobody")
        with pytest.raises(ApiKeyNotFoundError):
            service.revoke("999999")

    async def test_names_are_checked_and_unique_among_active_keys(
        self, service: ApiKeyService
    ) -> None:
        service.create("team", "stories:read")
        with pytest.raises(ValueError, match="already exists"):
            service.create("team", "stories:write")
        service.revoke("team")
        renewed, _ = service.create("team", "stories:write")  # a revoked name is free again
        assert service.revoke("team")[0].id == renewed.id
        for bad in ("", "   ", "123", "a" * 65, "-lead", "semi;colon", "new\nline"):
            with pytest.raises(ValueError, match="Invalid key name"):
                service.create(bad, "stories:read")

    async def test_unknown_scope_is_refused_with_the_valid_ones(
        self, service: ApiKeyService
    ) -> None:
        with pytest.raises(ValueError, match="admin:all, stories:write, stories:read"):
            service.create("bad", "stories:read,stories:delete")
        with pytest.raises(ValueError, match="At least one scope"):
            service.create("bad", " , ")
        assert service.list() == []

    async def test_model_allow_list(self, service: ApiKeyService) -> None:
        _, limited_key = service.create("limited", "stories:write", models="tiny, smol,tiny")
        _, open_key = service.create("open", "stories:write")

        limited = await service.verify(limited_key)
        unlimited = await service.verify(open_key)

        assert limited is not None
        assert unlimited is not None
        assert limited.models == ("tiny", "smol")
        assert limited.allows_model("smol")
        assert not limited.allows_model("sdxl")
        assert unlimited.models is None
        assert unlimited.allows_model("anything")
        assert [info.models for info in service.list()] == [("tiny", "smol"), None]
        with pytest.raises(ValueError, match="empty"):
            service.create("none", "stories:read", models=" , ")

    async def test_list_shows_every_key_oldest_first(self, service: ApiKeyService) -> None:
        assert service.list() == []
        first, _ = service.create("one", "admin:all")
        second, _ = service.create("two", ["stories:read", "stories:write"])
        service.revoke("one")

        listed = service.list()

        assert [info.id for info in listed] == [first.id, second.id]
        assert listed[0].revoked
        assert listed[1].scopes == ("stories:read", "stories:write")
        assert [info.id for info in service.list(include_revoked=False)] == [second.id]

    async def test_last_used_at_is_recorded(self, service: ApiKeyService) -> None:
        info, key = service.create("tracked", "stories:read")
        assert info.last_used_at is None

        await service.verify(key)
        assert service.list()[0].last_used_at is None  # written in batches, off the request
        await service.flush_usage()

        (listed,) = service.list()
        assert listed.last_used_at is not None
        assert listed.last_used_at >= info.created_at

    async def test_concurrent_checks_of_one_key_share_one_hash_check(
        self, service: ApiKeyService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, key = service.create("burst", "stories:read")
        calls: list[str] = []
        real_check = service._hasher.matches

        def counting_check(stored: str, presented: str) -> bool:
            calls.append(presented[:12])
            return real_check(stored, presented)

        monkeypatch.setattr(service._hasher, "matches", counting_check)

        results = await asyncio.gather(*(service.verify(key) for _ in range(20)))
        wrong = await asyncio.gather(*(service.verify(other_secret(key)) for _ in range(20)))

        assert all(result is not None for result in results)
        assert all(result is None for result in wrong)
        assert len(calls) == 2
        # The rejection is cached too: repeating the wrong key costs no new check.
        assert await service.verify(other_secret(key)) is None
        assert len(calls) == 2

    async def test_expired_entry_is_rechecked_without_hashing_again(
        self, database_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        service = ApiKeyService(database_url=database_url, cache_ttl_s=0.0)
        try:
            _, key = service.create("rechecked", "stories:read")
            assert await service.verify(key) is not None
            monkeypatch.setattr(service._hasher, "matches", pytest.fail)
            assert await service.verify(key) is not None  # re-read the row, same hash: no hash
            service.revoke("rechecked")
            assert await service.verify(key) is None
        finally:
            service.close()

    async def test_verify_cost(
        self, service: ApiKeyService, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _, key = service.create("timed", "stories:write")
        backend = sa.make_url(service.database_url).get_backend_name()

        cold = []
        for _ in range(5):
            service.clear_cache()
            started = time.perf_counter()
            assert await service.verify(key) is not None
            cold.append(time.perf_counter() - started)
        count = 1000
        started = time.perf_counter()
        for _ in range(count):
            assert await service.verify(key) is not None
        cached = (time.perf_counter() - started) / count

        with capsys.disabled():
            print(
                f"\n[{backend}] verify: cached {cached * 1e6:.1f} us/verify "
                f"(mean of {count}); uncached (DB read + SHA-256) "
                f"median {sorted(cold)[2] * 1e3:.1f} ms"
            )
        assert cached < 1e-3  # generous: the hot path is a few microseconds

    async def test_cli_create_list_revoke_in_another_process(
        self, service: ApiKeyService, database_url: str
    ) -> None:
        created = run_cli_process(
            "keys", "create", "--name", "cli", "--scopes", "stories:write",
            "--models", "tiny", "--database-url", database_url,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        lines = created.stdout.splitlines()
        key = lines[-1]
        assert KEY_FORMAT.fullmatch(key)
        assert "shown only once" in created.stdout
        assert key not in created.stderr
        assert sum(key in line for line in lines) == 1
        info = await service.verify(key)
        assert info is not None
        assert info.models == ("tiny",)

        listed = run_cli_process("keys", "list", "--database-url", database_url)
        assert listed.returncode == 0, listed.stderr
        assert info.display_prefix in listed.stdout
        assert secret_of(key) not in listed.stdout

        revoked = run_cli_process("keys", "revoke", "cli", "--database-url", database_url)
        assert revoked.returncode == 0, revoked.stderr
        await asyncio.sleep(CACHE_TTL_S)
        assert await service.verify(key) is None


class TestStoreOnSqlite(StoreContract):
    @pytest.fixture
    def database_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/keys/fictures-ai.db"


# SQLite-only and backend-free behaviour


@pytest.mark.parametrize(
    ("granted", "required", "allowed"),
    [
        (["admin:all"], "admin:all", True),
        (["admin:all"], "stories:write", True),
        (["admin:all"], "stories:read", True),
        (["stories:write"], "admin:all", False),
        (["stories:write"], "stories:write", True),
        (["stories:write"], "stories:read", True),
        (["stories:read"], "stories:write", False),
        (["stories:read"], "stories:read", True),
        ([], "stories:read", False),
        (["stories:delete", "stories:read"], "stories:read", True),
        (["stories:delete"], "stories:read", False),
    ],
)
def test_scope_hierarchy(granted: list[str], required: str, allowed: bool) -> None:
    assert scope_allows(granted, required) is allowed


def test_scope_allows_refuses_an_unknown_required_scope() -> None:
    with pytest.raises(ValueError, match="Unknown scope 'stories:delete'"):
        scope_allows(["admin:all"], "stories:delete")


def test_parse_scopes_and_models() -> None:
    assert parse_scopes("stories:read, stories:write stories:read") == (
        "stories:read",
        "stories:write",
    )
    assert parse_scopes([Scope.ADMIN_ALL]) == ("admin:all",)
    assert parse_models(None) is None
    assert parse_models("a, b,,a") == ("a", "b")


def test_key_hasher_schemes() -> None:
    key = "fai_abcdefgh_" + "k" * 43
    plain, peppered = KeyHasher(), KeyHasher(PEPPER)

    assert plain.hash(key) == plain.hash(key)  # deterministic: 256 random bits need no salt
    assert plain.hash(key).startswith("$sha256$")
    assert peppered.hash(key).startswith("$hmac-sha256$")
    assert peppered.hash(key) != KeyHasher(OTHER_PEPPER).hash(key)
    for hasher in (plain, peppered):
        stored = hasher.hash(key)
        assert DIGEST_FORMAT.fullmatch(stored)
        assert hasher.is_current(stored)
        assert hasher.matches(stored, key)
        assert not hasher.matches(stored, key[:-1] + "x")
        assert not hasher.matches(stored.upper(), key)
    # A SHA-256 row is read with a pepper too (and rewritten); an HMAC row only with its pepper.
    assert peppered.matches(plain.hash(key), key)
    assert not peppered.is_current(plain.hash(key))
    assert not plain.matches(peppered.hash(key), key)
    assert not KeyHasher(OTHER_PEPPER).matches(peppered.hash(key), key)
    legacy = LEGACY_HASHER.hash(key)
    assert plain.matches(legacy, key)
    assert not plain.matches(legacy, key[:-1] + "x")
    assert not plain.is_current(legacy)
    assert hashing.scheme_of(legacy) == hashing.ARGON2
    for unknown in ("", "plain", "$md5$abc", "$sha256$", f"sha256${'0' * 64}"):
        assert hashing.scheme_of(unknown) is None
        assert not plain.matches(unknown, key)
        assert plain.mismatch_reason(unknown) == "the key's row holds a hash of no known scheme"
    with pytest.raises(ValueError, match="empty pepper"):
        KeyHasher("")


def test_the_keys_commands_hash_with_the_settings_pepper(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"
    monkeypatch.setenv("API_KEY_PEPPER", PEPPER)

    create = ("keys", "create", "--name", "ops", "--scopes", "admin:all", "--database-url", url)
    assert run_cli(*create) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert read_rows(url)[0]["hash"] == KeyHasher(PEPPER).hash(key)
    assert run_cli("keys", "check", key, "--database-url", url) == 0
    assert "Accepted by the local store" in capsys.readouterr().out

    monkeypatch.delenv("API_KEY_PEPPER")
    assert run_cli("keys", "check", key, "--database-url", url) == 3
    assert "needs API_KEY_PEPPER, which is not set" in capsys.readouterr().out


def test_api_key_info_is_frozen() -> None:
    service = ApiKeyService(database_url="sqlite://")
    try:
        info, _ = service.create("frozen", "stories:read")
    finally:
        service.close()
    assert isinstance(info, ApiKeyInfo)
    with pytest.raises(AttributeError):
        info.name = "thawed"  # type: ignore[misc]


async def test_in_memory_sqlite_is_shared_by_the_worker_threads() -> None:
    service = ApiKeyService(database_url="sqlite://")
    try:
        _, key = service.create("memory", "stories:read")
        assert await service.verify(key) is not None
    finally:
        service.close()


def test_default_database_url_is_in_the_user_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "user_data_dir", lambda app: str(tmp_path / "data" / app))

    url = default_database_url()

    assert url == f"sqlite:///{tmp_path}/data/fictures-ai/fictures-ai.db"
    assert not (tmp_path / "data").exists()  # no side effect until used
    service = ApiKeyService(database_url=url)
    try:
        service.create("first", "stories:read")
    finally:
        service.close()
    assert (tmp_path / "data" / "fictures-ai" / "fictures-ai.db").is_file()


def test_plain_postgresql_urls_use_psycopg_and_mask_the_password() -> None:
    service = ApiKeyService(database_url="postgresql://fictures:hunter2@db.example:5432/keys")
    try:
        assert service.database_url == "postgresql+psycopg://fictures:***@db.example:5432/keys"
    finally:
        service.close()


async def test_unreachable_database_is_a_service_unavailable_error(tmp_path: Path) -> None:
    (tmp_path / "a-folder.db").mkdir()  # SQLite cannot open a folder
    service = ApiKeyService(database_url=f"sqlite:///{tmp_path}/a-folder.db")
    try:
        with pytest.raises(ServiceUnavailableError) as caught:
            await service.verify("fai_abcdefgh_" + "x" * 43)
        assert caught.value.retry_after == base.STORE_RETRY_AFTER_S
    finally:
        service.close()


async def test_caches_stay_bounded(tmp_path: Path) -> None:
    service = ApiKeyService(
        database_url=f"sqlite:///{tmp_path}/keys.db", max_cache_entries=3, cache_ttl_s=60
    )
    try:
        keys = [service.create(f"k{i}", "stories:read")[1] for i in range(5)]
        for key in keys:
            assert await service.verify(key) is not None
            assert await service.verify(other_secret(key)) is None
        assert len(service._cache._positive) == 3
        assert len(service._cache._negative) == 3
        assert await service.verify(keys[0]) is not None  # evicted, checked again
    finally:
        service.close()


def test_name_that_is_also_another_keys_prefix_is_ambiguous(tmp_path: Path) -> None:
    service = ApiKeyService(database_url=f"sqlite:///{tmp_path}/keys.db")
    try:
        first, _ = service.create("first", "stories:read")
        service.create(first.prefix, "stories:read")  # a name that reads like a prefix
        with pytest.raises(InvalidRequestError, match="give the id"):
            service.revoke(first.prefix)
        assert service.revoke(first.display_prefix)[0].id == first.id
    finally:
        service.close()


# The CLI in-process


def test_cli_create_prints_the_key_alone_on_the_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"

    code = run_cli("keys", "create", "--name", "ci", "--scopes", "admin:all", "--database-url", url)

    out = capsys.readouterr().out
    assert code == 0
    *description, key = out.rstrip("\n").split("\n")
    assert KEY_FORMAT.fullmatch(key)
    text = "\n".join(description)
    assert "ci" in text
    assert "admin:all" in text
    assert key[: len("fai_") + 8] in text
    assert "shown only once" in text
    service = ApiKeyService(database_url=url)
    try:
        verified = asyncio.run(service.verify(key))
        assert verified is not None
        assert verified.scopes == ("admin:all",)
    finally:
        service.close()


def test_cli_list_and_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/keys.db")  # no flag: the env
    assert run_cli("keys", "list") == 0
    assert "no keys yet" in capsys.readouterr().out
    assert run_cli("keys", "create", "--name", "a", "--scopes", "stories:read") == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert (
        run_cli("keys", "create", "--name", "b", "--scopes", "stories:write", "--models", "m") == 0
    )
    capsys.readouterr()

    assert run_cli("keys", "revoke", "a") == 0
    assert "Revoked API key 'a'" in capsys.readouterr().out
    # Again: done already, so still exit 0, but it says so rather than claim to revoke it.
    assert run_cli("keys", "revoke", "a") == 0
    again = capsys.readouterr().out
    assert again.startswith(f"API key 'a' ({key[:12]}, id 1) was already revoked at ")
    assert again.rstrip().endswith("; nothing changed.")
    assert run_cli("keys", "list") == 0
    table = capsys.readouterr().out.splitlines()

    assert table[0].split() == ["ID", "NAME", "PREFIX", "SCOPES", "MODELS", "CREATED", "REVOKED"]
    assert len(table) == 3
    assert table[1].split()[:5] == ["1", "a", key[:12], "stories:read", "*"]
    assert table[1].split()[-1].endswith("Z")  # revoked
    assert table[2].split()[:5] == ["2", "b", table[2].split()[2], "stories:write", "m"]
    assert table[2].split()[-1] == "-"
    assert secret_of(key) not in "\n".join(table)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "--name", "x", "--scopes", "stories:everything"], "valid scopes"),
        (["create", "--name", "12", "--scopes", "stories:read"], "Invalid key name"),
        (["create", "--name", "x", "--scopes", "stories:read", "--models", ","], "empty"),
        (["revoke", "nobody"], "No API key"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = run_cli("keys", *argv, "--database-url", f"sqlite:///{tmp_path}/keys.db")

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert message in captured.err
