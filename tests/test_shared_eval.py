"""`cirlab eval --model` on the real CIRR val and FashionIQ val annotations (placeholder images:
small random pictures, so that rankings are not ties) and on a CIRCO val layout: the predictions
it writes, scored by `cirlab score`, give exactly the numbers it printed."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.cli import main
from cirlab.composers import QueryRecipe, ZeroShotComposer
from cirlab.models import load_backbone

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _noise(paths, seed=0):
    rng = np.random.default_rng(seed)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _ids_of_fashioniq(root):
    ids = set()
    for path in (root / "image_splits").glob("split.*.val.json"):
        ids.update(json.loads(path.read_text()))
    for path in (root / "captions").glob("cap.*.val.json"):
        for r in json.loads(path.read_text()):
            ids.update((r["candidate"], r["target"]))
    return sorted(ids)


@pytest.fixture(scope="module")
def model(tiny_pretrained_blip, tmp_path_factory):
    composer = ZeroShotComposer(load_backbone(tiny_pretrained_blip), QueryRecipe(), "sum")
    return composer.save(tmp_path_factory.mktemp("model") / "zs-sum")


def _eval_then_score(capsys, model, dataset, root, out, files):
    assert main(["eval", "--model", str(model), "--dataset", dataset, "--root", str(root), "--split", "val",
                 "--run-dir", str(out)]) == 0
    printed = json.loads((out / "metrics.json").read_text())["sum"]
    capsys.readouterr()
    args = ["score", "--dataset", dataset, "--root", str(root), "--split", "val", "--json", "--skip-missing-images",
            "--predictions",
            str(out / files[0])] + (["--subset-predictions", str(out / files[1])] if len(files) > 1 else [])
    assert main(args) == 0
    return printed, json.loads(capsys.readouterr().out)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent (only on the project machines)")
def test_cirr_val_predictions_score_to_the_printed_metrics(model, tmp_path, capsys):
    import shutil

    root = tmp_path / "cirr_dataset"
    shutil.copytree(SHARED / "cirr", root / "cirr")
    relpaths = json.loads((root / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    _noise([root / rel for rel in relpaths.values()])
    printed, scored = _eval_then_score(capsys, model, "cirr", root, tmp_path / "eval",
                                       ["recall_submission_zs-sum-sum.json", "recall_subset_submission_zs-sum-sum.json"])
    assert set(printed) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Avg"}
    assert scored == pytest.approx(printed, abs=1e-9)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent (only on the project machines)")
def test_fashioniq_val_predictions_score_to_the_printed_metrics(model, tmp_path, capsys):
    import shutil

    root = tmp_path / "fashionIQ_dataset"
    shutil.copytree(SHARED / "fashioniq", root)
    ids = _ids_of_fashioniq(root)
    _noise([root / "images" / f"{i}.png" for i in ids[5:]])  # 5 images missing: counted, reported, skipped
    printed, scored = _eval_then_score(capsys, model, "fashioniq", root, tmp_path / "eval",
                                       ["fashioniq_predictions_zs-sum-sum.json"])
    assert {"dress/R@10", "shirt/R@50", "toptee/R@10", "avg/R@10", "avg/R@50", "avg"} <= set(printed)
    # the missing images' queries were left out of both the printed metrics and the file
    assert scored.keys() == printed.keys()
    for name, value in printed.items():
        assert scored[name] == pytest.approx(value, abs=1e-9), name


def test_circo_val_predictions_score_to_the_printed_metrics(model, tmp_path, capsys):
    """A CIRCO val layout (integer ids, several ground truths, the reference kept in the ranking)."""
    root = tmp_path / "CIRCO"
    n = 80
    rng = np.random.default_rng(1)
    files = {i + 1000: f"{i + 1000:012d}.jpg" for i in range(n)}
    (root / "COCO2017_unlabeled" / "annotations").mkdir(parents=True)
    (root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").write_text(
        json.dumps({"images": [{"id": i, "file_name": f} for i, f in files.items()]}))
    _noise([root / "COCO2017_unlabeled" / "unlabeled2017" / f for f in files.values()], seed=2)
    queries = []
    for q in range(12):
        ref, *gts = (int(x) + 1000 for x in rng.choice(n, 4, replace=False))
        queries.append({"id": q, "reference_img_id": ref, "target_img_id": gts[0], "gt_img_ids": gts,
                        "relative_caption": "has a red one", "shared_concept": "thing"})
    (root / "annotations").mkdir()
    (root / "annotations" / "val.json").write_text(json.dumps(queries))
    printed, scored = _eval_then_score(capsys, model, "circo", root, tmp_path / "eval",
                                       ["circo_submission_zs-sum-sum.json"])
    assert {"mAP@5", "mAP@50", "R@1", "R@50"} <= set(printed)
    assert scored == pytest.approx(printed, abs=1e-9)
