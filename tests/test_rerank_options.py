"""Re-ranking beyond the official recipe: a residual re-ranker whose zero-initialised head reproduces
stage I's order exactly, listwise hard candidates whose label points at the target, and gradients
that reach the re-ranker through both losses."""

import pytest
import torch

import cirlab
from cirlab.methods import build_stage
from cirlab.composers import GroundedComposer, QueryRecipe, RerankComposer
from cirlab.composers.grounded import grounded_states
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.registry import load_split
from cirlab.composers.vectors import similarity, split_features
from cirlab.evaluation.evaluate import evaluate_composer, rerank_rows
from cirlab.methods import rerank
from cirlab.models import load_backbone
from cirlab.models.dual_encoder import DualEncoderReranker


def _composer(blip_dir, residual_scale):
    blip = load_backbone(blip_dir)
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id)
    return RerankComposer(GroundedComposer(blip, QueryRecipe()), reranker.zero_head(), k=10, residual_scale=residual_scale)


def test_zero_initialised_residual_head_reproduces_the_stage_one_order(tiny_shapes, tiny_pretrained_blip):
    split = load_split("shapes", tiny_shapes, "val")
    composer = _composer(tiny_pretrained_blip, residual_scale=1 / 0.07)
    feats = split_features(composer, split)
    sim = similarity(composer, split, feats)
    (reranked, _, _), = rerank_rows(composer, split, feats, sim, [10]).values()
    top = sim.clone()
    top[torch.arange(len(sim)), [split.gallery.index(q.reference) for q in split.queries]] = float("-inf")
    assert torch.equal(reranked.argsort(dim=1, descending=True)[:, :10], top.argsort(dim=1, descending=True)[:, :10])
    result = evaluate_composer(composer, [split], rerank_ks=[10])
    assert result.metrics["rerank@10"] == result.metrics["stage1"]
    # without the residual the zero head ties every candidate: the order is no longer stage I's
    plain = _composer(tiny_pretrained_blip, residual_scale=None)
    (flat, _, _), = rerank_rows(plain, split, feats, sim, [10]).values()
    assert not torch.equal(flat.argsort(dim=1, descending=True)[:, :10], top.argsort(dim=1, descending=True)[:, :10])


def test_hard_candidates_hold_the_target_at_the_label_and_never_the_reference(tiny_shapes, tiny_pretrained_blip):
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml",
                      [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}", "method.reranker_init=null",
                       "method.loss=mixed", "method.train_k=6", "method.residual=true"])
    stage = build_stage(cfg)
    data = stage.train_data
    rows = data.base.rows
    assert 0 < len(data) <= len(data.base)
    for i in range(len(data)):
        item, q = data[i], data.base.queries[data.keep[i]]
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
    assert all(p.grad is None for p in stage.model.composer.first.parameters())


def test_an_oracle_reranker_lifts_exactly_the_targets_inside_the_top_k(tiny_shapes, tiny_pretrained_blip, monkeypatch):
    """The evaluation maps each candidate index to its gallery image: a re-ranker that scores the
    target's tokens 1 and every other candidate 0 must give R@1 = the filter's R@K. A swapped
    candidate-id mapping, a flipped sign or another logit index breaks this equality."""
    split = load_split("shapes", tiny_shapes, "val")
    composer = _composer(tiny_pretrained_blip, residual_scale=None)
    feats = split_features(composer, split)
    target = {i: feats["tokens"][feats.index_of(q.target)] for i, q in enumerate(split.queries)}
    seen = {"row": 0}

    def oracle(references, texts, candidates, stage1=None):
        first = seen["row"] % len(split.queries)  # one pass for the top K, one for the subset members
        seen["row"] += len(texts)
        return torch.stack([(c == target[first + i]).flatten(1).all(1).float() for i, c in enumerate(candidates)])

    monkeypatch.setattr(composer, "rerank", oracle)
    result = evaluate_composer(composer, [split], rerank_ks=[5])
    filt = evaluate_composer(GroundedComposer(composer.backbone, QueryRecipe()), [split], topk_depths=[5])
    assert result.metrics["rerank@5"]["R@1"] == filt.metrics["filter"]["R@5"] > result.metrics["stage1"]["R@1"]


