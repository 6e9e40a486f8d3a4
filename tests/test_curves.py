"""`cirlab curves`: metrics.jsonl of one or more runs -> one PNG; unknown metric names are listed."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from cirlab.cli import main
from cirlab.config import ExperimentConfig
from cirlab.training import RunDir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(path, scale: float) -> RunDir:
    """A run directory whose metrics.jsonl holds 20 train and 4 eval events."""
    cfg = ExperimentConfig.model_validate({"name": "fake", "trainer": {"output_dir": str(path.parent)}})
    run = RunDir.create(cfg, path)
    for step in range(1, 21):
        run.log({"event": "train", "epoch": step / 5, "step": step, "lr": 1e-3, "loss": scale * math.exp(-step / 8)})
        if step % 5 == 0:
            run.log({"event": "eval", "epoch": step / 5, "step": step, "R@1": 10.0 * step / scale, "R@5": 30.0,
                     "dress/R@10": 1.0})
    return run


def test_curves_of_two_runs_make_a_png(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 1.0), fake_run(tmp_path / "b", 2.0)
    out = tmp_path / "plots" / "curves.png"
    assert main(["curves", "--run-dir", str(a.path), "--run-dir", str(b.path), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes().startswith(PNG_SIGNATURE) and out.stat().st_size > 1000
    with Image.open(out) as image:
        image.verify()
    # several panels by default (lr, loss, R@1, R@5): wider than one chosen panel
    one = tmp_path / "one.png"
    assert main(["curves", "--run-dir", str(a.path), "--metrics", "loss", "--out", str(one)]) == 0
    with Image.open(out) as every, Image.open(one) as single:
        assert every.width > single.width
    assert not list(tmp_path.rglob("*.tmp"))


def test_unknown_metrics_and_empty_runs_are_clear_errors(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 1.0)
    out = tmp_path / "curves.png"
    assert main(["curves", "--run-dir", str(run.path), "--metrics", "loss,R@100", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--metrics R@100: not logged in" in err and str(run.metrics_path) in err
    assert "available: train: loss, lr; eval: R@1, R@5, dress/R@10" in err
    assert not out.exists()

    empty = RunDir.create(ExperimentConfig.model_validate({"name": "e"}), tmp_path / "empty")
    assert main(["curves", "--run-dir", str(empty.path), "--out", str(out)]) == 2
    assert f"{empty.metrics_path}: no train or eval events to plot" in capsys.readouterr().err
    assert main(["curves", "--run-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_curves_need_a_run_dir():
    with pytest.raises(SystemExit):
        main(["curves"])
