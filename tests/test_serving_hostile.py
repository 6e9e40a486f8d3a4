"""The service and the image decoder against hostile and careless input (issue 34): a gallery.json
naming files outside the gallery, uploads of every image kind, Pillow's real bomb limit, ids the
filesystem refuses, 429/503 with what a client needs to wait, security headers, sentences
instead of "Field required", a backend that is away, and `data check` reading image headers."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cirlab.cli import main
from cirlab.config import ServeConfig
from cirlab.data.base import CIRSplit, PathTable
from cirlab.data.check import check_splits
from cirlab.data import images as images_module
from cirlab.data.images import UnreadableImage, decode_image, load_as_shown, load_image
from cirlab.retrieval.index import load_index
from cirlab.retrieval.search import Searcher

from test_serving import bomb_png, png_bytes, searcher, served  # noqa: F401 (searcher: a fixture)

from fastapi.testclient import TestClient  # noqa: E402  (test_serving skips the module without fastapi)

from cirlab.serving.app import STATIC, create_app, decode_upload  # noqa: E402


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def tampered(searcher: Searcher, tmp_path, entries: dict[int, str]) -> Searcher:
    """A copy of the index folder whose gallery maps the ``n``-th id to ``entries[n]`` (as a
    gallery.json written by hand would), with the same model."""
    folder = shutil.copytree(searcher.folder, tmp_path / "ix")
    index = load_index(folder)
    ids = index.ids()
    for n, path in entries.items():
        index.gallery[ids[n]] = path
    return Searcher(searcher.composer, index, folder)


def grey_gradient() -> np.ndarray:
    """(16, 256) uint8: every 8-bit level once per row."""
    return np.tile(np.arange(256, dtype=np.uint8), (16, 1))


# -- 1. served files: inside the gallery root, images only --------------------------------------------


def test_images_serves_only_image_files_inside_the_gallery_root(searcher, tmp_path):
    outside = tmp_path / "elsewhere" / "x.png"
    outside.parent.mkdir()
    outside.write_bytes(png_bytes())
    hostile = tampered(searcher, tmp_path, {0: "/etc/passwd", 1: "evil.png", 2: "added/fake.png", 3: str(outside)})
    (hostile.folder / "evil.png").symlink_to("/etc/passwd")  # inside the index folder by name only
    (hostile.folder / "added").mkdir()
    (hostile.folder / "added" / "fake.png").write_bytes(os.urandom(300))  # an image suffix, no image
    ids = hostile.index.ids()
    with served(hostile) as client:
        for n in (0, 1, 2):
            r = client.get(f"/images/{ids[n]}")
            assert r.status_code == 404 and b"root:" not in r.content, (n, r.text)
        good = client.get(f"/images/{ids[4]}")
        assert good.status_code == 200 and good.headers["content-type"] == "image/png"
    gallery_root = str(searcher.image_path(ids[4]).resolve().parent)
    with served(hostile, gallery_root=gallery_root) as client:  # the operator names the root
        assert client.get(f"/images/{ids[3]}").status_code == 404
        assert client.get(f"/images/{ids[4]}").status_code == 200


# -- 2. uploads of every kind -------------------------------------------------------------------------


def top(client, image: bytes, kind: str = "image/png", k: int = 5) -> list[str]:
    r = client.post("/search", data={"text": "make it red", "k": k}, files={"image": ("q", image, kind)})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def exif_rotated(upright: Image.Image, fmt: str = "PNG") -> bytes:
    """``upright`` stored as a phone stores a portrait photo: the pixels turned a quarter to the
    left, EXIF Orientation=6 saying "turn right to display"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(upright.transpose(Image.Transpose.ROTATE_90), fmt, exif=exif)


