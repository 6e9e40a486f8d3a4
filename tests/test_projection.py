"""RTD's building blocks: the NT-Xent against a direct formula, the pseudo-word at ``$`` only, Phi and
the projection composer's folder round trip, LinCIR's keyword masking, the text-triplet sources,
the stages (what trains, what never moves), FashionIQ's two caption orders, a CIRCO submission."""

import json
import random
from pathlib import Path

import pytest
import torch

import cirlab
from cirlab.composers import ProjectionComposer, QueryRecipe
from cirlab.data.text_triplets import keyword_spans, mask_keywords, read_triplets, rule_triplets
from cirlab.models import build_small_blip, build_small_clip
from cirlab.models.phi import Phi
from cirlab.training.losses import nt_xent

TINY = dict(embed_dim=16, text_hidden=16, text_layers=1, text_heads=2, vision_hidden=16, stage_channels=(8, 8, 8, 8))
PROMPT = "a photo of $ that {text}"


def direct_nt_xent(a, b, tau):
    """The official contrastive_loss, term by term."""
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=-1)
    n, terms = len(a), []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        den = sum(torch.exp(z[i] @ z[j] / tau) for j in range(2 * n) if j != i)
        terms.append(-torch.log(torch.exp(z[i] @ z[pos] / tau) / den))
    return torch.stack(terms).mean()


def test_nt_xent_equals_the_direct_formula_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g, requires_grad=True), torch.randn(5, 8, generator=g, requires_grad=True)
    ours = nt_xent(a, b, tau=0.07)
    ga, gb = torch.autograd.grad(ours, (a, b))
    ref = direct_nt_xent(a, b, 0.07)
    ra, rb = torch.autograd.grad(ref, (a, b))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)
    # a swap of the positives' layout gives another value
    assert not torch.isclose(nt_xent(a, b.flip(0), 0.07), ours)


@pytest.fixture(scope="module", params=["clip", "blip"])
def composer(request):
    """A projection composer on the small CLIP (the papers' setting) and on the small BLIP's
    unimodal encoders (cirlab's extension): every test below runs on both."""
    torch.manual_seed(0)
    if request.param == "clip":
        backbone = build_small_clip(**TINY)
    else:  # at BERT's init (std 0.02, or MiniLM's first layer) [CLS] is one vector for every text until
        # ITC pretraining; wider random text layers stand in for a pretrained encoder
        backbone = build_small_blip(**TINY)
        for module in backbone.text_encoder.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.3)
    return ProjectionComposer(backbone, QueryRecipe(prompt=PROMPT),
                              Phi("searle", backbone.embed_dim, backbone.token_dim)).eval()


def test_the_pseudo_word_lands_at_the_marker_and_nowhere_else(composer):
    pseudo = torch.randn(2, composer.backbone.token_dim)
    texts = ["is red", "has $ money"]  # a second $ in the text is a marker too: both get the word
    with torch.no_grad():
        got = composer.encode_prompts(texts, pseudo)
        embeddings = composer.backbone.text_encoder.get_input_embeddings().weight
        expected = []
        for row, text in enumerate(texts):  # the same text with the marker's own embedding set to the word
            saved = embeddings[composer.marker_id].clone()
            embeddings[composer.marker_id] = pseudo[row]
            expected.append(composer.encode_text([text])[0])
            embeddings[composer.marker_id] = saved
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)
        other = pseudo.clone()
        other[1] += torch.randn_like(other[1])  # (a constant shift would vanish in the first LayerNorm)
        moved = composer.encode_prompts(texts, other)
    torch.testing.assert_close(moved[0], got[0])  # another row's word changes nothing here
    assert not torch.allclose(moved[1], got[1])


