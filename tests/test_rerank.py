"""Candidate re-ranking: the filter learns and exports its top K, the re-ranker trains on in-batch
pairs and re-sorts only the top K, subset recall scores the members directly."""

import json

import pytest
import torch

import cirlab
from cirlab.methods import build_stage
from cirlab.cli import main
from cirlab.composers import GroundedComposer, QueryRecipe, RerankComposer
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.base import CIRSplit, Query
from cirlab.data.registry import load_split
from cirlab.composers.vectors import similarity, split_features
from cirlab.evaluation.evaluate import _subset_members, reranked_similarity
from cirlab.data.registry import benchmark
from cirlab.methods import rerank
from cirlab.methods.common import RowTable
from cirlab.models import load_backbone
from cirlab.models.dual_encoder import DualEncoderReranker, load_reranker
from cirlab.retrieval.topk import load_topk
from cirlab.training.run import RunDir


def test_reranked_similarity_lifts_the_candidates_and_keeps_the_rest_in_stage_one_order():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    cand = torch.tensor([[0, 1, 2]])
    new = reranked_similarity(sim, cand, torch.tensor([[-5.0, 3.0, -4.0]]))
    assert new.argsort(descending=True)[0].tolist() == [1, 2, 0, 3, 4]
    padded = reranked_similarity(sim, torch.tensor([[4, -1]]), torch.tensor([[0.0, float("-inf")]]))
    assert padded.argsort(descending=True)[0].tolist() == [4, 0, 1, 2, 3]


def test_row_table_gathers_rows_across_parts_like_the_concatenated_table():
    torch.manual_seed(0)
    parts = [torch.randn(5, 3, 2).half(), torch.randn(4, 3, 2).half()]  # float16, as the cache stores tokens
    whole = torch.cat(parts).float()
    table = RowTable(parts)
    index = torch.tensor([[8, 0, 4], [5, 5, 1]])  # any shape, crossing the parts, repeats
    assert len(table) == 9
    assert table[index].dtype == torch.float32 and torch.equal(table[index], whole[index])
    assert torch.equal(table[[3, 7]], whole[[3, 7]])
    assert torch.equal(table.first()[index], whole[index][..., :1, :])  # [CLS] only
    with pytest.raises(IndexError, match="outside 0..8"):
        table[[9]]


def test_rerank_stages_keep_the_token_table_out_of_the_module(tiny_pretrained_blip):
    """A buffer would follow .to(device): at CIRR size, tens of GB onto the GPU."""
    tokens = RowTable([torch.zeros(3, 2, 4)])
    stage = rerank.FilterStage(load_backbone(tiny_pretrained_blip), tokens, rerank.FilterConfig())
    assert stage.tokens is tokens and "tokens" not in dict(stage.named_buffers())


def test_subset_members_drop_the_reference():
    q = Query(qid="1", reference="a", captions=("x",), target="b", positives=("b",), subset=("a", "b", "c"))
    split = CIRSplit(dataset="cirr", split="val", queries=[q], gallery=["a", "b", "c", "d"],
                     image_paths=lambda i: [], exclude_reference=True)
    members = _subset_members(split)
    assert sorted(m for m in members[0].tolist() if m >= 0) == [1, 2]


def _train(cfg_name, overrides, run_dir):
    assert main(["train", "--config", str(CONFIG_ROOT / "rerank" / cfg_name), "--run-dir", str(run_dir),
                 *(x for o in overrides for x in ("--set", o))]) == 0
    metrics = RunDir.open(run_dir).read_metrics()
    return [r["loss"] for r in metrics if r["event"] == "train"], [r for r in metrics if r["event"] == "eval"]


