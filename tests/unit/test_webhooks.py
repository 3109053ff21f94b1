"""The webhook sender of jobs: Standard Webhooks signatures checked by the reference library on
what a real receiver on 127.0.0.1 read, one attempt per send, back-off bounds, and the SSRF
guard, at submission and when connecting, in every notation of an internal address.

No network beyond loopback: host names resolve through a fake resolver, refused addresses are
refused before any connection.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import random
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from fictures_ai import __version__
from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.jobs.webhooks import (
    AllowedHosts,
    WebhookSender,
    backoff_delay,
    check_webhook_url,
    generate_webhook_secret,
    non_public_reason,
    parse_webhook_secret,
)
from tests.support import FakeClock, free_port
from tests.webhook_receiver import webhook_receiver

SECRET = generate_webhook_secret()
PAYLOAD = json.dumps(
    {"type": "job.completed", "timestamp": "2026-05-09T07:35:25Z", "data": {"id": "job_1", "ü": 1}},
    ensure_ascii=False,
).encode()


class FakeResolver:
    """Resolves names from a table (a list of answers is given out one call at a time, the
    last repeating); any other name fails as an unknown one does."""

    def __init__(self, table: Mapping[str, list[str] | list[list[str]]] | None = None) -> None:
        self.table = table or {}
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        answer = self.table.get(host.removesuffix("."))  # absolute names, as DNS reads them
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if answer and isinstance(answer[0], list):
            answers: list[list[str]] = answer
            return answers[min(self.calls.count(host), len(answers)) - 1]
        return answer  # type: ignore[return-value]


INTERNAL = {
    "internal.example": ["10.1.2.3"],
    "mixed.example": ["93.184.216.34", "10.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
}


@pytest.fixture
async def make_sender() -> AsyncIterator[Callable[..., WebhookSender]]:
    """Build senders (allowing nothing, 2 s time-out, unless told otherwise); closed after."""
    senders: list[WebhookSender] = []

    def make(**overrides: Any) -> WebhookSender:
        options: dict[str, Any] = {
            "secret": SECRET,
            "allowed_hosts": [],
            "timeout_s": 2.0,
            "retry_base_s": 5.0,
            "retry_max_s": 300.0,
            "resolver": FakeResolver(INTERNAL),
            **overrides,
        }
        sender = WebhookSender(**options)
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        await sender.aclose()


# Delivery and signatures.


async def test_a_delivery_is_signed_as_standard_webhooks_say(
    make_sender: Callable[..., WebhookSender],
) -> None:
    sender = make_sender(allowed_hosts=["127.0.0.1"])
    with webhook_receiver([204]) as receiver:
        attempt = await sender.send(
            f"{receiver.url}/hooks/fictures?team=7", webhook_id="msg_job_1", payload=PAYLOAD
        )
    assert attempt.delivered
    assert attempt.status_code == 204
    assert attempt.error is None
    assert attempt.attempted_at.tzinfo is not None
    assert 0 <= attempt.duration_s < 2
    (request,) = receiver.requests
    assert request.method == "POST"
    assert request.path == "/hooks/fictures?team=7"
    assert request.body == PAYLOAD
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"fictures-ai/{__version__}"
    assert request.headers["webhook-id"] == "msg_job_1"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    assert request.headers["webhook-signature"].startswith("v1,")
    # The reference implementation accepts exactly what was received...
    assert Webhook(SECRET).verify(request.body, request.headers) == json.loads(PAYLOAD)
    # ...and nothing else: another body, another id, another secret.
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(request.body.replace(b"job_1", b"job_2"), request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(request.body, {**request.headers, "webhook-id": "msg_job_2"})
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_webhook_secret()).verify(request.body, request.headers)


async def test_a_retry_keeps_the_id_and_signs_afresh(
    make_sender: Callable[..., WebhookSender],
) -> None:
    clock = FakeClock(time.time())
    sender = make_sender(allowed_hosts=["127.0.0.1"], clock=clock)
    with webhook_receiver([503, 200]) as receiver:
        first = await sender.send(receiver.url, webhook_id="msg_retry", payload=PAYLOAD)
        clock.advance(7)
        second = await sender.send(receiver.url, webhook_id="msg_retry", payload=PAYLOAD)
    assert (first.delivered, first.status_code) == (False, 503)
    assert (second.delivered, second.status_code) == (True, 200)
    one, two = receiver.requests
    assert one.headers["webhook-id"] == two.headers["webhook-id"] == "msg_retry"
    assert int(two.headers["webhook-timestamp"]) - int(one.headers["webhook-timestamp"]) == 7
    assert one.headers["webhook-signature"] != two.headers["webhook-signature"]
    assert one.body == two.body == PAYLOAD
    for request in (one, two):
        Webhook(SECRET).verify(request.body, request.headers)


@pytest.mark.parametrize("status", [400, 401, 404, 408, 410, 413, 429, 500, 502, 503])
async def test_an_answer_other_than_2xx_is_not_a_delivery(
    make_sender: Callable[..., WebhookSender], status: int
) -> None:
    sender = make_sender(allowed_hosts=["127.0.0.1"])
    with webhook_receiver([status]) as receiver:
        attempt = await sender.send(receiver.url, webhook_id="msg_1", payload=PAYLOAD)
    assert not attempt.delivered
    assert attempt.status_code == status
    assert attempt.error is not None
    assert f"HTTP {status}" in attempt.error
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
async def test_any_2xx_is_a_delivery(
    make_sender: Callable[..., WebhookSender], status: int
) -> None:
    sender = make_sender(allowed_hosts=["127.0.0.1"])
    with webhook_receiver([status]) as receiver:
        attempt = await sender.send(receiver.url, webhook_id="msg_1", payload=PAYLOAD)
    assert (attempt.delivered, attempt.status_code, attempt.error) == (True, status, None)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed(
    make_sender: Callable[..., WebhookSender], status: int
) -> None:
    sender = make_sender(allowed_hosts=["127.0.0.1"])
    with webhook_receiver([status, 204]) as receiver:
        attempt = await sender.send(receiver.url, webhook_id="msg_1", payload=PAYLOAD)
    assert not attempt.delivered
    assert attempt.status_code == status
    assert attempt.error is not None
    assert "redirects are not followed" in attempt.error
    assert [request.path for request in receiver.requests] == ["/"]


async def test_a_receiver_that_does_not_answer_times_out(
    make_sender: Callable[..., WebhookSender],
) -> None:
    sender = make_sender(allowed_hosts=["127.0.0.1"], timeout_s=0.3)
    # Listening but never accepting: the connection opens, no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        attempt = await sender.send(
            f"http://127.0.0.1:{port}/", webhook_id="msg_1", payload=PAYLOAD
        )
    assert not attempt.delivered
    assert attempt.status_code is None
    assert attempt.error is not None
    assert "WEBHOOK_TIMEOUT_S" in attempt.error
    assert 0.25 < attempt.duration_s < 2


async def test_a_refused_connection_is_a_failed_attempt(
    make_sender: Callable[..., WebhookSender],
) -> None:
    sender = make_sender(allowed_hosts=["127.0.0.1"])
    attempt = await sender.send(
        f"http://127.0.0.1:{free_port()}/", webhook_id="msg_1", payload=PAYLOAD
    )
    assert (attempt.delivered, attempt.status_code) == (False, None)
    assert attempt.error is not None
    assert "ConnectError" in attempt.error


async def test_a_failed_attempt_is_logged_once_without_payload_or_secret(
    make_sender: Callable[..., WebhookSender], caplog: pytest.LogCaptureFixture
) -> None:
    sender = make_sender(allowed_hosts=["127.0.0.1"])
    caplog.set_level(logging.INFO, logger="fictures_ai.services.jobs.webhooks")
    with webhook_receiver([500, 204]) as receiver:
        await sender.send(receiver.url, webhook_id="msg_log", payload=PAYLOAD)
        await sender.send(receiver.url, webhook_id="msg_log", payload=PAYLOAD)
    records = [r for r in caplog.records if r.name == "fictures_ai.services.jobs.webhooks"]
    (record,) = records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "msg_log" in message
    assert "HTTP 500" in message
    assert "job_1" not in message
    assert SECRET.removeprefix("whsec_") not in message


def test_signed_headers_refuse_ids_and_payloads_the_signature_cannot_carry() -> None:
    sender = WebhookSender(
        secret=SECRET, allowed_hosts=[], timeout_s=1, retry_base_s=1, retry_max_s=1
    )
    for bad_id in ["", "msg.1", "msg 1", "msg\r\n1", "x" * 256]:
        with pytest.raises(ValueError, match="webhook ids"):
            sender.signed_headers(webhook_id=bad_id, timestamp=1, payload=b"{}")
    with pytest.raises(ValueError, match="UTF-8"):
        sender.signed_headers(webhook_id="msg_1", timestamp=1, payload=b"\xff{}")


# The SSRF guard.

REFUSED = [
    # IPv4 loopback in every notation inet_aton(3) and the system resolver read.
    "http://127.0.0.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://017700000001/",
    "http://0x7f.0.0.0x1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://127.0.0.1./",
    "https://127.0.0.1:8443/hook",
    # Other internal IPv4.
    "http://0.0.0.0/",
    "http://0/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://192.0.0.8/",
    "http://198.18.0.1/",
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    # IPv6 internal, and IPv4 internal embedded in IPv6.
    "http://[::1]/",
    "http://[::]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::127.0.0.1]/",
    "http://[::8.8.8.8]/",
    "http://[2002:7f00:1::]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::10.0.0.1]/",
    "http://[64:ff9b:1::8.8.8.8]/",
    "http://[2001::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://[fec0::1]/",
    "http://[ff02::1]/",
    "http://[100::1]/",
    "http://[2001:db8::1]/",
    # Names: loopback names, and names resolving to an internal address (any of them).
    "http://localhost/",
    "http://LocalHost./",
    "http://localhost:8000/",
    "http://api.localhost/",
    "http://internal.example/",
    "http://INTERNAL.example./",
    "http://mixed.example/",
    "http://metadata.example/",
    "http://mapped.example/",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_internal_addresses_are_refused_at_submission(url: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await check_webhook_url(
            url, allowed_hosts=AllowedHosts.parse([]), resolver=FakeResolver(INTERNAL)
        )
    assert caught.value.param == "webhook_url"
    assert "WEBHOOK_ALLOWED_HOSTS" in caught.value.message
    assert "public" in caught.value.message


@pytest.mark.parametrize("url", REFUSED)
async def test_internal_addresses_are_a_failed_attempt_when_sending(
    make_sender: Callable[..., WebhookSender], url: str
) -> None:
    attempt = await make_sender().send(url, webhook_id="msg_1", payload=PAYLOAD)
    assert (attempt.delivered, attempt.status_code) == (False, None)
    assert attempt.error is not None
    assert "WEBHOOK_ALLOWED_HOSTS" in attempt.error


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://example.com/", "https://"),
        ("file:///etc/passwd", "https://"),
        ("gopher://93.184.216.34/", "https://"),
        ("https://user:secret@public.example/", "user name or password"),
        ("https://token@public.example/", "user name or password"),
        ("http:///hook", "no host"),
        ("http://public.example:0/", "port"),
        ("http://public.example:70000/", "port"),
        ("http://0177.0.0.1/", "IPv4"),
        ("http://%31%32%37.0.0.1/", "neither"),
        ("http://1.2.3.4.5/", "neither"),
        ("http://256.0.0.1/", "IPv4"),
        ("http://evil.0x7f/", "neither"),
        ("http://exa_mple-.com/", "not a valid host name"),
        ("https://public.example/" + "a" * 2100, "limit"),
        ("http://unknown.example/", "does not resolve"),
    ],
)
async def test_malformed_urls_are_refused_with_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says) as caught:
        await check_webhook_url(
            url, allowed_hosts=AllowedHosts.parse([]), resolver=FakeResolver(INTERNAL)
        )
    assert caught.value.param == "webhook_url"
    assert "secret" not in caught.value.message


@pytest.mark.parametrize(
    "url",
    [
        "https://93.184.216.34/hook",
        "http://8.8.8.8:8080/",
        "https://[2606:4700:4700::1111]/",
        "https://[::ffff:8.8.8.8]/",
        "https://[2002:808:808::1]/",
        "https://[64:ff9b::8.8.8.8]/",
        "https://public.example/hooks?x=1",
        "https://PUBLIC.example./",
    ],
)
async def test_public_addresses_pass(url: str) -> None:
    await check_webhook_url(
        url, allowed_hosts=AllowedHosts.parse([]), resolver=FakeResolver(INTERNAL)
    )


async def test_literal_addresses_are_not_resolved() -> None:
    resolver = FakeResolver({})
    for url in ["http://2130706433/", "http://0x7f.1/", "http://[::1]/", "http://8.8.8.8/"]:
        with contextlib.suppress(InvalidRequestError):
            await check_webhook_url(url, allowed_hosts=AllowedHosts.parse([]), resolver=resolver)
    assert resolver.calls == []


async def test_the_allow_list_lets_127_0_0_1_through(
    make_sender: Callable[..., WebhookSender],
) -> None:
    with webhook_receiver([204]) as receiver:
        refused = await make_sender().send(receiver.url, webhook_id="msg_1", payload=PAYLOAD)
        allowed = make_sender(allowed_hosts=["127.0.0.1"])
        delivered = await allowed.send(receiver.url, webhook_id="msg_1", payload=PAYLOAD)
        # An address entry allows the address in any notation.
        await allowed.check_url(f"http://0x7f.1:{receiver.port}/")
        await allowed.check_url(f"http://2130706433:{receiver.port}/")
        with pytest.raises(InvalidRequestError, match="WEBHOOK_ALLOWED_HOSTS"):
            await allowed.check_url("http://127.0.0.2/")
        with pytest.raises(InvalidRequestError, match="WEBHOOK_ALLOWED_HOSTS"):
            await allowed.check_url("http://localhost/")
    assert not refused.delivered
    assert refused.error is not None
    assert "loopback" in refused.error
    assert delivered.delivered
    assert len(receiver.requests) == 1


async def test_an_allowed_name_connects_to_the_address_it_resolved_to(
    make_sender: Callable[..., WebhookSender],
) -> None:
    resolver = FakeResolver({"hooks.internal": ["127.0.0.1"]})
    sender = make_sender(allowed_hosts=["Hooks.Internal."], resolver=resolver)
    with webhook_receiver([204]) as receiver:
        attempt = await sender.send(
            f"http://HOOKS.internal:{receiver.port}/in", webhook_id="msg_1", payload=PAYLOAD
        )
    assert attempt.delivered, attempt.error
    (request,) = receiver.requests
    # Connected to the resolved address; the Host header still names the URL's host.
    assert request.headers["host"] == f"hooks.internal:{receiver.port}"
    assert resolver.calls == ["hooks.internal"]
    Webhook(SECRET).verify(request.body, request.headers)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for the name hooks.internal, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command makes the test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=hooks.internal",
         "-addext", "subjectAltName=DNS:hooks.internal",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize(
    ("name", "delivered"), [("hooks.internal", True), ("other.internal", False)]
)
async def test_tls_verifies_the_url_host_while_connecting_to_the_checked_address(
    make_sender: Callable[..., WebhookSender],
    tls_files: tuple[Path, Path],
    name: str,
    delivered: bool,
) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    resolver = FakeResolver({"hooks.internal": ["127.0.0.1"], "other.internal": ["127.0.0.1"]})
    sender = make_sender(
        allowed_hosts=[name],
        resolver=resolver,
        ssl_context=ssl.create_default_context(cafile=str(cert)),
    )
    with webhook_receiver([204], ssl_context=server_context) as receiver:
        attempt = await sender.send(
            f"https://{name}:{receiver.port}/", webhook_id="msg_tls", payload=PAYLOAD
        )
    assert attempt.delivered is delivered, attempt.error
    if delivered:
        (request,) = receiver.requests
        Webhook(SECRET).verify(request.body, request.headers)
    else:
        # The certificate names hooks.internal, not other.internal: refused, though both
        # names connect to the same address.
        assert attempt.error is not None
        assert "certificate" in attempt.error.lower() or "hostname" in attempt.error.lower()
        assert receiver.requests == []


async def test_a_name_that_rebinds_to_an_internal_address_is_refused_when_connecting(
    make_sender: Callable[..., WebhookSender],
) -> None:
    # Public when the job is submitted, loopback when the webhook is sent.
    resolver = FakeResolver({"rebind.example": [["93.184.216.34"], ["127.0.0.1"]]})
    sender = make_sender(resolver=resolver)
    with webhook_receiver([204]) as receiver:
        url = f"http://rebind.example:{receiver.port}/"
        await sender.check_url(url)
        attempt = await sender.send(url, webhook_id="msg_1", payload=PAYLOAD)
    assert resolver.calls == ["rebind.example", "rebind.example"]
    assert not attempt.delivered
    assert attempt.error is not None
    assert "resolves to 127.0.0.1" in attempt.error
    assert receiver.requests == []


def test_allow_list_entries_are_hosts_or_addresses() -> None:
    allowed = AllowedHosts.parse(
        ["Hooks.Example.", " 10.0.0.7 ", "[::1]", "", "0x7f.1", "fd00::5", "hooks_1.internal"]
    )
    assert allowed.names == {"hooks.example", "hooks_1.internal"}
    assert {str(a) for a in allowed.addresses} == {"10.0.0.7", "::1", "127.0.0.1", "fd00::5"}
    assert allowed.allows_name("HOOKS.example")
    assert allowed.allows_name("hooks.example.")
    assert allowed.allows_name("167772167")  # 10.0.0.7
    assert not allowed.allows_name("sub.hooks.example")
    assert not allowed.allows_name("example")
    for bad in ["http://hooks.example", "hooks.example:8080", "hooks.example/x", "a b", "*.x.y"]:
        with pytest.raises(ValueError, match="WEBHOOK_ALLOWED_HOSTS"):
            AllowedHosts.parse([bad])


# Back-off.


@pytest.mark.parametrize("attempt", range(1, 25))
def test_retry_delays_are_full_jitter_under_a_doubling_cap(attempt: int) -> None:
    base_s, max_s = 2.0, 600.0
    cap = min(max_s, base_s * 2 ** (attempt - 1))
    assert backoff_delay(attempt, base_s=base_s, max_s=max_s, rng=lambda: 0.0) == 0.0
    assert backoff_delay(attempt, base_s=base_s, max_s=max_s, rng=lambda: 0.5) == cap / 2
    highest = backoff_delay(attempt, base_s=base_s, max_s=max_s, rng=lambda: 1.0 - 2**-53)
    assert cap * 0.999 < highest < cap
    rng = random.Random(attempt).random
    for _ in range(200):
        delay = backoff_delay(attempt, base_s=base_s, max_s=max_s, rng=rng)
        assert 0 <= delay <= min(max_s, base_s * 2**attempt)
        assert delay <= cap


def test_retry_delay_caps_and_refuses_attempt_zero() -> None:
    assert [backoff_delay(n, base_s=5, max_s=60, rng=lambda: 1.0) for n in range(1, 7)] == [
        5,
        10,
        20,
        40,
        60,
        60,
    ]
    assert backoff_delay(10**6, base_s=5, max_s=60, rng=lambda: 1.0) == 60
    with pytest.raises(ValueError, match="start at 1"):
        backoff_delay(0, base_s=5, max_s=60)
    sender = WebhookSender(
        secret=SECRET, allowed_hosts=[], timeout_s=1, retry_base_s=3, retry_max_s=100,
        rng=lambda: 0.25,
    )  # fmt: skip
    assert sender.retry_delay(1) == 0.75
    assert sender.retry_delay(4) == 6.0
    assert sender.retry_delay(100) == 25.0


# Secrets.


def test_a_generated_secret_is_32_random_bytes_the_library_reads() -> None:
    one, two = generate_webhook_secret(), generate_webhook_secret()
    assert one != two
    assert one.startswith("whsec_")
    key = parse_webhook_secret(one)
    assert len(key) == 32
    assert key == base64.b64decode(one.removeprefix("whsec_"))
    # The reference library signs with the same key.
    assert Webhook(one).sign("m", time_at(0), "x") == Webhook(key).sign("m", time_at(0), "x")


def test_unpadded_and_longest_secrets_are_accepted() -> None:
    key = bytes(range(25))
    unpadded = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    assert parse_webhook_secret(unpadded) == key
    assert len(parse_webhook_secret("whsec_" + base64.b64encode(b"k" * 64).decode())) == 64


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        ("", "does not start"),
        ("s3cret-password-that-is-long-enough", "does not start"),
        (base64.b64encode(b"k" * 32).decode(), "does not start"),
        ("WHSEC_" + base64.b64encode(b"k" * 32).decode(), "does not start"),
        ("whsec_", "0 bytes"),
        ("whsec_" + base64.b64encode(b"k" * 16).decode(), "16 bytes"),
        ("whsec_" + base64.b64encode(b"k" * 23).decode(), "23 bytes"),
        ("whsec_" + base64.b64encode(b"k" * 65).decode(), "65 bytes"),
        ("whsec_" + "!" * 40, "not base64"),
        ("whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(), "not base64"),
        ("whsec_ " + base64.b64encode(b"k" * 32).decode(), "not base64"),
    ],
)
def test_bad_secrets_are_refused(secret: str, says: str) -> None:
    with pytest.raises(ValueError, match="WEBHOOK_SECRET") as caught:
        parse_webhook_secret(secret)
    assert says in str(caught.value)
    if secret.removeprefix("whsec_"):
        assert secret.removeprefix("whsec_") not in str(caught.value)
    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        WebhookSender(secret=secret, allowed_hosts=[], timeout_s=1, retry_base_s=1, retry_max_s=1)


def time_at(seconds: int) -> datetime:
    """A UTC datetime ``seconds`` after the epoch."""
    return datetime.fromtimestamp(seconds, UTC)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("10.0.0.1", "a private address"),
        ("100.64.0.1", "carrier-grade NAT (100.64.0.0/10)"),
        ("169.254.169.254", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("192.0.0.8", "IETF protocol assignments"),
        ("::ffff:10.0.0.1", "the IPv4-mapped IPv6 form of 10.0.0.1, a private address"),
        ("2002:a9fe:a9fe::", "the 6to4 IPv6 form of 169.254.169.254, a link-local address"),
        ("64:ff9b::7f00:1", "the NAT64 IPv6 form of 127.0.0.1, a loopback address"),
        ("fd00::1", "a unique-local address (fc00::/7)"),
        ("fec0::1", "a site-local address (fec0::/10)"),
        ("8.8.8.8", None),
        ("::ffff:8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_non_public_addresses_are_named_for_what_they_are(address: str, reason: str | None) -> None:
    found = non_public_reason(ipaddress.ip_address(address))
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert reason in found
