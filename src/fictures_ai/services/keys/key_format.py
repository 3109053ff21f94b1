"""The server's own keys: ``fai_<prefix>_<secret>``.

8 characters of ``[a-z0-9]`` identify the key (its row's lookup prefix, shown by ``keys list``,
safe to log) and 43 URL-safe characters (256 random bits) prove it.
"""

from __future__ import annotations

import re
import secrets
import string

KEY_PREFIX = "fai"
PREFIX_LENGTH = 8
SECRET_BYTES = 32  # 256 bits: token_urlsafe gives 43 characters
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
# The prefix alphabet has no '_', so a key splits unambiguously even though the secret may
# contain '_' and '-'.
_KEY_PATTERN = re.compile(rf"{KEY_PREFIX}_([a-z0-9]{{{PREFIX_LENGTH}}})_[A-Za-z0-9_-]{{43}}")
_KEY_LENGTH = len(KEY_PREFIX) + 1 + PREFIX_LENGTH + 1 + 43


def new_key() -> tuple[str, str]:
    """A fresh random key and its prefix: ``(prefix, key)``."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    return prefix, f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"


def split_key(presented: str) -> str | None:
    """The prefix of a well-formed key, or None when ``presented`` is not shaped like a key."""
    if len(presented) != _KEY_LENGTH:
        return None
    match = _KEY_PATTERN.fullmatch(presented)
    return match.group(1) if match else None


def display_prefix(prefix: str) -> str:
    """The public start of a key as users see it: ``fai_<prefix>``."""
    return f"{KEY_PREFIX}_{prefix}"
