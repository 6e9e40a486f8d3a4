"""Composers: trained models as objects. Folder round trip, image inputs, fingerprints, the one
evaluation path, and predictions that ``cirlab score`` reads back to the printed numbers."""

import json

import pytest
import torch

import cirlab
from cirlab.cli import main
from cirlab.composers import (CombinerComposer, GroundedComposer, QueryRecipe, RerankComposer, SumComposer,
                              ZeroShotComposer)
from cirlab.data.registry import load_split
from cirlab.data.torch_data import default_text
from cirlab.composers.vectors import split_features
from cirlab.evaluation.evaluate import evaluate_composer
from cirlab.models import add_tokens, build_small_blip, load_backbone, save_backbone
from cirlab.models.combiner import Combiner, load_combiner
from cirlab.models.dual_encoder import DualEncoderReranker

TINY = dict(embed_dim=32, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=32, stage_channels=(8, 8, 16, 16))


def every_kind(blip_dir) -> dict:
    """One composer of each kind on the tiny pretrained BLIP."""
    torch.manual_seed(0)
    blip = load_backbone(blip_dir)
    directed = load_backbone(blip_dir)
    add_tokens(directed, ["[FORWARD]", "[BACKWARD]"])
    recipe, tokens = QueryRecipe(), QueryRecipe(direction="tokens")
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id)
    return {"zeroshot": ZeroShotComposer(blip, recipe, "sum"), "grounded-zs": ZeroShotComposer(blip, recipe, "grounded"),
            "sum": SumComposer(directed, tokens),
            "combiner": CombinerComposer(directed, tokens, Combiner(blip.embed_dim, 16, 16, dropout=0.5)),
            "grounded": GroundedComposer(blip, recipe), "rerank": RerankComposer(GroundedComposer(blip, recipe), reranker, k=5)}


def test_a_saved_composer_loads_and_encodes_images_and_cached_features_alike(tiny_shapes, tiny_pretrained_blip, tmp_path):
    split = load_split("shapes", tiny_shapes, "test")
    gallery_paths = [split.find_image(i) for i in split.gallery[:6]]
    queries = split.queries[:4]
    ref_paths = [split.find_image(q.reference) for q in queries]
    texts = [default_text(q, False) for q in queries]
    for name, composer in every_kind(tiny_pretrained_blip).items():
        composer.eval()
        loaded = cirlab.load(composer.save(tmp_path / name, {"note": name}))
        assert type(loaded) is type(composer) and loaded.recipe == composer.recipe
        feats = split_features(loaded, split)
        cached_gallery = feats[loaded.gallery_field].index_select(0, torch.arange(6)).float()
        cached_refs = feats[loaded.reference_field].index_select(
            0, torch.tensor([feats.index_of(q.reference) for q in queries])).float()
        g = composer.encode_gallery(gallery_paths)
        q = composer.encode_queries(ref_paths, texts)
        assert g.shape == (6, composer.backbone.embed_dim) and torch.allclose(g.norm(dim=-1), torch.ones(6), atol=1e-5)
        # the reloaded folder gives the same vectors, from images or from the cached features
        # (tokens are cached in float16: a relative error of about 1e-3)
        atol = 1e-5 if loaded.gallery_field == "embeds" else 1e-2
        assert torch.allclose(loaded.encode_gallery(gallery_paths), g, atol=1e-5), name
        assert torch.allclose(loaded.encode_gallery(cached_gallery), g, atol=atol), name
        assert torch.allclose(loaded.encode_queries(ref_paths, texts), q, atol=1e-5), name
        atol = 1e-5 if loaded.reference_field == "embeds" else 1e-2
        assert torch.allclose(loaded.encode_queries(cached_refs, texts), q, atol=atol), name
        assert json.loads((tmp_path / name / "composer.json").read_text())["provenance"] == {"note": name}


