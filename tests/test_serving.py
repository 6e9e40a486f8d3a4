"""The retrieval service: the index ranks as evaluation does (Milvus: tests/test_milvus.py), and every bound of the
HTTP API refuses its bad request with the right status while the server keeps answering."""

import io
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from cirlab.cli import main
from cirlab.composers import QueryRecipe, ZeroShotComposer
from cirlab.config import ServeConfig
from cirlab.data.registry import load_split
from cirlab.data.torch_data import default_text
from cirlab.composers.vectors import similarity, split_features
from cirlab.evaluation.submission import rankings_from_similarity
from cirlab.models import load_backbone
from cirlab.retrieval.index import FaissIndex, load_index
from cirlab.retrieval.search import Searcher

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cirlab.serving.app import create_app  # noqa: E402


def png_bytes(size=(40, 30), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width=30000, height=30000) -> bytes:
    """A valid 1-bit PNG of width x height (about 110 kB: its rows are zeros); decoding it
    would take width x height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


# -- the index ---------------------------------------------------------------------------------------


def test_flat_index_is_exact_inner_product_with_exclusion_replacement_and_removal(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    ids = [f"img{i}" for i in range(50)]
    index = FaissIndex(8)
    index.add(ids, x, [f"/g/{i}.png" for i in ids])
    exact = np.argsort(-(q @ x.T), axis=1, kind="stable")
    hits = index.search(q, 5, exclude=[ids[exact[0, 0]], None, None, None])
    assert [h.id for h in hits[0]] == [ids[j] for j in exact[0, 1:6]]  # the excluded one left out
    assert [h.id for h in hits[1]] == [ids[j] for j in exact[1, :5]]
    np.testing.assert_allclose([h.score for h in hits[1]], (q[1] @ x.T)[exact[1, :5]], rtol=1e-5)
    # replacing a vector moves the id, removing it drops it, and a saved index reads back the same
    index.add([ids[exact[2, 0]]], -q[2:3] * 10)
    assert index.search(q[2:3], 50)[0][-1].id == ids[exact[2, 0]] and len(index) == 50
    index.remove([ids[exact[3, 0]]])
    assert ids[exact[3, 0]] not in [h.id for h in index.search(q[3:4], 49)[0]] and len(index) == 49
    with pytest.raises(KeyError, match="not in the index"):
        index.remove(["nope"])
    index.model = {"fingerprint": "f"}
    index.save(tmp_path / "ix")
    for mmap in (False, True):
        again = load_index(tmp_path / "ix", mmap=mmap)
        assert len(again) == 49 and again.gallery == index.gallery
        assert [h.id for h in again.search(q, 7)[3]] == [h.id for h in index.search(q, 7)[3]]


def test_an_index_is_refused_with_another_model_and_a_damaged_folder_is_named(tiny_index, tiny_pretrained_blip,
                                                                               tmp_path):
    model, index_dir = tiny_index
    other = ZeroShotComposer(load_backbone(tiny_pretrained_blip), QueryRecipe(), "image")
    with pytest.raises(ValueError, match="fingerprint"):
        Searcher.open(index_dir, other.save(tmp_path / "other"))
    broken = shutil.copytree(index_dir, tmp_path / "broken")
    (broken / "gallery.json").write_text('{"x": "y"}')
    with pytest.raises(ValueError, match="gallery.json"):
        load_index(broken)
    assert main(["search", "--index", str(tmp_path / "missing"), "--id", "x", "--text", "t"]) == 2


def served(searcher: Searcher, api_key: str | None = None, **cfg) -> TestClient:
    return TestClient(create_app(searcher, ServeConfig(**cfg), api_key=api_key))


def test_served_top10_equals_the_evaluation_ranking_for_every_query(tiny_index, tiny_shapes):
    """Equal ids, position by position; where they differ the two images must be tied in the
    evaluation's own scores (the tiny gallery holds identical scenes, whose order among
    themselves is arbitrary, and float noise between a batch of 64 queries and one)."""
    model, index_dir = tiny_index
    split = load_split("shapes", tiny_shapes, "test")
    searcher = Searcher.open(index_dir)
    sim = similarity(searcher.composer, split, split_features(searcher.composer, split))
    ranked, _ = rankings_from_similarity(split, sim)
    column = {image: j for j, image in enumerate(split.gallery)}
    with served(searcher) as client:
        for n, q in enumerate(split.queries):
            r = client.post("/search", data={"id": q.reference, "text": default_text(q, False), "k": 10})
            assert r.status_code == 200, r.text
            got, want = [h["id"] for h in r.json()["results"]], ranked[q.qid][:10]
            for a, b in zip(got, want):
                assert a == b or abs(sim[n, column[a]] - sim[n, column[b]]) < 1e-5, (q.qid, got, want)


# -- the HTTP API and its bounds ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def searcher(tiny_index):
    return Searcher.open(tiny_index[1])


def good(client, searcher) -> None:
    r = client.post("/search", data={"id": searcher.index.ids()[0], "text": "make it red", "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_every_endpoint_answers(searcher):
    with served(searcher) as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["images"] == len(searcher.index)
        page = client.get("/gallery", params={"offset": 2, "limit": 5}).json()
        assert page["ids"] == searcher.index.ids()[2:7] and page["total"] == len(searcher.index)
        first = searcher.index.ids()[0]
        image = client.get(f"/images/{first}")
        assert image.status_code == 200 and image.content == searcher.image_path(first).read_bytes()
        upload = client.post("/search", data={"text": "make it red", "k": 4},
                             files={"image": ("q.png", png_bytes(), "image/png")})
        assert upload.status_code == 200 and len(upload.json()["results"]) == 4
        r = client.post("/search", data={"id": first, "text": "make it red", "k": 5}).json()
        assert first not in [h["id"] for h in r["results"]] and r["results"][0]["url"].startswith("/images/")
        assert client.get("/").status_code == 200
        metrics = client.get("/metrics").text
        assert 'cirlab_requests_total{method="POST",route="/search",status="200"} 2' in metrics
        assert "cirlab_queue_depth 0" in metrics and "cirlab_batch_size_count 2" in metrics


@pytest.mark.parametrize("name, request_kwargs, status", [
    ("oversize", dict(files={"image": ("q.png", b"\x00" * 5000, "image/png")}), 413),
    ("wrong type", dict(files={"image": ("q.gif", png_bytes(fmt="GIF"), "image/gif")}), 415),
    ("format not allowed", dict(files={"image": ("q.png", png_bytes(fmt="GIF"), "image/png")}), 415),
    ("not an image", dict(files={"image": ("q.png", b"hello" * 10, "image/png")}), 415),
    ("bomb", dict(files={"image": ("bomb.png", bomb_png(), "image/png")}), 413),
    ("overlong text", dict(data={"text": "x" * 501, "id": "ID"}), 422),
    ("k too large", dict(data={"text": "red", "id": "ID", "k": 101}), 422),
    ("two references", dict(data={"text": "red", "id": "ID"}, files={"image": ("q.png", png_bytes(), "image/png")}),
     422),
    ("unknown id", dict(data={"text": "red", "id": "no-such-image"}), 404),
    ("rerank without a re-ranker", dict(data={"text": "red", "id": "ID", "rerank": 5}), 422),
])
def test_each_bound_refuses_its_request_and_the_server_keeps_answering(searcher, name, request_kwargs, status):
    limit = 4096 if name == "oversize" else 10 * 2**20
    with served(searcher, max_upload_bytes=limit) as client:
        kwargs = dict(request_kwargs)
        data = {k: (searcher.index.ids()[0] if v == "ID" else v) for k, v in kwargs.pop("data", {"text": "red"}).items()}
        r = client.post("/search", data=data, **kwargs)
        assert r.status_code == status, (name, r.text)
        assert "detail" in r.json()
        good(client, searcher)


def test_a_streamed_body_is_cut_at_the_limit(searcher):
    with served(searcher, max_upload_bytes=4096) as client:
        chunks = (b"\x00" * 1024 for _ in range(64))
        r = client.post("/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        good(client, searcher)


@pytest.mark.parametrize("path", ["../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
                                  "/etc/passwd", "test-000000-0/../../gallery.json", "gallery.json"])
def test_images_serves_gallery_ids_only(searcher, path):
    with served(searcher) as client:
        r = client.get(f"/images/{path}")
        assert r.status_code == 404 and b"root:" not in r.content
        good(client, searcher)


def test_a_full_queue_answers_429_and_a_slow_model_504(searcher):
    entered, release = threading.Event(), threading.Event()
    original = searcher.search

    def slow(*args, **kwargs):
        entered.set()
        release.wait(10)
        return original(*args, **kwargs)

    app = create_app(searcher, ServeConfig(max_queue=1, max_batch=1, batch_wait_ms=0, request_timeout_s=1.5))
    searcher.search = slow
    try:
        with TestClient(app) as client:
            codes = {}

            def ask(name):
                codes[name] = client.post("/search", data={"id": searcher.index.ids()[0], "text": "red"}).status_code

            running = threading.Thread(target=ask, args=("running",))
            running.start()
            assert entered.wait(10)  # the worker holds the first query
            waiting = threading.Thread(target=ask, args=("waiting",))
            waiting.start()
            deadline = time.monotonic() + 10
            while app.state.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert client.post("/search", data={"id": searcher.index.ids()[0], "text": "red"}).status_code == 429
            running.join(10)
            waiting.join(10)
            assert codes == {"running": 504, "waiting": 504}
            searcher.search = original
            release.set()
            good(client, searcher)
    finally:
        release.set()
        searcher.search = original


def test_concurrent_queries_are_encoded_in_one_batch(searcher):
    app = create_app(searcher, ServeConfig(max_batch=8, batch_wait_ms=200))
    with TestClient(app) as client:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(
            client.post("/search", data={"id": searcher.index.ids()[0], "text": "red"}).status_code))
            for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert codes == [200] * 6
        metrics = client.get("/metrics").text
        batches = int(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("cirlab_batch_size_count")))
        assert batches < 6  # at least two queries shared a model call


def test_index_changes_need_the_api_key_and_persist(tiny_index, tmp_path):
    model, index_dir = tiny_index
    folder = shutil.copytree(index_dir, tmp_path / "ix")
    upload = {"image": ("new.png", png_bytes(color=(10, 200, 10)), "image/png")}
    with served(Searcher.open(folder, mmap=False)) as client:
        assert client.post("/index/images", data={"id": "new/one"}, files=upload).status_code == 403
    searcher = Searcher.open(folder, mmap=False)
    with served(searcher, api_key="s3cret") as client:
        assert client.post("/index/images", data={"id": "new/one"}, files=upload,
                           headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/index/images", data={"id": "../evil"}, files=upload,
                           headers={"X-API-Key": "s3cret"}).status_code == 422
        r = client.post("/index/images", data={"id": "new/one"}, files=upload, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200, r.text
        assert client.get("/images/new/one").status_code == 200
        assert client.post("/search", data={"id": "new/one", "text": "red"}).status_code == 200
        vector = searcher.composer.encode_gallery([Image.open(io.BytesIO(upload["image"][1]))]).numpy()
        assert searcher.index.search(vector, 1)[0][0].id == "new/one"  # its own vector, not another's
        victim = searcher.index.ids()[0]
        assert client.delete(f"/index/images/{victim}").status_code == 401
        assert client.delete(f"/index/images/{victim}", headers={"X-API-Key": "s3cret"}).status_code == 200
    again = load_index(folder)
    assert "new/one" in again and victim not in again and len(again) == len(load_index(index_dir))


def test_a_reranking_model_reranks_the_index_top_k_as_evaluation_does(tiny_shapes, tiny_pretrained_blip, tmp_path):
    import torch

    from cirlab.composers import GroundedComposer, RerankComposer
    from cirlab.evaluation.evaluate import rerank_rows
    from cirlab.models.dual_encoder import DualEncoderReranker

    torch.manual_seed(0)
    blip = load_backbone(tiny_pretrained_blip)
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id)
    model = RerankComposer(GroundedComposer(blip, QueryRecipe()), reranker, k=5).save(tmp_path / "model")
    assert main(["index", "build", "--model", str(model), "--dataset", "shapes", "--root", str(tiny_shapes),
                 "--split", "test", "--out", str(tmp_path / "ix")]) == 0
    searcher = Searcher.open(tmp_path / "ix")
    split = load_split("shapes", tiny_shapes, "test")
    split.queries = split.queries[:8]
    feats = split_features(searcher.composer, split)
    sim = similarity(searcher.composer, split, feats)
    reranked, _, _ = rerank_rows(searcher.composer, split, feats, sim, [5])["rerank@5"]
    column = {image: j for j, image in enumerate(split.gallery)}
    with served(searcher) as client:
        assert client.get("/healthz").json()["rerank"] is True
        for n, q in enumerate(split.queries):
            data = {"id": q.reference, "text": default_text(q, False), "k": 8}
            plain = [h["id"] for h in client.post("/search", data=data).json()["results"]]
            got = [h["id"] for h in client.post("/search", data={**data, "rerank": 5}).json()["results"]]
            assert sorted(got[:5]) == sorted(plain[:5]) and got[5:] == plain[5:]  # only the top 5 move
            # the service leaves the reference out of its results, as the evaluation's metrics do
            want = [j for j in torch.argsort(reranked[n], descending=True).tolist() if split.gallery[j] != q.reference][:8]
            for a, b in zip(got, [split.gallery[j] for j in want]):  # cached tokens are float16: near-ties may swap
                assert a == b or abs(reranked[n, column[a]] - reranked[n, column[b]]) < 1e-3, (got, want)


def test_a_bounded_load_test_over_loopback_gets_only_answers(searcher):
    from serving_helpers import load_test, serve_in_thread

    forms = [{"id": i, "text": "make it red", "k": 10} for i in searcher.index.ids()[:8]]
    app = create_app(searcher, ServeConfig(batch_wait_ms=20))
    with serve_in_thread(app) as base:
        result = load_test(base, forms, concurrency=4, max_requests=24, max_seconds=60)
    assert result["requests"] == 24 and result["errors"] == 0 and result["ok"] == 24
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["throughput"] > 0


@pytest.mark.slow
def test_torchrun_shards_the_encoding_into_the_same_index(tiny_index, tiny_shapes, tmp_path):
    model, index_dir = tiny_index
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cirlab", "index", "build", "--model", str(model), "--dataset", "shapes", "--root", str(tiny_shapes),
           "--split", "test", "--out", str(tmp_path / "sharded")]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    one, two = load_index(index_dir), load_index(tmp_path / "sharded")
    assert one.ids() == two.ids() and one.gallery == two.gallery
    rows = np.arange(len(one.ids()))
    np.testing.assert_allclose(one.index.reconstruct_batch(rows), two.index.reconstruct_batch(rows), atol=1e-6)


def test_folder_galleries_grow_with_add_and_search_draws_a_grid(tiny_index, tmp_path, capsys):
    import json

    model, index_dir = tiny_index
    searcher = Searcher.open(index_dir)
    for n, image_id in enumerate(searcher.index.ids()[:6]):
        dest = tmp_path / ("first" if n < 4 else "second") / ("shoes" if n % 2 else "") / f"{image_id}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(searcher.image_path(image_id), dest)
    out = tmp_path / "ix"
    assert main(["index", "build", "--model", str(model), "--images", str(tmp_path / "first"), "--out", str(out)]) == 0
    assert sorted(load_index(out).ids()) == sorted(["shoes/" + i if n % 2 else i
                                                    for n, i in enumerate(searcher.index.ids()[:4])])
    assert main(["index", "build", "--model", str(model), "--images", str(tmp_path / "second"), "--out", str(out),
                 "--add"]) == 0
    assert len(load_index(out)) == 6
    other = ZeroShotComposer(searcher.composer.backbone, QueryRecipe(), "text").save(tmp_path / "other")
    assert main(["index", "build", "--model", str(other), "--images", str(tmp_path / "second"), "--out", str(out),
                 "--add"]) == 2
    assert "fingerprint" in capsys.readouterr().err and len(load_index(out)) == 6  # refused, nothing lost
    first = load_index(out).ids()[0]
    assert main(["search", "--index", str(out), "--id", first, "--text", "make it red", "-k", "3", "--json",
                 "--grid", str(tmp_path / "grid.png")]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(hits) == 3 and first not in [h["id"] for h in hits]
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 128
