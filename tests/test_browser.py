"""The web page in a real browser: upload a reference, search, refine by clicking a hit, see an error.

Drives Debian's chromium (``/usr/bin/chromium``) through Playwright against the real server
(uvicorn in a background thread). Without chromium the test is skipped, unless
``CIRLAB_REQUIRE_BROWSER=1`` (as ``make test`` sets), where it fails instead.
"""

import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
WAIT_MS = 20_000
ROOT = Path(__file__).resolve().parents[1]
SHOT = ROOT / "tests" / "artifacts" / "browser.png"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The browser, checked before the (slow) index fixtures are built."""
    if CHROMIUM.is_file():
        return CHROMIUM
    reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CIRLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and CIRLAB_REQUIRE_BROWSER=1 requires it")
    pytest.skip(reason)


@pytest.fixture
def server(tiny_index):
    """Base URL of the real app served by uvicorn on a free 127.0.0.1 port; stopped afterwards."""
    from cirlab.config import ServeConfig
    from cirlab.retrieval.search import Searcher
    from cirlab.serving.app import create_app
    from serving_helpers import serve_in_thread

    searcher = Searcher.open(tiny_index[1])
    with serve_in_thread(create_app(searcher, ServeConfig())) as base:
        yield base, searcher


def test_page_search_refine_and_error(chromium, server):
    from playwright.sync_api import expect, sync_playwright

    base, searcher = server
    first = searcher.index.ids()[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            page.goto(base + "/")
            expect(page.locator("#gallery .pick").first).to_be_visible()  # the picker is paged in
            expect(page.locator("#rerank-box")).to_be_hidden()  # a zero-shot composer: no re-ranking

            # 1. an uploaded reference, a change typed, the Search button
            page.set_input_files("#upload", str(searcher.image_path(first)))
            expect(page.locator("#reference")).to_have_attribute("src", _starts("blob:"))
            page.fill("#text", "make it blue")
            page.click("#search")
            results = page.locator("#results .result")
            expect(results.first).to_be_visible()
            assert results.count() >= 1
            expect(page.locator("#error")).to_be_hidden()

            # 2. a hit becomes the reference (by id); a second text refines with Enter
            hit = results.first.get_attribute("data-id")
            results.first.click()
            expect(page.locator("#reference")).to_have_attribute("src", _ends(f"/images/{quote(hit)}"))
            page.fill("#text", "add a red circle")
            with page.expect_response(lambda r: r.url.endswith("/search")) as answer:
                page.press("#text", "Enter")
            assert answer.value.status == 200
            assert answer.value.json()["reference"] == hit
            expect(results.first).to_be_visible()
            assert hit not in [results.nth(i).get_attribute("data-id") for i in range(results.count())]
            SHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOT), full_page=True)

            # 3. the API's error (a text over the 500-character limit) shows in #error
            page.fill("#text", "x" * 501)
            page.click("#search")
            expect(page.locator("#error")).to_be_visible()
            expect(page.locator("#error")).to_contain_text("over the limit of 500")
        finally:
            browser.close()
    (ROOT / "docs").mkdir(exist_ok=True)
    shutil.copyfile(SHOT, ROOT / "docs" / "serving.png")


def _starts(prefix: str):
    return re.compile("^" + re.escape(prefix))


def _ends(suffix: str):
    return re.compile(re.escape(suffix) + "$")
