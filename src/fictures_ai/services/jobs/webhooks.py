"""Signed webhooks of jobs and batches: one delivery attempt at a time, to public addresses only.

What the job runner uses, and what it leaves to the runner:

- :meth:`WebhookSender.send` makes ONE attempt: a POST of the exact ``payload`` bytes, signed
  as the Standard Webhooks specification says (https://www.standardwebhooks.com/): headers
  ``webhook-id`` (the same on every retry of one event), ``webhook-timestamp`` (unix seconds,
  fresh on each attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256 of
  "{id}.{timestamp}.{body}">``, keyed with the bytes of ``WEBHOOK_SECRET`` (``whsec_`` +
  base64). A 2xx answer is a delivery; anything else (3xx, since redirects are never
  followed, 4xx, 5xx, a time-out, a refused address) is a failed attempt, returned as a
  :class:`WebhookAttempt`, never raised. Standard Webhooks (and Svix) retry every non-2xx, so
  does this.
- :meth:`WebhookSender.retry_delay` is the wait before the next attempt: exponential back-off
  with full jitter (:func:`backoff_delay`). The runner owns the loop: it records every attempt
  in its database, schedules the next and stops after ``WEBHOOK_MAX_ATTEMPTS``.
- :meth:`WebhookSender.check_url` (:func:`check_webhook_url`) refuses, when a job is
  submitted, a URL the sender would refuse: only ``http``/``https``, no ``user:password@``
  (the signature authenticates us; credentials in a URL end up in databases and logs), and
  a host that is a public address or a name resolving only to public addresses.

The SSRF guard: a host's addresses must all be globally routable (:func:`non_public_reason`:
loopback, private, link-local, CGNAT, multicast, reserved, unique-local, IPv4 embedded in
IPv6 as mapped, compatible, 6to4 or NAT64 forms of such addresses... are refused), in
whatever notation the URL writes them (``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
``127.1``, ``[::ffff:127.0.0.1]``, a trailing dot), unless the host is on
``WEBHOOK_ALLOWED_HOSTS``. The same check runs when connecting, inside the HTTP client's
network backend (:class:`_GuardedBackend`): the host is resolved once, every address is
checked, and the connection goes to a checked address, so a DNS answer that changes between
submission and delivery (DNS rebinding) cannot reach an internal address. No proxy is used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import random
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpcore
import httpx
from standardwebhooks.webhooks import Webhook

from fictures_ai import __version__
from fictures_ai.errors import InvalidRequestError

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``: the textual IP addresses a host name resolves to."""

SECRET_PREFIX = "whsec_"
# Standard Webhooks, "Signature scheme": the symmetric secret is "Random. Between 24 bytes
# (192 bits) and 64 bytes (512 bits)", base64 encoded and prefixed with whsec_.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
NEW_SECRET_BYTES = 32

MAX_URL_LENGTH = 2048
USER_AGENT = f"fictures-ai/{__version__}"

# Ids go into the signed content "{id}.{timestamp}.{body}": no dot, so the split is unique.
_WEBHOOK_ID = re.compile(r"^[A-Za-z0-9_:-]{1,255}$")
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
# One part of an IPv4 address as inet_aton(3) reads it: hex, octal or decimal.
_INET_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


@dataclass(frozen=True)
class WebhookAttempt:
    """What one delivery attempt did.

    ``attempted_at``: when it started (UTC). ``duration_s``: seconds until the answer's status
    line or the failure. ``status_code``: the receiver's HTTP status, None when no answer came
    (refused address, connection error, time-out). ``error``: why the attempt failed, for
    people (no secret, no payload), None when delivered. ``delivered``: a 2xx answer came.
    """

    attempted_at: datetime
    duration_s: float
    status_code: int | None
    error: str | None
    delivered: bool


