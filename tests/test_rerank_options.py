"""Re-ranking beyond the official recipe: a residual re-ranker whose zero-initialised head reproduces
stage I's order exactly, listwise hard candidates whose label points at the target, and gradients
that reach the re-ranker through both losses."""

import torch

from cirlab.composers import GroundedComposer, QueryRecipe, RerankComposer
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.registry import load_split
from cirlab.evaluation.evaluate import evaluate_composer, rerank_rows, similarity, split_features
from cirlab.methods import rerank
from cirlab.models import load_backbone
from cirlab.models.dual_encoder import DualEncoderReranker


def _composer(blip_dir, residual_scale):
    blip = load_backbone(blip_dir)
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id)
    return RerankComposer(blip, QueryRecipe(), reranker.zero_head(), k=10, residual_scale=residual_scale)


def test_zero_initialised_residual_head_reproduces_the_stage_one_order(tiny_shapes, tiny_pretrained_blip):
    split = load_split("shapes", tiny_shapes, "val")
    composer = _composer(tiny_pretrained_blip, residual_scale=1 / 0.07)
    feats = split_features(composer, split)
    sim = similarity(composer, split, feats)
    (reranked, _), = rerank_rows(composer, split, feats, sim, [10]).values()
    top = sim.clone()
    top[torch.arange(len(sim)), [split.gallery.index(q.reference) for q in split.queries]] = float("-inf")
    assert torch.equal(reranked.argsort(dim=1, descending=True)[:, :10], top.argsort(dim=1, descending=True)[:, :10])
    result = evaluate_composer(composer, [split], rerank_ks=[10])
    assert result.metrics["rerank@10"] == result.metrics["stage1"]
    # without the residual the zero head ties every candidate: the order is no longer stage I's
    plain = _composer(tiny_pretrained_blip, residual_scale=None)
    (flat, _), = rerank_rows(plain, split, feats, sim, [10]).values()
    assert not torch.equal(flat.argsort(dim=1, descending=True)[:, :10], top.argsort(dim=1, descending=True)[:, :10])


def test_hard_candidates_hold_the_target_at_the_label_and_never_the_reference(tiny_shapes, tiny_pretrained_blip):
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml",
                      [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}", "method.reranker_init=null",
                       "method.loss=mixed", "method.train_k=6", "method.residual=true"])
    stage = rerank.build(cfg)
    data = stage.train_data
    rows = data.base.rows
    for i in range(len(data)):
        item, q = data[i], data.base.queries[i]
        cand = item["candidates"].tolist()
        assert len(cand) == 6 and len(set(cand)) == 6
        assert cand[item["label"]] == rows[q.target] == item["target"]
        assert rows[q.reference] not in cand
        assert not {rows[p] for p in q.positives if p != q.target} & set(cand)

    # both losses are finite, and their gradient reaches the re-ranker (the zeroed head included)
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    out = stage.model.training_step(batch)
    out["loss"].backward()
    assert {"loss_in_batch", "loss_topk"} <= set(out) and torch.isfinite(out["loss"])
    head = stage.model.reranker.cls_head[-1].weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert all(p.grad is None for p in stage.model.filter.parameters())
