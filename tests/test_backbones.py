"""Backbone adapters: save/load round trips, folder errors, pseudo-word injection, BLIP modes,
added tokens and MiniLM initialisation, on tiny random models (real and small layouts)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel, BlipConfig, BlipForConditionalGeneration, CLIPConfig

from cirlab.models import (
    BlipBackbone,
    ClipBackbone,
    add_tokens,
    build_backbone,
    build_small_blip,
    fingerprint,
    init_text_from_minilm,
    inject_pseudo,
    load_backbone,
    minilm_path,
    minilm_tokenizer,
    save_backbone,
    small_blip_config,
    small_clip_config,
)

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, initializer_range=0.02)  # BLIP default 1e-10 hides the image
TINY_CONV = dict(embed_dim=16, text_hidden=32, text_layers=2, text_heads=4, vision_hidden=32,
                 stage_channels=(8, 8, 16, 16), image_size=32)
TEXTS = ["a photo of [$] that is red", "remove the small blue sphere [$]"]


def tiny_config(name):
    if name == "blip":  # HF BlipForImageTextRetrieval with a tiny ViT
        return BlipConfig(text_config=dict(vocab_size=30524, max_position_embeddings=64, **TINY_TEXT),
                          vision_config=TINY_VIT, image_text_hidden_size=16)
    if name == "clip":  # HF CLIPModel; MiniLM WordPiece, so EOS = [SEP]
        return CLIPConfig(text_config=dict(vocab_size=30522, max_position_embeddings=77, eos_token_id=102,
                                           bos_token_id=101, pad_token_id=0, **TINY_TEXT),
                          vision_config=TINY_VIT, projection_dim=16)
    if name == "small_blip":
        return small_blip_config(vocab_size=30524, **TINY_CONV)
    return small_clip_config(**TINY_CONV)


def tiny(name, seed=0):
    torch.manual_seed(seed)
    return build_backbone(tiny_config(name))


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def outputs(bb, marker_id):
    """Every encode_* output of a backbone, on fixed inputs."""
    enc = bb.tokenize(TEXTS)
    img = bb.encode_image(images())
    out = {"image": img.embeds, "tokens": img.tokens, "text": bb.encode_text(enc.input_ids, enc.attention_mask)}
    if isinstance(bb, BlipBackbone):
        out["grounded"] = bb.encode_grounded(enc.input_ids, enc.attention_mask, img.tokens)
        out["itm"] = bb.itm_logits(enc.input_ids, enc.attention_mask, img.tokens)
    pseudo = torch.randn(2, bb.token_dim, generator=torch.Generator().manual_seed(2))
    out["pseudo"] = bb.encode_text_with_pseudo(enc.input_ids, enc.attention_mask, pseudo, marker_id)
    return out


@pytest.mark.parametrize("name", ["blip", "small_blip", "clip", "small_clip"])
def test_save_load_roundtrip_gives_identical_outputs(name, tmp_path):
    bb = tiny(name)
    (marker,) = add_tokens(bb, ["[$]"])  # added tokens must survive the round trip too
    with torch.no_grad():
        before = outputs(bb, marker)
    save_backbone(bb, tmp_path / "bb")
    loaded = load_backbone(tmp_path / "bb", kind=bb.kind)
    assert type(loaded) is type(bb) and type(loaded.model) is type(bb.model)
    assert loaded.tokenize(TEXTS).input_ids.tolist() == bb.tokenize(TEXTS).input_ids.tolist()
    with torch.no_grad():
        after = outputs(loaded, marker)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert fingerprint(loaded) == fingerprint(bb)


def test_fingerprint_follows_weights():
    bb = tiny("small_clip")
    first = fingerprint(bb)
    with torch.no_grad():
        bb.text_proj.weight[0, 0] += 1e-3
    assert fingerprint(bb) != first


@pytest.mark.parametrize("name", ["small_blip", "blip"])
def test_image_fingerprint_ignores_the_text_side(name):
    """Cached image features survive text fine-tuning (and new tokens), not image-side changes."""
    bb = tiny(name)
    first = bb.image_fingerprint()
    with torch.no_grad():
        bb.text_proj.weight[0, 0] += 1e-3
    add_tokens(bb, ["[FORWARD]"])
    assert bb.image_fingerprint() == first
    tokens_only = bb.image_fingerprint(projection=False)
    with torch.no_grad():
        bb.vision_proj.weight[0, 0] += 1e-3
    assert bb.image_fingerprint() != first
    assert bb.image_fingerprint(projection=False) == tokens_only  # token sequences do not use vision_proj
    with torch.no_grad():
        next(bb.vision_model.parameters()).view(-1)[0] += 1e-3
    assert bb.image_fingerprint(projection=False) != tokens_only


@pytest.fixture(scope="module")
def saved_small_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("bb") / "small_clip"
    save_backbone(tiny("small_clip"), path)
    return path


@pytest.mark.parametrize(
    "remove, expected",
    [
        (["tokenizer.json", "tokenizer_config.json"], "missing tokenizer files"),
        (["model.safetensors"], "missing weights"),
        (["config.json"], "missing config"),
    ],
)
def test_incomplete_folder_names_missing_part(saved_small_clip, tmp_path, remove, expected):
    folder = tmp_path / "broken"
    shutil.copytree(saved_small_clip, folder)
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_backbone(folder)
    message = str(err.value)
    assert str(folder) in message and expected in message and "found:" in message
    for name in sorted({"config.json", "model.safetensors", "tokenizer.json"} - set(remove)):
        assert name in message


def test_wrong_kind_and_wrong_head_are_errors(saved_small_clip, tmp_path):
    with pytest.raises(ValueError, match="holds a clip model"):
        load_backbone(saved_small_clip, kind="blip")
    # A BLIP *captioning* folder has model_type "blip" but no text_encoder / text_proj / itm_head.
    torch.manual_seed(0)
    captioner = BlipForConditionalGeneration(tiny_config("blip"))
    captioner.save_pretrained(tmp_path / "cap")
    minilm_tokenizer().save_pretrained(tmp_path / "cap")
    with pytest.raises(ValueError, match="lack .* tensors of the BlipForImageTextRetrieval layout"):
        load_backbone(tmp_path / "cap")


def test_save_is_atomic(tmp_path, monkeypatch):
    bb = tiny("small_clip")
    target = save_backbone(bb, tmp_path / "bb")
    good = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        bb.text_proj.weight.zero_()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bb.tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(bb, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == good
    assert [p.name for p in tmp_path.iterdir()] == ["bb"]  # no temporary folder left behind


@pytest.mark.parametrize("name", ["clip", "small_clip"])
def test_clip_text_path_matches_hf(name):
    bb = tiny(name)
    enc = bb.tokenize(TEXTS + ["a much longer text so that the others are padded at the end"])
    with torch.no_grad():
        ours = bb.encode_text(enc.input_ids, enc.attention_mask)
        theirs = bb.model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    torch.testing.assert_close(ours, theirs.pooler_output, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "small_clip", "blip", "small_blip"])
def test_pseudo_injection_changes_only_the_marker(name):
    bb = tiny(name)
    (marker,) = add_tokens(bb, ["[$]"])
    enc = bb.tokenize(TEXTS)
    ids = enc.input_ids
    pseudo = torch.randn(2, bb.token_dim, requires_grad=True)
    with torch.no_grad():
        plain = bb.embed_text_tokens(ids)
        injected = bb.embed_text_tokens(ids, pseudo, marker)
    differs = (plain != injected).any(dim=-1)
    assert torch.equal(differs, ids == marker) and differs.sum(dim=1).tolist() == [1, 1]
    # CLIP's adapter returns the first layer's input (positions added); BLIP's the word embeddings,
    # to which its embedding layer adds positions and LayerNorm
    positions = (bb.text_encoder.embeddings.position_embedding.weight if isinstance(bb, ClipBackbone)
                 else torch.zeros(ids.shape[1], bb.token_dim))
    for row, col in (ids == marker).nonzero().tolist():
        torch.testing.assert_close(injected[row, col], pseudo[row].detach() + positions[col])

    out = bb.encode_text_with_pseudo(ids, enc.attention_mask, pseudo, marker)
    assert not torch.allclose(out, bb.encode_text(ids, enc.attention_mask))
    out.sum().backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0

    other = bb.tokenize(["no marker here", "nor here"])
    with pytest.raises(ValueError, match="no marker token"):
        bb.encode_text_with_pseudo(other.input_ids, other.attention_mask, pseudo, marker)


def test_inject_pseudo_several_markers_get_their_own_vectors():
    ids = torch.tensor([[1, 9, 2, 9, 3], [9, 4, 5, 6, 9]])
    embeds = torch.zeros(2, 5, 3)
    pseudo = torch.arange(12.0).reshape(2, 2, 3)
    out = inject_pseudo(embeds, ids, pseudo, marker_id=9)
    assert torch.equal(out[0, 1], pseudo[0, 0]) and torch.equal(out[0, 3], pseudo[0, 1])
    assert torch.equal(out[1, 0], pseudo[1, 0]) and torch.equal(out[1, 4], pseudo[1, 1])
    assert out[ids != 9].abs().sum() == 0
    with pytest.raises(ValueError, match="exactly 2 marker"):
        inject_pseudo(embeds, ids[:, :3], pseudo, marker_id=9)


@pytest.mark.parametrize("name", ["blip", "small_blip"])
def test_blip_text_only_ignores_images_grounded_does_not(name):
    bb = tiny(name)
    enc = bb.tokenize(TEXTS)
    with torch.no_grad():
        tok_a, tok_b = bb.encode_image(images(seed=1)).tokens, bb.encode_image(images(seed=2)).tokens
        text = bb.encode_text(enc.input_ids, enc.attention_mask)
        grounded_a = bb.grounded_embeds(enc.input_ids, enc.attention_mask, tok_a)
        grounded_b = bb.grounded_embeds(enc.input_ids, enc.attention_mask, tok_b)
        # the first token is replaced by [ENC], so what was there does not matter
        swapped = enc.input_ids.clone()
        swapped[:, 0] = 1037
        assert torch.equal(bb.grounded_embeds(swapped, enc.attention_mask, tok_a), grounded_a)
        # scrambling every cross-attention weight leaves text-only mode untouched
        for pname, param in bb.text_encoder.named_parameters():
            if "crossattention" in pname:
                param.normal_()
        assert torch.equal(bb.encode_text(enc.input_ids, enc.attention_mask), text)
        assert not torch.allclose(bb.grounded_embeds(enc.input_ids, enc.attention_mask, tok_a), grounded_a)
    assert not torch.allclose(grounded_a, grounded_b)


@pytest.mark.parametrize("name", ["small_blip", "clip"])
def test_add_tokens_grows_embedding_with_trainable_rows(name):
    bb = tiny(name)
    old = bb.input_embeddings.weight.detach().clone()
    ids = add_tokens(bb, ["[FORWARD]", "[BACKWARD]"])
    assert ids == [old.shape[0], old.shape[0] + 1]
    weight = bb.input_embeddings.weight
    assert weight.shape[0] == old.shape[0] + 2 and bb.config.text_config.vocab_size == weight.shape[0]
    assert torch.equal(weight[: old.shape[0]], old)
    torch.testing.assert_close(weight[ids[0]].detach(), old.mean(dim=0))
    assert add_tokens(bb, ["[FORWARD]"]) == ids[:1] and bb.input_embeddings.weight.shape[0] == weight.shape[0]

    enc = bb.tokenize(["[FORWARD] make it red", "[BACKWARD] make it blue"])
    assert enc.input_ids[:, 1].tolist() == ids  # one whole token, right after [CLS]
    bb.encode_text(enc.input_ids, enc.attention_mask).pow(2).sum().backward()
    grad = bb.input_embeddings.weight.grad
    assert grad[ids].abs().sum(dim=1).gt(0).all()


def test_init_text_from_minilm_reproduces_minilm():
    torch.manual_seed(0)
    bb = build_small_blip(embed_dim=16, vision_hidden=32, stage_channels=(8, 8, 16, 16), image_size=32)
    report = init_text_from_minilm(bb)
    source = load_file(minilm_path() / "model.safetensors")
    source = {k.removeprefix("bert."): v for k, v in source.items()}
    params = dict(bb.text_encoder.named_parameters())
    for name in ("encoder.layer.3.attention.self.query.weight", "encoder.layer.5.output.LayerNorm.bias"):
        assert name in report.copied and torch.equal(params[name], source[name])
    assert torch.equal(params["embeddings.word_embeddings.weight"][:30522], source["embeddings.word_embeddings.weight"])
    assert report.random and all("crossattention" in n for n in report.random)

    # BERT adds token-type 0 to every token; folded into positions, the text-only encoder equals MiniLM
    minilm = BertModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    enc = bb.tokenize(["a small red cube left of a large sphere", "hello"])
    with torch.no_grad():
        ours = bb.text_hidden_states(enc.input_ids, enc.attention_mask)
        theirs = minilm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_conv_tower_is_a_vit_drop_in():
    bb = tiny("small_clip")
    out = bb.vision_model(pixel_values=images(3))
    side = 32 // 2**4
    assert out.last_hidden_state.shape == (3, 1 + side * side, 32)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    with pytest.raises(ValueError, match="expected 32x32"):
        bb.vision_model(pixel_values=torch.zeros(1, 3, 64, 64))


def test_clip_backbone_refuses_mismatched_eos():
    config = tiny_config("clip")
    config.text_config.eos_token_id = 49407
    with pytest.raises(ValueError, match="eos_token_id=49407"):
        build_backbone(config)
    assert isinstance(tiny("clip"), ClipBackbone)


def original_blip_state(width=64, text=64, grid=2, patch=8, seed=0):
    """A synthetic state dict in salesforce/BLIP's naming (timm ViT + med.py BERT), one layer each."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {
        "visual_encoder.cls_token": r(1, 1, width),
        "visual_encoder.pos_embed": r(1, 1 + grid * grid, width),
        "visual_encoder.patch_embed.proj.weight": r(width, 3, patch, patch),
        "visual_encoder.patch_embed.proj.bias": r(width),
        "visual_encoder.norm.weight": r(width),
        "visual_encoder.norm.bias": r(width),
        "visual_encoder.blocks.0.attn.qkv.weight": r(3 * width, width),
        "visual_encoder.blocks.0.attn.qkv.bias": r(3 * width),
        "visual_encoder.blocks.0.attn.proj.weight": r(width, width),
        "visual_encoder.blocks.0.attn.proj.bias": r(width),
        "visual_encoder.blocks.0.mlp.fc1.weight": r(2 * width, width),
        "visual_encoder.blocks.0.mlp.fc1.bias": r(2 * width),
        "visual_encoder.blocks.0.mlp.fc2.weight": r(width, 2 * width),
        "visual_encoder.blocks.0.mlp.fc2.bias": r(width),
        "text_encoder.embeddings.word_embeddings.weight": r(30524, text),
        "text_encoder.embeddings.position_embeddings.weight": r(40, text),
        "text_encoder.embeddings.position_ids": torch.arange(40)[None],
        "text_encoder.embeddings.LayerNorm.weight": r(text),
        "text_encoder.embeddings.LayerNorm.bias": r(text),
        "vision_proj.weight": r(16, width), "vision_proj.bias": r(16),
        "text_proj.weight": r(16, text), "text_proj.bias": r(16),
        "itm_head.weight": r(2, text), "itm_head.bias": r(2),
        # not part of the retrieval model: dropped
        "visual_encoder_m.cls_token": r(1, 1, width), "temp": torch.tensor(0.07), "image_queue": r(16, 8),
        "text_decoder.bert.embeddings.word_embeddings.weight": r(30524, text),
    }
    for n in ("1", "2"):
        state[f"visual_encoder.blocks.0.norm{n}.weight"] = r(width)
        state[f"visual_encoder.blocks.0.norm{n}.bias"] = r(width)
    layer = "text_encoder.encoder.layer.0."
    for block, kv_width in (("attention", text), ("crossattention", width)):
        for part, fan_in in (("query", text), ("key", kv_width), ("value", kv_width)):
            state[f"{layer}{block}.self.{part}.weight"] = r(text, fan_in)
            state[f"{layer}{block}.self.{part}.bias"] = r(text)
        state[f"{layer}{block}.output.dense.weight"] = r(text, text)
        state[f"{layer}{block}.output.dense.bias"] = r(text)
        state[f"{layer}{block}.output.LayerNorm.weight"] = r(text)
        state[f"{layer}{block}.output.LayerNorm.bias"] = r(text)
    state[f"{layer}intermediate.dense.weight"] = r(4 * text, text)
    state[f"{layer}intermediate.dense.bias"] = r(4 * text)
    state[f"{layer}output.dense.weight"] = r(text, 4 * text)
    state[f"{layer}output.dense.bias"] = r(text)
    state[f"{layer}output.LayerNorm.weight"] = r(text)
    state[f"{layer}output.LayerNorm.bias"] = r(text)
    return state


