"""No credential ever shows: canary passwords in every setting that holds one, run through the
real server's start-up, requests and errors and through the CLI, appear in nothing they write.

The server runs with ``GENERATION_MODE=image`` (no vLLM to start) and debug logging, its keys
in a real PostgreSQL (hashed with a canary ``API_KEY_PEPPER``) and its rate limits in a real
Redis, both behind canary passwords, the web
app's database and the trace collector unreachable (their errors are logged), and Redis stopped
half-way (the limiter's error path). The passwords hold the characters that break naive masking
(@ # / : %), percent-encoded as a URL needs them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.e2e.conftest import CLI, start_server, stop_server
from tests.postgres import PostgresServer
from tests.redis_server import RedisServer
from tests.support import free_port

pytestmark = pytest.mark.e2e

CANARIES = {
    "DATABASE_URL": "canary-db-7f3a",
    "FICTURES_DATABASE_URL": "canary-web-2b9c",
    "REDIS_URL": "canary-redis-5d1e",
    "OTLP_ENDPOINT": "canary-otel-8a4f",
    "API_KEY_PEPPER": "canary-pepper-4e1f",
    # Not our setting (the OTel SDK reads it), but a credential the server process holds.
    "OTEL_EXPORTER_OTLP_HEADERS": "canary-otel-header-3c6b",
}
HARD_CHARACTERS = "@#/:%"
ROLE = "secret_keys"


def password(setting: str) -> str:
    return CANARIES[setting] + HARD_CHARACTERS


def encoded(setting: str) -> str:
    return quote(password(setting), safe="")


def pepper() -> str:
    """An API_KEY_PEPPER long enough to be accepted, holding its canary, and shaped like a URL
    (a URL's host and path are shown: the pepper must be hidden whole)."""
    return "https://" + CANARIES["API_KEY_PEPPER"] + "-" + "0123456789abcdef" * 2


def unreachable_database(setting: str) -> str:
    """A PostgreSQL URL with the setting's canary password on a port nothing listens on."""
    return f"postgresql://web:{encoded(setting)}@127.0.0.1:{free_port()}/fictures"


@pytest.fixture(scope="module")
def key_database(postgres_server: PostgresServer) -> str:
    """A database of its own for the server's keys, owned by a role whose password is the
    DATABASE_URL canary; its URL."""
    postgres_server.execute(
        "postgres",
        f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password('DATABASE_URL')}'",
        f"CREATE DATABASE {ROLE} OWNER {ROLE}",
    )
    return f"postgresql://{ROLE}:{encoded('DATABASE_URL')}@127.0.0.1:{postgres_server.port}/{ROLE}"


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password=password("REDIS_URL"))
    yield server
    server.stop()


