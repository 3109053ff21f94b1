"""A private PostgreSQL server for the tests that need one, started once per test session.

The server is Debian's (``apt-get install -y postgresql``; ``make test`` installs it): its
binaries live in ``/usr/lib/postgresql/<version>/bin`` (or ``PG_BIN_DIR``). The fixture runs
``initdb`` into a temporary folder, starts the server on a free localhost port with password
(SCRAM) logins, and stops it and deletes the folder at the end. PostgreSQL refuses to run as
root, so under root the server runs as the ``postgres`` OS user that the package creates.
Registered for every test by ``tests/conftest.py``; started only when a test asks for it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support import free_port

INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl) were not found under "
    "/usr/lib/postgresql/*/bin. Install Debian's server package: "
    "`apt-get install -y --no-install-recommends postgresql` (or set PG_BIN_DIR)."
)
SERVER_USER = "postgres"


@dataclass(frozen=True)
class PostgresServer:
    """A running private server: superuser ``user`` with ``password`` on 127.0.0.1:``port``."""

    port: int
    user: str
    password: str

    def url(self, database: str, *, password: str | None = None) -> str:
        return (
            f"postgresql+psycopg://{self.user}:{password or self.password}"
            f"@127.0.0.1:{self.port}/{database}"
        )

    def create_database(self, name: str) -> None:
        self.execute("postgres", f'CREATE DATABASE "{name}"')

    def execute(self, database: str, *statements: str) -> None:
        """Run ``statements`` in ``database`` as the superuser, each in its own transaction."""
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            autocommit=True,
        ) as connection:
            for statement in statements:
                connection.execute(statement.encode())


def find_bin_dir() -> Path:
    configured = os.environ.get("PG_BIN_DIR")
    candidates = [Path(configured)] if configured else []
    # Newest installed major version first (the names are numbers: 15, 16, ...).
    installed = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(installed, key=lambda path: _major(path.parent.name), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    pytest.fail(INSTALL_HINT, pytrace=False)


def _major(name: str) -> int:
    return int(name) if name.isdecimal() else -1


def as_server_user(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` OS user when we are root (the server refuses root)."""
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", SERVER_USER, "--", *argv]
    return ["su", SERVER_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]


def run_as_server_user(argv: list[str], *, what: str, log: Path | None = None) -> None:
    done = subprocess.run(
        as_server_user(argv), capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        log_text = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
        pytest.fail(
            f"PostgreSQL {what} failed ({done.returncode}): {done.stdout}{done.stderr}{log_text}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if os.geteuid() == 0:
        try:
            server_user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.fail(f"No '{SERVER_USER}' OS user to run the server as. {INSTALL_HINT}")
    root = Path(tempfile.mkdtemp(prefix="fictures-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    password = secrets.token_urlsafe(16)
    (root / "pwfile").write_text(password + "\n")
    sockets.mkdir()
    if os.geteuid() == 0:
        for path in (root, sockets, root / "pwfile"):
            os.chown(path, server_user.pw_uid, server_user.pw_gid)
    started = False
    try:
        run_as_server_user(
            [
                str(bin_dir / "initdb"),
                "--pgdata", str(data),
                "--username", "postgres",
                "--pwfile", str(root / "pwfile"),
                "--auth-local", "trust",
                "--auth-host", "scram-sha-256",
                "--encoding", "UTF8",
                "--no-sync",
            ],
            what="initdb",
        )  # fmt: skip
        for _attempt in range(3):  # another process may take the free port before we bind it
            port = free_port()
            options = (
                f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            done = subprocess.run(
                as_server_user(
                    [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                     "-w", "-t", "60", "start"]
                ),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )  # fmt: skip
            if done.returncode == 0:
                started = True
                break
        if not started:
            log_text = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            pytest.fail(f"PostgreSQL did not start: {done.stderr}\n{log_text}", pytrace=False)
        yield PostgresServer(port=port, user="postgres", password=password)
    finally:
        if started:
            run_as_server_user(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                what="stop",
            )
        shutil.rmtree(root, ignore_errors=True)
