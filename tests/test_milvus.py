"""The Milvus backend on a real ``milvus-lite server``: it ranks as faiss ``Flat`` does, each index
keeps its own collection, a rebuild killed at any point leaves a loadable index, a server restart
costs no 500 once it is back, and an unreachable server is a sentence naming it."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlab.cli import main
from cirlab.composers import QueryRecipe, ZeroShotComposer
from cirlab.data.registry import load_split
from cirlab.data.torch_data import default_text
from cirlab.models import build_small_blip, load_backbone, save_backbone
from cirlab.retrieval.index import load_index, new_index
from cirlab.retrieval.search import Query, Searcher
from cirlab.utils.crash import CRASH_EXIT

pytest.importorskip("pymilvus")
if not Path(sys.executable).with_name("milvus-lite").exists():
    pytest.skip("milvus-lite is not installed", allow_module_level=True)

from conftest import TINY_BLIP  # noqa: E402

from cirlab.retrieval.milvus import LiteServer  # noqa: E402


@pytest.fixture(scope="module")
def models(tiny_random_blip, tmp_path_factory):
    """Two models whose gallery vectors differ (two random tiny BLIPs): A and B."""
    tmp = tmp_path_factory.mktemp("milvus-models")
    torch.manual_seed(1)
    other = save_backbone(build_small_blip(**TINY_BLIP), tmp / "blip-b")
    return tuple(ZeroShotComposer(load_backbone(blip), QueryRecipe(), "sum").save(tmp / name)
                 for name, blip in (("A", tiny_random_blip), ("B", other)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A milvus-lite server on loopback shared by this module's tests."""
    lite = LiteServer(tmp_path_factory.mktemp("milvus-data"))
    lite.start()
    yield lite
    lite.stop()


@pytest.fixture(scope="module")
def flat(models, tiny_shapes, tmp_path_factory):
    """Exact faiss indexes of models A and B: the rankings a Milvus index of each must give."""
    tmp = tmp_path_factory.mktemp("milvus-flat")
    for model, name in zip(models, "AB"):
        assert build(model, tiny_shapes, tmp / name) == 0
    return tmp / "A", tmp / "B"


@pytest.fixture(scope="module")
def queries(tiny_shapes):
    return [Query(default_text(q, False), id=q.reference) for q in load_split("shapes", tiny_shapes, "test").queries]


def build(model, root, out, *extra) -> int:
    return main(["index", "build", "--model", str(model), "--dataset", "shapes", "--root", str(root), "--split", "test",
                 "--out", str(out), *map(str, extra)])


