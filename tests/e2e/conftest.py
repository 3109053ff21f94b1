"""A real ``fictures-ai serve`` process on a free port, started once per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

CLI = Path(sys.executable).with_name("fictures-ai")


@dataclass(frozen=True)
class RunningServer:
    """Where the server listens and where its log goes."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "VLLM_CPU_KV_CACHE_MB": "256",
        "TEXT_MAX_MODEL_LEN": "4096",
        "IMAGE_TORCH_THREADS": "1",
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
    yield RunningServer(url=url, log=log, process=process)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the text tests first: the first of them checks lazy loading on the fresh server."""
    items.sort(key=lambda item: item.path.name != "test_text_server.py")
