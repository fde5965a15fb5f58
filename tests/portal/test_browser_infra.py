"""The browser tests' own infrastructure: Chromium fixtures, screenshots, and checks that can fail."""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from tests.portal.a11y import accessibility_problems, check_page
from tests.portal.browser import (
    ROOT,
    VIEWPORT,
    ChromiumSession,
    artifacts_dir,
    chromium_executable,
    screenshot,
)
from tests.portal.infra_pages import BAD_PAGES, CHANGES, GOOD_PAGE
from tests.servers import ServerProcess, child_env, free_port

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pages_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn serving the known-good and known-bad pages."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "tests.portal.infra_pages:app", "--port", str(port)]
    log = tmp_path_factory.mktemp("pages") / "uvicorn.log"
    server = ServerProcess([*args, "--log-level", "warning"], child_env(), port, log)
    yield server.url
    server.stop()


def test_the_good_page_has_no_accessibility_problem(page: Page, pages_url: str) -> None:
    """Every kind of label, heading order, named chart, contrast (large text, translucent banner) passes."""
    page.goto(pages_url)
    assert accessibility_problems(page) == []
    check_page(page)


PROBLEMS = [
    ("unlabelled-input", 'form control <input id="name" name="name"> has no label'),
    ("label-without-text", 'form control <select name="env"> has no label'),
    ("empty-labelledby", 'form control <textarea name="note"> has no label'),
    ("skipped-heading", 'heading h4 "Table" follows h2 "Calls": a level is skipped'),
    ("two-h1", 'the page has 2 h1 headings, not one: "Usage", "Keys"'),
    ("heading-before-h1", 'heading h2 "Account" follows the start of the page: a level is skipped'),
    (
        "low-contrast-text",
        'text "Windows never written read as zero." in <p class="muted"> has contrast 3.03:1'
        " (#949494 on #ffffff), needs 4.5:1",
    ),
    (
        "low-contrast-large-text",
        'text "Projected invoice" in <p class="large"> has contrast 2.32:1 (#aaaaaa on #ffffff), needs 3:1',
    ),
    (
        # A colour space other than sRGB goes through a canvas, whose conversion rounds green up by one.
        "low-contrast-oklch-text",
        'text "Times are UTC." in <p class="caption"> has contrast 1.86:1 (#bdbebe on #ffffff), needs 4.5:1',
    ),
    (
        "translucent-background",
        'text "The period ends in 3 days." in <p class="banner"> has contrast 1.60:1 (#ffffff on #cccccc),'
        " needs 4.5:1",
    ),
    (
        "faded-text",
        'text "Windows never written read as zero." in <p class="muted"> has contrast 2.27:1'
        " (#acacac on #ffffff), needs 4.5:1",
    ),
    ("low-contrast-svg-text", 'text "hour" in <text> has contrast 1.91:1 (#bbbbbb on #ffffff), needs 4.5:1'),
    (
        "low-contrast-point",
        'chart point <circle class="point"> has contrast 1.75:1 (#9ecae1 on #ffffff), needs 3:1',
    ),
    ("unnamed-svg", "chart <svg> has no accessible name"),
    ("image-without-alt", "image <img> has no alt"),
    ("no-lang", "<html> has no lang"),
]


def test_every_bad_page_is_checked() -> None:
    """PROBLEMS covers each bad page the server holds, in order, and each differs from the good page."""
    assert [name for name, _ in PROBLEMS] == list(CHANGES)
    assert all(page != GOOD_PAGE for page in BAD_PAGES.values())


@pytest.mark.parametrize(("name", "problem"), [pytest.param(*case, id=case[0]) for case in PROBLEMS])
def test_each_bad_page_has_exactly_its_problem(page: Page, pages_url: str, name: str, problem: str) -> None:
    """A page with one problem put in is reported with that problem alone, in one readable line."""
    page.goto(f"{pages_url}/bad/{name}")
    assert accessibility_problems(page) == [problem]


def test_check_page_fails_listing_the_problems(page: Page, pages_url: str) -> None:
    """check_page raises with the page's URL and one line per problem."""
    page.goto(f"{pages_url}/bad/no-lang")
    with pytest.raises(AssertionError) as failure:
        check_page(page)
    assert (
        str(failure.value)
        == f"1 accessibility problem(s) on {pages_url}/bad/no-lang:\n  - <html> has no lang"
    )


def test_screenshot_writes_a_full_page_png(
    page: Page, pages_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """screenshot() writes a PNG of the whole page, taller than the viewport, under the artifacts dir."""
    monkeypatch.setenv("METERWARE_TEST_ARTIFACTS", str(tmp_path))
    page.goto(pages_url)
    path = screenshot(page, "infra/good")
    assert path == tmp_path / "infra" / "good.png"
    png = path.read_bytes()
    assert png[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk comes first
    assert width == VIEWPORT["width"]
    assert height > VIEWPORT["height"]


def test_artifacts_go_to_test_artifacts_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $METERWARE_TEST_ARTIFACTS, screenshots go to test-artifacts/ at the repository root."""
    monkeypatch.delenv("METERWARE_TEST_ARTIFACTS", raising=False)
    assert artifacts_dir() == ROOT / "test-artifacts"
    assert "test-artifacts/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("attempt", ["first", "second"])
def test_each_test_starts_without_cookies(page: Page, pages_url: str, attempt: str) -> None:
    """A test's page is in a fresh context: the cookie the other run set is gone."""
    page.goto(pages_url)
    assert page.context.cookies() == []
    page.goto(f"{pages_url}/set-cookie")
    assert [cookie["name"] for cookie in page.context.cookies()] == ["session"]


def test_pages_opened_in_one_test_do_not_share_cookies(open_page: Callable[[], Page], pages_url: str) -> None:
    """Each page open_page gives has its own context: a cookie one page got is not sent by the other."""
    first, second = open_page(), open_page()
    first.goto(f"{pages_url}/set-cookie")
    second.goto(pages_url)
    assert [cookie["name"] for cookie in first.context.cookies()] == ["session"]
    assert second.context.cookies() == []


def test_browser_is_headless_chromium(browser: Browser) -> None:
    """The session's browser is a connected Chromium."""
    assert browser.browser_type.name == "chromium"
    assert browser.is_connected()


def test_asyncio_runs_in_other_tests_while_the_browser_is_open(chromium_session: ChromiumSession) -> None:
    """Between the tests that use it, the open browser leaves this thread free for asyncio.run."""
    assert asyncio.run(asyncio.sleep(0, result="ran")) == "ran"


def test_a_missing_chromium_fails_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No Chromium on PATH nor at $METERWARE_CHROMIUM fails the test (not a skip), naming the fix."""
    monkeypatch.delenv("METERWARE_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        pytest.fail.Exception,
        match=r"^no Chromium \(chromium or chromium-browser on PATH\): run `bash tests/install-deps.sh`$",
    ):
        chromium_executable()
    monkeypatch.setenv("METERWARE_CHROMIUM", str(tmp_path / "chromium"))
    with pytest.raises(
        pytest.fail.Exception,
        match=r"^no Chromium \(\$METERWARE_CHROMIUM=/.*/chromium\): run `bash tests/install-deps.sh`$",
    ):
        chromium_executable()