def test_the_official_rule_counts_no_hit_below_the_reranked_top_k(tiny_shapes, tiny_pretrained_blip):
    """validate_stage2.py ranks only the K re-ranked candidates, so with K = 10 R@50 equals R@10;
    cirlab's first-stage rule keeps the stage-I order below the K, so R@50 is the filter's own."""
    split = load_split("shapes", tiny_shapes, "val")
    composer = _composer(tiny_pretrained_blip, residual_scale=1 / 0.07)  # distinct scores: no ties to break
    official = evaluate_composer(composer, [split], rerank_ks=[10], beyond_k="official").metrics
    first_stage = evaluate_composer(composer, [split], rerank_ks=[10]).metrics
    assert official["rerank@10"]["R@50"] == official["rerank@10"]["R@10"]
    assert official["rerank@10"]["R@50"] < first_stage["rerank@10"]["R@50"] == first_stage["stage1"]["R@50"]
    for name in ("R@1", "R@5", "R@10", "Rs@1", "Rs@2"):  # inside the K (and the member sets) the rules agree
        assert official["rerank@10"][name] == first_stage["rerank@10"][name]


def test_the_official_rule_is_saved_with_the_model_and_is_the_paper_configs_default(tiny_pretrained_blip, tmp_path):
    composer = _composer(tiny_pretrained_blip, residual_scale=None)
    default_fingerprint = composer.fingerprint()
    composer.beyond_k = "official"
    assert cirlab.load(composer.save(tmp_path / "m")).beyond_k == "official"
    composer.beyond_k = "first-stage"
    assert composer.fingerprint() == default_fingerprint  # the default is left out of the manifest
    for dataset in ("cirr", "fashioniq"):
        assert load_config(CONFIG_ROOT / f"rerank/{dataset}_reranker.yaml").method.beyond_k == "official"
    with pytest.raises(ValueError, match="beyond_k must be one of"):
        RerankComposer(composer.first, composer.reranker, beyond_k="nothing")