def _eval(model, root, out, *extra):
    assert main(["eval", "--model", str(model), "--dataset", "shapes", "--root", str(root), "--split", "test",
                 "--run-dir", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_filter_then_reranker_on_tiny_shapes(tiny_shapes, tiny_pretrained_blip, tmp_path):
    common = [f"data.root={tiny_shapes}", "trainer.log_every_steps=1", "evaluation.batch_size=64",
              "data.val_split=train"]  # 60 training scenes: recall on them shows the fit

    # stage I: loss falls and recall rises over the pretrained grounded encoder
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_filter.yaml",
                      [*common, f"model.backbone={tiny_pretrained_blip}"])
    stage = build_stage(cfg)
    before = stage.evaluate(stage.model.eval())
    losses, evals = _train("shapes_filter.yaml", [*common, f"model.backbone={tiny_pretrained_blip}",
                                                  "trainer.epochs=20", "trainer.batch_size=32",
                                                  "trainer.optimizer.lr=3e-3"], tmp_path / "filter")
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])
    assert evals[-1]["R@10"] > before["R@10"] + 5 and "R@200" in evals[-1]
    filter_model = tmp_path / "filter" / "model"
    filt = cirlab.load(filter_model)
    assert type(filt) is GroundedComposer

    # its eval writes a top-K file that agrees with the similarity it ranked
    metrics = _eval(filter_model, tiny_shapes, tmp_path / "eval-filter")
    assert {"R@10", "R@20", "R@50"} <= set(metrics["filter"])
    topk = load_topk(tmp_path / "eval-filter" / "topk_shapes_test.pt")
    split = load_split("shapes", tiny_shapes, "test")
    assert topk.query_ids == [q.qid for q in split.queries] and topk.reference_excluded
    assert topk.k == min(200, len(split.gallery) - 1)  # every candidate but the reference
    assert topk.backbone == filt.backbone.fingerprint()  # the file names the filter that ranked
    sim = similarity(filt, split, split_features(filt, split))
    for i, q in enumerate(split.queries[:5]):
        assert q.reference not in topk.candidates(q.qid)
        assert torch.allclose(topk.scores[i], sim[i][topk.indices[i].long()], atol=1e-5)
        assert torch.all(topk.scores[i][:-1] >= topk.scores[i][1:])

    # stage II, the official recipe: in-batch pair loss falls; the filter stays frozen
    losses, _ = _train("shapes_reranker.yaml", [*common, f"model.backbone={filter_model}",
                                                f"method.reranker_init={tiny_pretrained_blip}",
                                                "method.loss=in_batch", "method.residual=false",
                                                "trainer.eval_at_start=false",
                                                "trainer.schedule={name: cosine_epoch, min_lr: 0}",
                                                "trainer.epochs=2", "trainer.batch_size=8", "trainer.max_steps=90",
                                                "method.eval_queries=16",
                                                "trainer.optimizer.lr=3e-3"], tmp_path / "reranker")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731  (starts at ln 8: the new head scores all pairs alike)
    assert mean(losses[-15:]) < mean(losses[:15]) - 0.05
    composer = cirlab.load(tmp_path / "reranker" / "model")
    assert type(composer) is RerankComposer and composer.k == 20 and composer.reranker.merge == "official"
    fingerprint = filt.backbone.fingerprint()
    assert composer.backbone.fingerprint() == fingerprint
    assert isinstance(load_reranker(tmp_path / "reranker" / "model" / "reranker", backbone=fingerprint),
                      DualEncoderReranker)
    with pytest.raises(ValueError, match="trained on another backbone"):
        load_reranker(tmp_path / "reranker" / "model" / "reranker", backbone=load_backbone(tiny_pretrained_blip).fingerprint())

    # eval re-ranks within the top K only: the top-K set is stage I's, and so is the order below it
    rows = _eval(tmp_path / "reranker" / "model", tiny_shapes, tmp_path / "eval-rerank",
                 "--rerank-k", "5", "10", "--fusion", "1.0", "--max-queries", "12")
    assert set(rows) == {"stage1", "rerank@5", "rerank@10", "rerank@5+fusion", "rerank@10+fusion"}
    for k in (5, 10):
        for row in (f"rerank@{k}", f"rerank@{k}+fusion"):
            for depth in (d for d in benchmark("shapes").protocol.recall_ks if d >= k):
                assert rows[row][f"R@{depth}"] == pytest.approx(rows["stage1"][f"R@{depth}"], abs=1e-9), (row, depth)