def cli(*argv, env=None) -> subprocess.CompletedProcess:
    """``python -m cirlab argv`` in a subprocess: what a user sees, stderr included."""
    return subprocess.run([sys.executable, "-m", "cirlab", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def ranking(index_dir, queries, k=10) -> list[list[tuple[str, float]]]:
    return [[(h.id, h.score) for h in hits] for hits in Searcher.open(index_dir).search(queries, k=k)]


def same_ranking(got, want) -> bool:
    """Equal scores, and equal ids except among images of equal score (the tiny gallery repeats
    scenes, whose order among themselves is arbitrary)."""
    for a, b in zip(got, want, strict=True):
        if len(a) != len(b) or not np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5):
            return False
        for j, ((x, s), (y, _)) in enumerate(zip(a, b)):
            tied = [i for i, (_, t) in enumerate(b) if abs(t - s) < 1e-5]
            if x != y and not ({x, y} <= {b[i][0] for i in tied} | {a[i][0] for i in tied}):
                return False
    return True


def manifest(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def collections_of(uri: str, alias: str) -> list[str]:
    from pymilvus import MilvusClient

    return sorted(n for n in MilvusClient(uri=uri).list_collections() if n == alias or n.startswith(alias + "_"))


# -- ranking -----------------------------------------------------------------------------------------


def test_milvus_returns_the_ids_and_scores_of_faiss_flat(models, tiny_shapes, server, flat, queries, tmp_path):
    assert build(models[0], tiny_shapes, tmp_path / "mx", "--backend", "milvus", "--uri", server.uri) == 0
    flat_a, milvus = Searcher.open(flat[0]), Searcher.open(tmp_path / "mx")
    assert milvus.index.backend == "milvus" and len(milvus.index) == len(flat_a.index)
    assert same_ranking(ranking(tmp_path / "mx", queries), ranking(flat[0], queries))
    # removal reaches the server
    gone = next(i for i in flat_a.index.ids() if i not in {q.id for q in queries[:3]})
    milvus.index.remove([gone])
    assert gone not in {h.id for hits in milvus.search(queries[:3], k=len(flat_a.index)) for h in hits}


# -- one collection per index ------------------------------------------------------------------------


def test_two_indexes_on_one_server_keep_their_own_vectors_and_collections(models, tiny_shapes, server, flat, queries,
                                                                          tmp_path, capsys):
    """Issue 34 #1: model B's index built after model A's, both with the default collection, must
    not replace A's vectors; a collection that holds another index is refused, at build and load."""
    a, b = models
    assert build(a, tiny_shapes, tmp_path / "ixM1", "--backend", "milvus", "--uri", server.uri) == 0
    assert build(b, tiny_shapes, tmp_path / "ixM2", "--backend", "milvus", "--uri", server.uri) == 0
    assert same_ranking(ranking(tmp_path / "ixM1", queries), ranking(flat[0], queries)), "ixM1 answers with B's vectors"
    assert same_ranking(ranking(tmp_path / "ixM2", queries), ranking(flat[1], queries))
    m1, m2 = manifest(tmp_path / "ixM1"), manifest(tmp_path / "ixM2")
    assert m1["collection"] != m2["collection"] and m1["index_id"] != m2["index_id"]
    # building another folder into ixM1's collection is refused with a sentence; ixM1 still answers
    capsys.readouterr()
    assert build(b, tiny_shapes, tmp_path / "ixM3", "--backend", "milvus", "--uri", server.uri,
                 "--collection", m1["collection"]) == 2
    err = capsys.readouterr().err
    assert m1["collection"] in err and str(tmp_path / "ixM1") in err, err
    assert not (tmp_path / "ixM3").exists()
    assert same_ranking(ranking(tmp_path / "ixM1", queries), ranking(flat[0], queries))
    # a folder whose manifest names another index's collection is refused on load
    m2["target"] = m1["target"]
    (tmp_path / "ixM2" / "index.json").write_text(json.dumps(m2))
    with pytest.raises(ValueError, match=f"{m1['target']}.*holds index {m1['index_id']}"):
        load_index(tmp_path / "ixM2")


def test_collection_names_are_milvus_names_of_their_folder(tmp_path):
    from cirlab.retrieval.milvus import check_collection_name, default_collection

    odd = tmp_path / "my index-v2 (copy)"
    name = default_collection(odd)
    assert name.startswith("cirlab_my_index_v2__copy__") and check_collection_name(name) == name
    assert default_collection(tmp_path / "x" / "ix") != default_collection(tmp_path / "y" / "ix")
    assert len(default_collection(tmp_path / ("a" * 250))) <= 100
    for bad in ("1abc", "a-b", "", "x" * 250):
        with pytest.raises(ValueError, match="collection name"):
            check_collection_name(bad)


# -- a rebuild killed at each point ------------------------------------------------------------------


@pytest.mark.parametrize("point", ["milvus.rebuild:filled", "atomic_dir:filled", "milvus.rebuild:saved",
                                   "milvus.rebuild:switched"])
def test_a_rebuild_killed_at_each_point_leaves_a_loadable_index_and_a_rerun_cleans_up(
        point, models, tiny_shapes, server, flat, queries, tmp_path):
    """Issue 34 #3: index A, rebuilt with model B and killed at ``point``: the folder still loads
    and answers as A or as B (never a mix, never "no collection"), and a rerun completes and leaves
    no collection of the index but the one its folder names."""
    a, b = models
    ix = tmp_path / "ix"
    argv = ["index", "build", "--model", b, "--dataset", "shapes", "--root", tiny_shapes, "--split", "test",
            "--out", ix, "--backend", "milvus", "--uri", server.uri]
    assert build(a, tiny_shapes, ix, "--backend", "milvus", "--uri", server.uri) == 0
    r = cli(*argv, env={"CIRLAB_CRASH_AT": point})
    assert r.returncode == CRASH_EXIT, f"{point} was not reached (exit {r.returncode}): {r.stderr[-2000:]}"
    got = ranking(ix, queries)
    assert same_ranking(got, ranking(flat[0], queries)) or same_ranking(got, ranking(flat[1], queries))
    assert main([str(x) for x in argv]) == 0
    assert same_ranking(ranking(ix, queries), ranking(flat[1], queries))
    m = manifest(ix)
    assert collections_of(server.uri, m["collection"]) == [m["target"]]


# -- a restarting server -----------------------------------------------------------------------------


def post_search(base: str, ref: str, text: str) -> tuple[int, list[str]]:
    body = urllib.parse.urlencode({"id": ref, "text": text, "k": 10}).encode()
    try:
        with urllib.request.urlopen(f"{base}/search", data=body, timeout=30) as r:
            return r.status, [h["id"] for h in json.loads(r.read())["results"]]
    except urllib.error.HTTPError as e:
        return e.code, []


def healthz(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def test_search_answers_again_after_milvus_restarts_and_healthz_tells_the_truth(models, tiny_shapes, queries,
                                                                                  tmp_path):
    """Issue 34 #5: milvus-lite killed -9 and restarted (same port and data) under a client's
    queries: while it is away the index's probe fails and /healthz answers 503; once it is back
    every search answers 200 with the top 10 of before, no 500."""
    pytest.importorskip("fastapi")
    from serving_helpers import serve_in_thread

    from cirlab.config import ServeConfig
    from cirlab.serving.app import create_app

    lite = LiteServer(tmp_path / "data")
    lite.start()
    try:
        assert build(models[0], tiny_shapes, tmp_path / "ix", "--backend", "milvus", "--uri", lite.uri) == 0
        searcher = Searcher.open(tmp_path / "ix")
        asked = [(q.id, q.text) for q in queries[:6]]
        with serve_in_thread(create_app(searcher, ServeConfig())) as base:
            before = {q: post_search(base, *q) for q in asked}
            assert all(status == 200 for status, _ in before.values()), before
            phase, log, stop = ["up"], [], threading.Event()

            def client() -> None:
                deadline = time.monotonic() + 180
                while not stop.is_set() and time.monotonic() < deadline:
                    for q in asked:
                        status, ids = post_search(base, *q)
                        log.append((phase[0], status, ids == before[q][1]))

            thread = threading.Thread(target=client, daemon=True)
            thread.start()
            time.sleep(0.5)
            lite.kill()
            phase[0] = "away"
            time.sleep(0.5)
            try:
                searcher.index.probe()
                probe_away = "answered"
            except ConnectionError as e:
                probe_away = str(e)
            health_away = healthz(base)
            lite.start()

            def back() -> bool:
                try:
                    searcher.index.probe()
                except ConnectionError:
                    return False
                return healthz(base) == 200

            wait_for("the index probe and /healthz after the restart", back, 60)
            phase[0] = "back"
            wait_for("30 searches after the restart", lambda: sum(p == "back" for p, _, _ in log) >= 30, 60)
            stop.set()
            thread.join(60)
    finally:
        lite.stop()
    after = [(status, same) for p, status, same in log if p == "back"]
    counts = {p: sorted({s for q, s, _ in log if q == p}) for p in ("up", "away", "back")}
    assert all(status == 200 and same for status, same in after), (counts, after[:10])
    assert counts["away"] and lite.uri in probe_away, (counts, probe_away)
    assert health_away == 503, f"/healthz answered {health_away} while Milvus was away"
    assert 500 not in counts["away"], counts


# -- an unreachable server ---------------------------------------------------------------------------


def test_an_unreachable_milvus_is_a_sentence_naming_it_within_seconds(models, tiny_shapes, queries, tmp_path):
    """Issue 34 #8: build against a closed port and search an index whose server is down: exit 2
    and a sentence naming the uri, no traceback; a server that accepts but never answers fails in
    seconds, not after the 60 s call timeout."""
    r = cli("index", "build", "--model", models[0], "--dataset", "shapes", "--root", tiny_shapes, "--split", "test",
            "--out", tmp_path / "ix0", "--backend", "milvus", "--uri", "http://127.0.0.1:1")
    assert r.returncode == 2 and "http://127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    lite = LiteServer(tmp_path / "data")
    lite.start()
    try:
        assert build(models[0], tiny_shapes, tmp_path / "ix", "--backend", "milvus", "--uri", lite.uri) == 0
    finally:
        lite.stop()
    r = cli("search", "--index", tmp_path / "ix", "--id", queries[0].id, "--text", "t")
    assert r.returncode == 2 and lite.uri in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    with socket.socket() as mute:  # accepts connections (the kernel's backlog), never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        uri = f"http://127.0.0.1:{mute.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=uri):
            new_index("milvus", 8, uri=uri, collection="c")
        assert time.monotonic() - start < 10