def test_convert_original_blip_checkpoint(tmp_path):
    from cirlab.importers import import_blip

    state = original_blip_state()
    torch.save({"model": state, "epoch": 19}, tmp_path / "model_base.pth")
    folder = import_blip(tmp_path / "model_base.pth", tmp_path / "blip", image_size=32)  # 2x2 -> 4x4
    bb = load_backbone(folder, kind="blip")
    params = dict(bb.model.named_parameters())
    pairs = {
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
        "vision_model.encoder.layers.0.self_attn.qkv.weight": "visual_encoder.blocks.0.attn.qkv.weight",
        "vision_model.encoder.layers.0.self_attn.projection.bias": "visual_encoder.blocks.0.attn.proj.bias",
        "vision_model.encoder.layers.0.layer_norm2.weight": "visual_encoder.blocks.0.norm2.weight",
        "vision_model.post_layernorm.bias": "visual_encoder.norm.bias",
        "text_encoder.encoder.layer.0.crossattention.self.key.weight":
            "text_encoder.encoder.layer.0.crossattention.self.key.weight",
        "itm_head.weight": "itm_head.weight",
    }
    for ours, original in pairs.items():
        assert torch.equal(params[ours], state[original]), ours
    pos, old = params["vision_model.embeddings.position_embedding"], state["visual_encoder.pos_embed"]
    assert pos.shape == (1, 1 + 16, 64) and torch.equal(pos[:, 0], old[:, 0])
    # bicubic upsampling keeps the grid's mean roughly and is not a copy of the old rows
    assert abs(pos[0, 1:].mean() - old[0, 1:].mean()) < 0.2 and not torch.equal(pos[0, 1:5], old[0, 1:5])
    assert bb.enc_token_id == 30523 and bb.config.text_config.hidden_dropout_prob == 0.1

    del state["visual_encoder.blocks.0.attn.qkv.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing .*qkv.bias"):
        import_blip(tmp_path / "broken.pth", tmp_path / "blip2", image_size=32)
    assert not (tmp_path / "blip2").exists()
