"""SPN: the bank logits against a direct computation, duplicates never negatives of each other,
captioning that resumes without asking again, generated triplets that load and reach training,
and a second stage that trains only the query side."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import cirlab
from cirlab.methods import build_stage
from cirlab.cli import main
from cirlab.composers import QueryRecipe, SumComposer
from cirlab.config import CONFIG_ROOT, load_config
from cirlab.data.captioners import (CaptionCache, CaptionerConfig, ChatCaptioner, HFCaptioner, caption_images,
                                    word_budget_caption)
from cirlab.data.dedup import duplicate_map
from cirlab.data.registry import extend_split, load_split
from cirlab.data.torch_data import default_text
from cirlab.methods import spn
from cirlab.methods.common import training_splits
from cirlab.models import load_backbone
from cirlab.training import RunDir
from cirlab.utils.io import read_json


def bank_stage(cfg: spn.BankConfig, n_bank=7, d=6, seed=0):
    """A BankStage whose composer is the identity on (reference + fixed text offset)."""
    g = torch.Generator().manual_seed(seed)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.offset = torch.nn.Parameter(torch.randn(d, generator=g))

        def compose(self, refs, texts):
            return F.normalize(refs + self.offset, dim=-1)

        def query_parameters(self):
            return [self.offset]

    bank = F.normalize(torch.randn(n_bank, d, generator=g), dim=-1)
    refs = torch.randn(5, d, generator=g)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])  # feature rows 6 and 7 are copies of one image
    return spn.BankStage(Toy(), bank, refs, rows, cfg), bank, refs


def test_bank_logits_equal_a_direct_computation():
    stage, bank, refs = bank_stage(spn.BankConfig(tau=0.05))
    batch = {"reference": torch.tensor([0, 1, 2, 3]), "target": torch.tensor([4, 7, 0, 2]), "text": ["a"] * 4}
    loss = stage.training_step(batch)["loss"]
    q = F.normalize(refs[:4] + stage.composer.offset, dim=-1)
    labels = [4, 6, 0, 2]  # feature row 7 is bank row 6
    direct = -sum(torch.log(torch.exp(q[i] @ bank[labels[i]] / 0.05) /
                            sum(torch.exp(q[i] @ bank[j] / 0.05) for j in range(len(bank)))) for i in range(4)) / 4
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert stage.composer.offset.grad.abs().sum() > 0 and stage.tau.grad is None  # fixed tau

    # neg_num: the target against that many random bank rows, a sampled copy of the target masked out
    stage, bank, refs = bank_stage(spn.BankConfig(tau=0.05, neg_num=3))
    torch.manual_seed(1)
    loss = stage.training_step(batch)["loss"]
    torch.manual_seed(1)
    negatives = torch.randint(len(bank), (4, 3))
    q = F.normalize(refs[:4] + stage.composer.offset, dim=-1)
    terms = []
    for i in range(4):
        pos = torch.exp(q[i] @ bank[labels[i]] / 0.05)
        den = pos + sum(torch.exp(q[i] @ bank[j] / 0.05) for j in negatives[i].tolist() if j != labels[i])
        terms.append(-torch.log(pos / den))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)

    # learnable tau gets a gradient; in_batch scores only the batch's targets
    stage, bank, refs = bank_stage(spn.BankConfig(tau=0.05, learn_tau=True, negatives="in_batch"))
    loss = stage.training_step(batch)["loss"]
    q = F.normalize(refs[:4] + stage.composer.offset, dim=-1)
    logits = q @ bank[labels].T / 0.05
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(4)), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert stage.tau.grad is not None and stage.tau.requires_grad


def test_in_batch_negatives_leave_out_copies_of_the_target():
    stage, bank, refs = bank_stage(spn.BankConfig(tau=0.1, negatives="in_batch"))
    batch = {"reference": torch.tensor([0, 1]), "target": torch.tensor([6, 7]), "text": ["a", "b"]}  # one image
    loss = stage.training_step(batch)["loss"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # each query's only candidate is its target


def test_word_budget_captions_keep_colour_and_shape_first():
    objects = [{"colour": "red", "shape": "circle", "size": "large", "cell": "top-left"},
               {"colour": "blue", "shape": "square", "size": "small", "cell": "center"}]
    assert word_budget_caption(objects, 4) == "red circle, blue square"
    assert word_budget_caption(objects, 5) == "large red circle, blue square"
    assert word_budget_caption(objects, 6) == "large red circle, small blue square"
    assert word_budget_caption(objects, 9) == "large red circle at the top-left, small blue square"
    assert word_budget_caption(objects, 3) == "large red circle"
    assert word_budget_caption(objects, 2) == "red circle"
    assert word_budget_caption(objects, 1) == "circle"
    assert word_budget_caption([], 3) == "an empty scene"


def test_targets_come_from_the_similarity_rank_window():
    # points on a line: the k-th most similar other point of point 0 is point k+1
    angles = torch.linspace(0, 1.2, 10)
    vectors = torch.stack([angles.cos(), angles.sin()], dim=1)
    pairs = spn.draw_targets(vectors, [0] * 50, per_reference=1, window=(2, 4), seed=0)
    assert {t for _, t in pairs} == {3, 4}  # ranks 2 and 3
    pairs = spn.draw_targets(vectors, [0, 5], per_reference=3, window=None, seed=0)
    assert len(pairs) == 6 and all(r != t for r, t in pairs) and len({t for r, t in pairs if r == 0}) == 3
    with pytest.raises(ValueError, match="window"):
        spn.draw_targets(vectors, [0], per_reference=3, window=(0, 2), seed=0)


class Counting:
    """A captioner that counts the images it is asked about and fails after ``fail_after``."""

    signature, batch_size = "counting", 2

    def __init__(self, fail_after=None):
        self.asked, self.fail_after = [], fail_after

    def caption(self, items):
        if self.fail_after is not None and len(self.asked) + len(items) > self.fail_after:
            raise KeyboardInterrupt("stopped")
        self.asked += [i for i, _ in items]
        return [f"caption of {i}" for i, _ in items]


def test_captioning_interrupted_after_n_resumes_without_asking_for_those_again(tmp_path):
    items = [(f"img{i}", tmp_path / f"{i}.png") for i in range(7)]
    cache_path = tmp_path / "captions.jsonl"
    first = Counting(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        caption_images(first, items, CaptionCache(cache_path, first.signature))
    assert first.asked == ["img0", "img1", "img2", "img3"]
    with open(cache_path, "a") as f:
        f.write('{"id": "img9", "capt')  # a line torn by the interruption is ignored
    second = Counting()
    got = caption_images(second, items, CaptionCache(cache_path, second.signature))
    assert second.asked == ["img4", "img5", "img6"]
    assert got == {i: f"caption of {i}" for i, _ in items}
    # another captioner's captions are not reused
    other = Counting()
    other.signature = "other"
    caption_images(other, items[:2], CaptionCache(cache_path, other.signature))
    assert other.asked == ["img0", "img1"]


def test_chat_captioner_retries_times_out_and_names_the_image(stub_chat, tiny_shapes):
    image = tiny_shapes / "images" / "train" / "train-000000-0.png"
    assert image.is_file()
    url = f"http://127.0.0.1:{stub_chat.server_address[1]}/v1"
    cfg = CaptionerConfig(kind="chat", url=url, words=5, timeout_s=0.5, retries=2, backoff_s=0.01)
    chat = ChatCaptioner(cfg)
    stub_chat.plan = ["500", "ok"]
    assert chat.caption([("a", image)]) == ["caption 2 (please briefly describe the image in 5 words)"]
    sent = stub_chat.requests[-1]
    assert sent["model"] == "llava" and sent["temperature"] == 0.2
    assert sent["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    stub_chat.plan = ["slow", "slow", "slow"]
    with pytest.raises(RuntimeError, match=r"image 'b' after 3 attempt\(s\)"):
        chat.caption([("b", image)])
    stub_chat.plan = ["400"]
    n = len(stub_chat.requests)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        chat.caption([("c", image)])
    assert len(stub_chat.requests) == n + 1  # a client error is not retried


def test_hf_image_to_text_captioner_on_a_tiny_random_checkpoint(tmp_path, tiny_shapes):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    from cirlab.models.tokenizer import minilm_tokenizer

    tok = minilm_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=40, bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id,
                sep_token_id=tok.sep_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "cap")
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(tmp_path / "cap")
    captioner = HFCaptioner(tmp_path / "cap", max_new_tokens=5, batch_size=2)
    images = [(i, tiny_shapes / "images" / "train" / f"{i}.png") for i in ("train-000000-0", "train-000000-1", "train-000001-0")]
    got = caption_images(captioner, images, CaptionCache(tmp_path / "c.jsonl", captioner.signature))
    assert len(got) == 3 and all(isinstance(t, str) and t for t in got.values())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFCaptioner(tmp_path)


def test_pixel_duplicates_share_one_id(tiny_shapes, tmp_path):
    split = load_split("shapes", tiny_shapes, "train")
    dup = duplicate_map(split, split.gallery)
    scenes = read_json(tiny_shapes / "scenes" / "scenes.shapes.train.json")
    caption = {i: scenes[i]["caption"] for i in split.gallery}
    # identical renders are exactly the images of one scene
    for i in split.gallery:
        assert caption[dup[i]] == caption[i]
    canon = {}
    for i in split.gallery:
        canon.setdefault(caption[i], dup[i])
        assert dup[i] == canon[caption[i]]
    assert len(set(dup.values())) == len(set(caption.values())) < len(split.gallery)


@pytest.fixture(scope="module")
def stage1(tiny_pretrained_blip, tmp_path_factory):
    """A first-stage model folder: sum fusion over the tiny pretrained BLIP (Bi-BLIP4CIR stage I's kind)."""
    return SumComposer(load_backbone(tiny_pretrained_blip), QueryRecipe()).save(tmp_path_factory.mktemp("stage1") / "model")


def test_generated_triplets_load_through_the_loader_and_reach_training(tiny_shapes, stage1, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, root, symlinks=True)
    out = root / "captions" / "cap.shapes.train.extend_spn.json"
    sets = [f"data.root={root}", f"model.backbone={stage1}", f"method.out={out}", "method.window=[1,5]"]
    assert main(["spn", "generate", "--config", str(CONFIG_ROOT / "spn" / "shapes_generate.yaml"),
                 *(x for s in sets for x in ("--set", s))]) == 0
    records = json.loads(out.read_text())
    split = load_split("shapes", root, "train")
    dup = duplicate_map(split, split.gallery)
    assert len(records) == len({dup[q.reference] for q in split.queries})  # one per unique reference
    scenes = read_json(root / "scenes" / "scenes.shapes.train.json")
    for r in records:
        assert r["generated"] and dup[r["reference"]] == r["reference"] and r["reference"] != r["target_hard"]
        assert r["captions"] == [f"{r['captioned']['target_caption']} instead of {r['captioned']['reference_caption']}",
                                 f"Unlike {r['captioned']['reference_caption']}, I want {r['captioned']['target_caption']}"]
        assert set(r["target_soft"]) == {i for i in split.gallery if dup[i] == r["target_hard"]}
        assert r["captioned"]["target_caption"] == word_budget_caption(scenes[r["target_hard"]]["objects"], 10)
    # a rerun reads every caption from the cache and writes the same file
    before = out.read_text()
    assert main(["spn", "generate", "--config", str(CONFIG_ROOT / "spn" / "shapes_generate.yaml"),
                 *(x for s in sets for x in ("--set", s))]) == 0
    assert out.read_text() == before

    extended = extend_split(split, out)
    generated = extended.queries[len(split.queries):]
    assert len(generated) == len(records) and all(q.extra["generated"] for q in generated)
    assert {default_text(generated[0], True) for _ in range(40)} == set(generated[0].captions)
    cfg = load_config(CONFIG_ROOT / "spn" / "shapes_bank.yaml", [f"data.root={root}", f"model.backbone={stage1}",
                                                                 f"data.extensions=[{out}]"])
    assert len(training_splits(cfg)[0].queries) == len(split.queries) + len(records)
    stage = build_stage(cfg)
    assert len(stage.train_data) == len(split.queries) + len(records)
    texts = {stage.train_data[i]["text"] for i in range(len(split.queries), len(stage.train_data))}
    assert texts <= {c for q in generated for c in q.captions}
    # the bank holds each unique image of the original and generated triplets once
    ids = {i for q in extended.queries for i in (q.reference, q.target)}
    assert len(stage.model.bank) == len({dup[i] for i in ids})
    rows = stage.train_data.datasets[0].rows if hasattr(stage.train_data, "datasets") else stage.train_data.rows
    bank_row = stage.model.bank_row
    copies = [(i, j) for i in ids for j in ids if i < j and dup[i] == dup[j]]
    assert copies  # tiny shapes has pixel-identical renders, and each pair shares its bank row
    assert all(bank_row[rows[i]] == bank_row[rows[j]] for i, j in copies)
    assert len({int(bank_row[rows[i]]) for i in ids}) == len(stage.model.bank)

    bad = root / "captions" / "bad.json"
    bad.write_text(json.dumps([{**records[0], "target_hard": "no-such-image"}]))
    with pytest.raises(ValueError, match="bad.json: 1 images are not in shapes/train"):
        extend_split(split, bad)


def test_stage_two_trains_the_query_side_only_and_raises_recall_on_its_training_data(tiny_shapes, stage1, tmp_path):
    sets = [f"data.root={tiny_shapes}", f"model.backbone={stage1}", "data.val_split=train", "trainer.epochs=6",
            "trainer.eval_every_epochs=6", "trainer.batch_size=32", "trainer.precision=fp32", "trainer.log_every_steps=1",
            "trainer.optimizer.lr=1e-3", "method.tau=0.05"]
    run = tmp_path / "bank"
    assert main(["train", "--config", str(CONFIG_ROOT / "spn" / "shapes_bank.yaml"), "--run-dir", str(run),
                 *(x for s in sets for x in ("--set", s))]) == 0
    metrics = RunDir.open(run).read_metrics()
    losses = [r["loss"] for r in metrics if r["event"] == "train"]
    evals = [r for r in metrics if r["event"] == "eval"]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    best = max(evals, key=lambda r: r["Avg"])  # the evaluation the exported model comes from
    assert evals[0]["step"] == 0 and best["step"] > 0 and best["R@5"] > evals[0]["R@5"] + 5
    base, tuned = cirlab.load(stage1), cirlab.load(run / "model")
    assert isinstance(tuned, SumComposer) and tuned.recipe == base.recipe
    query = {id(p) for p in tuned.query_parameters()}
    before = dict(base.named_parameters())
    moved = [n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(id(dict(tuned.named_parameters())[n]) in query for n in moved)
    split = load_split("shapes", tiny_shapes, "val")
    images = [split.find_image(i) for i in split.gallery[:8]]
    torch.testing.assert_close(tuned.encode_gallery(images), base.encode_gallery(images), rtol=0, atol=0)


def _first_stages(tiny_pretrained_blip, tmp_path):
    """A model folder of every first-stage kind SPN stands on."""
    from cirlab.composers import CombinerComposer, GroundedComposer, ProjectionComposer
    from cirlab.models import build_small_clip
    from cirlab.models.combiner import Combiner
    from cirlab.models.phi import Phi

    blip = load_backbone(tiny_pretrained_blip)
    torch.manual_seed(0)
    clip = build_small_clip(embed_dim=16, text_hidden=16, text_layers=1, text_heads=2, vision_hidden=16,
                            stage_channels=(8, 8, 8, 8))
    return {
        "sum": SumComposer(blip, QueryRecipe()),
        "grounded": GroundedComposer(load_backbone(tiny_pretrained_blip), QueryRecipe(max_text_length=32)),
        "combiner": CombinerComposer(load_backbone(tiny_pretrained_blip), QueryRecipe(),
                                     Combiner(blip.embed_dim, 16, 16, dropout=0.5)),
        "projection": ProjectionComposer(clip, QueryRecipe(prompt="a photo of $ that {text}"),
                                         Phi("searle", clip.embed_dim, clip.token_dim)),
    }


def test_stage_two_stands_on_every_first_stage_kind(tiny_shapes, tiny_pretrained_blip, tmp_path):
    for kind, composer in _first_stages(tiny_pretrained_blip, tmp_path).items():
        folder = composer.save(tmp_path / kind)
        cfg = load_config(CONFIG_ROOT / "spn" / "shapes_bank.yaml", [f"data.root={tiny_shapes}", f"model.backbone={folder}"])
        stage = build_stage(cfg)
        model = stage.model.train()
        base = {n: p.detach().clone() for n, p in model.composer.named_parameters()}
        query = {id(p) for p in model.composer.query_parameters()}
        batch = torch.utils.data.default_collate([stage.train_data[i] for i in range(8)])
        out = model.training_step(batch)
        assert torch.isfinite(out["loss"]), kind
        out["loss"].backward()
        with_grad = {id(p) for p in model.composer.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert with_grad and with_grad <= query, kind  # only the query side learns
        assert not model.composer.training  # eval mode in stage 2: no dropout
        opt = torch.optim.SGD([p for p in model.composer.parameters() if p.requires_grad], lr=0.1)
        opt.step()
        for n, p in model.composer.named_parameters():
            if id(p) not in query:
                assert torch.equal(p, base[n]), (kind, n)
        stage.export(model, tmp_path / f"{kind}-out", {})
        assert cirlab.load(tmp_path / f"{kind}-out").kind == composer.kind  # a composer of the base's kind

    from cirlab.composers import GroundedComposer, RerankComposer
    from cirlab.models.dual_encoder import DualEncoderReranker

    blip = load_backbone(tiny_pretrained_blip)
    reranker = DualEncoderReranker.from_text_encoder(blip.text_encoder, enc_token_id=blip.enc_token_id, merge="official")
    folder = RerankComposer(GroundedComposer(blip, QueryRecipe()), reranker).save(tmp_path / "rerank")
    with pytest.raises(ValueError, match="re-ranking model; SPN trains a first stage"):
        build_stage(load_config(CONFIG_ROOT / "spn" / "shapes_bank.yaml", [f"data.root={tiny_shapes}",
                                                                         f"model.backbone={folder}"]))
