"""A real ``fictures-ai serve`` process on a free port, started once per test session.

It runs as the Fictures web app's server does: ``API_KEY_STORE=fictures`` with the web app's
``users`` and ``api_keys`` tables in a real PostgreSQL (``tests/postgres.py``), and the
server's own key table in that same database (both URLs name one database). API keys are
required, as by default: the fixture creates a ``stories:write`` key and a ``stories:read`` key
of the server's own with the real CLI before starting it; tests add web app keys through
``server.web_app``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.postgres import PostgresServer
from tests.support import WebAppDatabase, free_port

CLI = Path(sys.executable).with_name("fictures-ai")


@dataclass(frozen=True)
class RunningServer:
    """Where the server listens, its log, its keys, and an HTTP client that sends the key."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]
    key: str
    read_key: str
    database_url: str
    http: httpx.Client
    web_app: WebAppDatabase

    def env(self) -> dict[str, str]:
        """The environment for a CLI process talking to this server with its key."""
        return {**os.environ, "FICTURES_API_KEY": self.key, "DATABASE_URL": self.database_url}


def create_key(database_url: str, name: str, scopes: str, *, web_app: bool = True) -> str:
    """Create a key of the server's own with the real CLI and return it (the last line it
    prints). With ``web_app`` the database is the web app's too, so the CLI is told the web
    app's keys are accepted (API_KEY_STORE=fictures), as the session's server is."""
    env = {**os.environ, "DATABASE_URL": database_url}
    if web_app:
        env |= {"API_KEY_STORE": "fictures", "FICTURES_DATABASE_URL": database_url}
    result = subprocess.run(
        [str(CLI), "keys", "create", "--name", name, "--scopes", scopes],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip().splitlines()[-1]


def start_server(
    env: dict[str, str],
    log: Path,
    *,
    command: tuple[str, ...] = ("serve",),
    ready_s: float = 60,
) -> tuple[subprocess.Popen[bytes], str]:
    """``fictures-ai serve`` (or ``command``) on a free loopback port with ``env`` over the
    environment; return the process and its URL once ``/health`` answers, within ``ready_s``
    (the test fails if it never does)."""
    port = free_port()
    full_env = {
        **os.environ,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "IMAGE_TORCH_THREADS": "1",
        # vLLM's graph compilation (the default) adds about a minute to each start, more than
        # the suite's many servers can afford; `make bench` measures the compiled default.
        "TEXT_ENFORCE_EAGER": "true",
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CLI), *command], stdout=out, stderr=subprocess.STDOUT, env=full_env
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within a minute."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def web_app_database(postgres_server: PostgresServer) -> Iterator[WebAppDatabase]:
    """The web app's database, with its tables and one user, for the session's server."""
    postgres_server.create_database("fictures_web_app")
    database = WebAppDatabase(postgres_server.url("fictures_web_app"))
    database.create_tables()
    database.add_user()
    yield database
    database.dispose()


@contextlib.contextmanager
def running_server(
    folder: Path, web_app_database: WebAppDatabase, *, keys: str = "e2e", **env: str
) -> Iterator[RunningServer]:
    """The full server (text and images, keys named ``<keys>-writer`` and ``<keys>-reader`` in
    the web app's database) logging to ``folder``, with ``env`` over its settings."""
    log = folder / "server.log"
    database_url = web_app_database.url
    key = create_key(database_url, f"{keys}-writer", "stories:write")
    read_key = create_key(database_url, f"{keys}-reader", "stories:read")
    settings = {
        "TEXT_CPU_KV_CACHE_MB": "256",
        "TEXT_MAX_MODEL_LEN": "8192",
        "REQUIRE_API_KEY": "true",
        "DATABASE_URL": database_url,
        "API_KEY_STORE": "fictures",
        "FICTURES_DATABASE_URL": database_url,
        **env,
    }
    process, url = start_server(settings, log)
    http = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30)
    try:
        yield RunningServer(
            url=url,
            log=log,
            process=process,
            key=key,
            read_key=read_key,
            database_url=database_url,
            http=http,
            web_app=web_app_database,
        )
    finally:
        http.close()
        stop_server(process)


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, web_app_database: WebAppDatabase
) -> Iterator[RunningServer]:
    """The server as deployed by default (no speculative decoding), shared by the session."""
    with running_server(tmp_path_factory.mktemp("server"), web_app_database) as running:
        yield running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the text tests first (the first checks lazy loading on the fresh server) and the
    engine-failure tests last (they kill the engine the others use)."""

    def order(item: pytest.Item) -> int:
        return {"test_text_server.py": 0, "test_engine_failures.py": 2}.get(item.path.name, 1)

    items.sort(key=order)
