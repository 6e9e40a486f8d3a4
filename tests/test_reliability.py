"""What the index folder promises (docs/reliability.md): one writer at a time, files bound to
their manifest, shared permissions, and a sentence (exit 2, no traceback) for every user error of
the reproductions in issue 34 that goes through the CLI."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cirlab.cli import main
from cirlab.config import CONFIG_ROOT
from cirlab.retrieval.index import load_index

TINY = "{embed_dim: 16, text_hidden: 32, text_layers: 1, text_heads: 2, vision_hidden: 16, stage_channels: [8, 8, 8, 8]}"


def cli_error(capsys, argv: list, *needles: str) -> str:
    """Run ``cirlab argv``: exit 2 and one line naming each of ``needles`` (no traceback: an
    uncaught exception would fail the test here)."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cirlab ") and "error:" in err and "Traceback" not in err
    for needle in needles:
        assert str(needle) in err, err
    return err


@pytest.fixture()
def index_copy(tiny_index, tmp_path):
    model, built = tiny_index
    shutil.copytree(built, tmp_path / "index")
    return model, tmp_path / "index"


def search_argv(index: Path) -> list:
    return ["search", "--index", index, "--id", load_index_ids(index)[0], "--text", "add a red circle"]


def load_index_ids(index: Path) -> list[str]:
    import json

    return [i for i in json.loads((index / "ids.json").read_text()) if i is not None]


def test_a_truncated_or_swapped_index_file_is_refused_naming_it(index_copy, tiny_index, tiny_shapes, tmp_path,
                                                                   capsys):
    model, index = index_copy
    ids = load_index_ids(index)
    faiss_file = index / "index.faiss"
    good = faiss_file.read_bytes()
    faiss_file.write_bytes(good[: len(good) // 2])  # truncated
    cli_error(capsys, search_argv(index), faiss_file, "damaged or replaced")
    faiss_file.write_bytes(os.urandom(len(good)))  # corrupt
    cli_error(capsys, search_argv(index), faiss_file)
    # another index's file, of the same size and kind: served silently before the manifest held checksums
    other = tmp_path / "other"
    assert main(["index", "build", "--model", str(model), "--dataset", "shapes", "--root", str(tiny_shapes),
                 "--split", "val", "--out", str(other)]) == 0
    shutil.copy(other / "index.faiss", faiss_file)
    shutil.copy(other / "ids.json", index / "ids.json")
    with pytest.raises(ValueError, match="not the file this index was saved with"):
        load_index(index)
    # and without checksums (an index of an earlier cirlab) a faiss file faiss cannot read is named
    faiss_file.write_bytes(b"\0" * 64)
    manifest = (index / "index.json").read_text()
    import json

    m = json.loads(manifest)
    m.pop("sha256")
    (index / "index.json").write_text(json.dumps(m))
    cli_error(capsys, search_argv(index), faiss_file, "cannot be read by faiss")


def test_user_errors_through_the_cli_are_sentences(index_copy, tiny_shapes, tmp_path, capsys):
    _, index = index_copy
    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    cli_error(capsys, ["search", "--index", index, "--image", corrupt, "--text", "make it blue"], corrupt)
    cli_error(capsys, ["data", "show", "--root", tiny_shapes, "--split", "val", "--out", tmp_path], "is a folder")
    cli_error(capsys, ["search", "--index", tmp_path / "nothing", "--id", "x", "--text", "y"], tmp_path / "nothing")


def test_a_diverging_training_stops_with_a_sentence(tiny_shapes, tmp_path, capsys):
    """lr 1e30: the ITM sampler met NaN probabilities and torch raised a RuntimeError traceback."""
    sets = [f"data.root={tiny_shapes}", f"model.small={TINY}", "model.init_text=random", "trainer.max_steps=6",
            "trainer.batch_size=16", "trainer.num_workers=0", "method.eval_images=12", "trainer.optimizer.lr=1e30",
            "trainer.schedule.warmup_steps=0"]
    err = cli_error(capsys, ["pretrain", "--config", CONFIG_ROOT / "pretrain" / "shapes_blip.yaml", "--run-dir",
                             tmp_path / "run", *(x for s in sets for x in ("--set", s))], "diverged", "step")
    assert "checkpoint" in err


def add_argv(model: Path, images: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cirlab", "index", "build", "--model", str(model), "--images", str(images),
            "--out", str(out), "--add"]


def test_two_concurrent_adds_never_lose_images(tiny_index, tiny_shapes, tmp_path):
    """Before the folder lock both exited 0 and the later swap dropped the other's images (60 of 90
    survived). Here a small add starts while a large one is encoding: the large one holds the
    folder, the small one is refused (exit 2, naming the holder) and its rerun adds its images."""
    model, _ = tiny_index
    images = sorted((tiny_shapes / "images").rglob("*.png"))
    first, large, small = (tmp_path / n for n in ("first", "large", "small"))
    for folder in (first, large, small):
        folder.mkdir()
    for n, f in enumerate(images[:4]):
        (first / f"f{n}.png").symlink_to(f)
    for n in range(3000):  # seconds of encoding for the tiny model
        (large / f"l{n}.png").symlink_to(images[n % len(images)])
    for n, f in enumerate(images[:3]):
        (small / f"s{n}.png").symlink_to(f)
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(model), "--images", str(first), "--out", str(out)]) == 0
    slow = subprocess.Popen(add_argv(model, large, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"img/s" not in seen and slow.poll() is None:  # bounded by the process's own end
        seen += slow.stderr.read1(4096)
    fast = subprocess.run(add_argv(model, small, out), capture_output=True, text=True, timeout=300)
    assert slow.wait(timeout=300) == 0
    assert fast.returncode == 2 and "is being written by another process" in fast.stderr, fast.stderr[-2000:]
    assert "Traceback" not in fast.stderr
    assert main(["index", "build", "--model", str(model), "--images", str(small), "--out", str(out), "--add"]) == 0
    assert len(load_index(out)) == 4 + 3000 + 3


def test_index_folders_are_shared_like_every_other_output(index_copy):
    _, index = index_copy
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(index.stat().st_mode) == 0o777 & ~umask


def test_a_server_that_may_change_the_index_is_its_one_writer(index_copy, tiny_shapes, tmp_path, capsys):
    """With an API key the server saves the index it holds in memory after each change; an `index
    build --add` beside it would be overwritten by the next save, so it is refused while it runs."""
    import socket
    import time
    import urllib.request

    model, index = index_copy
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cirlab", "serve", "--index", str(index), "--port", str(port),
                               "--api-key", "k"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        cli_error(capsys, ["index", "build", "--model", model, "--dataset", "shapes", "--root", tiny_shapes,
                           "--split", "val", "--out", index, "--add"], "being written by another process",
                  f"pid {server.pid}")
    finally:
        server.terminate()
        server.wait(30)
    assert main(["index", "build", "--model", str(model), "--dataset", "shapes", "--root", str(tiny_shapes),
                 "--split", "val", "--out", str(index), "--add"]) == 0
