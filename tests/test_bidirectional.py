"""Bi-BLIP4CIR: direction tokens, reversed queries, and both stages learning on tiny shapes."""

import pytest
import torch
import torch.nn.functional as F

from cirlab.cli import main
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.registry import load_split
from cirlab.methods import bidirectional as bi
from cirlab.models import build_small_blip, load_backbone, token_id
from cirlab.models.combiner import Combiner
from cirlab.training.run import RunDir

TINY = dict(embed_dim=32, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=32, stage_channels=(8, 8, 16, 16))


def test_direction_tokens_get_ids_rows_and_lead_the_text():
    backbone = build_small_blip(**TINY)
    rows = backbone.input_embeddings.num_embeddings
    bi.prepare_backbone(backbone, bi.BiConfig(direction="tokens"))
    fwd, bwd = token_id(backbone.tokenizer, bi.FORWARD), token_id(backbone.tokenizer, bi.BACKWARD)
    assert {fwd, bwd} == {rows, rows + 1} and backbone.input_embeddings.num_embeddings == rows + 2
    ids = backbone.tokenize([bi.with_direction("make the circle red", False, "tokens")]).input_ids[0].tolist()
    assert ids[1] == bwd and ids[0] == backbone.tokenizer.cls_token_id  # [CLS] [BACKWARD] make ...
    assert backbone.input_embeddings.weight.requires_grad
    bi.prepare_backbone(backbone, bi.BiConfig(direction="tokens"))  # a stage-I export already has them
    assert backbone.input_embeddings.num_embeddings == rows + 2


def test_compat_prefix_reproduces_the_official_split_on_and():
    text = bi.with_direction("is red and has sandals", True, "compat")
    assert text == " [FORWARD] is red and [FORWARD]  has sand [FORWARD] als"  # "sandals" splits too
    backbone = build_small_blip(**TINY)
    pieces = backbone.tokenizer.tokenize(bi.with_direction("is red", True, "compat"))
    assert pieces[:3] == ["[", "forward", "]"]  # no new token: BERT word pieces, as in the official code


def test_reversed_split_asks_for_the_reference_scene(tiny_shapes):
    split = load_split("shapes", tiny_shapes, "test")
    scene = {q.reference: q.extra["reference_caption"] for q in split.queries}
    scene.update({q.target: q.extra["target_caption"] for q in split.queries})
    back = bi.reversed_split(split)
    assert len(back.queries) == len(split.queries) and back.gallery == split.gallery
    for q, r in zip(split.queries, back.queries):
        assert (r.reference, r.target, r.captions) == (q.target, q.reference, q.captions)
        assert set(r.positives) == {i for i in split.gallery if scene[i] == scene[q.reference]}


def _run(cfg_name, overrides, run_dir):
    from cirlab.data.images import collate_skip_none
    from cirlab.training.engine import Trainer
    from cirlab.utils.seed import seed_everything

    cfg = load_config(CONFIG_ROOT / "bidirectional" / cfg_name, overrides)
    seed_everything(cfg.seed)
    model, data, evaluate = bi.build(cfg)
    before = evaluate(model)
    run = RunDir.create(cfg, run_dir)
    Trainer(model, data, cfg, run, collate_fn=collate_skip_none, evaluate=evaluate,
            param_groups=getattr(model, "param_groups", lambda: None)()).fit()
    losses = [r["loss"] for r in run.read_metrics() if r["event"] == "train"]
    after = [r for r in run.read_metrics() if r["event"] == "eval"][-1]
    return model, before, after, losses


def test_both_stages_lower_the_loss_and_raise_recall(tiny_shapes, tiny_pretrained_blip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # feature cache
    common = [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}", "trainer.batch_size=32",
              "trainer.log_every_steps=1", "evaluation.batch_size=64",
              "data.val_split=train"]  # 60 training scenes: recall on them shows the fit
    model, before, after, losses = _run(
        "shapes_text.yaml", common + ["trainer.epochs=8", "trainer.optimizer.lr=1e-3", "method.reverse_weight=0.4",
                  "method.text_proj_lr_scale=1"],
        tmp_path / "text")
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])
    assert after["R@5"] > before["R@5"] + 5 and after["backward/R@5"] > before["backward/R@5"] + 5
    stage1 = bi.export(model, RunDir.open(tmp_path / "text"))
    assert token_id(load_backbone(stage1).tokenizer, bi.FORWARD) is not None

    model, _, _, losses = _run(
        "shapes_combiner.yaml", [*common, f"model.backbone={stage1}", "trainer.epochs=20", "trainer.eval_every_epochs=20",
                                  "method.projection_dim=64", "method.hidden_dim=128", "trainer.optimizer.lr=1e-3"],
        tmp_path / "combiner")
    # Only the loss here: the tiny backbone's image features barely tell scenes apart, so the
    # Combiner cannot lift recall on tiny shapes; that it learns to compose is checked on
    # synthetic features in test_combiner_stage_learns_to_compose.
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    combiner = bi.export(model, RunDir.open(tmp_path / "combiner"))

    # cirlab eval of both exports prints the forward and backward rows
    for stage, extra in (("text", []), ("combiner", ["--set", f"method.combiner={combiner}"])):
        cfg = CONFIG_ROOT / "bidirectional" / f"shapes_{stage}.yaml"
        assert main(["eval", "--config", str(cfg), "--set", f"data.root={tiny_shapes}", "--set",
                     f"model.backbone={stage1}", "--set", "evaluation.split=val", "--run-dir",
                     str(tmp_path / f"eval-{stage}"), *extra]) == 0


def test_combiner_stage_learns_to_compose():
    """Stage II on synthetic features where composition is learnable by construction: item i
    with modification m has target perm_m[i]; backward text m must lead from it back to i."""
    torch.manual_seed(0)
    n, k, d = 32, 4, 16
    images = F.normalize(torch.randn(n, d), dim=-1)
    perms = torch.stack([torch.randperm(n) for _ in range(k)])
    names = [f"{way} {m}" for way in ("forward", "backward") for m in range(k)]
    cfg = bi.BiConfig(stage="combiner", reverse_weight=0.5, dropout=0.0)
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


def test_cirr_test_submission_of_stage_one(cirr_test1, tiny_pretrained_blip, tmp_path, monkeypatch):
    """``cirlab eval`` of a Bi-BLIP4CIR model on CIRR test1 writes the server files."""
    from test_rerank import check_cirr_submission

    monkeypatch.chdir(tmp_path)
    root, queries = cirr_test1
    out = tmp_path / "submission"
    assert main(["eval", "--config", str(CONFIG_ROOT / "bidirectional" / "cirr_text.yaml"), "--run-dir", str(out),
                 "--set", f"data.root={root}", "--set", "evaluation.split=test1", "--set", "data.image_size=64",
                 "--set", f"model.backbone={tiny_pretrained_blip}", "--set", "model.kind=blip"]) == 0
    check_cirr_submission(out, "bi-cirr-text-forward", queries)
