"""Crash points: every write path killed (``os._exit``, as kill -9) at each of its named points
leaves the previous state intact and readable, and a rerun completes.

Each case runs the real command in a subprocess with ``CIRLAB_CRASH_AT`` (see
:mod:`cirlab.utils.crash`), checks what is on disk, then reruns the command in this process.
The two-rename fallback of :func:`cirlab.utils.io.atomic_dir` (file systems without an exchange
rename) is forced by patching it off in the subprocess. The Milvus rebuild's points are
exercised in tests/test_milvus.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cirlab
import cirlab.data.captioners  # noqa: F401  (declares its crash point)
import cirlab.utils.io  # noqa: F401
from cirlab.cli import main
from cirlab.composers import GroundedComposer, QueryRecipe, SumComposer
from cirlab.config import CONFIG_ROOT
from cirlab.models import load_backbone
from cirlab.retrieval.index import load_index
from cirlab.retrieval.topk import load_topk
from cirlab.training.checkpoint import load_checkpoint
from cirlab.training.run import RunDir
from cirlab.utils.crash import CRASH_EXIT, POINTS

TINY = "{embed_dim: 16, text_hidden: 32, text_layers: 1, text_heads: 2, vision_hidden: 16, stage_channels: [8, 8, 8, 8]}"
SWAPS = ["atomic_dir:filled", "atomic_dir:exchanged", "atomic_dir:moved-old"]
COVERED: set[str] = set()  # (write path, point) pairs crashed by this module


def crash(argv: list[str], point: str, *, path: str) -> None:
    """Run ``cirlab argv`` in a subprocess that dies at ``point``; the fallback swap where the
    point belongs to it."""
    code = "import sys; from cirlab.cli import main; sys.exit(main(sys.argv[1:]))"
    if point.startswith("atomic_dir:moved-old"):
        code = "import cirlab.utils.io as io; io._exchange = lambda a, b: False; " + code
    env = {**os.environ, "CIRLAB_CRASH_AT": point}
    r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == CRASH_EXIT, f"{point} was not reached (exit {r.returncode}): {r.stderr[-3000:]}"
    COVERED.add(f"{path} / {point.split('@')[0]}")


def no_leftovers(folder: Path) -> None:
    """After a completed rerun, no work folder of a dead writer is left next to ``folder``."""
    assert not [p.name for p in folder.parent.glob(f".{folder.name}.*") if not p.name.endswith(".lock")]


def pretrain_argv(root: Path, run: Path) -> list[str]:
    sets = [f"data.root={root}", f"model.small={TINY}", "model.init_text=random", "trainer.max_steps=4",
            "trainer.checkpoint_every_steps=2", "trainer.batch_size=16", "trainer.num_workers=0", "method.eval_images=12"]
    return ["pretrain", "--config", CONFIG_ROOT / "pretrain" / "shapes_blip.yaml", "--run-dir", run,
            *(x for s in sets for x in ("--set", s))]


@pytest.fixture(scope="module")
def finished_run(tiny_shapes, tmp_path_factory):
    """Checkpoint save: a pretraining killed while writing its second latest.pt keeps the first,
    and ``--resume`` completes it. Returns the finished run (its export is the next case's old state)."""
    run = tmp_path_factory.mktemp("crash-run") / "run"
    crash(pretrain_argv(tiny_shapes, run), "atomic_path:written@latest.pt#2", path="checkpoint save")
    assert load_checkpoint(run / "latest.pt")["step"] == 2
    assert not (run / "backbone").exists()
    assert main(["pretrain", "--resume", "--run-dir", str(run)]) == 0
    assert load_checkpoint(run / "latest.pt")["step"] == 4
    return run


@pytest.mark.parametrize("point", SWAPS)
def test_backbone_export(finished_run, tmp_path, point):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = load_backbone(run / "backbone").state_dict()
    crash(["pretrain", "--resume", "--run-dir", run], f"{point}@backbone", path="model export (backbone)")
    after = load_backbone(run / "backbone").state_dict()  # the whole export: the same weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main(["pretrain", "--resume", "--run-dir", str(run)]) == 0
    load_backbone(run / "backbone")
    no_leftovers(run / "backbone")


@pytest.mark.parametrize("point", SWAPS)
def test_model_export(tiny_pretrained_blip, tiny_shapes, tmp_path, point):
    """A composer's export (``cirlab train``, resumed after it finished, exports again)."""
    run = tmp_path / "run"
    sets = [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}", "trainer.max_steps=1",
            "trainer.epochs=1", "trainer.batch_size=4", "trainer.num_workers=0",
            "trainer.checkpoint_every_steps=null", "evaluation.batch_size=16"]
    assert main(["train", "--config", str(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml"), "--run-dir", str(run),
                 *(x for s in sets for x in ("--set", s))]) == 0
    RunDir(run).unlock()  # this process's lock on the run would refuse the subprocess
    before = (run / "model" / "composer.json").read_bytes()
    crash(["train", "--resume", "--run-dir", run], f"{point}@model", path="model export (composer)")
    cirlab.load(run / "model")  # what every reader calls: it puts back a folder a crash left aside
    assert (run / "model" / "composer.json").read_bytes() == before
    assert main(["train", "--resume", "--run-dir", str(run)]) == 0
    cirlab.load(run / "model")
    no_leftovers(run / "model")


def index_argv(model: Path, root: Path, out: Path) -> list:
    return ["index", "build", "--model", model, "--dataset", "shapes", "--root", root, "--split", "test", "--out", out]


@pytest.mark.parametrize("point", SWAPS)
def test_index_rebuild(tiny_index, tiny_shapes, tmp_path, point):
    model, built = tiny_index
    out = tmp_path / "index"
    shutil.copytree(built, out)
    before = load_index(out)
    queries = np.random.default_rng(0).standard_normal((3, before.dim)).astype(np.float32)
    expected = before.search(queries, 5)
    crash(index_argv(model, tiny_shapes, out), f"{point}@index", path="index build")
    assert load_index(out).search(queries, 5) == expected  # checked against its manifest's sha256 on load
    assert main([str(a) for a in index_argv(model, tiny_shapes, out)]) == 0
    assert load_index(out).search(queries, 5) == expected
    no_leftovers(out)


@pytest.mark.parametrize("point", SWAPS)
def test_index_add(tiny_index, tiny_shapes, tmp_path, point):
    model, _ = tiny_index
    images = sorted((tiny_shapes / "images").rglob("*.png"))[:5]
    first, more = tmp_path / "first", tmp_path / "more"
    for folder, files in ((first, images[:3]), (more, images[3:])):
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
    out = tmp_path / "index"
    assert main(["index", "build", "--model", str(model), "--images", str(first), "--out", str(out)]) == 0
    argv = ["index", "build", "--model", model, "--images", more, "--out", out, "--add"]
    crash(argv, f"{point}@index", path="index build --add")
    assert len(load_index(out)) in (3, 5)  # the old index or the whole new one, each matching its manifest
    assert main([str(a) for a in argv]) == 0
    assert sorted(load_index(out).ids()) == sorted(f.stem for f in images)
    no_leftovers(out)


@pytest.fixture(scope="module")
def spn_setup(tiny_pretrained_blip, tiny_shapes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash-spn")
    root = tmp / "shapes"
    shutil.copytree(tiny_shapes, root, symlinks=True)
    stage1 = SumComposer(load_backbone(tiny_pretrained_blip), QueryRecipe()).save(tmp / "stage1")
    return root, stage1


def spn_argv(root: Path, stage1: Path, out: Path, *sets: str) -> list:
    sets = (f"data.root={root}", f"model.backbone={stage1}", f"method.out={out}", "method.window=[1,5]", *sets)
    return ["spn", "generate", "--config", CONFIG_ROOT / "spn" / "shapes_generate.yaml",
            *(x for s in sets for x in ("--set", s))]


def test_spn_generation_file(spn_setup, tmp_path):
    root, stage1 = spn_setup
    out = tmp_path / "extend_spn.json"
    crash(spn_argv(root, stage1, out), "caption_cache:appended", path="SPN caption cache")
    assert not out.exists()
    cached = Path(f"{out}.captions.jsonl").read_text().splitlines()
    assert cached and all(json.loads(line)["caption"] for line in cached)  # the batch written before the crash
    assert main([str(a) for a in spn_argv(root, stage1, out)]) == 0
    first = out.read_bytes()
    crash(spn_argv(root, stage1, out, "method.window=[2,6]"), "atomic_path:written@extend_spn", path="SPN generation file")
    assert out.read_bytes() == first
    assert main([str(a) for a in spn_argv(root, stage1, out, "method.window=[2,6]")]) == 0
    assert json.loads(out.read_text()) and out.read_bytes() != first


def test_topk_export(tiny_pretrained_blip, tiny_shapes, tmp_path):
    """An evaluation that died after its top-K file (at eval.json) is rerun into the same folder and
    dies writing the top-K again: the first file is intact; the next rerun completes."""
    model = GroundedComposer(load_backbone(tiny_pretrained_blip), QueryRecipe()).save(tmp_path / "filter")
    argv = ["eval", "--model", model, "--dataset", "shapes", "--root", tiny_shapes, "--split", "test",
            "--run-dir", tmp_path / "eval"]
    crash(argv, "atomic_path:written@eval.json", path="evaluation record")
    file = tmp_path / "eval" / "topk_shapes_test.pt"
    before = load_topk(file)
    crash(argv, "atomic_path:written@topk", path="top-K export")
    assert torch.equal(load_topk(file).indices, before.indices)
    assert main([str(a) for a in argv]) == 0
    assert torch.equal(load_topk(file).indices, before.indices)
    no_leftovers(file)


def test_every_crash_point_is_exercised():
    """Runs last in this module: the points crashed above are every declared point outside Milvus."""
    import cirlab.retrieval.milvus  # noqa: F401  (declares its own points, crashed in tests/test_milvus.py)

    crashed = {c.split(" / ")[1] for c in COVERED}
    assert crashed == {p for p in POINTS if not p.startswith("milvus")}, sorted(COVERED)
    print(f"{len(COVERED)} (write path, crash point) pairs: {sorted(COVERED)}")
