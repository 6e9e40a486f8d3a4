"""``cirlab score`` on tiny annotation fixtures in the real file layouts (no images needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cirlab.cli import main
from cirlab.data.registry import load_split, load_splits
from cirlab.evaluation.submission import (
    rankings_from_similarity,
    write_circo_submission,
    write_cirr_submission,
    write_fashioniq_predictions,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def a(*ids):
    return [f"a{i}" for i in ids]


@pytest.fixture
def cirr_root(tmp_path):
    """8 images, 3 queries with 6-member sets, in CIRR's layout."""
    root = tmp_path / "cirr_dataset"
    queries = [(10, 0, 1, (0, 1, 2, 3, 4, 5)), (11, 2, 6, (2, 6, 7, 0, 1, 3)), (12, 4, 5, (4, 5, 0, 1, 2, 3))]
    write_json(root / "cirr" / "captions" / "cap.rc2.val.json", [
        {"pairid": pid, "reference": f"a{ref}", "target_hard": f"a{tgt}", "target_soft": {f"a{tgt}": 1.0},
         "caption": "make it so", "img_set": {"id": pid, "members": a(*members)}}
        for pid, ref, tgt, members in queries])
    write_json(root / "cirr" / "image_splits" / "split.rc2.val.json", {f"a{i}": f"./dev/a{i}.png" for i in range(8)})
    return root


def cirr_predictions(tmp_path):
    # Full ranking (reference deleted, 7 candidates), target ranks: 10 -> 1, 11 -> 7, 12 -> 2
    #   R@1 = 1/3, R@5 = 2/3, R@10 = R@50 = 3/3.
    ranked = {"10": a(1, 2, 3, 4, 5, 6, 7), "11": a(0, 1, 3, 4, 5, 7, 6), "12": a(0, 5, 1, 2, 3, 6, 7)}
    # Top 3 of the 5 non-reference members: 10 -> rank 3, 11 -> rank 1, 12 -> not in the top 3
    #   Rs@1 = 1/3, Rs@2 = 1/3, Rs@3 = 2/3; Avg = (R@5 + Rs@1) / 2 = (66.7 + 33.3) / 2 = 50.
    subset = {"10": a(2, 3, 1), "11": a(6, 7, 0), "12": a(0, 1, 2)}
    preds = write_json(tmp_path / "recall.json", {"version": "rc2", "metric": "recall", **ranked})
    subset_preds = write_json(tmp_path / "subset.json", {"version": "rc2", "metric": "recall_subset", **subset})
    return preds, subset_preds


def test_score_cli_json_on_cirr_fixture(cirr_root, tmp_path):
    preds, subset_preds = cirr_predictions(tmp_path)
    cmd = [sys.executable, "-m", "cirlab", "score", "--dataset", "cirr", "--root", str(cirr_root), "--split", "val",
           "--predictions", str(preds), "--subset-predictions", str(subset_preds), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)  # exactly one JSON object on stdout
    third = 100 / 3
    assert metrics == pytest.approx({"R@1": third, "R@5": 2 * third, "R@10": 100.0, "R@50": 100.0,
                                     "Rs@1": third, "Rs@2": third, "Rs@3": 2 * third, "Avg": 50.0})


