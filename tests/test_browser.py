"""The web page in a real browser: upload a reference, search, refine by clicking a hit, see an error;
file names on the result cards and the model in the header; on a narrow screen the search box
before the picker; ``/docs`` rendered with its scripts from this server, or off (404).

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
NARROW_SHOT = ROOT / "tests" / "artifacts" / "browser-narrow.png"


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


def test_page_search_refine_and_error(chromium, server, tiny_index):
    from playwright.sync_api import expect, sync_playwright

    base, searcher = server
    model_folder = Path(tiny_index[0])  # <tmp>/model: the header names the folder holding it
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
            # the header names the model (not its row name in result tables) and its kind
            assert model_folder.name == "model"
            expect(page.locator("#model-name")).to_have_text(model_folder.parent.name)
            expect(page.locator("#model-kind")).to_contain_text(searcher.composer.kind)

            # 1. an uploaded reference, a change typed, the Search button
            page.set_input_files("#upload", str(searcher.image_path(first)))
            expect(page.locator("#reference")).to_have_attribute("src", _starts("blob:"))
            page.fill("#text", "make it blue")
            with page.expect_response(lambda r: r.url.endswith("/search")) as answer:
                page.click("#search")
            results = page.locator("#results .result")
            expect(results.first).to_be_visible()
            assert results.count() >= 1
            expect(page.locator("#error")).to_be_hidden()
            # each card names its file, relative to the gallery root: here its name; no server path
            for n, hit in enumerate(answer.value.json()["results"][:3]):
                name = searcher.image_path(hit["id"]).name
                assert hit["file"] == name, hit
                expect(results.nth(n).locator(".file")).to_have_text(f"#{n + 1} {name}")
                expect(results.nth(n).locator(".score")).to_have_text(f"score {hit['score']:.3f}")

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


def test_narrow_screen_puts_the_search_box_before_the_picker(chromium, server):
    """400 px wide (a phone): one column, the search box and the Search button above the
    gallery picker, and both inside the first screen's width (nothing scrolls sideways)."""
    from playwright.sync_api import expect, sync_playwright

    base, searcher = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 400, "height": 800})
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            page.goto(base + "/")
            expect(page.locator("#gallery .pick").first).to_be_visible()
            text, button = page.locator("#text").bounding_box(), page.locator("#search").bounding_box()
            picker = page.locator("#gallery-panel").bounding_box()
            assert text["y"] + text["height"] <= picker["y"], (text, picker)
            assert button["y"] + button["height"] <= picker["y"], (button, picker)
            assert text["y"] + text["height"] <= 800, text  # within the first screen
            assert page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scrolling
            page.locator("#gallery .pick").first.click()  # a pick from below becomes the reference above
            page.fill("#text", "make it blue")
            page.press("#text", "Enter")
            expect(page.locator("#results .result").first).to_be_visible()
            results, picker = page.locator("#results").bounding_box(), page.locator("#gallery-panel").bounding_box()
            assert results["y"] + results["height"] <= picker["y"], (results, picker)  # the results above it too
            NARROW_SHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(NARROW_SHOT), full_page=True)
        finally:
            browser.close()


def test_api_docs_render_offline_or_are_off(chromium, server):
    """``/docs`` either renders with every request answered by this server (the package
    fastapi-offline installed; any other address is refused and recorded) or answers 404
    (docs/serving.md says so); ``/redoc`` answers 404; ``/openapi.json`` is always there."""
    import json
    import urllib.error
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    from cirlab.serving.app import docs_assets

    base, _ = server
    with urllib.request.urlopen(base + "/openapi.json", timeout=30) as r:
        assert "/search" in json.loads(r.read())["paths"]
    for url in ("/docs", "/redoc") if docs_assets() is None else ("/redoc",):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + url, timeout=30)
        assert e.value.code == 404, url
    if docs_assets() is None:
        return
    outside: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(base + "/"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            page.route("**/*", only_this_server)
            page.goto(base + "/docs")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("cirlab")
            expect(page.locator(".opblock-summary-path", has_text="/search").first).to_be_visible()
            assert page.locator(".swagger-ui .errors-wrapper").count() == 0  # the spec parsed
        finally:
            browser.close()
    assert outside == [], f"the docs pages asked other servers: {outside}"


def test_docs_are_off_without_their_assets(tiny_index, monkeypatch):
    """Without fastapi-offline (Swagger UI's files), ``/docs`` answers 404, and ``/redoc`` always:
    never FastAPI's own pages, which load their scripts from a CDN and stay blank offline."""
    from fastapi.testclient import TestClient

    from cirlab.config import ServeConfig
    from cirlab.retrieval.search import Searcher
    from cirlab.serving import app as served

    monkeypatch.setattr(served, "docs_assets", lambda: None)
    client = TestClient(served.create_app(Searcher.open(tiny_index[1]), ServeConfig()))
    assert [client.get(u).status_code for u in ("/docs", "/redoc", "/docs-assets/swagger-ui.css")] == [404] * 3
    assert "/search" in client.get("/openapi.json").json()["paths"]


def _starts(prefix: str):
    return re.compile("^" + re.escape(prefix))


def _ends(suffix: str):
    return re.compile(re.escape(suffix) + "$")


def test_file_names_and_model_name_never_show_a_server_path():
    """What the cards and the header are given: a file relative to the gallery root, an image
    added through the API relative to the index folder, anything else by its name alone (also
    when the gallery root is ``/``); the model by its folder's name (the run's for ``<run>/model``)."""
    from types import SimpleNamespace

    from cirlab.serving.app import file_namer, model_info

    gallery = {"shoes/red-1": "/data/cat/shoes/red-1.jpg", "x": "added/x.png", "e": "/etc/passwd",
               "up": "../../secret/a.png"}
    searcher = SimpleNamespace(index=SimpleNamespace(gallery=gallery), folder=Path("/srv/index"))
    assert [file_namer(searcher, Path("/data/cat"))(i) for i in gallery] == [
        "shoes/red-1.jpg", "added/x.png", "passwd", "a.png"]
    assert [file_namer(searcher, Path("/"))(i) for i in gallery] == ["red-1.jpg", "added/x.png", "passwd", "a.png"]
    composer = SimpleNamespace(name="forward", kind="combiner", backbone=SimpleNamespace(kind="blip"))
    for path, name in (("/home/u/runs/demo/bi-combiner/model", "bi-combiner"),
                       ("/ckpt/bi-blip4cir-cirr", "bi-blip4cir-cirr"), (None, "forward")):
        searcher = SimpleNamespace(index=SimpleNamespace(model={"path": path} if path else {}), composer=composer,
                                   can_rerank=False)
        assert model_info(searcher) == {"name": name, "kind": "combiner", "row": "forward", "backbone": "blip",
                                        "rerank": False}
