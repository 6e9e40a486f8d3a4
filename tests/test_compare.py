"""``cirlab compare``: McNemar's exact test and the paired bootstrap against hand-computed values,
and the command end to end on two tiny evaluations."""

import json
from math import comb

import pytest
import torch

from cirlab.cli import main
from cirlab.config import CONFIG_ROOT
from cirlab.data.base import CIRSplit, Query
from cirlab.evaluation.compare import RowScores, bootstrap_means, compare_scores, mcnemar_exact

# 10 queries. R@1: A hits 0, 1, 2, 8; B hits 0..6. Gained (B only): 3, 4, 5, 6; lost (A only): 8.
R1_A = [1, 1, 1, 0, 0, 0, 0, 0, 1, 0]
R1_B = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
RS1_A = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
RS1_B = [1, 0, 1, 0, 1, 0, 1, 0, 1, 1]


def _row(label: str, r1: list[int], rs1: list[int]) -> RowScores:
    split = CIRSplit("shapes", "test", [Query(str(i), f"r{i}", ("t",)) for i in range(len(r1))], ["x"],
                     lambda _: [], True)
    values = {"R@1": torch.tensor(r1, dtype=torch.double), "R@5": torch.tensor(r1, dtype=torch.double),
              "Rs@1": torch.tensor(rs1, dtype=torch.double)}
    values["Avg"] = (values["R@5"] + values["Rs@1"]) / 2
    return RowScores(label, [split], [values])


def test_mcnemar_exact_is_the_binomial_tail_by_hand():
    # 4 gained, 1 lost: n = 5 discordant, p = 2 * (C(5,0) + C(5,1)) / 2^5 = 2 * 6 / 32
    assert mcnemar_exact(4, 1) == pytest.approx(0.375)
    assert mcnemar_exact(1, 4) == mcnemar_exact(4, 1)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped; nothing discordant
    assert mcnemar_exact(2000, 1900) == pytest.approx(2 * sum(comb(3900, i) for i in range(1901)) / 2 ** 3900)


def test_compare_scores_on_ten_queries():
    c = compare_scores(_row("A", R1_A, RS1_A), _row("B", R1_B, RS1_B), resamples=2000, seed=3)
    r1 = c.metrics["R@1"]
    assert (r1.a, r1.b, r1.diff) == pytest.approx((40.0, 70.0, 30.0))
    assert (r1.gained, r1.lost, r1.p) == (4, 1, pytest.approx(0.375))
    assert r1.low <= r1.diff <= r1.high and -100 <= r1.low < r1.high <= 100
    rs1 = c.metrics["Rs@1"]
    assert (rs1.diff, rs1.gained, rs1.lost, rs1.p) == (pytest.approx(10.0), 1, 0, 1.0)  # p = 2 * 1/2
    assert rs1.low >= 0  # B never loses a query: no resample can be below 0
    avg = c.metrics["Avg"]
    assert avg.diff == pytest.approx(20.0) and avg.p is None and avg.gained is None
    assert c.queries == 10 and c.evaluated == (10, 10)


