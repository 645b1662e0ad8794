"""A headless Chromium for the playground's and the inspector page's tests and the playground screenshot.

Playwright's sync API drives the system's Chromium (Debian's ``chromium``, which .ci/run installs) through
``executable_path``: no browser is downloaded, and ``playwright install`` is never run. A caller waits for the
page's own ``data-state`` to leave idle and running rather than for a guessed time, since a streamed response
keeps no request or load event open.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
MISSING = "needs a headless Chromium (apt-get install chromium)"

# Playwright adds --headless and its own automation flags. Chromium run as root refuses to start without
# --no-sandbox; the machines have no GPU for it; the rest keep it from reaching out to the network on its own.
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
VIEWPORT = {"width": 1200, "height": 800}


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium (BROWSER) for as long as the block runs."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Browser, url: str) -> Page:
    """A new 1200x800 page, once ``url`` has loaded."""
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url)
    return page


def wait_state(page: Page, output: str = "output", timeout: float = 20.0) -> str:
    """Waits until the element ``#output``'s data-state leaves idle and running; returns it."""
    try:
        return page.wait_for_function(
            """id => { const s = document.getElementById(id)?.dataset.state;
                       return s !== undefined && s !== "idle" && s !== "running" && s; }""",
            arg=output, timeout=timeout * 1000).json_value()
    except PlaywrightTimeout:
        state = page.evaluate("id => document.getElementById(id)?.dataset.state", output)
        raise AssertionError(f"#{output} still {state!r} after {timeout}s") from None


def char_spans(page: Page, output: str = "output") -> list[dict]:
    """Each generated or scored character's span in ``#output``: its text, log-probability, probability, shade."""
    return page.evaluate("""id => [...document.querySelectorAll(`#${id} .ch`)].map(s => ({
        char: s.textContent, lp: Number(s.dataset.lp), p: Number(s.dataset.p), bg: s.style.backgroundColor}))""",
                         output)
