"""Credentials kept out of what is logged or printed: URL passwords and secret parameters masked.

The settings that hold credentials (``Settings.secret_fields()``: the database, Redis and OTLP
URLs) go through :func:`mask_setting` wherever their values are shown, but for a setting that is
a secret as a whole (the API key pepper), shown as :data:`MASK` even when it looks like a URL;
messages that may quote one (a driver's error, an exception's text) go through
:func:`mask_credentials`.

Masking never parses strictly, so it cannot fail on a malformed URL, and it errs towards
hiding too much: in ``scheme://userinfo@host``, the userinfo runs to the *last* ``@`` (an
unencoded ``@``, ``#``, ``/`` or ``:`` in a password stays inside it), and the value of every
``name=value`` parameter whose name says password, token, key, secret, pepper, auth or
credential is masked too (``?password=...`` in a database URL, ``password=...`` in a libpq
string).
"""

from __future__ import annotations

import re

MASK = "***"

# Schemes whose userinfo without a password is a user name (PostgreSQL logs in as it); in any
# other URL a lone userinfo may be the secret itself (https://TOKEN@host, redis://PASSWORD@host).
_USER_NAME_SCHEMES = frozenset({"postgresql", "postgres", "sqlite", "mysql", "mariadb"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://\S*")
_SECRET_PARAMETER = re.compile(
    r"(?<![\w.\-])(?P<name>[\w.\-]*(?:pass|pwd|secret|pepper|token|key|auth|credential)[\w.\-]*)"
    r"(?P<equals>\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&]*)",
    re.IGNORECASE,
)


def mask_url(url: str) -> str:
    """``url`` (one whole value) with its password, a lone userinfo that may be a token (any
    scheme but a database's), and its secret parameters replaced by ``***``."""
    scheme_end = _SCHEME.match(url)
    if scheme_end is None:
        return mask_parameters(url)
    scheme, rest = url[: scheme_end.end()], url[scheme_end.end() :]
    if "@" in rest:
        userinfo, _, after = rest.rpartition("@")
        rest = f"{_mask_userinfo(scheme, userinfo)}@{after}"
    return scheme + mask_parameters(rest)


def mask_setting(value: str) -> str:
    """A credential setting's value as it may be shown: a URL is masked with :func:`mask_url`;
    anything else is hidden whole (a bare password put where a URL belongs, a libpq string)."""
    return mask_url(value) if _SCHEME.match(value.strip()) else MASK


def mask_credentials(text: str) -> str:
    """Free text (an error message, a log line) with every URL in it masked as by
    :func:`mask_url` (a URL runs to the next whitespace) and every secret parameter masked."""
    return mask_parameters(_URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text))


def mask_parameters(text: str) -> str:
    """``text`` with the value of each ``name=value`` whose name says it holds a credential
    (``password``, ``sslpassword``, ``api_key``, ``access_token``, ``auth``, ...) masked."""
    return _SECRET_PARAMETER.sub(
        lambda match: f"{match['name']}{match['equals']}{MASK}" if match["value"] else match[0],
        text,
    )


def _mask_userinfo(scheme: str, userinfo: str) -> str:
    user, colon, _password = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}"
    base = scheme.removesuffix("://").split("+", 1)[0].lower()
    return userinfo if base in _USER_NAME_SCHEMES else MASK
