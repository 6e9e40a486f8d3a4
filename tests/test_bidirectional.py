"""Bi-BLIP4CIR: direction tokens, reversed queries, and both stages learning on tiny shapes."""

import json

import pytest
import torch
import torch.nn.functional as F

import cirlab
from cirlab.methods import build_stage
from cirlab.cli import main
from cirlab.composers import BACKWARD, FORWARD, CombinerComposer, QueryRecipe, SumComposer, with_direction
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.registry import load_split
from cirlab.evaluation.evaluate import reversed_split
from cirlab.methods import bidirectional as bi
from cirlab.models import build_small_blip, load_backbone, token_id
from cirlab.models.combiner import Combiner
from cirlab.training.run import RunDir
from cirlab.utils.seed import seed_everything

TINY = dict(embed_dim=32, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=32, stage_channels=(8, 8, 16, 16))


def test_direction_tokens_get_ids_rows_and_lead_the_text():
    backbone = build_small_blip(**TINY)
    rows = backbone.input_embeddings.num_embeddings
    bi.prepare_backbone(backbone, bi.BiConfig(direction="tokens"))
    fwd, bwd = token_id(backbone.tokenizer, FORWARD), token_id(backbone.tokenizer, BACKWARD)
    assert {fwd, bwd} == {rows, rows + 1} and backbone.input_embeddings.num_embeddings == rows + 2
    ids = backbone.tokenize([with_direction("make the circle red", False, "tokens")]).input_ids[0].tolist()
    assert ids[1] == bwd and ids[0] == backbone.tokenizer.cls_token_id  # [CLS] [BACKWARD] make ...
    assert backbone.input_embeddings.weight.requires_grad
    bi.prepare_backbone(backbone, bi.BiConfig(direction="tokens"))  # a stage-I export already has them
    assert backbone.input_embeddings.num_embeddings == rows + 2


def test_compat_prefix_reproduces_the_official_split_on_and():
    text = with_direction("is red and has sandals", True, "compat")
    assert text == " [FORWARD] is red and [FORWARD]  has sand [FORWARD] als"  # "sandals" splits too
    backbone = build_small_blip(**TINY)
    pieces = backbone.tokenizer.tokenize(with_direction("is red", True, "compat"))
    assert pieces[:3] == ["[", "forward", "]"]  # no new token: BERT word pieces, as in the official code


def test_reversed_split_asks_for_the_reference_scene(tiny_shapes):
    split = load_split("shapes", tiny_shapes, "test")
    scene = {q.reference: q.extra["reference_caption"] for q in split.queries}
    scene.update({q.target: q.extra["target_caption"] for q in split.queries})
    back = reversed_split(split)
    assert len(back.queries) == len(split.queries) and back.gallery == split.gallery
    for q, r in zip(split.queries, back.queries):
        assert (r.reference, r.target, r.captions) == (q.target, q.reference, q.captions)
        assert set(r.positives) == {i for i in split.gallery if scene[i] == scene[q.reference]}


def _train(cfg_name, overrides, run_dir):
    """`cirlab train` of a shapes config; ``(train losses, eval events)`` of its run."""
    assert main(["train", "--config", str(CONFIG_ROOT / "bidirectional" / cfg_name), "--run-dir", str(run_dir),
                 *(x for o in overrides for x in ("--set", o))]) == 0
    metrics = RunDir.open(run_dir).read_metrics()
    return [r["loss"] for r in metrics if r["event"] == "train"], [r for r in metrics if r["event"] == "eval"]


def _eval(model, root, split, out):
    assert main(["eval", "--model", str(model), "--dataset", "shapes", "--root", str(root), "--split", split,
                 "--run-dir", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_both_stages_lower_the_loss_and_raise_recall(tiny_shapes, tiny_pretrained_blip, tmp_path):
    common = [f"data.root={tiny_shapes}", "trainer.batch_size=32", "trainer.log_every_steps=1",
              "evaluation.batch_size=64", "trainer.precision=fp32",
              "data.val_split=train"]  # 60 training scenes: recall on them shows the fit
    text = [*common, f"model.backbone={tiny_pretrained_blip}", "trainer.epochs=8", "trainer.eval_every_epochs=8",
            "trainer.optimizer.lr=1e-3", "method.reverse_weight=0.4", "method.text_proj_lr_scale=1"]
    cfg = load_config(CONFIG_ROOT / "bidirectional" / "shapes_text.yaml", text)
    seed_everything(cfg.seed)  # as cirlab train: the direction tokens' initial rows
    stage = build_stage(cfg)
    before = stage.evaluate(stage.model.eval())
    assert set(stage.metric_names) <= set(before) and "backward/R@5" in stage.metric_names
    losses, evals = _train("shapes_text.yaml", text, tmp_path / "text")
    after = evals[-1]
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])
    assert after["R@5"] > before["R@5"] + 5
    # backward retrieval learns more slowly (its query is text-dominated): on some CPUs' kernels the
    # tiny run reaches 2.0 -> 5.3, on others more than +5
    assert after["backward/R@5"] > max(2 * before["backward/R@5"], before["backward/R@5"] + 3)
    stage1 = tmp_path / "text" / "model"
    composer = cirlab.load(stage1)
    assert isinstance(composer, SumComposer) and composer.recipe.direction == "tokens"
    assert token_id(composer.backbone.tokenizer, FORWARD) is not None
    # the exported model, scored by `cirlab eval --model` on the split training validated on,
    # gives the numbers of the run's (only, hence selected) evaluation: one evaluation path
    metrics = _eval(stage1, tiny_shapes, "train", tmp_path / "eval-text-train")
    assert set(metrics) == {"forward", "backward", "backward image-only"}
    for name, value in metrics["forward"].items():
        assert value == pytest.approx(after[name], abs=1e-6), name
    for name, value in metrics["backward"].items():
        assert value == pytest.approx(after[f"backward/{name}"], abs=1e-6), name

    losses, _ = _train("shapes_combiner.yaml", [*common, f"model.backbone={stage1}", "trainer.epochs=20",
                                                "trainer.eval_every_epochs=20", "method.projection_dim=64",
                                                "method.hidden_dim=128", "trainer.optimizer.lr=1e-3"],
                       tmp_path / "combiner")
    # Only the loss here: the tiny backbone's image features barely tell scenes apart, so the
    # Combiner cannot lift recall on tiny shapes; that it learns to compose is checked on
    # synthetic features in test_combiner_stage_learns_to_compose.
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    combiner = cirlab.load(tmp_path / "combiner" / "model")
    assert isinstance(combiner, CombinerComposer) and combiner.recipe == composer.recipe
    # stage II trains the Combiner only: its folder holds stage I's backbone, unchanged
    assert combiner.backbone.fingerprint() == composer.backbone.fingerprint()
    frozen = composer.backbone.state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in combiner.backbone.state_dict().items())

    # `cirlab eval --model` of both exports on val prints the forward and backward rows
    for model in (stage1, tmp_path / "combiner" / "model"):
        metrics = _eval(model, tiny_shapes, "val", tmp_path / f"eval-{model.parent.name}")
        assert set(metrics) == {"forward", "backward", "backward image-only"} and {"R@1", "R@5", "Rs@1", "Avg"} <= set(metrics["backward"])


