"""Candidate re-ranking: the filter learns and exports its top K, the re-ranker trains on in-batch
pairs and re-sorts only the top K, subset recall scores the members directly."""

import json

import pytest
import torch

from cirlab.cli import main
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.base import CIRSplit, Query
from cirlab.data.registry import load_split
from cirlab.methods import rerank
from cirlab.models.dual_encoder import load_reranker
from cirlab.retrieval.topk import load_topk
from cirlab.training.run import RunDir


def test_reranked_similarity_lifts_the_candidates_and_keeps_the_rest_in_stage_one_order():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    cand = torch.tensor([[0, 1, 2]])
    new = rerank.reranked_similarity(sim, cand, torch.tensor([[-5.0, 3.0, -4.0]]))
    assert new.argsort(descending=True)[0].tolist() == [1, 2, 0, 3, 4]
    padded = rerank.reranked_similarity(sim, torch.tensor([[4, -1]]), torch.tensor([[0.0, float("-inf")]]))
    assert padded.argsort(descending=True)[0].tolist() == [4, 0, 1, 2, 3]


def test_row_table_gathers_rows_across_parts_like_the_concatenated_table():
    from cirlab.methods.common import RowTable

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
    from cirlab.methods.common import RowTable
    from cirlab.models import load_backbone

    tokens = RowTable([torch.zeros(3, 2, 4)])
    stage = rerank.FilterStage(load_backbone(tiny_pretrained_blip), tokens, rerank.RerankConfig(stage="filter"))
    assert stage.tokens is tokens and "tokens" not in dict(stage.named_buffers())


def test_subset_candidates_drop_the_reference():
    q = Query(qid="1", reference="a", captions=("x",), target="b", positives=("b",), subset=("a", "b", "c"))
    split = CIRSplit(dataset="cirr", split="val", queries=[q], gallery=["a", "b", "c", "d"],
                     image_paths=lambda i: [], exclude_reference=True)
    members = rerank._subset_candidates(split)
    assert sorted(m for m in members[0].tolist() if m >= 0) == [1, 2]


def _train(cfg_name, overrides, run_dir):
    assert main(["train", "--config", str(CONFIG_ROOT / "rerank" / cfg_name), "--run-dir", str(run_dir),
                 *(x for o in overrides for x in ("--set", o))]) == 0
    run = RunDir.open(run_dir)
    metrics = run.read_metrics()
    return [r["loss"] for r in metrics if r["event"] == "train"], [r for r in metrics if r["event"] == "eval"]


