"""The playground page in a real headless Chromium (Debian's) against the real server process.

Chromium comes from Debian (``make test-deps``, which ``make test`` and ``make e2e`` run), not
from ``playwright install``: Playwright only drives it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from tests.e2e.conftest import RunningServer

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FIRST_TEXT_MS = 300_000  # the first text request of a fresh server loads vLLM (~40 s)
IMAGE_MS = 120_000

# Records every length the output took, to tell streamed text from text that arrives at once.
RECORD_OUTPUT_LENGTHS = """() => {
  window.outputLengths = [];
  const output = document.getElementById("output");
  new MutationObserver(() => window.outputLengths.push(output.textContent.length))
    .observe(output, {childList: true, characterData: true, subtree: true});
}"""

IMAGE_LOADED = """() => {
  const image = document.getElementById("image");
  return !image.hidden && image.complete && image.naturalWidth > 0;
}"""


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: these tests drive Debian's Chromium. Install it with "
            "`make test-deps` (apt-get install chromium), which `make test` and `make e2e` run."
        )
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, server: RunningServer) -> Iterator[Page]:
    """The playground in a fresh browser context (empty localStorage).

    Fails the test on a script error or a console error (a Content-Security-Policy violation
    is one), other than the browser's own line about a failed HTTP request.
    """
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console error: {message.text}")

    page.on("console", on_console)
    page.goto("/playground")
    page.wait_for_function("() => document.getElementById('text-model').textContent !== '…'")
    yield page
    context.close()
    assert not problems, problems


def fill_text_form(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", "16")
    page.fill("#temperature", "0")


def fill_image_form(page: Page, *, seed: str = "") -> None:
    page.fill("#image-prompt", "a lighthouse in a storm")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.fill("#steps", "2")
    page.fill("#seed", seed)


def test_page_is_served_with_a_content_security_policy(page: Page, server: RunningServer) -> None:
    response = page.request.get("/playground")
    assert response.ok
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "img-src 'self' data:" in policy
    assert response.headers["cache-control"] == "no-cache"
    assert page.request.get("/playground/assets/index.html").status == 404
    assert page.text_content("#text-model") != "unavailable"  # the names come from /health


def test_without_a_key_the_servers_401_is_shown(page: Page) -> None:
    fill_text_form(page, "Say hello.")
    with page.expect_request("**/api/v1/text/stream") as text_request:
        page.click("#generate")
    assert "authorization" not in text_request.value.all_headers()
    page.wait_for_selector("#text-panel[data-state=error]")
    assert "Missing or invalid API key" in (page.text_content("#text-error") or "")


def test_text_streams_and_an_image_renders(page: Page, server: RunningServer) -> None:
    page.fill("#api-key", server.key)
    page.evaluate(RECORD_OUTPUT_LENGTHS)
    fill_text_form(page, "Tell me a long story about a dragon who learns to paint.")
    with page.expect_request("**/api/v1/text/stream") as text_request:
        page.click("#generate")
    assert text_request.value.all_headers()["authorization"] == f"Bearer {server.key}"

    # Text appears, then grows while the stream is still open.
    page.wait_for_function(
        "() => document.getElementById('output').textContent.length > 0", timeout=FIRST_TEXT_MS
    )
    first = len(page.text_content("#output") or "")
    page.wait_for_function(
        f"() => document.getElementById('output').textContent.length > {first}"
        " || document.getElementById('text-panel').dataset.state !== 'streaming'"
    )
    page.wait_for_selector("#text-panel[data-state=done]")
    lengths = page.evaluate("window.outputLengths")
    assert len(set(lengths)) >= 3, f"the text did not arrive in pieces: {lengths}"
    assert lengths[-1] == len(page.text_content("#output") or "")
    assert "16 tokens" in (page.text_content("#text-status") or "")
    assert "finish reason: length" in (page.text_content("#text-status") or "")
    assert page.is_hidden("#text-error")

    fill_image_form(page, seed="7")
    page.click("#image-generate")
    page.wait_for_selector("#image-panel[data-state=done]", timeout=IMAGE_MS)
    page.wait_for_function(IMAGE_LOADED)
    assert page.evaluate("document.getElementById('image').naturalWidth") == 256
    assert page.evaluate("document.getElementById('image').naturalHeight") == 256
    assert "seed 7" in (page.text_content("#image-info") or "")
    assert page.is_hidden("#image-progress")
    assert page.is_hidden("#image-error")
    # Once loaded, the default image model says plainly that it draws noise.
    page.wait_for_selector("#image-notice:has-text('random weights')")


def test_an_api_key_is_sent_as_a_bearer_token_and_remembered(
    page: Page, server: RunningServer
) -> None:
    page.fill("#api-key", server.key)
    fill_text_form(page, "Say hello.")
    with page.expect_request("**/api/v1/text/stream") as text_request:
        page.click("#generate")
    assert text_request.value.all_headers()["authorization"] == f"Bearer {server.key}"
    page.wait_for_selector("#text-panel[data-state=done]", timeout=FIRST_TEXT_MS)
    assert page.text_content("#output")

    fill_image_form(page)
    with page.expect_request("**/api/v1/images/stream") as image_request:
        page.click("#image-generate")
    assert image_request.value.all_headers()["authorization"] == f"Bearer {server.key}"
    page.wait_for_selector("#image-panel[data-state=done]", timeout=IMAGE_MS)
    page.wait_for_function(IMAGE_LOADED)

    # The key is kept in localStorage: a reload fills it in again.
    page.reload()
    assert page.input_value("#api-key") == server.key


def test_an_invalid_request_shows_the_servers_error(page: Page, server: RunningServer) -> None:
    page.fill("#api-key", server.key)
    page.fill("#prompt", "")
    page.click("#generate")
    page.wait_for_selector("#text-panel[data-state=error]")
    assert page.is_visible("#text-error")
    assert "Prompt must not be empty" in (page.text_content("#text-error") or "")
    assert page.is_enabled("#generate")

    page.fill("#image-prompt", "a lighthouse")
    page.fill("#width", "4096")
    page.click("#image-generate")
    page.wait_for_selector("#image-panel[data-state=error]")
    assert "width: Input should be less than or equal to 2048" in (
        page.text_content("#image-error") or ""
    )