def test_a_projection_composer_folder_loads_back_to_the_same_vectors(composer, tmp_path):
    images = torch.rand(3, 3, composer.backbone.image_size, composer.backbone.image_size)
    texts = ["is red", "is blue", "is big"]
    before = composer.encode_queries(images, texts), composer.encode_gallery(images)
    again = cirlab.load(composer.save(tmp_path / "model"))
    assert isinstance(again, ProjectionComposer) and again.phi.style == "searle"
    torch.testing.assert_close(again.encode_queries(images, texts), before[0])
    torch.testing.assert_close(again.encode_gallery(images), before[1])
    with pytest.raises(ValueError, match="no '\\$'"):
        ProjectionComposer(composer.backbone, QueryRecipe(prompt="a photo that {text}"), composer.phi)


@pytest.mark.parametrize("style, sizes", [("pic2word", [(16, 512), (512, 512), (512, 16)]),
                                          ("searle", [(16, 64), (64, 64), (64, 16)])])
def test_phi_has_the_official_layers(style, sizes):
    phi = Phi(style, 16, 16)
    linears = [m for m in phi.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == sizes
    drop = [m.p for m in phi.modules() if isinstance(m, torch.nn.Dropout)]
    assert drop == ([0.1, 0.1] if style == "pic2word" else [0.5, 0.5])


def test_keyword_masking_replaces_whole_spans_only():
    rng = random.Random(0)
    assert mask_keywords("a man riding a brown horse", rng, use_spacy=False) == "$ riding $"
    # the official substring replace would turn "redhead" into "$head"
    assert mask_keywords("a red hat and a redhead", rng, use_spacy=False) == "$ and $"
    shapes = "a small red circle at the top-left, a large cyan square at the middle-center"
    spans = keyword_spans(shapes, use_spacy=False)
    assert [shapes[s:e] for s, e in spans] == ["a small red circle", "the top-left", "a large cyan square",
                                                "the middle-center"]
    assert mask_keywords("in at of", rng, use_spacy=False).count("$") == 1  # nothing to keep: one word masked
    assert mask_keywords("", rng, use_spacy=False) == "a photo of $"


def test_text_triplet_sources(tmp_path):
    caps = ["a small red circle at the top-left", "a photo of nothing known"]
    one, two = rule_triplets(caps, per_caption=3, seed=1), rule_triplets(caps, per_caption=3, seed=1)
    assert one == two and len(one) == 3  # seeded; a caption without a lexicon word gives none
    for t in one:
        diff = [(a, b) for a, b in zip(t.reference_caption.split(), t.target_caption.split()) if a != b]
        assert len(diff) == 1 and diff[0][1] in t.conditioning_caption
    path = tmp_path / "triplets.json"
    path.write_text(json.dumps([{"reference_caption": "a", "conditioning_caption": "b", "target_caption": "c"}]))
    assert read_triplets(path)[0].target_caption == "c"
    path.write_text(json.dumps([{"reference_caption": "a", "target_caption": "c"}]))
    with pytest.raises(ValueError, match="conditioning_caption"):
        read_triplets(path)


# -- the stages ------------------------------------------------------------------------------------


def rtd_stage(composer, **options):
    import copy

    from cirlab.methods.projection import RtdConfig, RtdStage

    return RtdStage(copy.deepcopy(composer), RtdConfig(**options))


TRIPLETS = {"reference_caption": ["a small red circle at the top-left", "a large blue square at the middle-center"],
            "conditioning_caption": ["make it blue", "remove the object"],
            "target_caption": ["a small blue circle at the top-left", "an empty scene"]}


def test_rtd_trains_only_the_text_side_and_its_anchor_never_moves(composer):
    stage = rtd_stage(composer).train()
    anchor_before = {k: v.clone() for k, v in stage.anchor.state_dict().items()}
    phi_before = {k: v.clone() for k, v in stage.composer.phi.state_dict().items()}
    with torch.no_grad():
        enc = stage.anchor.tokenize(TRIPLETS["target_caption"], max_length=77)
        out_before = stage.anchor.encode_text(enc.input_ids, enc.attention_mask)
    trainable = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(8):
        loss = stage.training_step(TRIPLETS)["loss"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in stage.anchor.parameters())
        assert all(p.grad is None for p in stage.composer.phi.parameters())
        assert all(p.grad is None for p in stage.composer.backbone.vision_model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    text_params = {id(p) for p in stage.composer.backbone.text_encoder.parameters()}
    text_params |= {id(p) for p in stage.composer.backbone.text_proj.parameters()}
    assert {id(p) for p in trainable} == text_params
    for k, v in stage.anchor.state_dict().items():
        torch.testing.assert_close(v, anchor_before[k], rtol=0, atol=0)
    for k, v in stage.composer.phi.state_dict().items():
        torch.testing.assert_close(v, phi_before[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(stage.anchor.encode_text(enc.input_ids, enc.attention_mask), out_before)
    # without the anchor the trainable encoder encodes the targets too (the paper's ablation)
    free = rtd_stage(composer, anchor=False).train()
    free.training_step(TRIPLETS)["loss"].backward()
    assert all(p.grad is None for p in free.anchor.parameters())


def test_zero_noise_gives_the_deterministic_phi_output(composer):
    from cirlab.methods.projection import with_noise

    x = torch.randn(4, 16)
    assert torch.equal(with_noise(x, 0.0), x)
    torch.manual_seed(0)
    noisy = with_noise(x, 0.5)
    spread = (noisy - x).norm(dim=-1) / x.norm(dim=-1)
    assert (spread > 0).all() and spread.std() > 0  # one uniform scale per row
    stage = rtd_stage(composer, noise=0.0).train()
    a = stage.training_step(TRIPLETS)["loss"]
    b = stage.training_step(TRIPLETS)["loss"]
    assert torch.equal(a, b)  # Phi in eval mode, no noise: the same pseudo-words, the same loss


def test_lincir_and_pic2word_phi_stages_lower_their_losses(composer):
    from cirlab.methods.projection import PhiConfig, PhiStage

    captions = {"caption": ["a small red circle at the top-left", "a large cyan square at the middle-center",
                            "a small gray triangle at the bottom-right", "a large yellow circle at the top-center"]}
    for style, batch, embeds in (("lincir", captions, None),
                                 ("pic2word", {"row": torch.arange(4)}, torch.randn(4, composer.backbone.embed_dim))):
        bb = composer.backbone
        c = ProjectionComposer(bb, composer.recipe, Phi("pic2word" if style == "pic2word" else "searle",
                                                        bb.embed_dim, bb.token_dim))
        stage = PhiStage(c, PhiConfig(style=style, logit_scale=10.0), embeds).train()
        opt = torch.optim.AdamW(c.phi.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss = stage.training_step(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0], (style, losses[0], losses[-1])
        assert all(p.grad is None for p in c.backbone.parameters())


def test_fashioniq_queries_average_both_caption_orders(composer):
    from cirlab.data.base import CIRSplit, Query
    from cirlab.composers.vectors import query_vectors
    from cirlab.features.cache import FeatureSet

    queries = [Query("dress-0", "A", ("is red", "has long sleeves")), Query("dress-1", "B", ("is short.", "is blue"))]
    split = CIRSplit("fashioniq", "val", queries, ["A", "B"], lambda i: [], False)
    embeds = torch.randn(2, composer.backbone.embed_dim)
    feats = FeatureSet(Path("."), {}, ["A", "B"], {"embeds": embeds})
    both = ProjectionComposer(composer.backbone, QueryRecipe(prompt=PROMPT, caption_orders="both"), composer.phi).eval()
    got = query_vectors(both, split, feats)
    f1 = both.encode_queries(embeds, ["is red and has long sleeves", "is short and is blue"])
    f2 = both.encode_queries(embeds, ["has long sleeves and is red", "is blue and is short"])
    torch.testing.assert_close(got, torch.nn.functional.normalize(f1 + f2, dim=-1))
    one = ProjectionComposer(composer.backbone, QueryRecipe(prompt=PROMPT), composer.phi).eval()
    torch.testing.assert_close(query_vectors(one, split, feats),
                               one.encode_queries(embeds, ["Is red and has long sleeves", "Is short and is blue"]))
    pic2word = ProjectionComposer(composer.backbone, QueryRecipe(prompt=PROMPT, caption_orders="pic2word"),
                                  composer.phi).eval()
    torch.testing.assert_close(query_vectors(pic2word, split, feats),
                               pic2word.encode_queries(embeds, ["has long sleeves and is red", "is blue and is short."]))
    assert not torch.allclose(query_vectors(one, split, feats), got)


def test_an_rtd_model_writes_a_valid_circo_submission(composer, tmp_path):
    from test_loaders import write_image, write_json

    from cirlab.data.check import drop_missing
    from cirlab.data.registry import load_split
    from cirlab.evaluation.evaluate import evaluate_composer, write_predictions
    from cirlab.evaluation.submission import read_predictions

    root = tmp_path / "CIRCO"
    write_json(root / "annotations" / "test.json",
               [{"id": 5, "reference_img_id": 13, "relative_caption": "at night", "shared_concept": "a car"},
                {"id": 6, "reference_img_id": 11, "relative_caption": "in the snow", "shared_concept": "a dog"}])
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 8, "height": 8} for i in range(10, 20)]
    write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", {"images": images})
    for n, image in enumerate(images):
        write_image(root / "COCO2017_unlabeled" / "unlabeled2017" / image["file_name"], color=(20 * n, 0, 0))
    stage = rtd_stage(composer).train()
    opt = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        loss = stage.training_step(TRIPLETS)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = cirlab.load(stage.composer.save(tmp_path / "rtd-model"))
    split, _ = drop_missing(load_split("circo", root, "test"))
    result = evaluate_composer(model, [split])
    files = write_predictions(tmp_path / "out", "rtd", result, model.name)
    ranked = json.loads(files[0].read_text())
    assert set(ranked) == {"5", "6"} and all(len(v) == 10 for v in ranked.values())
    meta, read = read_predictions(files[0], ["5", "6"])
    assert read == {q: [str(i) for i in ids] for q, ids in ranked.items()}


def _official_pic2word(embed_dim: int, token_dim: int) -> torch.nn.Module:
    """The layout of Pic2Word's IM2TEXT (n_layer 2): blocks of [Linear, Dropout, ReLU] then fc_out."""
    from torch import nn

    model = nn.Module()
    model.layers = nn.Sequential(*(nn.Sequential(nn.Linear(d, 512), nn.Dropout(0.1), nn.ReLU()) for d in (embed_dim, 512)))
    model.fc_out = nn.Linear(512, token_dim)
    model.forward = lambda x: model.fc_out(model.layers(x))
    return model


def test_official_phi_and_rtd_checkpoints_import_as_a_projection_model(tmp_path):
    from cirlab.cli import main
    from cirlab.importers import import_projection
    from cirlab.models import save_backbone

    torch.manual_seed(0)
    clip = build_small_clip(**TINY).eval()
    clip_dir = save_backbone(clip, tmp_path / "clip")
    x = torch.randn(3, clip.embed_dim)
    # Pic2Word: DistributedDataParallel names under "state_dict_img2text", next to other entries
    p2w = _official_pic2word(clip.embed_dim, clip.token_dim).eval()
    torch.save({"epoch": 30, "state_dict_img2text": {f"module.{k}": v for k, v in p2w.state_dict().items()}},
               tmp_path / "p2w.pt")
    model = cirlab.load(import_projection(tmp_path / "p2w.pt", clip_dir, tmp_path / "p2w"))
    assert isinstance(model, ProjectionComposer) and model.phi.style == "pic2word"
    with torch.no_grad():
        assert torch.allclose(model.pseudo_words(x), p2w.forward(x), atol=1e-6)
    # LinCIR / RTD's --phi_checkpoint: {"Phi": state} of Linear-GELU-Dropout x 2, Linear; plus an
    # RTD text encoder, {"CLIPTextModelWithProjection": state}, that replaces the text side only
    lincir = Phi("searle", clip.embed_dim, clip.token_dim).eval()
    torch.save({"Phi": lincir.state_dict()}, tmp_path / "phi_best.pt")
    tuned = build_small_clip(**TINY).eval()  # another init: a text encoder unlike the folder's
    text_state = {k: v for k, v in tuned.model.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    torch.save({"CLIPTextModelWithProjection": text_state}, tmp_path / "text_encoder_best.pt")
    assert main(["import", "rtd", str(tmp_path / "text_encoder_best.pt"), "--phi", str(tmp_path / "phi_best.pt"),
                 "--clip", str(clip_dir), "--out", str(tmp_path / "rtd")]) == 0
    model = cirlab.load(tmp_path / "rtd")
    assert model.phi.style == "searle" and (model.recipe.caption_orders, model.recipe.transform) == ("both", "resize")
    enc = clip.tokenize(["a red square"])
    with torch.no_grad():  # RTD's evaluation loads the text encoder in fp16: the import rounds it the same way
        for p in tuned.model.parameters():
            p.copy_(p.half().float())
        assert torch.allclose(model.pseudo_words(x), lincir(x), atol=1e-6)
        assert torch.allclose(model.backbone.encode_text(enc.input_ids, enc.attention_mask),
                              tuned.encode_text(enc.input_ids, enc.attention_mask), atol=1e-5)
    image_side = [k for k in clip.model.state_dict() if k.startswith(("vision_model.", "visual_projection."))]
    assert image_side and all(torch.equal(model.backbone.model.state_dict()[k], clip.model.state_dict()[k])
                              for k in image_side)
    # bad input names the file and writes nothing
    torch.save({"Phi": {"layers.0.weight": torch.zeros(2, 2)}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt: neither a Pic2Word"):
        import_projection(tmp_path / "odd.pt", clip_dir, tmp_path / "odd")
    torch.save({"CLIPTextModelWithProjection": {"text_projection.weight": torch.zeros(1)}}, tmp_path / "bad_text.pt")
    with pytest.raises(ValueError, match="bad_text.pt: not a text encoder of this CLIP"):
        import_projection(tmp_path / "phi_best.pt", clip_dir, tmp_path / "bad", text_encoder=tmp_path / "bad_text.pt")
    assert not (tmp_path / "odd").exists() and not (tmp_path / "bad").exists()


def test_lincir_reads_a_caption_corpus_outside_shapes(tmp_path):
    from cirlab.config import load_config
    from cirlab.config import CONFIG_ROOT
    from cirlab.data.text_triplets import read_captions
    from cirlab.methods.projection import training_captions

    (tmp_path / "c.txt").write_text("a dog on a sofa\n\n  a red car \na dog on a sofa\n")
    (tmp_path / "c.json").write_text(json.dumps(["a dog on a sofa", "a red car"]))
    assert read_captions(tmp_path / "c.txt") == read_captions(tmp_path / "c.json") == ["a dog on a sofa", "a red car"]
    (tmp_path / "bad.json").write_text(json.dumps(["a dog", 3]))
    with pytest.raises(ValueError, match="bad.json: entry 1 is a int"):
        read_captions(tmp_path / "bad.json")
    cfg = load_config(CONFIG_ROOT / "projection" / "cirr_lincir.yaml", [f"method.captions={tmp_path / 'c.txt'}"])
    assert training_captions(cfg, cfg.method) == ["a dog on a sofa", "a red car"]
    with pytest.raises(ValueError, match="method.captions: LinCIR-style Phi training needs a caption corpus"):
        cfg = load_config(CONFIG_ROOT / "projection" / "cirr_lincir.yaml", ["method.captions=null"])
        training_captions(cfg, cfg.method)