@pytest.mark.parametrize("candidate_input", ["image", "difference"])
def test_training_losses_score_query_i_against_target_j_with_the_target_as_label(tiny_shapes, tiny_pretrained_blip,
                                                                                 candidate_input):
    """Both re-ranker losses against a direct loop over (query, candidate) pairs with ``score``:
    in-batch, row i holds query i against every target and its label is i; listwise, row i holds
    query i's candidates and the label is the target's position. A transposed layout differs.
    With ``candidate_input: difference`` pair (i, j) reads candidate j's tokens minus query i's
    reference tokens."""
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml",
                      [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}", "method.reranker_init=null",
                       "method.loss=mixed", "method.train_k=4", "method.residual=false",
                       f"method.candidate_input={candidate_input}"])
    stage = build_stage(cfg)
    model = stage.model.eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.reranker.cls_head[-1].weight, std=1.0)  # scores far apart: layouts differ
    assert len(stage.train_data) >= 3
    batch = torch.utils.data.default_collate([stage.train_data[i] for i in (0, len(stage.train_data) // 2, -1)])
    with torch.no_grad():
        out = model.training_step(batch)
        model.eval()  # training_step puts the filter in its configured mode; the re-ranker stays in eval
        z_t, ids, mask = grounded_states(model.composer.backbone, batch["text"], model.tokens[batch["reference"]],
                                         cfg.method.max_text_length)
        tok = model.tokens

        def score(i, row):
            cand = tok[torch.tensor([row])]
            if candidate_input == "difference":
                cand = cand - tok[batch["reference"][i:i + 1]]
            return model.reranker.score(z_t[i:i + 1], ids[i:i + 1], mask[i:i + 1], cand)[0]

        pairs = torch.stack([torch.stack([score(i, int(t)) for t in batch["target"]]) for i in range(3)])
        lists = torch.stack([torch.stack([score(i, int(c)) for c in batch["candidates"][i]]) for i in range(3)])
    assert torch.allclose(out["loss_in_batch"], torch.nn.functional.cross_entropy(pairs, torch.arange(3)), atol=1e-5)
    assert not torch.allclose(out["loss_in_batch"], torch.nn.functional.cross_entropy(pairs.T, torch.arange(3)), atol=1e-5)
    assert torch.allclose(out["loss_topk"], torch.nn.functional.cross_entropy(lists, batch["label"]), atol=1e-5)


def test_the_filter_loss_takes_fp32_cosines_under_bf16_autocast(tiny_shapes, tiny_pretrained_blip):
    """One-edit siblings differ by less than bf16's ~3 digits of cosine: the filter's logits must be
    computed in fp32 from its projections, as pretraining's ITC is (a bf16 matmul rounds them)."""
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_filter.yaml",
                      [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}"])
    stage = build_stage(cfg)
    model = stage.model.eval()
    batch = torch.utils.data.default_collate([stage.train_data[i] for i in range(16)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(batch)["loss"]
        states, _, _ = grounded_states(model.backbone, batch["text"], model.tokens[batch["reference"]],
                                       cfg.method.max_text_length)
        query = model.backbone.text_proj(states[:, 0]).float()
        cls = model.tokens.first()[batch["target"]][:, 0]
        target = model.backbone.vision_proj(cls.to(model.backbone.dtype)).float()
    q, t = (torch.nn.functional.normalize(x, dim=-1) for x in (query, target))
    direct = torch.nn.functional.cross_entropy((q @ t.T) / model.temp.detach(), torch.arange(16))
    rounded = torch.nn.functional.cross_entropy((q.bfloat16() @ t.bfloat16().T).float() / model.temp.detach(),
                                                torch.arange(16))
    assert torch.allclose(loss, direct, atol=1e-5) and not torch.allclose(loss, rounded, atol=1e-5)


def test_a_difference_reranker_reads_candidate_minus_reference_and_keeps_its_mode_on_save(
        tiny_shapes, tiny_pretrained_blip, tmp_path):
    """The composer's re-ranking scores with ``candidate_input="difference"`` are the re-ranker's
    scores on (candidate tokens - reference tokens), not on the candidate tokens; the mode survives
    save and load."""
    blip = load_backbone(tiny_pretrained_blip)
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(reranker.cls_head[-1].weight, std=1.0)
    composer = RerankComposer(GroundedComposer(blip, QueryRecipe()), reranker, k=5, candidate_input="difference").eval()
    split = load_split("shapes", tiny_shapes, "val")
    feats = split_features(composer, split)
    tokens = feats["tokens"]
    qs = split.queries[:3]
    refs = torch.stack([tokens[feats.index_of(q.reference)] for q in qs]).float()
    cands = torch.stack([torch.stack([tokens[feats.index_of(g)] for g in split.gallery[:4]]) for _ in qs]).float()
    texts = [q.captions[0] for q in qs]
    scores = composer.rerank(refs, texts, cands)
    with torch.no_grad():
        z_t, ids, mask = composer.grounded_states(refs, texts)
        direct = reranker.topk_scores(z_t, ids, mask, cands - refs[:, None])
        plain = reranker.topk_scores(z_t, ids, mask, cands)
    assert torch.allclose(scores, direct, atol=1e-5) and not torch.allclose(scores, plain, atol=1e-3)
    loaded = cirlab.load(composer.save(tmp_path / "model"))
    assert loaded.candidate_input == "difference"
    assert torch.allclose(loaded.rerank(refs, texts, cands), scores, atol=1e-5)
    with pytest.raises(ValueError, match="candidate_input"):
        RerankComposer(GroundedComposer(blip, QueryRecipe()), reranker, candidate_input="sum")
    # a bad mode in a saved model's composer.json: the error names the folder and the field
    manifest = tmp_path / "model" / "composer.json"
    manifest.write_text(manifest.read_text().replace('"difference"', '"sum"'))
    with pytest.raises(ValueError, match=r"model: candidate_input must be one of .*got 'sum'"):
        cirlab.load(tmp_path / "model")


def _first_stages(blip_dir):
    """Bi-BLIP4CIR's two first stages on the tiny BLIP: a sum model with direction tokens and a Combiner."""
    from cirlab.composers import CombinerComposer, SumComposer
    from cirlab.models import add_tokens
    from cirlab.models.combiner import Combiner

    torch.manual_seed(0)
    blip = load_backbone(blip_dir)
    add_tokens(blip, ["[FORWARD]", "[BACKWARD]"])
    recipe = QueryRecipe(direction="tokens", max_text_length=32)
    return {"sum": SumComposer(blip, recipe),
            "combiner": CombinerComposer(blip, recipe, Combiner(blip.embed_dim, 16, 16, dropout=0.5).eval())}


@pytest.mark.parametrize("kind", ["sum", "combiner"])
def test_a_reranker_over_any_blip_first_stage_keeps_its_ranking_and_survives_save(tiny_shapes, tiny_pretrained_blip,
                                                                                  tmp_path, kind):
    """Re-ranking is not tied to the grounded filter: over a Bi-BLIP4CIR model, the stage-I row is
    that model's own ranking, a zero-head residual re-ranker keeps its top-K order exactly, z_t is
    the grounded encoder on the first stage's formatted text ([FORWARD] first), and the saved
    folder rebuilds the first stage (its Combiner too)."""
    first = _first_stages(tiny_pretrained_blip)[kind].eval()
    blip = first.backbone
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id).zero_head()
    composer = RerankComposer(first, reranker, k=10, residual_scale=1 / 0.07).eval()
    split = load_split("shapes", tiny_shapes, "val")
    own = evaluate_composer(first, [split]).metrics["forward"]
    result = evaluate_composer(composer, [split], rerank_ks=[10]).metrics
    for metric, value in own.items():
        assert result["stage1"][metric] == pytest.approx(value, abs=0.51), metric  # cached CLS is float16
    assert result["rerank@10"] == result["stage1"]

    texts, refs = ["add a red circle"], torch.randn(1, 5, blip.vision_hidden)
    _, ids, _ = composer.grounded_states(refs, texts)
    assert ids[0, 1].item() == blip.tokenizer.convert_tokens_to_ids("[FORWARD]")  # after [ENC]

    torch.nn.init.normal_(reranker.cls_head[-1].weight, std=1.0)
    cands = torch.randn(1, 3, 5, blip.vision_hidden)
    loaded = cirlab.load(composer.save(tmp_path / "model"))
    assert type(loaded.first) is type(first) and loaded.heads == (*first.heads, "reranker")
    assert loaded.fingerprint() == composer.fingerprint()
    assert torch.allclose(loaded.rerank(refs, texts, cands, torch.zeros(1, 3)), composer.rerank(refs, texts, cands,
                                                                                              torch.zeros(1, 3)))
    assert torch.allclose(loaded.encode_queries(refs, texts), composer.encode_queries(refs, texts), atol=1e-6)


def test_the_reranker_trains_over_a_bi_blip4cir_model_folder(tiny_shapes, tiny_pretrained_blip, tmp_path):
    """``model.backbone`` may be any BLIP model folder: its ranking gives the hard candidates and
    the residual's cosines, only the re-ranker trains, and the export is a rerank model over it."""
    first = _first_stages(tiny_pretrained_blip)["sum"]
    folder = first.save(tmp_path / "sum")
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml",
                      [f"data.root={tiny_shapes}", f"model.backbone={folder}", "method.train_k=4"])
    stage = build_stage(cfg)
    assert type(stage.model.composer.first) is type(first)
    batch = torch.utils.data.default_collate([stage.train_data[i] for i in range(4)])
    item = stage.train_data[0]
    with torch.no_grad():  # the residual's cosines are the sum model's, on the candidate rows
        refs = stage.model.tokens[batch["reference"]]
        direct = first.compose(first.backbone.vision_proj(refs[:, 0]), batch["text"]) @ first.gallery_vectors(
            first.backbone.vision_proj(stage.model.tokens[batch["candidates"].flatten()][:, 0])).T
        got = stage.model._stage1(stage.model.composer.compose(refs, batch["text"]), batch["candidates"])
    assert torch.allclose(got, direct.view(4, 4, 4).diagonal(dim1=0, dim2=1).T, atol=1e-5)
    assert item["candidates"][item["label"]] == item["target"]
    out = stage.model.training_step(batch)
    out["loss"].backward()
    assert stage.model.reranker.cls_head[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stage.model.composer.first.parameters())
    with pytest.raises(ValueError, match="re-ranking model already"):
        build_stage(load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml", [
            f"data.root={tiny_shapes}", f"model.backbone={stage.export(stage.model, tmp_path / 'rr', {})}"]))


def test_the_fitted_residual_scale_recovers_the_temperature_the_labels_were_drawn_at():
    """Labels drawn from softmax(40 x cosines) give back a scale near 40: the zero-head residual model
    is then the first stage's own best-calibrated listwise model; lists without a target are ignored."""
    gen = torch.Generator().manual_seed(0)
    cos = torch.rand(4000, 8, generator=gen) * 0.2
    labels = torch.multinomial(torch.softmax(40 * cos, dim=1), 1, generator=gen).squeeze(1)
    labels[:100] = -1
    assert rerank.calibrated_scale(cos, labels) == pytest.approx(40, rel=0.1)
    with pytest.raises(ValueError, match="no training list"):
        rerank.calibrated_scale(cos[:3], torch.full((3,), -1))
    with pytest.raises(ValueError, match="needs loss topk or mixed"):
        rerank.RerankerConfig(residual=True, residual_scale="auto", loss="in_batch")
    rerank.RerankerConfig(residual=False, residual_scale="auto", loss="in_batch")  # the official recipe: no residual


def test_an_auto_residual_scale_is_fitted_before_training_and_saved(tiny_shapes, tiny_pretrained_blip, tmp_path):
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_reranker.yaml",
                      [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}", "method.train_k=4",
                       "method.residual_scale=auto"])
    stage = build_stage(cfg)
    scale = stage.model.composer.residual_scale
    assert isinstance(scale, float) and 1 <= scale <= 1000
    assert cirlab.load(stage.export(stage.model, tmp_path / "m", {})).residual_scale == scale