def test_score_cli_table_and_without_subset(cirr_root, tmp_path, capsys):
    preds, _ = cirr_predictions(tmp_path)
    args = ["score", "--dataset", "cirr", "--root", str(cirr_root), "--predictions", str(preds)]
    assert main(args + ["--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"R@1", "R@5", "R@10", "R@50"}  # no Rs@K, no Avg
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "R@5" in table and "66.67" in table and "chance" in table


def test_score_cli_user_errors(cirr_root, tmp_path, capsys):
    preds, subset_preds = cirr_predictions(tmp_path)
    partial = write_json(tmp_path / "partial.json", {"metric": "recall", "10": a(1, 2, 3, 4, 5, 6, 7)})
    base = ["score", "--dataset", "cirr", "--root", str(cirr_root)]
    assert main(base + ["--predictions", str(partial)]) == 2
    assert "2 of 3 queries are missing (e.g. 11, 12)" in capsys.readouterr().err
    # the two CIRR files swapped
    assert main(base + ["--predictions", str(subset_preds), "--subset-predictions", str(preds)]) == 2
    assert "expected 'recall'" in capsys.readouterr().err
    with_ref = write_json(tmp_path / "ref.json", {"10": a(0, 1, 2, 3, 4, 5, 6), "11": a(0, 1, 3, 4, 5, 7, 6),
                                                  "12": a(0, 5, 1, 2, 3, 6, 7)})
    assert main(base + ["--predictions", str(with_ref)]) == 2
    err = capsys.readouterr().err
    assert "ref.json" in err and "query 10" in err and "reference" in err
    assert main(base + ["--predictions", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_score_cli_fashioniq_all_categories_in_one_file(tmp_path, capsys):
    root = tmp_path / "fashionIQ_dataset"
    for cat in ("dress", "shirt", "toptee"):
        write_json(root / "image_splits" / f"split.{cat}.val.json", [f"{cat}{i}" for i in range(60)])
        write_json(root / "captions" / f"cap.{cat}.val.json",
                   [{"candidate": f"{cat}0", "target": f"{cat}{t}", "captions": ["x", "y"]} for t in (1, 2)])
    # Gallery order as ranking: targets 1 and 2 sit at ranks 2 and 3 (reference cat0 kept at rank 1)
    # except that the toptee-1 target is moved to rank 20: toptee R@10 = 50, everything else 100.
    ranked = {f"{cat}-{j}": [f"{cat}{i}" for i in range(50)] for cat in ("dress", "shirt", "toptee") for j in (0, 1)}
    ranked["toptee-1"].remove("toptee2")
    ranked["toptee-1"].insert(19, "toptee2")
    preds = write_json(tmp_path / "fiq.json", {"version": "fashioniq", "metric": "recall", **ranked})
    assert main(["score", "--dataset", "fashioniq", "--root", str(root), "--predictions", str(preds), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx({
        "dress/R@10": 100.0, "dress/R@50": 100.0, "shirt/R@10": 100.0, "shirt/R@50": 100.0,
        "toptee/R@10": 50.0, "toptee/R@50": 100.0, "avg/R@10": 250 / 3, "avg/R@50": 100.0, "avg": 275 / 3})
    # --category scores one category, from a file of its own or the file of all three
    only = write_json(tmp_path / "toptee.json", {k: v for k, v in ranked.items() if k.startswith("toptee")})
    for path in (only, preds):
        assert main(["score", "--dataset", "fashioniq", "--root", str(root), "--category", "toptee",
                     "--predictions", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == pytest.approx(
            {"toptee/R@10": 50.0, "toptee/R@50": 100.0, "avg/R@10": 50.0, "avg/R@50": 100.0, "avg": 75.0})
    typo = write_json(tmp_path / "typo.json", {**ranked, "dres-0": ranked["dress-0"]})
    assert main(["score", "--dataset", "fashioniq", "--root", str(root), "--predictions", str(typo)]) == 2
    assert "1 keys are not query ids" in capsys.readouterr().err


def perfect_rankings(split, k=50):
    """Positives first, then the rest of the gallery; the reference left out where excluded."""
    out = {}
    for query in split.queries:
        first = list(query.positives)
        rest = [g for g in split.gallery if g not in first and not (split.exclude_reference and g == query.reference)]
        out[query.qid] = (first + rest)[:k]
    return out


def test_perfect_cirr_predictions_score_100(cirr_root, tmp_path, capsys):
    split = load_split("cirr", cirr_root, "val")
    subset = {x.qid: [x.target] + [m for m in x.subset if m not in (x.target, x.reference)][:2] for x in split.queries}
    files = write_cirr_submission(tmp_path, "perfect", perfect_rankings(split), subset, split=split)
    assert main(["score", "--dataset", "cirr", "--root", str(cirr_root), "--predictions", str(files[0]),
                 "--subset-predictions", str(files[1]), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert len(metrics) == 8 and all(v == pytest.approx(100.0) for v in metrics.values())


def test_perfect_circo_predictions_score_100(tmp_path, capsys):
    root = tmp_path / "CIRCO"
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, 200)]
    write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", {"images": images})
    write_json(root / "annotations" / "val.json", [
        {"id": 0, "reference_img_id": 5, "target_img_id": 7, "relative_caption": "c", "shared_concept": "s",
         "gt_img_ids": [7, 8, 9, 10, 11, 12, 13]},
        {"id": 1, "reference_img_id": 6, "target_img_id": 20, "relative_caption": "c", "shared_concept": "s",
         "gt_img_ids": [20]}])
    split = load_split("circo", root, "val")
    path = write_circo_submission(tmp_path / "circo.json", perfect_rankings(split), split=split)
    assert main(["score", "--dataset", "circo", "--root", str(root), "--predictions", str(path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@1", "R@5", "R@10", "R@50"}
    assert all(v == pytest.approx(100.0) for v in metrics.values())


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_real_cirr_val_perfect_scores_100_and_random_is_at_chance(tmp_path, capsys):
    root = SHARED / "cirr"  # the annotations sit directly under root (no images needed)
    split = load_split("cirr", root, "val")
    assert (len(split.queries), len(split.gallery)) == (4181, 2297)
    subset = {x.qid: [x.target] + [m for m in x.subset if m not in (x.target, x.reference)][:2] for x in split.queries}

    def score(name, ranked, subset):
        files = write_cirr_submission(tmp_path, name, ranked, subset, split=split)
        assert main(["score", "--dataset", "cirr", "--root", str(root), "--predictions", str(files[0]),
                     "--subset-predictions", str(files[1]), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert all(v == pytest.approx(100.0) for v in score("perfect", perfect_rankings(split), subset).values())
    sim = torch.rand(4181, 2297, generator=torch.Generator().manual_seed(0))
    metrics = score("random", *rankings_from_similarity(split, sim))
    # chance: R@50 = 50/2296 = 2.18% (SE 0.23), Rs@1 = 20% (SE 0.62)
    assert abs(metrics["R@50"] - 50 / 2296 * 100) < 1.0 and abs(metrics["Rs@1"] - 20.0) < 2.5


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_real_fashioniq_val_perfect_scores_100(tmp_path, capsys):
    root = SHARED / "fashioniq"
    splits = load_splits("fashioniq", root, "val")
    ranked = {k: v for s in splits for k, v in perfect_rankings(s).items()}
    path = write_fashioniq_predictions(tmp_path / "fiq.json", ranked, splits=splits)
    assert main(["score", "--dataset", "fashioniq", "--root", str(root), "--predictions", str(path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert len(metrics) == 9 and all(v == pytest.approx(100.0) for v in metrics.values())
