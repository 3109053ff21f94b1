"""What a store says about a key: :class:`ApiKeyInfo` (never its secret or hash) and the
outcome of one check, :class:`KeyCheck`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from fictures_ai.services.keys.key_format import display_prefix
from fictures_ai.services.keys.scopes import scope_allows

KeyId = int | str
"""A key's id in its store: an integer in ours, text in the web app's."""


def aware(moment: datetime) -> datetime:
    """``moment`` in UTC. Naive values are read as UTC: that is how both stores write them
    (SQLite keeps no zone; the web app stores UTC in ``timestamp`` columns)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """One API key as the rest of the server sees it: never its secret or hash."""

    id: KeyId
    name: str
    prefix: str
    """The public part that finds the key's row (safe to log)."""
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    created_at: datetime | None
    store: str = "local"
    """Which store holds the key: ``local`` or ``fictures``."""
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    owner: str | None = None
    """The web app's user id, for keys of the ``fictures`` store."""

    @property
    def display_prefix(self) -> str:
        """The public start of the key as users see it (``fai_<prefix>``, ``fic_...``)."""
        return display_prefix(self.prefix) if self.store == "local" else self.prefix

    @property
    def revoked(self) -> bool:
        """Whether the key has been revoked."""
        return self.revoked_at is not None

    @property
    def client_id(self) -> str:
        """The key's identity across stores (rate limits, access log): ``key:<store>:<id>``."""
        return f"key:{self.store}:{self.id}"

    def expired(self, now: datetime) -> bool:
        """Whether the key's expiry (if any) is at or before ``now``."""
        return self.expires_at is not None and self.expires_at <= now

    def has_scope(self, required: str) -> bool:
        """Whether this key's scopes include ``required`` (see :func:`scope_allows`)."""
        return scope_allows(self.scopes, required)

    def allows_model(self, model: str) -> bool:
        """Whether this key may use ``model``: any model without an allow-list."""
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The outcome of checking one presented key against its store's database."""

    info: ApiKeyInfo | None
    """The key, when it is valid."""
    reason: str | None = None
    """Why it is not, for people (the CLI, logs); never sent to clients, who get one 401."""
    key_hash: str | None = None
    """The stored hash the key passed (never logged): a re-check while it is unchanged skips
    the hash check."""

    @property
    def accepted(self) -> bool:
        """Whether the key is valid."""
        return self.info is not None
