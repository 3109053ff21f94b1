"""A throwaway redis-server for the tests that need a real one (the Redis rate limiter's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.support import free_port

REDIS_PACKAGE_HINT = (
    "redis-server is not installed; these tests start a real one. Install the Debian package: "
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
    "--no-install-recommends redis-server"
)


class RedisServer:
    """A throwaway redis-server process on localhost, without persistence; with ``password``,
    clients must log in with it (``requirepass``), and ``url`` carries it."""

    def __init__(
        self, directory: Path, port: int | None = None, *, password: str | None = None
    ) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            pytest.fail(REDIS_PACKAGE_HINT, pytrace=False)
        self.port = port or free_port()
        self.password = password
        userinfo = f":{quote(password, safe='')}@" if password else ""
        self.url = f"redis://{userinfo}127.0.0.1:{self.port}/0"
        self.log = directory / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(directory),
                "--logfile", str(self.log),
                *(["--requirepass", password] if password else []),
            ],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_until_ready()

    def _wait_until_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        try:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"redis-server exited at start:\n{self.log_text()}", pytrace=False)
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server did not answer PING:\n{self.log_text()}")
                time.sleep(0.02)
        finally:
            client.close()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
