"""Webhooks of jobs verified on the receiver's side by the standardwebhooks npm package.

Our sender posts to a real receiver on 127.0.0.1 (allowed through WEBHOOK_ALLOWED_HOSTS); the
received body and headers go to ``js/verify_webhook.mjs``, the TypeScript/JavaScript receiver
code of docs/webhooks.md, which must accept them, and refuse them once the body is changed.
``tests/e2e/js`` pins ``standardwebhooks`` (``package-lock.json``); the fixture installs the
pinned packages with ``npm ci`` when it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fictures_ai.services.jobs.webhooks import WebhookSender, generate_webhook_secret
from tests.webhook_receiver import ReceivedRequest, webhook_receiver

pytestmark = pytest.mark.e2e

JS = Path(__file__).parent / "js"
SECRET = generate_webhook_secret()
PAYLOAD = json.dumps(
    {
        "type": "job.completed",
        "timestamp": "2026-05-09T07:35:25Z",
        "data": {"id": "job_01", "object": "job", "status": "completed", "title": "Été, 夏"},
    },
    ensure_ascii=False,
).encode()


@pytest.fixture(scope="module")
def node() -> str:
    """Node.js, with the pinned standardwebhooks package installed beside the script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js 20+ and npm are needed for the JavaScript receiver tests", False)
    if not (JS / "node_modules" / "standardwebhooks" / "package.json").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            check=True,
            timeout=600,
        )
    return node


@pytest.fixture
async def received() -> ReceivedRequest:
    """One webhook as a receiver on 127.0.0.1 read it off the socket."""
    sender = WebhookSender(
        secret=SECRET,
        allowed_hosts=["127.0.0.1"],
        timeout_s=5,
        retry_base_s=1,
        retry_max_s=10,
    )
    try:
        with webhook_receiver([204]) as receiver:
            attempt = await sender.send(
                f"{receiver.url}/webhooks/fictures", webhook_id="msg_e2e_1", payload=PAYLOAD
            )
    finally:
        await sender.aclose()
    assert attempt.delivered, attempt.error
    (request,) = receiver.requests
    return request


def verify_in_node(node: str, *, secret: str, headers: dict[str, str], body: bytes) -> str:
    """Run verify_webhook.mjs; its stdout, or an AssertionError with its stderr."""
    done = subprocess.run(
        [node, "verify_webhook.mjs"],
        cwd=JS,
        input=json.dumps({"secret": secret, "headers": headers, "body": body.decode()}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(done.stderr.strip() or f"exit {done.returncode}")
    return done.stdout


def test_the_npm_library_verifies_what_the_receiver_got(
    node: str, received: ReceivedRequest
) -> None:
    assert received.body == PAYLOAD
    out = verify_in_node(node, secret=SECRET, headers=received.headers, body=received.body)
    assert json.loads(out) == json.loads(PAYLOAD)


@pytest.mark.parametrize(
    "change",
    ["body", "id", "timestamp", "secret"],
)
def test_the_npm_library_refuses_a_changed_webhook(
    node: str, received: ReceivedRequest, change: str
) -> None:
    secret, headers, body = SECRET, dict(received.headers), received.body
    if change == "body":
        body = body.replace(b"completed", b"cancelled")
    elif change == "id":
        headers["webhook-id"] = "msg_e2e_2"
    elif change == "timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) + 1)
    else:
        secret = generate_webhook_secret()
    with pytest.raises(AssertionError, match="verification failed"):
        verify_in_node(node, secret=secret, headers=headers, body=body)