def _submission(out, tag):
    recall = json.loads((out / f"recall_submission_{tag}.json").read_text())
    subset = json.loads((out / f"recall_subset_submission_{tag}.json").read_text())
    assert recall["version"] == "rc2" and subset["metric"] == "recall_subset"
    return recall, subset


def _assert_ranked_by(ranked, expected, score, tol=1e-5):
    """``ranked`` holds the ids of ``expected`` in descending ``score`` (up to near-ties)."""
    assert sorted(ranked) == sorted(expected)
    scores = [score[i] for i in ranked]
    assert all(a >= b - tol for a, b in zip(scores, scores[1:])), scores


def test_cirr_test1_submission_reranks_the_stage_one_top_k(cirr_test1, tiny_pretrained_blip, tmp_path):
    """`cirlab eval --model` of a re-ranking model on CIRR test1 (no targets): the stage-I file is the
    filter's ranking; each rerank@K file puts stage I's top K in the re-ranker's own order and
    keeps stage I's order after them; its subset file orders the members by the re-ranker."""
    root, _ = cirr_test1
    torch.manual_seed(0)
    blip = load_backbone(tiny_pretrained_blip)
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id)
    composer = RerankComposer(GroundedComposer(blip, QueryRecipe()), reranker, k=50).eval()
    out = tmp_path / "submission"
    assert main(["eval", "--model", str(composer.save(tmp_path / "rr" / "model")), "--dataset", "cirr",
                 "--root", str(root), "--split", "test1", "--run-dir", str(out), "--rerank-k", "5", "10"]) == 0
    assert not (out / "metrics.json").exists()  # test1 has no targets

    # the same thing computed here, from the cached [ENC]-grounding tokens the evaluation reads
    split = load_split("cirr", root, "test1")
    feats = split_features(composer, split)
    tokens = lambda ids: feats["tokens"].index_select(0, torch.tensor([feats.index_of(i) for i in ids])).float()  # noqa: E731
    texts = [q.captions[0] for q in split.queries]
    refs = tokens([q.reference for q in split.queries])
    sim = composer.encode_queries(refs, texts) @ composer.encode_gallery(tokens(split.gallery)).T
    stage1, stage1_subset = _submission(out, "rr-stage1")
    reordered = False
    for i, q in enumerate(split.queries):
        order = [split.gallery[j] for j in sim[i].argsort(descending=True).tolist() if split.gallery[j] != q.reference]
        assert stage1[q.qid] == order[:50] and len(set(order[:50])) == 50
        members = [m for m in order if m in q.subset]
        assert stage1_subset[q.qid] == members[:3]
        member_scores = composer.rerank(refs[i:i + 1], texts[i:i + 1], tokens(members)[None])[0].tolist()
        by_member = dict(zip(members, member_scores))
        for k in (5, 10):
            recall, subset = _submission(out, f"rr-rerankat{k}")
            top = order[:k]
            scores = composer.rerank(refs[i:i + 1], texts[i:i + 1], tokens(top)[None])[0].tolist()
            _assert_ranked_by(recall[q.qid][:k], top, dict(zip(top, scores)))
            assert recall[q.qid][k:] == order[k:50]
            reordered |= recall[q.qid][:k] != top
            # Rs@K: every member scored directly by the re-ranker, whatever its stage-I rank
            ranked_members = sorted(members, key=lambda m: -by_member[m])
            assert len(subset[q.qid]) == 3 and q.reference not in subset[q.qid]
            _assert_ranked_by(subset[q.qid], subset[q.qid], by_member)
            assert min(by_member[m] for m in subset[q.qid]) >= by_member[ranked_members[3]] - 1e-5
    assert reordered  # the re-ranker's order is not stage I's: the check above is not vacuous
