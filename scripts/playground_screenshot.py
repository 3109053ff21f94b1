"""Take the README's screenshot of the playground: streamed text and a rendered image.

Start a server first, then point this at it::

    API_HOST=127.0.0.1 API_PORT=8123 .venv/bin/fictures-ai serve &
    .venv/bin/python scripts/playground_screenshot.py --url http://127.0.0.1:8123

It drives Debian's Chromium (``make browser`` installs it) headless with Playwright: types a
prompt, waits for the streamed text to finish, renders an image with a fixed seed and saves a
full-page PNG (``docs/images/playground.png`` by default), reduced to 256 colours to keep the
repository small. The first text request of a fresh server loads the model (about 40 s on 2
cores): run it twice against the same server for timings without the load.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TEXT_PROMPT = "Write the opening lines of a story about a lighthouse keeper who finds a map."
IMAGE_PROMPT = "a lighthouse on a cliff in a storm, oil painting"


def take_screenshot(*, url: str, output: Path, chromium: Path) -> None:
    """Fill both forms on ``{url}/playground``, wait for the results and save the page."""
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860}, color_scheme="light")
        page.goto(f"{url.rstrip('/')}/playground")

        page.fill("#prompt", TEXT_PROMPT)
        page.fill("#max-tokens", "120")
        page.click("#generate")
        page.wait_for_selector("#text-panel[data-state=done]", timeout=300_000)

        page.fill("#image-prompt", IMAGE_PROMPT)
        page.fill("#negative-prompt", "blurry, text")
        page.fill("#seed", "42")
        page.click("#image-generate")
        page.wait_for_selector("#image-panel[data-state=done]", timeout=300_000)
        page.wait_for_function("() => document.getElementById('image').complete")
        page.wait_for_selector("#image-notice:visible")  # the model list refreshes after a run
        page.mouse.move(0, 0)  # no hover effects in the picture

        png = page.screenshot(full_page=True)
        browser.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    save_compact_png(png, output)


def save_compact_png(png: bytes, output: Path) -> None:
    """Save a screenshot with a 256-colour palette: less than half the bytes, same look."""
    with Image.open(io.BytesIO(png)) as image:
        palette = image.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    palette.save(output, optimize=True)


def main() -> None:
    """Command line: ``--url``, ``--output``, ``--chromium``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running server")
    parser.add_argument("--output", type=Path, default=Path("docs/images/playground.png"))
    parser.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    args = parser.parse_args()
    take_screenshot(url=args.url, output=args.output, chromium=args.chromium)


if __name__ == "__main__":
    main()
