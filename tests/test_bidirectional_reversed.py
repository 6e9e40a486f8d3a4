"""Stage I's reversed query is the official one: normalize(normalize(T_j) + t_i) against normalize(R_i)."""

import torch
import torch.nn.functional as F

from cirlab.methods import bidirectional as bi
from cirlab.models import build_small_blip

TINY = dict(embed_dim=16, text_hidden=32, text_layers=1, text_heads=2, vision_hidden=16, stage_channels=(8, 8, 8, 8))


def _stage(reversed_target, reversed_negatives="targets"):
    torch.manual_seed(0)
    backbone = bi.prepare_backbone(build_small_blip(**TINY), bi.BiTextConfig())
    embeds = 5 * torch.randn(6, 16)  # raw image features are far from unit norm
    cfg = bi.BiTextConfig(reverse_weight=1.0, reversed_target=reversed_target, reversed_negatives=reversed_negatives)
    return bi.TextStage(backbone, embeds, cfg).eval(), embeds


def test_reversed_loss_matches_the_official_formula_and_the_raw_variant_differs():
    batch = {"reference": torch.tensor([0, 1, 2]), "target": torch.tensor([3, 4, 5]),
             "text": ["[FORWARD] make it red"] * 3, "back_text": ["[BACKWARD] make it red", "[BACKWARD] a", "[BACKWARD] b"]}
    losses = {}
    for mode in ("normalized", "raw"):
        stage, embeds = _stage(mode)
        with torch.no_grad():
            out = stage.training_step(batch)
            t = stage.encode_text(batch["back_text"])
        refs, tgts = embeds[batch["reference"]], embeds[batch["target"]]
        start = F.normalize(tgts, dim=-1) if mode == "normalized" else tgts
        direct = torch.stack([100 * F.normalize(start + t[i], dim=-1) @ F.normalize(refs[i], dim=-1) for i in range(3)])
        expected = F.cross_entropy(direct, torch.arange(3))
        assert torch.allclose(out["loss_reversed"], expected, atol=1e-4), mode
        losses[mode] = out["loss_reversed"].item()
    assert abs(losses["normalized"] - losses["raw"]) > 1e-3


def test_reversed_loss_over_references_matches_its_formula_and_masks_a_shared_reference():
    """``reversed_negatives: references``: row i scores normalize(T_i) + t_i against every R_k;
    a column showing the same reference image as row i is left out, not counted as a negative."""
    stage, embeds = _stage("normalized", "references")
    batch = {"reference": torch.tensor([0, 1, 1]), "target": torch.tensor([3, 4, 5]),
             "text": ["[FORWARD] make it red"] * 3, "back_text": ["[BACKWARD] make it red", "[BACKWARD] a", "[BACKWARD] b"]}
    with torch.no_grad():
        out = stage.training_step(batch)
        t = stage.encode_text(batch["back_text"])
    refs, tgts = embeds[batch["reference"]], F.normalize(embeds[batch["target"]], dim=-1)
    direct = torch.stack([torch.stack([100 * F.normalize(tgts[i] + t[i], dim=0) @ F.normalize(refs[k], dim=0)
                                       for k in range(3)]) for i in range(3)])
    direct[1, 2] = direct[2, 1] = float("-inf")  # queries 1 and 2 share reference 1
    assert torch.allclose(out["loss_reversed"], F.cross_entropy(direct, torch.arange(3)), atol=1e-4)
    official, _ = _stage("normalized", "targets")
    with torch.no_grad():
        assert abs(official.training_step(batch)["loss_reversed"].item() - out["loss_reversed"].item()) > 1e-3


def test_the_exported_composer_forms_backward_queries_as_stage_one_trained_them():
    """Evaluation's backward query must be the training one: normalize(normalize(T) + t_backward)
    (raw image features are ~8x unit norm on shapes: T + t would be another query)."""
    from cirlab.composers import SumComposer
    from cirlab.config import ExperimentConfig
    from cirlab.methods.common import recipe_of

    for mode in ("normalized", "raw"):
        stage, embeds = _stage(mode)
        recipe = recipe_of(ExperimentConfig(), bi.BiTextConfig(direction="tokens", reversed_target=mode))
        composer = SumComposer(stage.backbone, recipe).eval()
        with torch.no_grad():
            got = composer.compose(embeds[:2], ["make it red", "b"], forward=False)
            t = stage.encode_text(["[BACKWARD] make it red", "[BACKWARD] b"])
        start = F.normalize(embeds[:2], dim=-1) if mode == "normalized" else embeds[:2]
        assert torch.allclose(got, F.normalize(start + t, dim=-1), atol=1e-5), mode
