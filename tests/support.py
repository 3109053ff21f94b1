"""Small helpers that tests of every kind (unit, integration, e2e) share."""

from __future__ import annotations

import secrets
import socket
from datetime import UTC, datetime
from typing import Any

import bcrypt
import sqlalchemy as sa

from fictures_ai.database import normalise_url

# Every image size the Fictures web app asks for: its standard and quick profiles (the quick
# profile's are not multiples of 8).
WEB_APP_SIZES = [
    (1024, 1024),
    (1664, 936),
    (928, 1664),
    (832, 1248),
    (1344, 756),
    (896, 896),
    (768, 1365),
    (768, 1152),
]

# A function tool in OpenAI's shape, as the SDKs send it.
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeClock:
    """A clock that moves only when told to: pass it where code reads the time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class WebAppDatabase:
    """The Fictures web app's ``users`` and ``api_keys`` tables, made as the web app makes them.

    The columns are the contract's (``api-contract.md``, "Keys from the web app's database");
    keys are ``fic_`` + 12 + ``_`` + 43 characters, hashed with bcrypt as bcryptjs does
    (``$2a$``, cost 10 unless a test asks for a cheaper one).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(normalise_url(url))
        metadata = sa.MetaData()
        self.users = sa.Table(
            "users",
            metadata,
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("email", sa.Text),
            sa.Column("name", sa.Text),
            sa.Column("role", sa.Text),
        )
        self.api_keys = sa.Table(
            "api_keys",
            metadata,
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("user_id", sa.Text, sa.ForeignKey("users.id")),
            sa.Column("name", sa.String(255)),
            sa.Column("key_hash", sa.String(64)),
            sa.Column("key_prefix", sa.String(16)),
            sa.Column("scopes", sa.JSON),
            sa.Column("last_used_at", sa.DateTime),
            sa.Column("expires_at", sa.DateTime),
            sa.Column("is_active", sa.Boolean),
            sa.Column("created_at", sa.DateTime),
            sa.Column("updated_at", sa.DateTime),
        )
        self.metadata = metadata

    def create_tables(self) -> None:
        self.metadata.create_all(self.engine)

    def add_user(self, user_id: str = "user_1") -> str:
        with self.engine.begin() as connection:
            connection.execute(
                self.users.insert().values(
                    id=user_id, email=f"{user_id}@example.com", name=user_id, role="writer"
                )
            )
        return user_id

    def add_key(
        self,
        *,
        user_id: str = "user_1",
        scopes: list[str] | None = None,
        is_active: bool = True,
        expires_at: datetime | None = None,
        rounds: int = 10,
        name: str = "my key",
    ) -> tuple[str, str]:
        """Insert a new key; return its id and the key itself."""
        key = f"fic_{secrets.token_urlsafe(9)}_{secrets.token_urlsafe(32)}"
        key_id = f"key_{secrets.token_hex(8)}"
        now = datetime.now(UTC).replace(tzinfo=None)
        with self.engine.begin() as connection:
            connection.execute(
                self.api_keys.insert().values(
                    id=key_id,
                    user_id=user_id,
                    name=name,
                    key_hash=bcrypt.hashpw(key.encode(), bcrypt.gensalt(rounds, b"2a")).decode(),
                    key_prefix=key[:16],
                    scopes=["stories:write"] if scopes is None else scopes,
                    last_used_at=None,
                    expires_at=expires_at.replace(tzinfo=None) if expires_at else None,
                    is_active=is_active,
                    created_at=now,
                    updated_at=now,
                )
            )
        return key_id, key

    def key_row(self, key_id: str) -> dict[str, Any]:
        with self.engine.connect() as connection:
            row = connection.execute(
                self.api_keys.select().where(self.api_keys.c.id == key_id)
            ).one()
        return dict(row._mapping)

    def set_active(self, key_id: str, active: bool) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                self.api_keys.update().where(self.api_keys.c.id == key_id).values(is_active=active)
            )

    def table_names(self) -> set[str]:
        return set(sa.inspect(self.engine).get_table_names())

    def dispose(self) -> None:
        self.engine.dispose()
