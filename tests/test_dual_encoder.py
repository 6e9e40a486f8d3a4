"""Re-ranking stage II: the dual encoder starts as a copy of BLIP's grounded encoder, its batched
scoring equals per-query scoring, gradients reach every new part, its folder round-trips under its
backbone's fingerprint; the stage-I top-K file round-trips."""

import pytest
import torch

from cirlab.models import build_small_blip
from cirlab.models.dual_encoder import DualEncoderReranker, load_reranker, save_reranker
from cirlab.retrieval.topk import TopK, load_topk, save_topk, topk_from_similarity

TINY = dict(embed_dim=32, text_hidden=32, text_layers=2, text_heads=2, vision_hidden=32, stage_channels=(8, 8, 16, 16))
TEXTS = ["is red", "make the cube larger and move it left", "remove the sphere", "add a small blue cylinder"]


@pytest.fixture(scope="module")
def blip():
    torch.manual_seed(0)
    return build_small_blip(**TINY).eval()


def text(blip, n=len(TEXTS)):
    enc = blip.tokenize(TEXTS[:n], max_length=16)
    return enc["input_ids"], enc["attention_mask"]


def image_tokens(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(*shape, 6, 32, generator=g)
    atts = torch.ones(*shape, 6, dtype=torch.long)
    atts.view(-1, 6)[::2, 4:] = 0  # every other image has two padded tokens
    return tokens, atts


def reranker(blip, merge, seed=0):
    torch.manual_seed(seed)
    return DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id, merge=merge).eval()


def test_duplicated_average_model_equals_grounded_encoder(blip):
    before = {k: v.clone() for k, v in blip.text_encoder.state_dict().items()}
    model = reranker(blip, "average")
    ids, mask = text(blip)
    tokens, atts = image_tokens(len(ids))
    with torch.no_grad():
        # HF BlipTextModel, [ENC] first. No image mask: transformers 5.x drops encoder_attention_mask
        # before BLIP's cross-attention (BlipTextAttention.forward does not pass it on).
        ref = blip.encode_grounded(ids, mask, tokens)
        enc_ids = ids.clone()
        enc_ids[:, 0] = blip.enc_token_id
        z_t = model.embeddings(enc_ids)  # branch 0 fed what branch 1 gets: both branches stay equal
        h0, h1 = model.hidden_states(z_t, ids, mask, tokens)
        torch.testing.assert_close(h0, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(h1, ref, atol=1e-5, rtol=0)
        # the image mask acts like removing the padded tokens (row 0 has its last two masked)
        masked = model.hidden_states(z_t, ids, mask, tokens, atts)
        cut = model.hidden_states(z_t[:1], ids[:1], mask[:1], tokens[:1, :4])
        for h, c in zip(masked, cut):
            torch.testing.assert_close(h[:1], c, atol=1e-5, rtol=0)
        assert not torch.allclose(masked[0][:1], h0[:1], atol=1e-3)
    layer = model.layers[0]
    assert layer.attention[0].self.query.weight.data_ptr() != layer.attention[1].self.query.weight.data_ptr()
    assert layer.crossattention[0].output.LayerNorm.weight is not layer.crossattention[1].output.LayerNorm.weight
    assert all(torch.equal(v, before[k]) for k, v in blip.text_encoder.state_dict().items())


def test_official_merge_layer_is_wired(blip):
    average, official = reranker(blip, "average"), reranker(blip, "official")
    assert [layer.merge_layer is None for layer in official.layers] == [True, False]  # l >= num_layers / 2
    assert all(layer.merge_layer is None for layer in average.layers)
    ids, mask = text(blip)
    tokens, atts = image_tokens(len(ids))
    z_t = torch.randn(*ids.shape, 32)
    official.cls_head.load_state_dict(average.cls_head.state_dict())
    with torch.no_grad():
        assert not torch.allclose(official(z_t, ids, mask, tokens, atts), average(z_t, ids, mask, tokens, atts))
        eye = torch.eye(32)
        official.layers[1].merge_layer.weight.copy_(torch.cat([eye / 2, eye / 2], dim=1))
        official.layers[1].merge_layer.bias.zero_()
        torch.testing.assert_close(official(z_t, ids, mask, tokens, atts), average(z_t, ids, mask, tokens, atts),
                                   atol=1e-5, rtol=0)


def test_pair_and_topk_scores_equal_per_query_scoring(blip):
    model = reranker(blip, "official")
    ids, mask = text(blip, 3)
    q, c, k = len(ids), 4, 5
    z_t = torch.randn(q, ids.shape[1], 32, generator=torch.Generator().manual_seed(2))
    cand, cand_atts = image_tokens(c)
    each = lambda i, n: (z_t[i].expand(n, -1, -1), ids[i].expand(n, -1), mask[i].expand(n, -1))  # noqa: E731
    with torch.no_grad():
        loop = torch.stack([model.score(*each(i, c), cand, cand_atts) for i in range(q)])
        for chunk in (None, 5, 8):  # 1 query per chunk, 2 queries per chunk
            torch.testing.assert_close(model.pair_scores(z_t, ids, mask, cand, cand_atts, chunk_size=chunk), loop,
                                       atol=1e-5, rtol=0)
        own, own_atts = image_tokens(q, k, seed=3)
        loop = torch.stack([model.score(*each(i, k), own[i], own_atts[i]) for i in range(q)])
        for chunk in (None, 4):  # chunks straddle queries
            torch.testing.assert_close(model.topk_scores(z_t, ids, mask, own, own_atts, chunk_size=chunk), loop,
                                       atol=1e-5, rtol=0)
    assert loop.std() > 1e-3  # the scores depend on the pair


def test_gradients_reach_both_branches_merge_and_head(blip):
    ids, mask = text(blip)
    z_t = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(4))
    cand, cand_atts = image_tokens(len(ids))
    grads = []
    for checkpointing in (False, True):
        model = reranker(blip, "official").train()
        model.gradient_checkpointing = checkpointing
        logits = model.pair_scores(z_t, ids, mask, cand, cand_atts)
        torch.nn.functional.cross_entropy(logits, torch.arange(len(ids))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys()
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, atol=1e-6, rtol=1e-4)
    must_move = ["layers.0.attention.0.self.query.weight", "layers.0.attention.1.self.query.weight",
                 "layers.1.crossattention.0.self.key.weight", "layers.1.crossattention.1.self.value.weight",
                 "layers.0.crossattention.0.output.dense.weight", "layers.1.crossattention.1.output.LayerNorm.weight",
                 "layers.1.intermediate.dense.weight", "layers.1.merge_layer.weight",
                 "cls_head.0.weight", "cls_head.2.bias", "embeddings.word_embeddings.weight"]
    for name in must_move:
        assert plain[name] is not None and plain[name].abs().sum() > 0, name