def test_bootstrap_is_deterministic_under_its_seed_and_paired():
    a, b = _row("A", R1_A, RS1_A), _row("B", R1_B, RS1_B)
    first, again = compare_scores(a, b, seed=7), compare_scores(a, b, seed=7)
    assert first.metrics == again.metrics
    diffs = torch.tensor(R1_B, dtype=torch.double)[:, None] - torch.tensor(R1_A, dtype=torch.double)[:, None]
    draws = [bootstrap_means(diffs, 50, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    same = compare_scores(a, a, seed=7).metrics["R@1"]  # paired: a row against itself never differs
    assert (same.low, same.high, same.gained, same.lost, same.p) == (0.0, 0.0, 0, 0, 1.0)


def test_interval_matches_the_paired_standard_error():
    """On 400 queries the 95% interval spans about 2 x 1.96 standard errors of the paired mean."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, generator=g) < 0.4
    b = torch.where(torch.rand(400, generator=g) < 0.8, a, ~a)  # 20% of the queries flip
    c = compare_scores(_row("A", a.int().tolist(), a.int().tolist()), _row("B", b.int().tolist(), b.int().tolist()))
    d = (b.double() - a.double()) * 100
    se = d.std().item() / 400 ** 0.5
    m = c.metrics["R@1"]
    assert m.high - m.low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_compare_cli_on_two_tiny_evaluations(tiny_shapes, tiny_random_blip, tmp_path, capsys):
    config = str(CONFIG_ROOT / "zeroshot" / "shapes_zeroshot_blip.yaml")
    sets = ["--set", f"data.root={tiny_shapes}", "--set", f"model.backbone={tiny_random_blip}"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["eval", "--config", config, "--run-dir", str(full), *sets]) == 0
    assert main(["eval", "--config", config, "--run-dir", str(part), "--max-queries", "20", *sets]) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    capsys.readouterr()

    assert main(["compare", str(full), str(full), "--row-a", "image", "--row-b", "sum", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for name in ("R@1", "R@5", "Rs@1", "Avg"):  # the values are metrics.json's, read back per query
        assert out["metrics"][name]["a"] == pytest.approx(metrics["image"][name])
        assert out["metrics"][name]["b"] == pytest.approx(metrics["sum"][name])
    n = out["queries"]
    r1 = out["metrics"]["R@1"]
    assert r1["gained"] - r1["lost"] == pytest.approx(r1["diff"] * n / 100)

    assert main(["compare", str(full), str(part), "--row-a", "sum", "--row-b", "sum"]) == 0
    printed = capsys.readouterr().out
    assert f"20 queries in both (A evaluated {n}, B 20)" in printed
    assert "R@1" in printed and "McNemar p" in printed

    assert main(["compare", str(full), str(part)]) == 2  # four rows each: which one is asked
    assert "name one (--row-a / --row-b)" in capsys.readouterr().err


def _tiny_eval(tiny_shapes, tiny_random_blip, out, *extra) -> None:
    config = str(CONFIG_ROOT / "zeroshot" / "shapes_zeroshot_blip.yaml")
    assert main(["eval", "--config", config, "--run-dir", str(out), "--set", f"data.root={tiny_shapes}",
                 "--set", f"model.backbone={tiny_random_blip}", *extra]) == 0


def _one_row_copy(source, row, out, as_row=None) -> None:
    """A `cirlab eval` folder holding one row of ``source`` (renamed ``as_row``): a stand-in for a trained model's."""
    out.mkdir(parents=True)
    (out / "eval.json").write_text((source / "eval.json").read_text())
    metrics = json.loads((source / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({as_row or row: metrics[row]}))
    for prefix in ("recall_submission", "recall_subset_submission"):
        [path] = source.glob(f"{prefix}_*-{row}.json")
        (out / f"{prefix}_{out.name}-{(as_row or row).replace('@', 'at')}.json").write_text(path.read_text())


def test_eval_examples_and_the_demo_table(tiny_shapes, tiny_random_blip, tmp_path, capsys):
    from PIL import Image

    from cirlab.cli.demo import LINES, results_table
    from cirlab.evaluation.examples import write_examples

    evals = tmp_path / "eval"
    _tiny_eval(tiny_shapes, tiny_random_blip, evals / "zeroshot", "--examples", "3")
    with Image.open(evals / "zeroshot" / "examples.png") as im:  # 3 queries x 4 rows (image, text, sum, grounded)
        assert im.height > 3 * 4 * 72 and im.width > 5 * 72
    rows = {"pic2word": "text", "rtd": "sum", "bi-text": "grounded", "bi-combiner": "sum", "spn-bank": "image"}
    for run, row in rows.items():
        _one_row_copy(evals / "zeroshot", row, evals / run)
    _one_row_copy(evals / "zeroshot", "image", evals / "rerank-reranker", "rerank@10")

    table, data, warnings = results_table(evals)
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "line" and len(lines) == 2 + len(LINES)  # header, rule
    assert [line.split("|")[1].strip() for line in lines[2:]] == [line.label for line in LINES]
    assert data["chance (a random ranking)"]["Rs@1"] == pytest.approx(20)
    image = data["image only (zero-shot)"]
    reranked = data["SPN + re-ranker (top 10)"]  # the image row, as SPN's: no difference, p = 1
    assert reranked["R@1"] == pytest.approx(image["R@1"]) and reranked["R@1 diff"]["diff"] == 0
    assert reranked["R@1 diff"]["p"] == 1.0 and reranked["vs"] == "SPN"
    # a random tiny BLIP's text rows are near chance on 8 test scenes: each trained line at chance is named
    assert all("at chance" in w for w in warnings)
    assert not any("image only" in w for w in warnings)  # an untrained line is not warned about
    picture = write_examples([(line.label, evals / line.run, line.row) for line in LINES], tmp_path / "examples.png")
    assert picture.is_file()
