"""A real ``fictures-ai serve`` process on a free port, started once per test session.

API keys are required, as by default: the fixture creates a ``stories:write`` key and a
``stories:read`` key in a key database of its own with the real CLI before starting it.
"""

from __future__ import annotations

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

from tests.support import free_port

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

    def env(self) -> dict[str, str]:
        """The environment for a CLI process talking to this server with its key."""
        return {**os.environ, "FICTURES_API_KEY": self.key, "DATABASE_URL": self.database_url}


def create_key(database_url: str, name: str, scopes: str) -> str:
    """Create a key with the real CLI and return it (the last line it prints)."""
    result = subprocess.run(
        [str(CLI), "keys", "create", "--name", name, "--scopes", scopes],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = free_port()
    folder = tmp_path_factory.mktemp("server")
    log = folder / "server.log"
    database_url = f"sqlite:///{folder / 'keys.db'}"
    key = create_key(database_url, "e2e-writer", "stories:write")
    read_key = create_key(database_url, "e2e-reader", "stories:read")
    env = {
        **os.environ,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "VLLM_CPU_KV_CACHE_MB": "256",
        "TEXT_MAX_MODEL_LEN": "4096",
        "IMAGE_TORCH_THREADS": "1",
        "DATABASE_URL": database_url,
        "REQUIRE_API_KEY": "true",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CLI), "serve"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    http = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30)
    yield RunningServer(
        url=url,
        log=log,
        process=process,
        key=key,
        read_key=read_key,
        database_url=database_url,
        http=http,
    )
    http.close()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the text tests first (the first checks lazy loading on the fresh server) and the
    engine-failure tests last (they kill the engine the others use)."""

    def order(item: pytest.Item) -> int:
        return {"test_text_server.py": 0, "test_engine_failures.py": 2}.get(item.path.name, 1)

    items.sort(key=order)