def test_an_exif_rotated_upload_gets_the_top5_of_the_upright_photo(searcher):
    upright = load_image(searcher.image_path(searcher.index.ids()[0]))
    with served(searcher) as client:
        assert top(client, exif_rotated(upright)) == top(client, encoded(upright))


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ((200, 30, 30), (30, 30, 200))]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncated() -> bytes:
    data = encoded(Image.effect_noise((64, 64), 60).convert("RGB"))
    return data[: len(data) * 2 // 3]


UPLOADS = {  # name: (bytes, content type, status, the decoded colour of pixel (0, 0) or None)
    "exif-rotated jpeg": (lambda: exif_rotated(Image.new("RGB", (40, 20), (200, 30, 30)), "JPEG"), "image/jpeg", 200,
                          None),
    "corrupt exif jpeg": (lambda: encoded(Image.new("RGB", (20, 20), (30, 30, 200)), "JPEG", exif=b"Exif\x00\x00junk"),
                          "image/jpeg", 200, None),
    "cmyk jpeg": (lambda: encoded(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), "image/jpeg", 200,
                  (255, 0, 0)),
    "16-bit grey": (lambda: encoded(Image.fromarray(grey_gradient().astype(np.uint16) * 257)), "image/png", 200,
                    (0, 0, 0)),
    "palette": (lambda: encoded(Image.new("RGB", (20, 20), (30, 200, 30)).quantize()), "image/png", 200,
                (30, 200, 30)),
    "palette, transparent": (lambda: encoded(Image.new("P", (20, 20), 0), transparency=0), "image/png", 200,
                             (255, 255, 255)),
    "rgba, transparent": (lambda: encoded(Image.new("RGBA", (20, 20), (0, 0, 0, 0))), "image/png", 200,
                          (255, 255, 255)),
    "la, half transparent": (lambda: encoded(Image.new("LA", (20, 20), (0, 128))), "image/png", 200,
                             (127, 127, 127)),
    "animated png": (lambda: animated("PNG"), "image/png", 200, (200, 30, 30)),
    "animated webp": (lambda: animated("WEBP"), "image/webp", 200, None),
    "1x1": (lambda: png_bytes(size=(1, 1)), "image/png", 200, (200, 30, 30)),
    "truncated": (truncated, "image/png", 415, None),
    "bomb": (bomb_png, "image/png", 413, None),
}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_every_kind_of_upload_decodes_as_shown_or_gets_a_clear_4xx(searcher, name):
    make, kind, status, colour = UPLOADS[name]
    data = make()
    with served(searcher) as client:
        r = client.post("/search", data={"text": "make it red", "k": 3}, files={"image": ("q", data, kind)})
        assert r.status_code == status, (name, r.text)
        assert isinstance(r.json().get("results", r.json().get("detail")), (list, str))
        if status != 200:
            assert re.search(r"image|pixels", r.json()["detail"]), r.text
    if colour is not None:
        pixel = decode_upload(data, kind, ServeConfig()).getpixel((0, 0))
        assert all(abs(a - b) <= 1 for a, b in zip(pixel, colour)), (name, pixel, colour)
    if name == "exif-rotated jpeg":
        assert decode_upload(data, kind, ServeConfig()).size == (40, 20)  # shown upright, as stored it is 20x40


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "<i4"])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path, dtype):
    """Modes I;16, I;16B and I (Pillow's 32-bit ints, as 16-bit PNGs and TIFFs decode)."""
    wide = Image.fromarray((grey_gradient().astype(np.uint32) * 257).astype(dtype))
    got = np.asarray(images_module.to_rgb(wide))
    assert got.dtype == np.uint8 and got.shape == (16, 256, 3)
    assert np.abs(got[..., 0].astype(int) - grey_gradient()).max() <= 1
    if wide.mode == "I":
        return  # Pillow writes no PNG of mode I
    wide.save(tmp_path / "wide.png")  # through the file reader as well (`cirlab search --image`)
    assert np.abs(np.asarray(load_as_shown(tmp_path / "wide.png"))[..., 1].astype(int) - grey_gradient()).max() <= 1


# -- 3. Pillow's real bomb limit ----------------------------------------------------------------------