def generate_webhook_secret() -> str:
    """A new ``WEBHOOK_SECRET``: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(NEW_SECRET_BYTES)).decode()


def parse_webhook_secret(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret ``whsec_<base64>``.

    Raises ValueError (naming WEBHOOK_SECRET, never echoing it) without the ``whsec_``
    prefix, with characters outside standard base64 (padding may be left out), or when the
    key is not 24 to 64 bytes long, as the specification asks.
    """
    how = (
        f"WEBHOOK_SECRET must be '{SECRET_PREFIX}' followed by the base64 of "
        f"{MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes (Standard Webhooks); make one "
        'with: python -c "from fictures_ai.services.jobs.webhooks import '
        'generate_webhook_secret as g; print(g())"'
    )
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"{how}. It does not start with '{SECRET_PREFIX}'.")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"{how}. What follows the prefix is not base64.") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(f"{how}. It decodes to {len(key)} bytes.")
    return key


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first) before the
    next: exponential back-off with full jitter, ``rng() * min(max_s, base_s * 2**(attempt-1))``.

    ``rng`` returns a float in [0, 1) (``random.random``). The result is in
    [0, min(max_s, base_s * 2**(attempt - 1))]. Raises ValueError when ``attempt`` < 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt}")
    # Past 2**64 the cap is max_s anyway; a bounded exponent cannot overflow a float.
    cap = min(max_s, base_s * 2.0 ** min(attempt - 1, 64))
    return rng() * cap