def test_query_parameters_are_the_query_side_only(tiny_pretrained_blip):
    kinds = every_kind(tiny_pretrained_blip)
    vision = {id(p) for c in kinds.values() for p in c.backbone.vision_model.parameters()}
    for name, composer in kinds.items():
        params = composer.query_parameters()
        assert params and not vision & {id(p) for p in params}, name
    assert {id(p) for p in kinds["combiner"].query_parameters()} == {id(p) for p in kinds["combiner"].combiner.parameters()}


def test_a_folder_whose_backbone_was_swapped_or_whose_head_belongs_elsewhere_is_refused(tiny_pretrained_blip, tmp_path):
    composer = every_kind(tiny_pretrained_blip)["combiner"]
    folder = composer.save(tmp_path / "model")
    torch.manual_seed(1)
    other = build_small_blip(**TINY)
    add_tokens(other, ["[FORWARD]", "[BACKWARD]"])
    with pytest.raises(ValueError, match="trained on another backbone"):
        load_combiner(folder / "combiner", backbone=other.fingerprint())
    save_backbone(other, folder / "backbone")
    with pytest.raises(ValueError, match="not the one this model was saved with"):
        cirlab.load(folder)
    plain = cirlab.load(folder / "backbone")  # a backbone folder alone: its zero-shot model
    assert plain.kind == "zeroshot" and plain.mode == "sum"
    (folder / "backbone" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no composer.json"):
        cirlab.load(folder / "backbone")


def _score(capsys, dataset, root, split, recall, subset=None):
    capsys.readouterr()
    args = ["score", "--dataset", dataset, "--root", str(root), "--split", split, "--predictions", str(recall), "--json"]
    assert main(args + (["--subset-predictions", str(subset)] if subset else [])) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_predictions_score_back_to_the_printed_metrics(tiny_shapes, tiny_pretrained_blip, tmp_path, capsys):
    """`cirlab eval --model` on shapes val: each row's two CIRR-format files, scored by
    `cirlab score`, give the metrics it printed (the re-ranker's subset file included)."""
    for name in ("sum", "rerank"):
        folder = every_kind(tiny_pretrained_blip)[name].save(tmp_path / name)
        out = tmp_path / f"eval-{name}"
        assert main(["eval", "--model", str(folder), "--dataset", "shapes", "--root", str(tiny_shapes),
                     "--split", "val", "--run-dir", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics) == ({"forward", "backward", "backward image-only"} if name == "sum" else {"stage1", "rerank@5"})
        for row, expected in metrics.items():
            tag = f"{name}-{row}".replace("@", "at")
            if row.startswith("backward"):  # it ranks references: a diagnostic without a submission file
                assert not (out / f"recall_submission_{tag}.json").exists()
                continue
            scored = _score(capsys, "shapes", tiny_shapes, "val", out / f"recall_submission_{tag}.json",
                            out / f"recall_subset_submission_{tag}.json")
            assert scored == pytest.approx(expected, abs=1e-9), row


def test_cirr_test1_submission_is_the_composers_own_ranking(cirr_test1, tiny_pretrained_blip, tmp_path):
    """The server files hold exactly what ranking the decoded images with the composer gives."""
    root, queries = cirr_test1
    composer = every_kind(tiny_pretrained_blip)["zeroshot"]
    out = tmp_path / "submission"
    assert main(["eval", "--model", str(composer.save(tmp_path / "model")), "--dataset", "cirr", "--root", str(root),
                 "--split", "test1", "--run-dir", str(out)]) == 0
    split = load_split("cirr", root, "test1")
    gallery = composer.encode_gallery([split.find_image(i) for i in split.gallery])
    recall = json.loads((out / f"recall_submission_{tmp_path.name}-sum.json").read_text())
    subset = json.loads((out / f"recall_subset_submission_{tmp_path.name}-sum.json").read_text())
    for q in queries:
        query = composer.encode_queries([split.find_image(q["reference"])], [q["caption"]])
        order = [split.gallery[j] for j in (query @ gallery.T)[0].argsort(descending=True).tolist()]
        order.remove(q["reference"])
        assert recall[str(q["pairid"])] == order[:50]
        members = [i for i in order if i in q["img_set"]["members"]]
        assert subset[str(q["pairid"])] == members[:3]


def test_one_path_scores_a_grounded_filter_with_depths_and_fashioniq_style_names(tiny_shapes, tiny_pretrained_blip):
    composer = every_kind(tiny_pretrained_blip)["grounded"]
    split = load_split("shapes", tiny_shapes, "val")
    result = evaluate_composer(composer, [split], topk_depths=[10, 20], topk_k=7)
    assert set(result.metrics) == {"filter"} and {"R@1", "R@10", "R@20", "Rs@1", "Avg"} <= set(result.metrics["filter"])
    topk, = result.topk
    assert topk.k == 7 and all(q.reference not in topk.candidates(q.qid) for q in split.queries)


def test_export_is_the_selected_checkpoint(tiny_shapes, tiny_pretrained_blip, tmp_path):
    """`cirlab train` exports best.pt's weights (the one select_metric chose) and says so."""
    from cirlab.config import CONFIG_ROOT
    from cirlab.training.checkpoint import load_checkpoint

    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml"), "--run-dir", str(run),
                 "--set", f"data.root={tiny_shapes}", "--set", f"model.backbone={tiny_pretrained_blip}",
                 "--set", "trainer.epochs=3", "--set", "trainer.batch_size=16", "--set", "trainer.optimizer.lr=3e-2",
                 "--set", "method.text_proj_lr_scale=1"]) == 0
    manifest = json.loads((run / "model" / "composer.json").read_text())
    best = load_checkpoint(run / "best.pt")
    assert manifest["provenance"]["checkpoint"] == "best.pt" and manifest["provenance"]["step"] == best["step"]
    exported = cirlab.load(run / "model").backbone.state_dict()
    assert all(torch.equal(v, best["model"][f"backbone.{k}"]) for k, v in exported.items())