def test_filter_then_reranker_on_tiny_shapes(tiny_shapes, tiny_pretrained_blip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # feature cache
    common = [f"data.root={tiny_shapes}", "trainer.log_every_steps=1", "evaluation.batch_size=64",
              "data.val_split=train"]  # 60 training scenes: recall on them shows the fit

    # stage I: loss falls and recall rises over the pretrained grounded encoder
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_filter.yaml",
                      [*common, f"model.backbone={tiny_pretrained_blip}"])
    model, _, evaluate = rerank.build(cfg)
    before = evaluate(model.eval())
    losses, evals = _train("shapes_filter.yaml", [*common, f"model.backbone={tiny_pretrained_blip}",
                                                  "trainer.epochs=20", "trainer.batch_size=32",
                                                  "trainer.optimizer.lr=3e-3"], tmp_path / "filter")
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])
    assert evals[-1]["R@10"] > before["R@10"] + 5 and "R@200" in evals[-1]
    backbone = tmp_path / "filter" / "backbone"

    # its eval writes a top-K file that agrees with the similarity it ranked
    assert main(["eval", "--config", str(CONFIG_ROOT / "rerank" / "shapes_filter.yaml"), "--run-dir",
                 str(tmp_path / "eval-filter"), "--set", f"data.root={tiny_shapes}",
                 "--set", f"model.backbone={backbone}", "--set", "method.export_k=20"]) == 0
    topk = load_topk(tmp_path / "eval-filter" / "topk_shapes_test.pt")
    split = load_split("shapes", tiny_shapes, "test")
    assert topk.query_ids == [q.qid for q in split.queries] and topk.k == 20 and topk.reference_excluded
    sim = rerank.filter_similarity(rerank.load_backbone(backbone), split, *_tokens(backbone, split, cfg),
                                   rerank.RerankConfig(**cfg.method))
    for i, q in enumerate(split.queries[:5]):
        assert q.reference not in topk.candidates(q.qid)
        assert torch.allclose(topk.scores[i], sim[i][topk.indices[i].long()], atol=1e-5)
    metrics = json.loads((tmp_path / "eval-filter" / "metrics.json").read_text())
    assert {"R@10", "R@20", "R@50"} <= set(metrics["filter"])

    # stage II: in-batch pair loss falls; eval re-ranks within the top K only
    losses, _ = _train("shapes_reranker.yaml", [*common, f"model.backbone={backbone}",
                                                f"method.reranker_init={tiny_pretrained_blip}",
                                                "trainer.epochs=2", "trainer.batch_size=8", "trainer.max_steps=90",
                                                "method.eval_queries=16",
                                                "trainer.optimizer.lr=3e-3"], tmp_path / "reranker")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731  (starts at ln 8: the new head scores all pairs alike)
    assert mean(losses[-15:]) < mean(losses[:15]) - 0.05
    reranker, filter_folder = load_reranker(tmp_path / "reranker" / "reranker")
    assert filter_folder == str(backbone.resolve()) and reranker.merge == "official"
    assert main(["eval", "--config", str(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml"), "--run-dir",
                 str(tmp_path / "eval-rerank"), "--set", f"data.root={tiny_shapes}",
                 "--set", f"model.backbone={backbone}", "--set", f"method.reranker={tmp_path / 'reranker' / 'reranker'}",
                 "--set", "method.eval_ks=[5,10]", "--set", "method.fusion=true", "--set", "method.eval_queries=12"]) == 0
    rows = json.loads((tmp_path / "eval-rerank" / "metrics.json").read_text())
    assert set(rows) == {"stage1", "rerank@5", "rerank@10", "rerank@5+fusion", "rerank@10+fusion"}
    for k in (5, 10):  # beyond K the order is stage I's, so R@K' >= K is unchanged (official protocol)
        assert rows[f"rerank@{k}"]["R@10"] == pytest.approx(rows["stage1"]["R@10"]) or k < 10
        assert rows[f"rerank@{k}"]["R@50"] == pytest.approx(rows["stage1"]["R@50"])


def _tokens(backbone_dir, split, cfg):
    from cirlab.methods.common import image_table

    table, rows = image_table(rerank.load_backbone(backbone_dir), [split], cfg, tokens=True)
    return table["tokens"], rows


def test_cirr_test_submission_from_the_reranked_lists(cirr_test1, tiny_pretrained_blip, tmp_path, monkeypatch):
    """``cirlab eval`` on CIRR test1 (no targets) writes the two server files of every row."""
    from cirlab.models import load_backbone
    from cirlab.models.dual_encoder import save_reranker

    monkeypatch.chdir(tmp_path)
    root, queries = cirr_test1
    blip = load_backbone(tiny_pretrained_blip)
    reranker = save_reranker(rerank.DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id),
                             tmp_path / "reranker", backbone=tiny_pretrained_blip)
    out = tmp_path / "submission"
    assert main(["eval", "--config", str(CONFIG_ROOT / "rerank" / "cirr_reranker.yaml"), "--run-dir", str(out),
                 "--set", f"data.root={root}", "--set", "evaluation.split=test1", "--set", "data.image_size=64",
                 "--set", f"model.backbone={tiny_pretrained_blip}", "--set", f"method.reranker={reranker}",
                 "--set", "model.kind=blip"]) == 0
    check_cirr_submission(out, "rerank-cirr-reranker-rerankat50", queries)
    assert (out / "recall_submission_rerank-cirr-reranker-stage1.json").is_file()


def check_cirr_submission(out, name, queries):
    recall = json.loads((out / f"recall_submission_{name}.json").read_text())
    subset = json.loads((out / f"recall_subset_submission_{name}.json").read_text())
    assert recall["version"] == "rc2" and subset["metric"] == "recall_subset"
    for q in queries:
        ranked, members = recall[str(q["pairid"])], subset[str(q["pairid"])]
        assert len(ranked) == 50 and q["reference"] not in ranked and len(set(ranked)) == 50
        assert len(members) == 3 and set(members) <= set(q["img_set"]["members"]) - {q["reference"]}