def non_public_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public internet address, or None when it is one.

    Python's ``ipaddress`` flags (``is_global``, ``is_private``...) decide, plus what this
    Python (3.11) does not flag: multicast (``is_global`` is true for it), the shared address
    space 100.64.0.0/10 (CGNAT), 192.0.0.0/24, deprecated IPv6 site-local (fec0::/10) and
    IPv4-compatible addresses, and IPv4 addresses embedded in IPv6 (IPv4-mapped, 6to4
    2002::/16, NAT64 64:ff9b::/96), which are judged by the IPv4 address they reach.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_unspecified:
            return "the unspecified address"
        if address.is_loopback:
            return "a loopback address"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            form, ipv4 = embedded
            reason = non_public_reason(ipv4)
            return None if reason is None else f"the {form} IPv6 form of {ipv4}, {reason}"
        if address in _IPV4_COMPATIBLE:
            return "an IPv4-compatible IPv6 address (deprecated, RFC 4291)"
        if address in _NAT64_LOCAL:
            return "a local-use NAT64 address (64:ff9b:1::/48)"
        if address.teredo is not None:
            return "a Teredo tunnel address"
        if address.is_site_local:
            return "a site-local address (fec0::/10)"
        if address in ipaddress.IPv6Network("fc00::/7"):
            return "a unique-local address (fc00::/7)"
    else:
        if address in _CGNAT:
            return "in the shared address space of carrier-grade NAT (100.64.0.0/10)"
        if address in _IETF_PROTOCOL:
            return "in the IETF protocol assignments (192.0.0.0/24)"
    flags = (
        (address.is_unspecified, "the unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a globally routable address"),
    )
    return next((reason for flagged, reason in flags if flagged), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address reaches through a translation, with the form's name."""
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    if address in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` writes literally, or None when it is a name.

    Reads IPv6 (with or without brackets) and IPv4 the way inet_aton(3) does, which is how
    the system resolver reads them: one to four parts, each decimal, octal (leading 0) or hex
    (0x), the last part filling the remaining bytes (``2130706433``, ``0x7f.1``, ``127.1``,
    ``0177.0.0.1`` are all 127.0.0.1). A trailing dot is ignored. Raises InvalidRequestError
    for a host that ends in a number (as an IPv4 address does) but is not a valid address.
    """
    text = host.removeprefix("[").removesuffix("]")
    text = text.removesuffix(".")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    parts = text.split(".")
    if not _INET_PART.match(parts[-1]):
        return None
    value = _inet_aton(parts) if all(_INET_PART.match(part) for part in parts) else None
    if value is None:
        raise InvalidRequestError(
            f"The webhook URL's host '{host}' is neither a host name nor a valid IP address.",
            param="webhook_url",
        )
    return ipaddress.IPv4Address(value)


def _inet_aton(parts: Sequence[str]) -> int | None:
    """The 32-bit value of inet_aton(3) parts, or None when out of range."""
    if not 1 <= len(parts) <= 4:
        return None
    values = [_inet_part(part) for part in parts]
    value = 0
    for number in values[:-1]:
        if number > 0xFF:
            return None
        value = value << 8 | number
    rest_bits = 8 * (5 - len(parts))
    if values[-1] >= 1 << rest_bits:
        return None
    return value << rest_bits | values[-1]


def _inet_part(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8)
    return int(part)


def _is_host_name(host: str) -> bool:
    """Whether ``host`` (lower-case ASCII, as httpx writes it, no trailing dot) is a DNS name."""
    return 0 < len(host) <= 253 and all(_LABEL.match(label) for label in host.split("."))


@dataclass(frozen=True)
class AllowedHosts:
    """``WEBHOOK_ALLOWED_HOSTS``: hosts that may be internal addresses.

    An entry is a host name or an IP address (IPv6 with or without brackets), matched
    case-insensitively and without a trailing dot; it allows every port. A name entry allows
    URLs with that exact host (no wildcards, no sub-domains) whatever it resolves to; an IP
    entry allows that address in any notation, and a name that resolves to it.
    """

    names: frozenset[str]
    addresses: frozenset[IPAddress]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowedHosts:
        """Parse the entries; blank ones are skipped. Raises ValueError for an entry with a
        scheme, port, path or other characters a host does not have."""
        names: set[str] = set()
        addresses: set[IPAddress] = set()
        for entry in entries:
            host = entry.strip().lower()
            if not host:
                continue
            try:
                address = parse_ip_literal(host)
            except InvalidRequestError:
                address = None
            if address is not None:
                addresses.add(address)
            elif _is_host_name(host.removesuffix(".")):
                names.add(host.removesuffix("."))
            else:
                raise ValueError(
                    f"WEBHOOK_ALLOWED_HOSTS entry '{entry}' is not a host name or an IP address"
                    " (write hosts only: no scheme, port or path)."
                )
        return cls(frozenset(names), frozenset(addresses))

    def allows_name(self, host: str) -> bool:
        """Whether URL host ``host`` is allowed by name, or as an IP literal on the list."""
        normal = host.lower().removesuffix(".")
        if normal in self.names:
            return True
        try:
            address = parse_ip_literal(normal)
        except InvalidRequestError:
            return False
        return address is not None and address in self.addresses


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives ``host``, in its order (for TCP).

    Raises OSError (``socket.gaierror``) when the name does not resolve.
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _AddressPolicy:
    """Resolves hosts and refuses those with an address that is not public nor allowed."""

    def __init__(self, allowed: AllowedHosts, resolver: Resolver) -> None:
        self.allowed = allowed
        self.resolver = resolver

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """The checked addresses of ``host``, to connect to in order.

        Raises InvalidRequestError (param ``webhook_url``) when the host is not allowed,
        does not resolve, or has an address that is not public.
        """
        literal = parse_ip_literal(host)
        allowed_by_name = self.allowed.allows_name(host)
        if literal is not None:
            found = [literal]
        else:
            name = host.removesuffix(".")
            if not _is_host_name(name):
                raise InvalidRequestError(
                    f"The webhook URL's host '{host}' is not a valid host name.",
                    param="webhook_url",
                )
            if not allowed_by_name and (name == "localhost" or name.endswith(".localhost")):
                raise _refused(host, "a loopback name (RFC 6761)")
            try:
                found = [ipaddress.ip_address(text) for text in await self.resolver(host, port)]
            except (OSError, ValueError) as exc:
                raise InvalidRequestError(
                    f"The webhook URL's host '{host}' does not resolve ({exc}).",
                    param="webhook_url",
                ) from None
            if not found:
                raise InvalidRequestError(
                    f"The webhook URL's host '{host}' resolves to no address.",
                    param="webhook_url",
                )
        if not allowed_by_name:
            for address in found:
                reason = non_public_reason(address)
                if reason is not None and address not in self.allowed.addresses:
                    plain = literal is None or str(literal) == host
                    shown = host if plain else f"{host} ({address})"
                    why = reason if literal is not None else f"resolves to {address}, {reason}"
                    raise _refused(shown, why)
        return found


def _refused(host: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The webhook URL's host {host} is {reason}: webhooks go only to public internet "
        "addresses. A server operator can allow this host by adding it to "
        "WEBHOOK_ALLOWED_HOSTS.",
        param="webhook_url",
    )


class _AddressRefusedError(httpcore.ConnectError):
    """A connection the SSRF guard refused; its message is the InvalidRequestError's."""


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """The default network backend, connecting only to addresses the policy checked.

    httpcore hands ``connect_tcp`` the URL's host; this resolves it once, checks every
    address and connects to a checked one (trying them in order), so what is checked is what
    is connected to. TLS still verifies the certificate for, and sends SNI of, the URL's host:
    httpcore takes those from the URL, not from what ``connect_tcp`` connected to.
    """

    def __init__(self, policy: _AddressPolicy) -> None:
        self._policy = policy
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self._policy.addresses(host, port)
        except InvalidRequestError as exc:
            raise _AddressRefusedError(exc.message) from None
        last_error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None  # addresses() returns at least one address
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise _AddressRefusedError("Webhooks are not sent over Unix sockets.")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def _parse_url(url: str) -> httpx.URL:
    """``url`` parsed, or InvalidRequestError (param ``webhook_url``) saying what is wrong
    with its form: not http(s), credentials in it, no host, a bad port, too long."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequestError(
            f"The webhook URL is {len(url)} characters long; the limit is {MAX_URL_LENGTH}.",
            param="webhook_url",
        )
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidRequestError(
            f"The webhook URL is not a valid URL: {exc}.", param="webhook_url"
        ) from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidRequestError(
            "The webhook URL must start with https:// (or http://).", param="webhook_url"
        )
    if parsed.userinfo:
        raise InvalidRequestError(
            "The webhook URL must not hold a user name or password: the webhook-signature "
            "header authenticates the server; verify it instead.",
            param="webhook_url",
        )
    if not parsed.host:
        raise InvalidRequestError("The webhook URL has no host.", param="webhook_url")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise InvalidRequestError(
            f"The webhook URL's port {parsed.port} is not a TCP port (1 to 65535).",
            param="webhook_url",
        )
    return parsed


def _host_and_port(parsed: httpx.URL) -> tuple[str, int]:
    """The host as httpcore connects to it (IDNA ASCII, no brackets) and the port."""
    default = 443 if parsed.scheme == "https" else 80
    return parsed.raw_host.decode("ascii"), parsed.port or default


async def check_webhook_url(
    url: str,
    *,
    allowed_hosts: AllowedHosts,
    resolver: Resolver = resolve_host,
) -> None:
    """Refuse, at submission, a webhook URL the sender would refuse to send to.

    Raises InvalidRequestError (param ``webhook_url``, a message saying what to change and
    naming WEBHOOK_ALLOWED_HOSTS where that would help) for a URL that is not http(s), holds
    credentials, or whose host is not allowed and is, or resolves to, a non-public address.
    Resolves the host (a DNS query). Passing is no promise: the check runs again when
    connecting, on the addresses connected to.
    """
    parsed = _parse_url(url)
    await _AddressPolicy(allowed_hosts, resolver).addresses(*_host_and_port(parsed))


class WebhookSender:
    """Sends signed webhooks, one attempt per :meth:`send`, over one connection pool.

    Construct it once at start-up and :meth:`aclose` it at shutdown.
    """

    def __init__(
        self,
        *,
        secret: str,
        allowed_hosts: Collection[str],
        timeout_s: float,
        retry_base_s: float,
        retry_max_s: float,
        rng: Callable[[], float] = random.random,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``secret``: WEBHOOK_SECRET (``whsec_`` + base64 of 24 to 64 bytes).
        ``allowed_hosts``: WEBHOOK_ALLOWED_HOSTS entries (:class:`AllowedHosts`).
        ``timeout_s``: the limit of one whole attempt, from resolving to the status line.
        ``retry_base_s``, ``retry_max_s``: the back-off of :meth:`retry_delay`.
        ``rng`` (jitter, [0, 1)), ``resolver`` (host names to addresses), ``clock`` (unix
        seconds for ``webhook-timestamp``) and ``ssl_context`` (the CAs trusted for https)
        are there to be replaced in tests.

        Raises ValueError for a malformed secret or allow-list entry, or a non-positive time.
        """
        self._webhook = Webhook(parse_webhook_secret(secret))
        self.allowed_hosts = AllowedHosts.parse(allowed_hosts)
        if timeout_s <= 0 or retry_base_s <= 0 or retry_max_s < retry_base_s:
            raise ValueError(
                "WEBHOOK_TIMEOUT_S and WEBHOOK_RETRY_BASE_S must be positive and "
                "WEBHOOK_RETRY_MAX_S at least WEBHOOK_RETRY_BASE_S."
            )
        self.timeout_s = timeout_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._rng = rng
        self._resolver = resolver
        self._clock = clock
        # httpcore, not httpx.AsyncClient: the pool takes the guarded network backend as a
        # public argument, while httpx's transport would need its private pool replaced. No
        # proxy from the environment either: a proxy would resolve and connect unchecked.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=100,
            keepalive_expiry=30.0,
            network_backend=_GuardedBackend(_AddressPolicy(self.allowed_hosts, resolver)),
        )

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one, in
        [0, min(retry_max_s, retry_base_s * 2**(attempt - 1))] (:func:`backoff_delay`)."""
        return backoff_delay(
            attempt, base_s=self.retry_base_s, max_s=self.retry_max_s, rng=self._rng
        )

    async def check_url(self, url: str) -> None:
        """:func:`check_webhook_url` with this sender's allow-list and resolver."""
        await check_webhook_url(url, allowed_hosts=self.allowed_hosts, resolver=self._resolver)

    def signed_headers(self, *, webhook_id: str, timestamp: int, payload: bytes) -> dict[str, str]:
        """The headers of one attempt: the three Standard Webhooks headers for ``payload``
        sent at ``timestamp`` (unix seconds), content type and user agent.

        Raises ValueError when ``webhook_id`` is not 1 to 255 of ``A-Z a-z 0-9 _ : -`` or
        ``payload`` is not UTF-8 (the signature is defined over text).
        """
        if not _WEBHOOK_ID.match(webhook_id):
            raise ValueError(f"webhook ids are 1 to 255 of A-Z a-z 0-9 _ : -, not {webhook_id!r}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("webhook payloads are UTF-8 (JSON)") from None
        signature = self._webhook.sign(webhook_id, datetime.fromtimestamp(timestamp, UTC), text)
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }

    async def send(self, url: str, *, webhook_id: str, payload: bytes) -> WebhookAttempt:
        """Make one delivery attempt: POST ``payload`` to ``url``, freshly signed.

        Never raises for what the receiver or the network does, nor for a URL the guard
        refuses: those are a :class:`WebhookAttempt` with ``delivered`` false and ``error``
        set. Raises ValueError for a bad ``webhook_id`` or ``payload``
        (:meth:`signed_headers`). The response body is not read.
        """
        attempted_at = datetime.now(UTC)
        headers = self.signed_headers(
            webhook_id=webhook_id, timestamp=int(self._clock()), payload=payload
        )
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        host = "?"
        try:
            parsed = _parse_url(url)
            host = parsed.raw_host.decode("ascii")
            status_code = await self._post(parsed, headers, payload)
        except InvalidRequestError as exc:
            error = exc.message
        except _AddressRefusedError as exc:
            error = str(exc)
        except (TimeoutError, httpcore.TimeoutException):
            error = f"No answer within {self.timeout_s:g} s (WEBHOOK_TIMEOUT_S)."
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            # Connection refused or reset, TLS failures (ConnectError), malformed answers.
            error = f"{type(exc).__name__}: {str(exc) or 'the connection failed'}"
        duration_s = time.monotonic() - started
        if status_code is not None and not 200 <= status_code < 300:
            error = f"The receiver answered HTTP {status_code}" + (
                " (redirects are not followed)." if 300 <= status_code < 400 else "."
            )
        attempt = WebhookAttempt(
            attempted_at=attempted_at,
            duration_s=duration_s,
            status_code=status_code,
            error=error,
            delivered=error is None,
        )
        if error is not None:
            logger.warning(
                "Webhook %s to %s failed after %.2f s: %s", webhook_id, host, duration_s, error
            )
        return attempt

    async def _post(self, parsed: httpx.URL, headers: dict[str, str], payload: bytes) -> int:
        """POST and return the status code, within ``timeout_s`` in all."""
        host, port = _host_and_port(parsed)
        target = httpcore.URL(
            scheme=parsed.raw_scheme, host=host.encode("ascii"), port=port, target=parsed.raw_path
        )
        # httpcore would write an IPv6 host without brackets; httpx's netloc has them.
        all_headers = [("host", parsed.netloc.decode("ascii")), *headers.items()]
        timeouts = dict.fromkeys(("connect", "read", "write", "pool"), self.timeout_s)
        # stream(), not request(): the body is never read, however large the receiver sends.
        async with (
            asyncio.timeout(self.timeout_s),
            self._pool.stream(
                "POST",
                target,
                headers=all_headers,
                content=payload,
                extensions={"timeout": timeouts},
            ) as response,
        ):
            return response.status

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._pool.aclose()