@pytest.mark.parametrize("train_vision_proj", [True, False])
def test_the_filter_trains_vision_proj_only_when_asked(tiny_shapes, tiny_pretrained_blip, train_vision_proj):
    """The official stage I computes its target features under no_grad: ``train_vision_proj: false``
    must leave the gallery side exactly as pretrained while the text side still learns."""
    cfg = load_config(CONFIG_ROOT / "rerank" / "shapes_filter.yaml",
                      [f"data.root={tiny_shapes}", f"model.backbone={tiny_pretrained_blip}",
                       f"method.train_vision_proj={str(train_vision_proj).lower()}"])
    stage = build_stage(cfg)
    model = stage.model.train()
    vision = [p.detach().clone() for p in model.backbone.vision_proj.parameters()]
    text = [p.detach().clone() for p in model.backbone.text_proj.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    batch = torch.utils.data.default_collate([stage.train_data[i] for i in range(16)])
    model.training_step(batch)["loss"].backward()
    opt.step()
    moved = lambda before, module: any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))
    assert moved(text, model.backbone.text_proj)
    assert moved(vision, model.backbone.vision_proj) == train_vision_proj


def test_reranking_scores_in_eval_mode_and_hands_the_modules_back_as_it_found_them(tiny_shapes, tiny_pretrained_blip):
    """Validation re-ranks in the middle of training: dropout must be off while it scores, and every
    module must come back in the mode it had (they once stayed in eval mode)."""
    split = load_split("shapes", tiny_shapes, "val")
    composer = _composer(tiny_pretrained_blip, residual_scale=1 / 0.07)
    composer.reranker.cls_head[-1].reset_parameters()  # a head that is not zero: scores depend on the pairs
    for m in composer.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    feats = split_features(composer, split)
    sim = similarity(composer, split, feats)
    composer.train()
    composer.first.eval()  # as during re-ranker training: the first stage frozen, the re-ranker training
    modes = [m.training for m in composer.modules()]
    first = rerank_rows(composer, split, feats, sim, [10])["rerank@10"][0]
    assert [m.training for m in composer.modules()] == modes and any(modes) and not all(modes)
    assert torch.equal(first, rerank_rows(composer, split, feats, sim, [10])["rerank@10"][0])