def test_select_metric_is_checked_before_the_run_is_made(tiny_shapes, tiny_pretrained_blip, tmp_path, capsys):
    from cirlab.config import CONFIG_ROOT

    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml"), "--run-dir", str(run),
                 "--set", f"data.root={tiny_shapes}", "--set", f"model.backbone={tiny_pretrained_blip}",
                 "--set", "trainer.select_metric=R@7"]) == 2
    assert "select_metric 'R@7' is not a validation metric" in capsys.readouterr().err and not run.exists()


def test_a_refused_eval_leaves_no_output_folder(tiny_shapes, tiny_pretrained_blip, tmp_path):
    folder = every_kind(tiny_pretrained_blip)["zeroshot"].save(tmp_path / "model")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--dataset", "cirr", "--root", str(tiny_shapes), "--split", "val",
                 "--run-dir", str(out)]) == 2  # no CIRR annotations there
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--root", str(tiny_shapes), "--run-dir", str(out)]) == 2
    assert not out.exists()


def test_a_composer_hands_its_shared_modules_back_in_the_mode_it_found_them(tiny_shapes, tiny_pretrained_blip):
    """Validation builds a composer over the modules a stage trains: encoding must not leave them
    in another mode (train mode would turn dropout on in the rest of the evaluation)."""
    composer = every_kind(tiny_pretrained_blip)["rerank"]
    split = load_split("shapes", tiny_shapes, "val")
    paths = [split.find_image(i) for i in split.gallery[:2]]
    for mode in (True, False):
        composer.train(mode)
        composer.reranker.eval()  # a mixed state must come back as it was too
        seen = []
        original = composer.compose
        composer.compose = lambda *a, **k: seen.append(composer.backbone.training) or original(*a, **k)
        composer.encode_gallery(paths)
        composer.encode_queries(paths, ["make it red", "make it blue"])
        assert seen == [False]  # encoded in eval mode
        assert composer.backbone.training is mode and composer.reranker.training is False
        assert all(m.training is mode for m in composer.backbone.modules())
        del composer.compose