def test_rejects_text_only_encoder_and_bad_merge(blip):
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    text_only = BlipTextModel(BlipTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, is_decoder=False))
    with pytest.raises(ValueError, match="cross-attention"):
        DualEncoderReranker.from_text_encoder(text_only, enc_token_id=1)
    with pytest.raises(ValueError, match="merge"):
        DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=1, merge="concat")


def test_reranker_folder_round_trip_checks_the_backbone_fingerprint(blip, tmp_path):
    """A re-ranker folder rebuilds the same scorer from the folder alone, names the stage-I backbone
    by fingerprint, and is refused with another backbone."""
    model = reranker(blip, "official")
    folder = save_reranker(model, tmp_path / "reranker", backbone=blip.fingerprint())
    loaded = load_reranker(folder, backbone=blip.fingerprint())
    assert isinstance(loaded, DualEncoderReranker)
    assert (loaded.merge, loaded.enc_token_id) == (model.merge, model.enc_token_id)
    ids, mask = text(blip)
    tokens, atts = image_tokens(len(ids))
    z_t = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(z_t, ids, mask, tokens, atts), model(z_t, ids, mask, tokens, atts),
                                   atol=0, rtol=0)
    assert isinstance(load_reranker(folder), DualEncoderReranker)  # no fingerprint given: nothing to check
    with pytest.raises(ValueError, match="trained on another backbone"):
        load_reranker(folder, backbone="0" * 16)


# -- the stage-I top-K file -------------------------------------------------------------------------


def small_topk(k=3):
    sim = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    exclude = [0, None, 3, 7, 2]
    topk = topk_from_similarity(sim, [f"q{i}" for i in range(5)], [f"g{j}" for j in range(8)], k,
                                exclude=exclude, dataset="cirr", split="val", backbone="abc")
    return sim, exclude, topk


def test_topk_from_similarity_ranks_and_excludes_reference():
    sim, exclude, topk = small_topk()
    assert topk.k == 3 and topk.indices.dtype == torch.int32 and topk.reference_excluded
    for i, ref in enumerate(exclude):
        naive = sorted((j for j in range(8) if j != ref), key=lambda j: -sim[i, j].item())[:3]
        assert topk.indices[i].tolist() == naive
        torch.testing.assert_close(topk.scores[i], sim[i, naive])
        assert topk.candidates(f"q{i}") == [f"g{j}" for j in naive]
    with pytest.raises(ValueError, match="k=8"):  # only 7 left once the reference is out
        topk_from_similarity(sim, topk.query_ids, topk.gallery_ids, 8, exclude=exclude, dataset="d", split="s")
    with pytest.raises(ValueError, match="k=9"):
        topk_from_similarity(sim, topk.query_ids, topk.gallery_ids, 9, dataset="d", split="s")
    assert not topk_from_similarity(sim, topk.query_ids, topk.gallery_ids, 8, dataset="d", split="s").reference_excluded


def test_topk_file_round_trip_and_errors(tmp_path):
    _, _, topk = small_topk()
    path = save_topk(tmp_path / "cirr_top3_val.pt", topk)
    back = load_topk(path)
    assert isinstance(back, TopK) and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left
    for name in ("dataset", "split", "query_ids", "gallery_ids", "reference_excluded", "backbone", "k"):
        assert getattr(back, name) == getattr(topk, name), name
    assert torch.equal(back.indices, topk.indices) and torch.equal(back.scores, topk.scores)
    assert back.candidates("q2") == topk.candidates("q2")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_topk(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something-else"}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a cirlab top-K file"):
        load_topk(foreign)
    for field, value in (("indices", topk.indices + 6), ("scores", topk.scores[:, :2]), ("k", 4),
                         ("gallery_ids", topk.gallery_ids[:5])):
        bad = tmp_path / f"bad_{field}.pt"
        torch.save({**topk.to_dict(), field: value}, bad)
        with pytest.raises(ValueError, match=f"bad_{field}.pt.*'(indices|scores|{field})'"):
            load_topk(bad)
    with pytest.raises(FileNotFoundError):
        load_topk(tmp_path / "missing.pt")
