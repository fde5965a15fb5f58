"""Real headless Chromium for the portal's browser tests: Debian's chromium driven by Playwright.

Playwright's sync API marks its event loop as running in the thread that drives it, for as long as it
lives; ``asyncio.run`` (and anyio's runner) refuse to start in that thread then, and a Playwright call made
while the mark is gone kills its connection. So the session keeps Chromium open but marks the loop only
while a test uses it (``ChromiumSession.in_use``; the ``browser``, ``page`` and ``open_page`` fixtures): the
rest of the suite runs its own event loops as before. A test holding one of them runs asyncio code in
another thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserType, Error, Page, Playwright, ViewportSize, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
# Fixed, so that screenshots, and the dates and numbers a page formats, are the same from run to run.
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
LOCALE = "en-US"
TIMEZONE = "UTC"
# Fail a wait with Playwright's own message (which selector, which URL) well before pytest-timeout fires.
TIMEOUT_MS = 15_000
# Containers give /dev/shm 64 MB, too little for Chromium's renderers: it keeps that memory in /tmp then.
CHROMIUM_ARGS = ["--disable-dev-shm-usage"]


def chromium_executable() -> str:
    """The Chromium to drive: ``$METERWARE_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH.

    Fails the test (never skips it) when there is none: the README's test command installs it.
    """
    configured = os.environ.get("METERWARE_CHROMIUM")
    if configured:
        found, looked_for = shutil.which(configured), f"$METERWARE_CHROMIUM={configured}"
    else:
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        looked_for = "chromium or chromium-browser on PATH"
    if found is None:
        pytest.fail(f"no Chromium ({looked_for}): run `bash tests/install-deps.sh`", pytrace=False)
    return found


def launch_chromium(chromium: BrowserType, executable: str) -> Browser:
    """Launch headless ``executable``, in Chromium's sandbox unless it cannot run here."""
    # Chromium refuses its sandbox as root; as another user a container may deny the user namespaces it needs.
    if os.geteuid() != 0:
        try:
            return chromium.launch(executable_path=executable, chromium_sandbox=True, args=CHROMIUM_ARGS)
        except Error as error:
            if "sandbox" not in str(error).lower():
                raise
    return chromium.launch(executable_path=executable, chromium_sandbox=False, args=CHROMIUM_ARGS)


@dataclass
class ChromiumSession:
    """One Playwright driver and one Chromium, opened once and shared by the tests of a session."""

    playwright: Playwright
    browser: Browser
    loop: asyncio.AbstractEventLoop

    @classmethod
    def start(cls) -> ChromiumSession:
        executable = chromium_executable()
        playwright = sync_playwright().start()
        loop = asyncio.get_running_loop()  # Playwright's, marked running in this thread by start()
        try:
            browser = launch_chromium(playwright.chromium, executable)
        except BaseException:
            playwright.stop()
            raise
        asyncio._set_running_loop(None)
        return cls(playwright, browser, loop)

    @contextmanager
    def in_use(self) -> Iterator[Browser]:
        """Mark Playwright's loop as running in this thread, as its calls need, until the block ends."""
        asyncio._set_running_loop(self.loop)
        try:
            yield self.browser
        finally:
            asyncio._set_running_loop(None)

    def close(self) -> None:
        with self.in_use():
            try:
                self.browser.close()
            finally:
                self.playwright.stop()


def new_page(browser: Browser) -> Page:
    """Open a page in a fresh browser context (its own cookies and storage); close it with its context."""
    context = browser.new_context(viewport=VIEWPORT, locale=LOCALE, timezone_id=TIMEZONE)
    context.set_default_timeout(TIMEOUT_MS)
    return context.new_page()


def artifacts_dir() -> Path:
    """Where the tests write screenshots: ``$METERWARE_TEST_ARTIFACTS``, else ``test-artifacts/``."""
    return Path(os.environ.get("METERWARE_TEST_ARTIFACTS") or ROOT / "test-artifacts")


def screenshot(page: Page, name: str) -> Path:
    """Write a full-page PNG of ``page`` to ``<artifacts>/<name>.png`` and return its path.

    ``name`` may hold ``/``: ``screenshot(page, "asgi/overview")``.
    """
    path = artifacts_dir() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path, full_page=True)
    return path