def test_combiner_stage_learns_to_compose():
    """Stage II on synthetic features where composition is learnable by construction: item i
    with modification m has target perm_m[i]; backward text m must lead from it back to i."""
    torch.manual_seed(0)
    n, k, d = 32, 4, 16
    images = F.normalize(torch.randn(n, d), dim=-1)
    perms = torch.stack([torch.randperm(n) for _ in range(k)])
    names = [f"{way} {m}" for way in ("forward", "backward") for m in range(k)]
    cfg = bi.BiCombinerConfig(reverse_weight=0.5, dropout=0.0)
    stage = bi.CombinerStage(Combiner(d, 64, 128, dropout=0.0), images, torch.randn(2 * k, d),
                             {t: r for r, t in enumerate(names)}, cfg)
    refs, mods = torch.arange(n).repeat(k), torch.arange(k).repeat_interleave(n)
    targets = perms[mods, refs]

    @torch.no_grad()
    def accuracies() -> tuple[float, float]:
        """Forward R@1 over the n items, and the reversed loss's own task over all n targets:
        argmax_j <combine(T_j, backward text m), R_i> == perm_m[i]."""
        combiner = stage.combiner.eval()
        forward = (combiner(images[refs], stage.text_feats[mods]) @ images.T).argmax(-1) == targets
        pairs = combiner(images.repeat(n * k, 1), stage.text_feats[k + mods].repeat_interleave(n, 0))
        reversed_ = (pairs.view(n * k, n, d) @ images[refs, :, None]).squeeze(-1).argmax(-1) == targets
        combiner.train()
        return 100 * forward.float().mean().item(), 100 * reversed_.float().mean().item()

    before = accuracies()
    opt = torch.optim.Adam(stage.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        for batch in torch.randperm(n * k).split(32):
            out = stage.training_step({"reference": refs[batch], "target": targets[batch],
                                       "text": [names[m] for m in mods[batch]],
                                       "back_text": [names[k + m] for m in mods[batch]]})
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append((out["loss_forward"].item(), out["loss_reversed"].item()))
    first, last = torch.tensor(losses[:4]).mean(0), torch.tensor(losses[-4:]).mean(0)
    assert (last < 0.1 * first).all()
    after = accuracies()
    assert max(before) < 15 and min(after) > 90  # chance 1/32, plus the odd fixed point of perm_m


def test_cirr_test_submission_of_stage_one(cirr_test1, tiny_pretrained_blip, tmp_path):
    """`cirlab eval --model` of a Bi-BLIP4CIR stage-I model on CIRR test1 (no targets) writes the
    server files, holding the model's own ranking of [FORWARD]-marked queries."""
    root, queries = cirr_test1
    torch.manual_seed(0)
    backbone = load_backbone(tiny_pretrained_blip)
    bi.prepare_backbone(backbone, bi.BiTextConfig())
    composer = SumComposer(backbone, QueryRecipe(direction="tokens")).eval()
    out = tmp_path / "submission"
    assert main(["eval", "--model", str(composer.save(tmp_path / "bi" / "model")), "--dataset", "cirr",
                 "--root", str(root), "--split", "test1", "--run-dir", str(out)]) == 0
    assert not (out / "metrics.json").exists()  # test1 has no targets
    recall = json.loads((out / "recall_submission_bi-forward.json").read_text())
    subset = json.loads((out / "recall_subset_submission_bi-forward.json").read_text())
    assert recall["version"] == "rc2" and subset["metric"] == "recall_subset"
    split = load_split("cirr", root, "test1")
    gallery = composer.encode_gallery([split.find_image(i) for i in split.gallery])
    texts = [q["caption"] for q in queries]
    assert composer.tokenize(texts).input_ids[0, 1] == token_id(backbone.tokenizer, FORWARD)
    query = composer.encode_queries([split.find_image(q["reference"]) for q in queries], texts)
    for q, sim in zip(queries, query @ gallery.T):
        order = [split.gallery[j] for j in sim.argsort(descending=True).tolist()]
        order.remove(q["reference"])
        assert recall[str(q["pairid"])] == order[:50]
        assert subset[str(q["pairid"])] == [i for i in order if i in q["img_set"]["members"]][:3]
