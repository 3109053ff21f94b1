"""How the server's own keys are stored: a keyed digest that names its scheme, never the key.

The keys are 256 random bits, so a slow password hash buys nothing: no one can try 2**256
candidates against a leaked table, fast hash or slow. It only made every uncached check cost
about 20 ms of CPU (argon2id at 19 MiB), which anyone who knows a key's public prefix could make
the server spend per guess. As GitHub and Stripe do for their tokens, the table holds an
HMAC-SHA-256 of the key keyed with ``API_KEY_PEPPER`` (a secret that lives in the server's
settings, not in the database, so a copy of the table alone cannot even confirm a key), or a
plain SHA-256 when no pepper is set. Either takes a few microseconds
(``benchmarks/key_verification.py``).

A stored hash names its scheme, as PHC strings do (``$argon2id$v=19$...``):

- ``$hmac-sha256$<64 hex digits>``: written while ``API_KEY_PEPPER`` is set;
- ``$sha256$<64 hex digits>``: written while it is not;
- ``$argon2id$...``: written by earlier versions. Still accepted; an accepted key's row is
  rewritten in the current scheme (see :meth:`KeyHasher.is_current`).

A ``$sha256$`` row is accepted with or without a pepper (and rewritten once one is set), but an
``$hmac-sha256$`` row only with the pepper that made it: changing or removing the pepper makes
every key hashed with the old one fail, and there is no telling a wrong key from a wrong pepper.
"""

from __future__ import annotations

import hashlib
import hmac

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

HMAC_SHA256 = "hmac-sha256"
SHA256 = "sha256"
ARGON2 = "argon2"
"""The scheme of earlier versions' hashes (argon2id; any argon2 variant is read)."""

# Verifying reads the cost parameters from the hash itself; these only matter for hashing,
# which this module never does with argon2.
_ARGON2 = PasswordHasher()


def scheme_of(stored: str) -> str | None:
    """The scheme a stored hash names: ``hmac-sha256``, ``sha256``, ``argon2``, or None for
    something else."""
    if stored.startswith(f"${ARGON2}"):
        return ARGON2
    tag, _, digest = stored.removeprefix("$").partition("$")
    if stored.startswith("$") and tag in (HMAC_SHA256, SHA256) and digest:
        return tag
    return None


class KeyHasher:
    """Hashes keys in the current scheme (HMAC-SHA-256 with the pepper, else SHA-256) and
    checks a presented key against a stored hash of any scheme (see the module docstring)."""

    def __init__(self, pepper: str | None = None) -> None:
        """``pepper``: the secret HMAC key (``API_KEY_PEPPER``); None for plain SHA-256.

        Raises ``ValueError`` for an empty pepper (unset is None, not "").
        """
        if pepper is not None and not pepper:
            raise ValueError("An empty pepper would be no secret; leave it unset instead")
        self._pepper = pepper.encode() if pepper is not None else None

    @property
    def peppered(self) -> bool:
        """Whether ``API_KEY_PEPPER`` is set (new hashes are HMAC-SHA-256)."""
        return self._pepper is not None

    @property
    def scheme(self) -> str:
        """The scheme new hashes are written in."""
        return HMAC_SHA256 if self._pepper is not None else SHA256

    def hash(self, key: str) -> str:
        """The stored form of ``key`` in the current scheme (deterministic: no salt is needed
        for 256 random bits)."""
        return f"${self.scheme}${_hex_digest(key, self._pepper)}"

    def matches(self, stored: str, presented: str) -> bool:
        """Whether ``presented`` is the key ``stored`` was made from. Digests are compared in
        constant time; an ``$hmac-sha256$`` hash never matches without the pepper, a hash of
        no known scheme never matches at all."""
        scheme = scheme_of(stored)
        if scheme == ARGON2:
            try:
                return _ARGON2.verify(stored, presented)
            except (VerificationError, InvalidHashError):
                return False
        if scheme == SHA256:
            expected = f"${SHA256}${_hex_digest(presented, None)}"
        elif scheme == HMAC_SHA256 and self._pepper is not None:
            expected = f"${HMAC_SHA256}${_hex_digest(presented, self._pepper)}"
        else:
            return False
        return hmac.compare_digest(expected.encode(), stored.encode())

    def is_current(self, stored: str) -> bool:
        """Whether ``stored`` is in the scheme this hasher writes; a key that matches a hash
        that is not should have its row rewritten with :meth:`hash`."""
        return scheme_of(stored) == self.scheme

    def lacks_pepper_for(self, stored: str) -> bool:
        """Whether ``stored`` can never match here because it needs the pepper and none is set
        (a set-up error, not a wrong key)."""
        return scheme_of(stored) == HMAC_SHA256 and self._pepper is None

    def mismatch_reason(self, stored: str) -> str:
        """Why a key that does not match ``stored`` was refused, as far as can be told (for
        people: the CLI and logs; it never quotes the key, the hash or the pepper)."""
        scheme = scheme_of(stored)
        if self.lacks_pepper_for(stored):
            return "the key's hash needs API_KEY_PEPPER, which is not set"
        if scheme == HMAC_SHA256:
            return "the secret does not match (or API_KEY_PEPPER changed since the key was made)"
        if scheme is None:
            return "the key's row holds a hash of no known scheme"
        return "the secret does not match"


def _hex_digest(key: str, pepper: bytes | None) -> str:
    if pepper is None:
        return hashlib.sha256(key.encode()).hexdigest()
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
