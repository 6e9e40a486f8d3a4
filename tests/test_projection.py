"""RTD's building blocks: the NT-Xent against a direct formula, the pseudo-word at ``$`` only, Phi and
the projection composer's folder round trip, LinCIR's keyword masking, the text-triplet sources."""

import json
import random

import pytest
import torch

import cirlab
from cirlab.composers import ProjectionComposer, QueryRecipe
from cirlab.data.text_triplets import keyword_spans, mask_keywords, read_triplets, rule_triplets
from cirlab.models import build_small_clip
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


@pytest.fixture(scope="module")
def composer():
    torch.manual_seed(0)
    clip = build_small_clip(**TINY)
    return ProjectionComposer(clip, QueryRecipe(prompt=PROMPT), Phi("searle", clip.embed_dim, clip.token_dim)).eval()


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
