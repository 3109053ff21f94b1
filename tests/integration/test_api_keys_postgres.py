"""The API-key store on a real PostgreSQL server (``tests/postgres.py``), as on SQLite.

Each test gets a fresh database and runs the same ``StoreContract`` as SQLite does, the
rewriting of earlier versions' argon2id rows in place included.
"""

from __future__ import annotations

import uuid

import pytest

from fictures_ai.errors import ServiceUnavailableError
from fictures_ai.services.keys.local_store import ApiKeyService
from tests.postgres import PostgresServer
from tests.unit.test_api_keys import StoreContract

pytestmark = pytest.mark.integration


class TestStoreOnPostgres(StoreContract):
    @pytest.fixture
    def database_url(self, postgres_server: PostgresServer) -> str:
        name = f"keys_{uuid.uuid4().hex[:12]}"
        postgres_server.create_database(name)
        return postgres_server.url(name)


async def test_wrong_password_is_a_service_unavailable_error(
    postgres_server: PostgresServer,
) -> None:
    service = ApiKeyService(database_url=postgres_server.url("postgres", password="wrong"))
    try:
        assert "wrong" not in service.database_url
        with pytest.raises(ServiceUnavailableError):
            await service.verify("fai_abcdefgh_" + "x" * 43)
    finally:
        service.close()


def test_plain_postgresql_url_connects_through_psycopg(postgres_server: PostgresServer) -> None:
    postgres_server.create_database("plain_url")
    url = postgres_server.url("plain_url").replace("postgresql+psycopg://", "postgresql://")
    service = ApiKeyService(database_url=url)
    try:
        info, _ = service.create("plain", "stories:read")
        assert [key.id for key in service.list()] == [info.id]
    finally:
        service.close()