def test_a_144_megapixel_image_decodes_and_a_bomb_is_refused(tmp_path):
    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)  # 144 Mpx: over Pillow's warning level, under its bomb limit
    assert images_module.MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    assert decode_image(big).size == (12000, 12000)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())  # 900 Mpx
    with pytest.raises(UnreadableImage, match=r"bomb\.png.*900000000 pixels.*CIRLAB_MAX_IMAGE_PIXELS"):
        decode_image(bomb)


def test_the_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    path.write_bytes(png_bytes(size=(20, 10)))
    monkeypatch.setattr(images_module, "MAX_PIXELS", 199)
    with pytest.raises(UnreadableImage, match="over the limit of 199 pixels"):
        load_image(path)
    monkeypatch.setattr(images_module, "MAX_PIXELS", 200)
    assert load_image(path).size == (20, 10)
    code = "from cirlab.data import images; from PIL import Image; print(images.MAX_PIXELS, Image.MAX_IMAGE_PIXELS)"
    env = {**os.environ, "CIRLAB_MAX_IMAGE_PIXELS": "1000000000"}  # above Pillow's own: Pillow's is raised
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1000000000", "500000000"]
    env["CIRLAB_MAX_IMAGE_PIXELS"] = "many"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "CIRLAB_MAX_IMAGE_PIXELS" in bad.stderr


# -- 4. ids the filesystem refuses --------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["x" * 256, "a\x00b", "a\nb", "shoes/" + "y" * 252, "é" * 127, "a\x7fb"])
def test_an_id_the_filesystem_refuses_gets_422(tiny_index, tmp_path, bad_id):
    folder = shutil.copytree(tiny_index[1], tmp_path / "ix")
    before = (folder / "gallery.json").read_text()
    with served(Searcher.open(folder, mmap=False), api_key="k") as client:
        r = client.post("/index/images", data={"id": bad_id}, headers={"X-API-Key": "k"},
                        files={"image": ("new.png", png_bytes(), "image/png")})
        assert r.status_code == 422, r.text
        assert "id" in r.json()["detail"] and not isinstance(r.json()["detail"], list)
        assert client.post("/index/images", data={"id": "shoes/" + "y" * 200}, headers={"X-API-Key": "k"},
                           files={"image": ("new.png", png_bytes(), "image/png")}).status_code == 200
    added = json.loads((folder / "gallery.json").read_text()).keys() - json.loads(before).keys()
    assert added == {"shoes/" + "y" * 200}


# -- 5. Retry-After and security headers --------------------------------------------------------------


def test_a_429_says_when_to_retry(searcher):
    entered, release = threading.Event(), threading.Event()
    original = searcher.search

    def slow(*args, **kwargs):
        entered.set()
        release.wait(10)
        return original(*args, **kwargs)

    app = create_app(searcher, ServeConfig(max_queue=1, max_batch=1, batch_wait_ms=0, request_timeout_s=20))
    form = {"id": searcher.index.ids()[0], "text": "red"}
    searcher.search = slow
    with TestClient(app) as client:
        threads = [threading.Thread(target=client.post, args=("/search",), kwargs={"data": form}) for _ in range(2)]
        try:
            threads[0].start()
            assert entered.wait(10)  # the worker holds the first query, the second waits
            threads[1].start()
            deadline = time.monotonic() + 10
            while app.state.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = client.post("/search", data=form)
            assert r.status_code == 429 and int(r.headers.get("retry-after", 0)) >= 1, r.headers
        finally:
            searcher.search = original
            release.set()
            for t in threads:
                if t.ident is not None:  # started
                    t.join(20)


