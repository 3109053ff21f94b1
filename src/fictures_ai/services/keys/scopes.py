"""What a key may do: its scopes, which nest (``admin:all`` ⊃ ``stories:write`` ⊃
``stories:read``), and the models it may use."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable


class Scope(enum.StrEnum):
    """What a key may do; each scope includes the ones below it."""

    ADMIN_ALL = "admin:all"
    STORIES_WRITE = "stories:write"
    STORIES_READ = "stories:read"


# Keyed by the plain string so that the per-request check needs no enum conversion.
_SCOPE_RANK: dict[str, int] = {
    Scope.STORIES_READ.value: 1,
    Scope.STORIES_WRITE.value: 2,
    Scope.ADMIN_ALL.value: 3,
}
VALID_SCOPES: tuple[str, ...] = tuple(scope.value for scope in Scope)


def scope_allows(granted: Iterable[str], required: str) -> bool:
    """Whether the ``granted`` scopes include ``required`` (admin:all ⊃ stories:write ⊃ read).

    Unknown granted scopes grant nothing; an unknown ``required`` scope is a programming error
    and raises ``ValueError``.
    """
    needed = _SCOPE_RANK[to_scope(required).value]
    return any(_SCOPE_RANK.get(scope, 0) >= needed for scope in granted)


def parse_scopes(scopes: str | Iterable[str]) -> tuple[str, ...]:
    """Scopes from ``"a,b"``, ``"a b"`` or an iterable, validated, deduplicated, in order.

    Raises ``ValueError`` naming the valid scopes when one is unknown or none is given.
    """
    items = re.split(r"[\s,]+", scopes) if isinstance(scopes, str) else list(scopes)
    parsed: list[str] = []
    for item in (item.strip() for item in items):
        if item and to_scope(item).value not in parsed:
            parsed.append(item)
    if not parsed:
        raise ValueError(f"At least one scope is needed; valid scopes: {', '.join(VALID_SCOPES)}")
    return tuple(parsed)


def to_scope(value: str) -> Scope:
    """The scope named ``value``; ``ValueError`` naming the valid ones when there is none."""
    try:
        return Scope(value)
    except ValueError:
        raise ValueError(
            f"Unknown scope '{value}'; valid scopes: {', '.join(VALID_SCOPES)}"
        ) from None


def parse_models(models: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """A model allow-list from ``"m1,m2"`` or an iterable; None means every model.

    Raises ``ValueError`` for an empty list (a key that may use no model is a mistake).
    """
    if models is None:
        return None
    items = models.split(",") if isinstance(models, str) else list(models)
    parsed = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not parsed:
        raise ValueError("The model allow-list is empty; leave it out to allow every model")
    return parsed