class Written:
    """Everything the server and the CLI wrote, by where it came from."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def add(self, where: str, text: str) -> None:
        self.texts[f"{len(self.texts)}: {where}"] = text

    def response(self, response: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
        self.add(f"{response.request.method} {response.request.url.path}", headers + response.text)
        return response

    def cli(self, *args: str, env: dict[str, str], code: int) -> str:
        """Run ``fictures-ai args`` with ``env`` over the environment; check its exit code;
        return its stderr and stdout."""
        done = subprocess.run(
            [str(CLI), *args],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = done.stderr + done.stdout
        self.add(f"fictures-ai {' '.join(args)}", output)
        assert done.returncode == code, output
        return output

    def assert_no_canary(self) -> None:
        leaks = [
            f"{setting} canary in {where}"
            for where, text in self.texts.items()
            for setting, canary in CANARIES.items()
            if canary in text
        ]
        assert not leaks, leaks


def wait_for(log: Path, text: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"'{text}' never logged:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def test_the_server_shows_no_credential_from_start_up_to_shutdown(
    key_database: str, redis_with_password: RedisServer, tmp_path: Path
) -> None:
    written = Written()
    collector = f"127.0.0.1:{free_port()}"  # nothing listens: every export fails
    env = {
        "GENERATION_MODE": "image",
        "LOG_LEVEL": "DEBUG",
        "DATABASE_URL": key_database,
        "API_KEY_PEPPER": pepper(),
        "API_KEY_STORE": "fictures",
        "FICTURES_DATABASE_URL": unreachable_database("FICTURES_DATABASE_URL"),
        "REDIS_URL": redis_with_password.url,
        "RATE_LIMIT_PER_MINUTE": "1000",
        "OTLP_ENDPOINT": f"http://otel:{encoded('OTLP_ENDPOINT')}@{collector}",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20"
        + encoded("OTEL_EXPORTER_OTLP_HEADERS"),
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    output = written.cli(
        "keys", "create", "--name", "canary", "--scopes", "stories:write", env=env, code=0
    )
    key = output.strip().splitlines()[-1]
    log = tmp_path / "server.log"
    process, url = start_server(env, log)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            good = {"Authorization": f"Bearer {key}"}
            for path in (
                "/",
                "/health",
                "/health/live",
                "/health/ready",
                "/metrics",
                "/openapi.json",
            ):
                written.response(http.get(path))
            # Through the key database and Redis, both logged in with their canaries.
            models = written.response(http.get("/api/v1/models", headers=good))
            assert models.status_code == 200, models.text
            assert "x-ratelimit-remaining-requests" in models.headers
            assert written.response(http.get("/v1/models", headers=good)).status_code == 200
            # Errors: no key, a wrong key, a key of the unreachable web app database, a bad body.
            assert written.response(http.get("/api/v1/models")).status_code == 401
            wrong = {"Authorization": "Bearer fai_00000000_" + "x" * 43}
            assert written.response(http.get("/v1/models", headers=wrong)).status_code == 401
            web_app = {"x-api-key": "fic_" + "a" * 12 + "_" + "b" * 43}
            assert written.response(http.get("/api/v1/models", headers=web_app)).status_code == 503
            invalid = http.post("/api/v1/images/generate", headers=good, json={"width": "wide"})
            assert written.response(invalid).status_code == 422
            wait_for(log, "Failed to export spans batch")  # the collector's error path
            # Redis goes away: requests are still served, and the limiter says why.
            redis_with_password.stop()
            assert written.response(http.get("/api/v1/models", headers=good)).status_code == 200
            wait_for(log, "Rate limiter: Redis is unavailable")
            written.response(http.get("/health"))
    finally:
        stop_server(process)
    text = log.read_text(errors="replace")
    written.add("the server's stdout and stderr", text)
    # The start-up line names every credential setting, masked.
    changed = next(line for line in text.splitlines() if "Settings changed" in line)
    for setting in (
        "database_url",
        "api_key_pepper",
        "fictures_database_url",
        "redis_url",
        "otlp_endpoint",
    ):
        assert f"'{setting}': " in changed
    assert "***" in changed
    assert "cannot be reached" in text  # the web app's database
    written.assert_no_canary()


def test_the_cli_shows_no_credential_in_output_or_errors(key_database: str) -> None:
    written = Written()
    web_app = unreachable_database("FICTURES_DATABASE_URL")
    # Success, a refused key, and unreachable databases.
    written.cli("keys", "list", env={"DATABASE_URL": key_database}, code=0)
    written.cli(
        "keys", "check", "fai_00000000_" + "x" * 43, env={"DATABASE_URL": key_database}, code=3
    )
    written.cli("keys", "list", env={"DATABASE_URL": unreachable_database("DATABASE_URL")}, code=1)
    fictures = {
        "DATABASE_URL": key_database,
        "API_KEY_STORE": "fictures",
        "FICTURES_DATABASE_URL": web_app,
    }
    written.cli("keys", "check", "fic_" + "a" * 12 + "_" + "b" * 43, env=fictures, code=1)
    # Values that are not database URLs, each on another path: an unencoded @ or : (the rest
    # of the password would become the host or the port), a libpq string, a bare password.
    db, otel = CANARIES["DATABASE_URL"], CANARIES["OTLP_ENDPOINT"]
    written.cli("keys", "list", "--database-url", f"postgresql://u:{db}@x@h/db", env={}, code=2)
    written.cli("keys", "list", env={"DATABASE_URL": f"postgresql://u:x@{db}:1@h/db"}, code=2)
    written.cli("models", "prepare", env={"DATABASE_URL": f"host=h password={db}"}, code=2)
    short_pepper = {"API_KEY_PEPPER": "x://" + CANARIES["API_KEY_PEPPER"]}  # too short, URL-like
    assert "API_KEY_PEPPER='***'" in written.cli("keys", "list", env=short_pepper, code=2)
    invalid = {
        "DATABASE_URL": db,
        "FICTURES_DATABASE_URL": web_app.replace("postgresql", "mysql"),
        "OTLP_ENDPOINT": f"http://u:{otel}@collector:port",
        "API_KEY_PEPPER": CANARIES["API_KEY_PEPPER"],  # too short
    }
    output = written.cli("serve", env=invalid, code=2)
    assert all(f"{setting}=" in output for setting in invalid)
    # A model-level error, whose input is every setting at once.
    everything = {
        "DATABASE_URL": key_database,
        "REDIS_URL": f"redis://:{encoded('REDIS_URL')}@h",
        "OTLP_ENDPOINT": f"http://u:{otel}@collector",
        "API_KEY_STORE": "fictures",
    }
    written.cli("serve", env=everything, code=2)
    # A Redis URL that Redis refuses once the app is built.
    redis = {
        "GENERATION_MODE": "image",
        "RATE_LIMIT_PER_MINUTE": "10",
        "REDIS_URL": f"http://:{encoded('REDIS_URL')}@cache",
    }
    written.cli("serve", env=redis, code=2)
    written.assert_no_canary()
