"""Fixtures of the portal's browser tests: one Chromium per session, a fresh browser context per page."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, Page

from tests.portal.browser import ChromiumSession, new_page


@pytest.fixture(scope="session")
def chromium_session() -> Iterator[ChromiumSession]:
    """Chromium, launched once per session; tests use it through ``browser``, ``page`` or ``open_page``."""
    session = ChromiumSession.start()
    yield session
    session.close()


@pytest.fixture
def browser(chromium_session: ChromiumSession) -> Iterator[Browser]:
    """The session's headless Chromium, usable by Playwright calls for the duration of the test."""
    with chromium_session.in_use() as browser:
        yield browser


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[], Page]]:
    """Open pages each in a fresh browser context (one per customer, say), all closed after the test."""
    pages: list[Page] = []

    def open_one() -> Page:
        pages.append(new_page(browser))
        return pages[-1]

    yield open_one
    for opened in pages:
        opened.context.close()


@pytest.fixture
def page(open_page: Callable[[], Page]) -> Page:
    """A page in a fresh browser context: no cookie or storage of another test."""
    return open_page()