def test_every_response_carries_the_security_headers(searcher):
    with served(searcher, max_upload_bytes=4096) as client:
        answers = [client.get("/"), client.get("/healthz"), client.get("/static/app.js"), client.get("/images/nope"),
                   client.get(f"/images/{searcher.index.ids()[0]}"), client.post("/search", data={"text": "t"}),
                   client.post("/search", content=b"x" * 5000, headers={"content-type": "multipart/form-data"})]
        assert [r.status_code for r in answers] == [200, 200, 200, 404, 200, 422, 413]
        for r in answers:
            assert r.headers["x-content-type-options"] == "nosniff", r.request.url
            assert r.headers["x-frame-options"] == "DENY", r.request.url
        policy = answers[0].headers["content-security-policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
            assert directive in policy
    page = (STATIC / "index.html").read_text()  # what the policy forbids, the page must not need
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son\w+=|javascript:", page)
    assert not re.search(r"\.innerHTML|eval\(|new Function", (STATIC / "app.js").read_text())


# -- 6. sentences -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, needle", [
    ("empty text", dict(data={"text": "", "id": "ID"}),
     "text is empty; send the change to make as the form field 'text'"),
    ("blank text", dict(data={"text": "  ", "id": "ID"}), "text is empty"),
    ("no form", dict(json={"text": "red", "id": "ID"}), "multipart/form-data"),
    ("malformed multipart", dict(content=b"garbage", headers={"content-type": "multipart/form-data; boundary=x"}),
     "multipart/form-data"),
    ("k not a number", dict(data={"text": "red", "id": "ID", "k": "ten"}), "form field 'k'"),
])
def test_bad_forms_get_a_sentence(searcher, name, kwargs, needle):
    kwargs = dict(kwargs)
    for key in ("data", "json"):
        if key in kwargs:
            kwargs[key] = {k: searcher.index.ids()[0] if v == "ID" else v for k, v in kwargs[key].items()}
    with served(searcher) as client:
        r = client.post("/search", **kwargs)
        assert r.status_code in (400, 422), r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and needle in detail and "Field required" not in detail, detail


def test_search_cli_names_the_k_it_was_given(tiny_index, capsys):
    _, index_dir = tiny_index
    first = load_index(index_dir).ids()[0]
    assert main(["search", "--index", str(index_dir), "--id", first, "--text", "red", "-k", "-3"]) == 2
    assert "-k must be at least 1, got -3" in capsys.readouterr().err


# -- 7. `data check` reads every image's header -------------------------------------------------------


def test_data_check_without_decode_reports_files_that_are_not_images(tmp_path):
    (tmp_path / "good.png").write_bytes(png_bytes())
    (tmp_path / "noise.png").write_bytes(os.urandom(2000))
    (tmp_path / "text.jpg").write_text("hello, not a jpeg\n")
    relpaths = {"good": "good.png", "noise": "noise.png", "text": "text.jpg", "gone": "gone.png"}
    split = CIRSplit("cirr", "val", [], list(relpaths), PathTable(tmp_path, relpaths), True)
    report = check_splits([split])
    assert report["missing"] == ["gone", "noise", "text"] and report["unreadable"] == ["noise", "text"]


# -- 8. a backend that is away ------------------------------------------------------------------------


def test_healthz_and_search_answer_503_while_the_backend_is_away(searcher, tiny_index):
    index = load_index(tiny_index[1])
    away = Searcher(searcher.composer, index, tiny_index[1])
    state = {"mode": "up"}

    def probe() -> None:
        if state["mode"] == "down":
            raise ConnectionError("milvus at http://127.0.0.1:1 refused the connection")
        if state["mode"] == "hung":
            time.sleep(1.5)

    real_search = index._search

    def search(*args):
        if state["mode"] != "up":
            raise ConnectionError("milvus at http://127.0.0.1:1 refused the connection")
        return real_search(*args)

    index.probe, index._search = probe, search
    form = {"id": index.ids()[0], "text": "red"}
    with served(away, health_timeout_s=0.5) as client:
        assert client.get("/healthz").status_code == 200
        state["mode"] = "down"
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json() == {"status": "unavailable",
                                                     "detail": "milvus at http://127.0.0.1:1 refused the connection"}
        r = client.post("/search", data=form)
        assert r.status_code == 503 and "backend" in r.json()["detail"] and "refused" in r.json()["detail"]
        state["mode"] = "hung"
        start = time.monotonic()
        r = client.get("/healthz")
        assert r.status_code == 503 and "0.5 s" in r.json()["detail"] and time.monotonic() - start < 3
        state["mode"] = "up"
        assert client.get("/healthz").status_code == 200 and client.post("/search", data=form).status_code == 200
