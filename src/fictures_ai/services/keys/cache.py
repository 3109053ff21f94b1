"""The verified-key cache every store shares: the recent outcomes of key checks, in memory.

A key accepted in the last ``ttl_s`` seconds is answered from here in microseconds, so a key
revoked, deactivated or expired elsewhere keeps working for at most that long; a key rejected in
the last ``negative_ttl_s`` seconds is rejected again without a new check. Entries are keyed so
that a lookup's timing reveals nothing of a secret: accepted keys by their public prefix, holding
the SHA-256 of the whole key (compared in constant time, so a wrong secret for a known prefix
misses), rejected keys by that digest. Both maps are bounded; the oldest entries go first.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypeVar

from fictures_ai.services.keys.info import ApiKeyInfo, KeyCheck

T = TypeVar("T")


def fingerprint(presented: str) -> bytes:
    """What the cache knows a presented key by: its SHA-256."""
    return hashlib.sha256(presented.encode()).digest()


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """An accepted key: its fingerprint, the check that accepted it, and until when it holds
    (``time.monotonic()`` seconds)."""

    digest: bytes
    check: KeyCheck
    expires_at: float


class VerificationCache:
    """Accepted keys by prefix, rejected keys by fingerprint, and the prefixes this process
    revoked (which never come back)."""

    def __init__(self, *, ttl_s: float, negative_ttl_s: float, max_entries: int) -> None:
        """``ttl_s``: how long an accepted key is trusted; ``negative_ttl_s``: how long a
        rejected one stays rejected; ``max_entries`` bounds each of the two maps."""
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self._max_entries = max_entries
        self._positive: OrderedDict[str, CacheEntry] = OrderedDict()
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        # Prefixes revoked by this process: a check that read the row just before the
        # revocation must not put the key back.
        self._revoked_here: set[str] = set()

    def accepted(self, prefix: str, digest: bytes) -> CacheEntry | None:
        """The entry of exactly this key (prefix and fingerprint), expired or not: an expired
        one still tells which stored hash the key passed. None for any other key."""
        entry = self._positive.get(prefix)
        if entry is not None and hmac.compare_digest(entry.digest, digest):
            return entry
        return None

    def rejected(self, digest: bytes, now: float) -> bool:
        """Whether the key with this fingerprint was rejected less than ``negative_ttl_s``
        seconds before ``now``."""
        rejected_until = self._negative.get(digest)
        if rejected_until is None:
            return False
        if now < rejected_until:
            return True
        self._negative.pop(digest, None)
        return False

    def record(self, prefix: str, digest: bytes, check: KeyCheck, now: float) -> ApiKeyInfo | None:
        """Remember the outcome of a check made at ``now``; return the key's info when it is
        accepted. A prefix revoked by this process is rejected whatever the check said."""
        if check.info is None or prefix in self._revoked_here:
            if self.accepted(prefix, digest) is not None:
                self._positive.pop(prefix, None)
            _put(self._negative, digest, now + self.negative_ttl_s, self._max_entries)
            return None
        entry = CacheEntry(digest=digest, check=check, expires_at=now + self.ttl_s)
        _put(self._positive, prefix, entry, self._max_entries)
        return check.info

    def forget(self, prefix: str) -> None:
        """Drop a key revoked by this process, and keep it out."""
        self._revoked_here.add(prefix)
        self._positive.pop(prefix, None)

    def clear(self) -> None:
        """Forget every outcome (the next request of each key is checked again)."""
        self._positive.clear()
        self._negative.clear()


def _put(cache: OrderedDict[Any, T], key: Any, value: T, limit: int) -> None:
    # Oldest insertion goes first: entries are re-inserted every TTL, so this is close to LRU
    # without paying for move_to_end on every hit.
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)
