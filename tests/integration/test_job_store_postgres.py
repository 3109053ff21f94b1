"""The job store on a real PostgreSQL server (``tests/postgres.py``): the same contract as on
SQLite (leases, exactly-once outcomes, concurrent workers, one final event)."""

from __future__ import annotations

import uuid

import pytest

from tests.postgres import PostgresServer
from tests.unit.test_jobs import JobStoreContract

pytestmark = pytest.mark.integration


class TestJobStoreOnPostgres(JobStoreContract):
    @pytest.fixture
    def database_url(self, postgres_server: PostgresServer) -> str:
        name = f"jobs_{uuid.uuid4().hex[:12]}"
        postgres_server.create_database(name)
        return postgres_server.url(name)
