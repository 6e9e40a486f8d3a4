"""Official-side reference outputs for the CLIP-family zero-shot CIR checkpoints.

Builds ONE random CLIP ViT-L/14 (seeded; LayerNorm weight 1 + 0.1 N(0,1), bias 0.1 N(0,1), text and
vision position embeddings += 0.02 N(0,1); every weight rounded to fp16 and back, as the released
openai weights are fp16) shared by Pic2Word, SEARLE, LinCIR and RTD, writes it in every layout an
official repository reads, writes a random Phi / tuned text encoder per method in the layout its
training script saves, then runs each official evaluation code path on the shared inputs and stores
what it computes. Nothing here is a re-implementation: the official modules are imported from the
checkouts under ``--official`` (never copied) and their own functions run; this file only builds
weights, lays out fake dataset folders, records what the official functions see and return, and
saves it.

    PYTHONPATH=/work/scratch/tf436:/work/scratch/tv /work/scratch/refenv/bin/python \
        benchmarks/compat/official_clip.py --official /work/scratch/official \
        --inputs /work/scratch/compat/inputs --out /work/scratch/compat [--methods pic2word searle lincir rtd]

Each method runs in its own subprocess (the LinCIR and RTD checkouts share module names such as
``validate``, ``utils``, ``loader``), one after the other, at niceness >= 10, 2 threads, batch <= 8.

Written under ``--out``:

* ``ckpt/clip-vit-large-patch14-hf/``: ``CLIPModel.save_pretrained`` (fp32 safetensors holding
  fp16-exact values; config.json as on the hub, text ``eos_token_id`` 2 = legacy argmax pooling) +
  the offline tokenizer (slow and fast files) + preprocessor_config.json; this is what cirlab loads.
* ``ckpt/openai/ViT-L-14.pt``: the same weights in openai's layout and format: a TorchScript archive
  (traced forward / encode_image / encode_text, fp16 parameters, plus ``input_resolution``,
  ``context_length``, ``vocab_size`` buffers) like openai's release, read by ``clip.load(path,
  jit=False)`` (SEARLE) and Pic2Word's ``model.clip.load``. A plain state-dict file cannot be used:
  clip 1.0.1's ``load`` runs ``torch.jit.load`` on the open file, which reads it to the end, then
  ``torch.load`` on the same object, which fails at EOF under torch 2.13.
* ``ckpt/pic2word/pic2word_model.pt``, ``ckpt/searle/SEARLE_ViT-L14.pt``,
  ``ckpt/lincir/phi_best.pt``, ``ckpt/rtd/text_encoder_best.pt`` (RTD also uses LinCIR's Phi).
* ``layouts/<method>.json`` (+ ``layouts/openai-clip.json``): the facts of each file.
* ``ref/<method>.pt``: the official outputs (keys in REPORT_clip.md); ``ref/conversion_check_clip.json``:
  HF vs openai ``clip`` vs Pic2Word's CLIP fork on the same pixels and token ids.
* ``standins_clip/``: the fake dataset folders and the fake HF hub cache below; ``build.json`` marks a
  finished build (``--rebuild`` redoes it).

The offline HF tokenizer is also written to ``--hf-dir``/clip-vit-large-patch14 (default
/work/scratch/hf): vocab.json and merges.txt derived from the openai ``clip`` package's
bpe_simple_vocab_16e6.txt.gz exactly as ``clip.simple_tokenizer.SimpleTokenizer`` builds its
vocabulary (256 byte symbols, the same with ``</w>``, the first 48,894 merges, then
``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407), the hub's tokenizer settings (pad =
unk = eos = ``<|endoftext|>``, model_max_length 77, lower case), saved by ``CLIPTokenizer`` and
``CLIPTokenizerFast`` (tokenizer.json), with the CLIP config.json and preprocessor_config.json.

Stand-ins (everything that is not the official code path, all small):

1. Module stubs, present in ``sys.modules`` only while the official modules are imported (they are
   imported at module level but only used by training code): Pic2Word ``wandb``, ``braceexpand``,
   ``pyarrow``, ``torch.utils.tensorboard`` (``SummaryWriter = None``); LinCIR/RTD ``webdataset``,
   ``spacy``, ``datasets``; RTD also ``sng_parser``. SEARLE needs none.
2. ``DataLoader`` in the official modules is wrapped to force ``num_workers=0``,
   ``pin_memory=False`` and ``batch_size <= 8`` (official: 32 with 10 workers); with 8 items the
   batches are the same.
3. Fake dataset folders (``standins_clip/data``) in each repository's own CIRR / FashionIQ layout:
   symlinks to the 8 input images and caption / split JSON files; query i = (image i, caption i),
   target image (i + 1) % 8, CIRR group = images i, i+1, i+2; FashionIQ pairs all under ``dress``
   (``shirt`` and ``toptee`` empty).
4. Hub-free CLIP loading: openai ``clip.load`` and Pic2Word's ``model.clip.load`` are given the path
   of ``ckpt/openai/ViT-L-14.pt`` instead of the name "ViT-L/14" (both accept a file path); LinCIR's
   and RTD's unmodified ``build_text_encoder`` reads a fake HF hub cache (``standins_clip/hf_cache``,
   ``HF_HUB_OFFLINE=1``) whose snapshot for openai/clip-vit-large-patch14 symlinks the HF folder's
   files and whose stabilityai/stable-diffusion-xl-base-1.0/tokenizer_2 is the offline tokenizer
   with ``pad_token "!"`` as SDXL's (that tokenizer is built but unused by validation, which
   tokenizes with ``clip.tokenize``).
5. Spies: ``clip.tokenize`` / Pic2Word's ``data.tokenize``, the ``encode_with_pseudo_tokens*``
   function, Pic2Word's ``encode_text_img_retrieval`` and ``get_metrics_*`` are wrapped to record
   their arguments and results (they call the original unchanged); forward hooks record module
   inputs / outputs (pixels, Phi in/out, text hidden states). One exception: Pic2Word's
   ``get_metrics_cirr`` raises on any CIRR layout (gallery names are full paths, reference names
   bare), so its spy records the error and returns NaN metrics, letting ``evaluate_cirr`` finish
   its loop; the features are recorded before the metric call either way.
6. The training-side settings the evaluation reads are passed as a Namespace (Pic2Word: model path,
   middle_dim 512, n_layer 2, precision "amp", gpu None; LinCIR/RTD: clip_model_name "large",
   mixed_precision forced to "fp16" as validate.py main does, l2_normalize False).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gzip
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

SEED = 20240611
METHODS = ("pic2word", "searle", "lincir", "rtd")
CHECKOUT = {"pic2word": "composed_image_retrieval", "searle": "SEARLE", "lincir": "lincir", "rtd": "RTD"}
REPO = {"pic2word": "google-research/composed_image_retrieval", "searle": "miccunifi/SEARLE",
        "lincir": "navervision/lincir", "rtd": "jaeseokbyun/RTD"}
HF_NAME = "clip-vit-large-patch14"
N_IMAGES = 8
MAX_BATCH = 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------------------------------------
# small helpers


class Ctx:
    def __init__(self, args: argparse.Namespace):
        self.official = Path(args.official).resolve()
        self.inputs = Path(args.inputs).resolve()
        self.out = Path(args.out).resolve()
        self.hf_tok_dir = Path(args.hf_dir).resolve() / HF_NAME
        self.spec = json.loads((self.inputs / "inputs.json").read_text())
        self.images = [self.inputs / name for name in self.spec["images"]]
        assert len(self.images) == N_IMAGES
        self.ckpt = self.out / "ckpt"
        self.hf_dir = self.ckpt / f"{HF_NAME}-hf"
        self.openai_file = self.ckpt / "openai" / "ViT-L-14.pt"
        self.files = {
            "pic2word": self.ckpt / "pic2word" / "pic2word_model.pt",
            "searle": self.ckpt / "searle" / "SEARLE_ViT-L14.pt",
            "lincir": self.ckpt / "lincir" / "phi_best.pt",
            "rtd": self.ckpt / "rtd" / "text_encoder_best.pt",
        }
        self.standins = self.out / "standins_clip"
        self.data = self.standins / "data"
        self.hf_cache = self.standins / "hf_cache"
        self.ref = self.out / "ref"
        self.layouts = self.out / "layouts"

    def checkout(self, method: str) -> Path:
        return self.official / CHECKOUT[method]

    def commit(self, method: str) -> str:
        return subprocess.run(["git", "-C", str(self.checkout(method)), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()


def log(*parts) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}]", *parts, flush=True)


@contextlib.contextmanager
def stub_modules(*names: str, **attrs: dict):
    """Empty modules in sys.modules while the official modules import; removed afterwards."""
    made = []
    for name in names:
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        module.__dict__.update(attrs.get(name.replace(".", "_"), {}))
        sys.modules[name] = module
        made.append(name)
    try:
        yield
    finally:
        for name in made:
            sys.modules.pop(name, None)


def load_file_module(name: str, path: Path):
    """Import one official file under a private name (no sys.path change)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_dataloader(original):
    """Stand-in 2: the official DataLoader with 0 workers and batches of at most 8."""

    @functools.wraps(original)
    def make(*args, **kwargs):
        kwargs["num_workers"] = 0
        kwargs["pin_memory"] = False
        kwargs["batch_size"] = min(int(kwargs.get("batch_size", 1)), MAX_BATCH)
        return original(*args, **kwargs)

    return make


class Spy:
    """Wrap a function: record (args, kwargs, result) of each call, return the result unchanged.

    With ``catch=True`` an exception of the wrapped function is recorded (``self.errors``) and
    ``{"official_error": nan}`` is returned instead of raising: used only for Pic2Word's
    ``get_metrics_cirr``, which raises on every CIRR layout (see REPORT_clip.md), so that
    ``evaluate_cirr`` still runs its loop over the four feature kinds.
    """

    def __init__(self, fn, catch: bool = False):
        self.fn, self.calls, self.catch, self.errors = fn, [], catch, []
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        try:
            result = self.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if not self.catch:
                raise
            self.errors.append(repr(exc))
            result = {"official_error": float("nan")}
        self.calls.append((args, kwargs, result))
        return result


class Hooks:
    """Forward (pre-)hooks that keep detached copies of module inputs / outputs, call by call."""

    def __init__(self):
        self.data: dict[str, list] = {}
        self.handles = []

    def _put(self, key, value):
        self.data.setdefault(key, []).append(value)

    def pre(self, module, key, pick=lambda args, kwargs: args[0]):
        def hook(mod, args, kwargs):
            self._put(key, pick(args, kwargs).detach().clone())
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def post(self, module, key, pick=lambda out: out):
        def hook(mod, args, out):
            self._put(key, pick(out).detach().clone())
        self.handles.append(module.register_forward_hook(hook))

    def io(self, module, key):
        def hook(mod, args, out):
            self._put(key + "_in", args[0].detach().clone())
            self._put(key + "_out", out.detach().clone())
        self.handles.append(module.register_forward_hook(hook))

    def clear(self):
        self.data = {}

    def get(self, key) -> list:
        return self.data.get(key, [])


def fp16_round_(module) -> None:
    import torch
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def perturb_(module, gen, layer_norms=True, position_embeddings=()) -> None:
    """LayerNorm weight = 1 + 0.1 N(0,1), bias = 0.1 N(0,1); position embeddings += 0.02 N(0,1)."""
    import torch
    from torch import nn
    with torch.no_grad():
        if layer_norms:
            for sub in module.modules():
                if isinstance(sub, nn.LayerNorm):
                    sub.weight.copy_(1 + 0.1 * torch.randn(sub.weight.shape, generator=gen))
                    sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=gen))
        for emb in position_embeddings:
            emb.add_(0.02 * torch.randn(emb.shape, generator=gen))


def tensor_stats(t) -> dict:
    t = t.float()
    return {"shape": list(t.shape), "mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0}


def diff_stats(a, b) -> dict:
    import torch.nn.functional as F
    a, b = a.double(), b.double()
    d = (a - b).abs()
    out = {"max_abs": float(d.max()), "max_rel": float(d.max() / b.abs().max().clamp_min(1e-30)),
           "ref_max_abs": float(b.abs().max())}
    if a.dim() == 2:
        out["min_cosine"] = float(F.cosine_similarity(a, b, dim=-1).min())
    return out


# ------------------------------------------------------------------------------------------------
# shared CLIP, tokenizer, layouts


def hub_clip_config():
    """The CLIPConfig of openai/clip-vit-large-patch14 as on the hub (text eos_token_id 2: legacy)."""
    from transformers import CLIPConfig
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                  num_attention_heads=16, num_channels=3, image_size=224, patch_size=14,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
                  initializer_range=0.02, initializer_factor=1.0)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768, logit_scale_init_value=2.6592)


def clip_image_processor():
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                              crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def write_tokenizer(dst: Path, pad_token: str = "<|endoftext|>") -> None:
    """vocab.json + merges.txt from the openai clip package's BPE file, saved by CLIPTokenizer(Fast)."""
    from clip import simple_tokenizer
    from transformers import CLIPTokenizer, CLIPTokenizerFast
    dst.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(simple_tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # as SimpleTokenizer.__init__ and CLIPTokenizer.__init__
    symbols = list(simple_tokenizer.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    assert len(encoder) == len(vocab) == 49408
    assert encoder == simple_tokenizer.SimpleTokenizer().encoder
    (dst / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    slow = CLIPTokenizer(str(dst / "vocab.json"), str(dst / "merges.txt"), errors="replace",
                         unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token=pad_token, model_max_length=77, do_lower_case=True)
    slow.save_pretrained(str(dst))
    fast = CLIPTokenizerFast.from_pretrained(str(dst))
    fast.save_pretrained(str(dst))


def hf_to_openai(sd: dict) -> dict:
    """HF CLIPModel state dict -> openai CLIP state dict (same tensors; q/k/v concatenated, projections transposed)."""
    import torch
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    def block(dst, src):
        out[f"{dst}.attn.in_proj_weight"] = torch.cat([take(f"{src}.self_attn.{x}_proj.weight") for x in "qkv"])
        out[f"{dst}.attn.in_proj_bias"] = torch.cat([take(f"{src}.self_attn.{x}_proj.bias") for x in "qkv"])
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.out_proj.{kind}"] = take(f"{src}.self_attn.out_proj.{kind}")
            out[f"{dst}.ln_1.{kind}"] = take(f"{src}.layer_norm1.{kind}")
            out[f"{dst}.mlp.c_fc.{kind}"] = take(f"{src}.mlp.fc1.{kind}")
            out[f"{dst}.mlp.c_proj.{kind}"] = take(f"{src}.mlp.fc2.{kind}")
            out[f"{dst}.ln_2.{kind}"] = take(f"{src}.layer_norm2.{kind}")

    out["positional_embedding"] = take("text_model.embeddings.position_embedding.weight")
    out["text_projection"] = take("text_projection.weight").t().contiguous()
    out["logit_scale"] = take("logit_scale")
    v = "vision_model"
    out["visual.class_embedding"] = take(f"{v}.embeddings.class_embedding")
    out["visual.positional_embedding"] = take(f"{v}.embeddings.position_embedding.weight")
    out["visual.proj"] = take("visual_projection.weight").t().contiguous()
    out["visual.conv1.weight"] = take(f"{v}.embeddings.patch_embedding.weight")
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = take(f"{v}.pre_layrnorm.{kind}")
    n_vis = len({k.split(".")[3] for k in sd if k.startswith(f"{v}.encoder.layers.")})
    for i in range(n_vis):
        block(f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}")
    for kind in ("weight", "bias"):
        out[f"visual.ln_post.{kind}"] = take(f"{v}.post_layernorm.{kind}")
    n_txt = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in range(n_txt):
        block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    out["token_embedding.weight"] = take("text_model.embeddings.token_embedding.weight")
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = take(f"text_model.final_layer_norm.{kind}")
    left = sorted(k for k in set(sd) - used if not k.endswith("position_ids"))
    assert not left, f"HF tensors not converted: {left[:5]}"
    return out


def describe_tree(obj, prefix="") -> dict:
    """{"a/b/c": shape} for every tensor in nested dicts ("/" separates nesting levels)."""
    import torch
    found = {}
    if isinstance(obj, torch.Tensor):
        found[prefix] = list(obj.shape)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            found.update(describe_tree(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found.update(describe_tree(value, f"{prefix}/{i}" if prefix else str(i)))
    return found


def top_level_summary(ckpt: dict) -> dict:
    import torch
    summary = {}
    for key, value in ckpt.items():
        if isinstance(value, dict):
            tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
            summary[key] = f"dict: {len(value)} entries, {len(tensors)} tensors" + (
                f", first key {next(iter(value))!r}" if value else "")
        elif isinstance(value, torch.Tensor):
            summary[key] = f"tensor {list(value.shape)} {value.dtype}"
        else:
            summary[key] = f"{type(value).__name__}: {value!r}"
    return summary


def dtypes_of(obj) -> list[str]:
    import torch
    seen = set()

    def walk(o):
        if isinstance(o, torch.Tensor):
            seen.add(str(o.dtype).replace("torch.", ""))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    walk(obj)
    return sorted(seen)


def write_layout(ctx: Ctx, name: str, path: Path, facts: dict, jit: bool = False) -> None:
    import torch
    if jit:
        ckpt = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # also proves a safe load works
    if jit:
        top = {"<TorchScript archive>": f"torch.jit.load(path).state_dict(): {len(ckpt)} tensors, first key "
                                        f"{next(iter(ckpt))!r}; methods forward, encode_image, encode_text"}
    else:
        top = top_level_summary(ckpt)
    layout = {**facts, "file": str(path.relative_to(ctx.out)), "bytes": path.stat().st_size,
              "top_level": top, "key_path_separator": "/",
              "tensors": describe_tree(ckpt), "dtype": ",".join(dtypes_of(ckpt))}
    ctx.layouts.mkdir(parents=True, exist_ok=True)
    (ctx.layouts / f"{name}.json").write_text(json.dumps(layout, indent=1) + "\n")


def make_fake_data(ctx: Ctx) -> None:
    """Stand-in 3: CIRR and FashionIQ folders in each repository's layout, over the 8 inputs."""
    n = N_IMAGES
    names = [f"img{i}" for i in range(n)]
    cirr = ctx.spec["cirr_captions"]
    fiq = ctx.spec["fiq_captions"]
    triplets = [{"pairid": i, "reference": names[i], "target_hard": names[(i + 1) % n],
                 "target_soft": {names[(i + 1) % n]: 1.0}, "caption": cirr[i],
                 "img_set": {"id": i, "members": [names[i], names[(i + 1) % n], names[(i + 2) % n]]}}
                for i in range(n)]
    fiq_triplets = [{"candidate": names[i], "target": names[(i + 1) % n], "captions": list(fiq[i])} for i in range(n)]

    def link(dst: Path, src: Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)

    def dump(path: Path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1))

    # SEARLE / LinCIR / RTD: CIRR/{cirr/captions, cirr/image_splits (name -> relative path), dev/}
    root = ctx.data / "cirr"
    relpaths = {}
    for name, src in zip(names, ctx.images):
        link(root / "dev" / f"{name}{src.suffix}", src)
        relpaths[name] = f"./dev/{name}{src.suffix}"
    dump(root / "cirr" / "captions" / "cap.rc2.val.json", triplets)
    dump(root / "cirr" / "image_splits" / "split.rc2.val.json", relpaths)
    # SEARLE / LinCIR / RTD: fashionIQ/{captions, image_splits, images/<name>.jpg}
    root = ctx.data / "fashioniq"
    for name, src in zip(names, ctx.images):
        link(root / "images" / f"{name}.jpg", src)
    for dress in ("dress", "shirt", "toptee"):
        dump(root / "captions" / f"cap.{dress}.val.json", fiq_triplets if dress == "dress" else [])
        dump(root / "image_splits" / f"split.{dress}.val.json", names if dress == "dress" else [])
    # Pic2Word: data/CIRR/{captions, image_splits, dev/<name>.png}, data/fashion-iq/{json, image_splits, images/<name>.png}
    root = ctx.data / "pic2word"
    for name, src in zip(names, ctx.images):
        link(root / "CIRR" / "dev" / f"{name}.png", src)
        link(root / "fashion-iq" / "images" / f"{name}.png", src)
    dump(root / "CIRR" / "captions" / "cap.rc2.val.json", triplets)
    dump(root / "CIRR" / "image_splits" / "split.rc2.val.json", {name: f"./dev/{name}.png" for name in names})
    dump(root / "fashion-iq" / "json" / "cap.dress.val.json", fiq_triplets)
    dump(root / "fashion-iq" / "image_splits" / "split.dress.val.json", names)


def make_fake_hub_cache(ctx: Ctx) -> None:
    """Stand-in 4: an HF hub cache in which LinCIR's/RTD's build_text_encoder finds its two repos offline."""
    rev = "0" * 40
    entries = {
        "models--openai--clip-vit-large-patch14": {
            "config.json": ctx.hf_dir / "config.json", "model.safetensors": ctx.hf_dir / "model.safetensors",
            "preprocessor_config.json": ctx.hf_dir / "preprocessor_config.json",
            **{f: ctx.hf_dir / f for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                                           "special_tokens_map.json")}},
        "models--stabilityai--stable-diffusion-xl-base-1.0": {
            f"tokenizer_2/{f}": ctx.standins / "sdxl_tokenizer_2" / f
            for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")},
    }
    write_tokenizer(ctx.standins / "sdxl_tokenizer_2", pad_token="!")
    for f in ("tokenizer.json",):  # SDXL's tokenizer_2 folder holds the slow files only
        (ctx.standins / "sdxl_tokenizer_2" / f).unlink(missing_ok=True)
    for repo, files in entries.items():
        base = ctx.hf_cache / repo
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(rev)
        for rel, src in files.items():
            dst = base / "snapshots" / rev / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src)


# ------------------------------------------------------------------------------------------------
# build: shared CLIP in both layouts, method checkpoints, layouts, conversion check


def build(ctx: Ctx) -> None:
    import clip
    import torch
    import torch.nn.functional as F
    import transformers
    from PIL import Image
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizerFast

    torch.set_num_threads(2)
    # 1. tokenizer (offline, from the clip package's BPE file) + hub config in --hf-dir
    config = hub_clip_config()
    log("tokenizer ->", ctx.hf_tok_dir)
    write_tokenizer(ctx.hf_tok_dir)
    config.save_pretrained(str(ctx.hf_tok_dir))
    clip_image_processor().save_pretrained(str(ctx.hf_tok_dir))

    # 2. the shared CLIP: seeded init, perturbation, fp16 rounding
    log("building the random CLIP ViT-L/14")
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    perturb_(model, gen, position_embeddings=(model.text_model.embeddings.position_embedding.weight,
                                              model.vision_model.embeddings.position_embedding.weight))
    fp16_round_(model)
    ctx.hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(ctx.hf_dir), safe_serialization=True)
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "preprocessor_config.json"):
        (ctx.hf_dir / f).write_bytes((ctx.hf_tok_dir / f).read_bytes())
    hf_sd = {k: v.clone() for k, v in model.state_dict().items()}
    del model

    # 3. openai layout: a TorchScript archive like openai's released ViT-L-14.pt (fp16 parameters plus the
    # input_resolution / context_length / vocab_size entries its state dict carries). A plain state-dict
    # file cannot be used: clip 1.0.1's load() tries torch.jit.load on the open file object, which reads it
    # to the end, then calls torch.load on the same object and fails at EOF (torch 2.13).
    import clip.model as clip_model_mod
    oa_sd = hf_to_openai(hf_sd)
    net = clip_model_mod.build_model({k: v.clone() for k, v in oa_sd.items()}).float().eval()
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(net, key):  # plain int attributes of clip.model.CLIP; buffers in the released archive
            delattr(net, key)
        net.register_buffer(key, torch.tensor(value))
    example_px, example_ids = torch.zeros(1, 3, 224, 224), clip.tokenize(["a photo"])
    with torch.no_grad():
        traced = torch.jit.trace_module(net, {"forward": (example_px, example_ids), "encode_image": example_px,
                                              "encode_text": example_ids})
    traced = traced.half()
    ctx.openai_file.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(ctx.openai_file))
    del net, traced
    oa_sd = {k: v.half() for k, v in oa_sd.items()}
    oa_sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    write_layout(ctx, "openai-clip", ctx.openai_file, {
        "kind": "openai-clip", "official_repo": "openai/CLIP (pip clip 1.0.1)", "commit": None,
        "saved_by": "converted here from the HF folder (hf_to_openai), traced with torch.jit.trace_module "
                    "(forward, encode_image, encode_text) and .half(): the format of openai's released ViT-L-14.pt",
        "read_by": "clip/clip.py load(path, jit=False) -> torch.jit.load(...).state_dict() -> clip/model.py "
                   "build_model (SEARLE src/validate.py:446,465 and :118,:243; Pic2Word model/clip.py:132-188 via "
                   "src/eval_retrieval.py:44)"},
        jit=True)

    # 4. method checkpoints in their official layouts, built with the official classes
    p2w = ctx.checkout("pic2word")
    sys.path[:0] = [str(p2w)]
    p2w_model = importlib.import_module("model.model")
    p2w_clip = importlib.import_module("model.clip")
    torch.manual_seed(SEED + 10)
    img2text = p2w_model.IM2TEXT(embed_dim=768, middle_dim=512, output_dim=768, n_layer=2)  # eval_retrieval.py:47
    p2w_net = p2w_model.build_model({k: v.clone() for k, v in oa_sd.items()})  # what load() builds (model/clip.py:179)
    for p in p2w_net.parameters():  # utils.convert_models_to_fp32 (precision "amp", main.py:96-97)
        p.data = p.data.float()
    named = list(img2text.named_parameters())  # the optimizer main.py:127-145 builds (fresh AdamW: empty state)
    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n)], "weight_decay": 0.1}],
                                  lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    ckpt = {"epoch": 30, "name": "cirlab-compat-random",
            "state_dict": {f"module.{k}": v for k, v in p2w_net.state_dict().items()},
            "state_dict_img2text": {f"module.{k}": v for k, v in img2text.state_dict().items()},
            "optimizer": optimizer.state_dict()}
    ctx.files["pic2word"].parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, ctx.files["pic2word"])
    del p2w_net, ckpt
    write_layout(ctx, "pic2word", ctx.files["pic2word"], {
        "kind": "pic2word", "official_repo": REPO["pic2word"], "commit": ctx.commit("pic2word"),
        "saved_by": "src/main.py:225-234 (torch.save epoch/name/state_dict/state_dict_img2text/optimizer; "
                    "also :236-245 epoch_latest.pt)",
        "read_by": "src/eval_retrieval.py:93-107 (module. stripped when not distributed; strict load of both)",
        "notes": ["'module.' prefixes: the model and img2text are DistributedDataParallel-wrapped when saved "
                  "(main.py:115-117); LinCIR/RTD validate.py strip 'module.' unconditionally",
                  "state_dict is the whole CLIP in openai layout, fp32 (convert_models_to_fp32 under amp); "
                  "eval loads it over the clip.load weights, so it decides the CLIP Pic2Word evaluates with",
                  "IM2TEXT(embed_dim=768, middle_dim=512, output_dim=768, n_layer=2, dropout=0.1): "
                  "layers.{0,1}.0 = Linear, .1 = Dropout, .2 = ReLU; fc_out = Linear(512, 768)",
                  "optimizer: a fresh AdamW state_dict with main.py's two param groups (no step taken)"]})

    torch.manual_seed(SEED + 20)
    searle_phi_mod = load_file_module("searle_phi", ctx.checkout("searle") / "src" / "phi.py")
    phi = searle_phi_mod.Phi(input_dim=768, hidden_dim=3072, output_dim=768, dropout=0.5)  # hubconf.py:19-26
    ctx.files["searle"].parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 50, phi.__class__.__name__: phi.state_dict()}, ctx.files["searle"])
    write_layout(ctx, "searle", ctx.files["searle"], {
        "kind": "searle", "official_repo": REPO["searle"], "commit": ctx.commit("searle"),
        "saved_by": "src/train_phi.py:55-65 (save_phi: {'epoch', Phi.__class__.__name__: state_dict})",
        "read_by": "hubconf.py:26-30 (SEARLE-XL: Phi(768, 3072, 768, dropout=0.5), ckpt['Phi']); "
                   "src/validate.py:448-456 ('phi' eval type, same key)",
        "notes": ["Phi = Sequential(Linear, GELU, Dropout, Linear, GELU, Dropout, Linear): layers.{0,3,6}",
                  "fp32 (trained under amp; released Phi files are fp32)"]})

    torch.manual_seed(SEED + 30)
    lincir_models = load_file_module("lincir_models", ctx.checkout("lincir") / "models.py")
    phi = lincir_models.Phi(input_dim=768, hidden_dim=768 * 4, output_dim=768, dropout=0.5)  # validate.py:557-560
    ctx.files["lincir"].parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 20000, phi.__class__.__name__: phi.state_dict()}, ctx.files["lincir"])
    write_layout(ctx, "lincir", ctx.files["lincir"], {
        "kind": "lincir", "official_repo": REPO["lincir"], "commit": ctx.commit("lincir"),
        "saved_by": "train_phi.py:86-96 (save_phi: {'epoch', 'Phi': state_dict}; phi_best at :306)",
        "read_by": "validate.py:557-566 (Phi(projection_dim, 4*projection_dim, hidden_size, 0.5), ckpt['Phi']); "
                   "RTD train_text_encoder.py:142-145 and validate.py:565-574 the same",
        "notes": ["same Phi class as SEARLE (models.py:40-61)", "fp32", "RTD's --phi_checkpoint takes this file"]})

    # RTD tuned text encoder: the shared text tower + projection, re-perturbed, fp16-rounded
    te = CLIPTextModelWithProjection.from_pretrained(str(ctx.hf_dir)).eval()
    gen = torch.Generator().manual_seed(SEED + 40)
    with torch.no_grad():
        for name, p in te.named_parameters():
            if p.dim() > 1 and "position_embedding" not in name:
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and "norm" not in name:  # biases
                p.add_(0.05 * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=gen))
    perturb_(te, gen, position_embeddings=(te.text_model.embeddings.position_embedding.weight,))
    fp16_round_(te)
    ctx.files["rtd"].parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 2000, te.__class__.__name__: te.state_dict()}, ctx.files["rtd"])
    write_layout(ctx, "rtd", ctx.files["rtd"], {
        "kind": "rtd", "official_repo": REPO["rtd"], "commit": ctx.commit("rtd"),
        "saved_by": "train_text_encoder.py:90-100 (save_text_encoder: {'epoch', "
                    "'CLIPTextModelWithProjection': state_dict}; text_encoder_best at :322)",
        "read_by": "validate.py:559-563 (strict load_state_dict into build_text_encoder's fp16 text encoder)",
        "phi": str(ctx.files["lincir"].relative_to(ctx.out)),
        "notes": ["transformers 4.36 state dict: text_model.* and text_projection.weight; no position_ids "
                  "(non-persistent buffer since 4.31)",
                  "values are fp16-exact: validate.py forces mixed_precision='fp16' (:556) so the official "
                  "eval rounds a fp32 text encoder checkpoint to fp16 when it loads it",
                  "random 'tuned' encoder: the shared CLIP text tower + projection, each weight matrix + 0.05 std "
                  "N(0,1), biases likewise, LayerNorms re-drawn (1 + 0.1 N, 0.1 N), position embeddings += 0.02 N, "
                  "then fp16-rounded"]})
    del te

    # 5. conversion check: HF vs openai clip vs Pic2Word's fork, same pixels and token ids
    log("conversion check")
    hf = CLIPModel.from_pretrained(str(ctx.hf_dir)).eval()
    oa, oa_preprocess = clip.load(str(ctx.openai_file), device="cpu", jit=False)
    oa = oa.eval()
    p2w_net, _, _ = p2w_clip.load(str(ctx.openai_file), device="cpu", jit=False)
    p2w_net = p2w_net.eval()
    weights_equal = all(torch.equal(oa.state_dict()[k].float(), v.float())
                        for k, v in hf_to_openai(hf.state_dict()).items())
    pixels = torch.stack([oa_preprocess(Image.open(p)) for p in ctx.images])
    prompts = [f"a photo of $ that {c}" for c in ctx.spec["cirr_captions"]]
    ids = clip.tokenize(prompts)
    tok_slow = CLIPTokenizer.from_pretrained(str(ctx.hf_dir))
    tok_fast = CLIPTokenizerFast.from_pretrained(str(ctx.hf_dir))
    all_texts = prompts + [f"a photo of * , {c}" for c in ctx.spec["cirr_captions"]] + [
        f"a photo of $ that {a.strip('.?, ')} and {b.strip('.?, ')}" for a, b in ctx.spec["fiq_captions"]] + [
        f"a photo of * , {b} and {a}" for a, b in ctx.spec["fiq_captions"]]
    ref_ids = clip.tokenize(all_texts)
    tok_check = {}
    for label, tok in (("slow", tok_slow), ("fast", tok_fast)):
        enc = tok(all_texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        mask = enc["attention_mask"].bool()
        tok_check[label] = {"equal_on_tokens": bool((enc["input_ids"][mask] == ref_ids[mask]).all()),
                            "same_lengths": bool((mask.sum(1) == (ref_ids != 0).sum(1)).all()),
                            "pad_id_hf": int(enc["input_ids"][0, -1]), "pad_id_clip_tokenize": int(ref_ids[0, -1])}
    enc = tok_fast(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = {"hf": hf.get_image_features(pixel_values=pixels), "openai": oa.encode_image(pixels),
               "pic2word": p2w_net.encode_image(pixels)}
        txt = {"hf": hf.get_text_features(input_ids=ids), "openai": oa.encode_text(ids),
               "pic2word": p2w_net.encode_text(ids),
               "hf_hf_tokenizer_ids": hf.get_text_features(input_ids=enc["input_ids"],
                                                          attention_mask=enc["attention_mask"])}
    check = {
        "what": "image features (8 inputs, openai clip preprocess) and text features (8 CIRR prompts "
                "'a photo of $ that {caption}', clip.tokenize ids) of the same weights in three implementations; "
                "unnormalised features, fp32 on CPU",
        "weights_bit_identical_after_clip_load": weights_equal,
        "image_hf_vs_openai": diff_stats(img["hf"], img["openai"]),
        "image_pic2word_vs_openai": diff_stats(img["pic2word"], img["openai"]),
        "text_hf_vs_openai": diff_stats(txt["hf"], txt["openai"]),
        "text_pic2word_vs_openai": diff_stats(txt["pic2word"], txt["openai"]),
        "text_hf_hftokenizer_vs_openai": diff_stats(txt["hf_hf_tokenizer_ids"], txt["openai"]),
        "normalised_image_hf_vs_openai_max_abs": float((F.normalize(img["hf"]) - F.normalize(img["openai"])).abs().max()),
        "normalised_text_hf_vs_openai_max_abs": float((F.normalize(txt["hf"]) - F.normalize(txt["openai"])).abs().max()),
        "feature_scale": {"image": tensor_stats(img["openai"]), "text": tensor_stats(txt["openai"])},
        "tokenizer_vs_clip_tokenize": tok_check,
        "transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED,
    }
    ctx.ref.mkdir(parents=True, exist_ok=True)
    (ctx.ref / "conversion_check_clip.json").write_text(json.dumps(check, indent=1) + "\n")
    log("conversion check:", json.dumps({k: check[k] for k in ("image_hf_vs_openai", "text_hf_vs_openai")}))

    ctx.standins.mkdir(parents=True, exist_ok=True)
    (ctx.standins / "build.json").write_text(json.dumps({"seed": SEED, "done": datetime.datetime.now().isoformat()}))


# ------------------------------------------------------------------------------------------------
# reference record


def _save_ref(ctx: Ctx, method: str, record: dict) -> None:
    import torch
    path = ctx.ref / f"{method}.pt"
    ctx.ref.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)
    torch.load(path, map_location="cpu", weights_only=True)
    log("wrote", path)


def _versions() -> dict:
    import PIL
    import torch
    import torchvision
    out = {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "pillow": str(PIL.__version__)}
    if "transformers" in sys.modules:
        out["transformers"] = str(sys.modules["transformers"].__version__)
    out["clip"] = "openai clip 1.0.1 (pip)"
    return out


def _meta(ctx: Ctx, method: str, **extra) -> dict:
    return {"method": method, "official_repo": REPO[method], "commit": ctx.commit(method), "seed": SEED,
            "dtype": "float32", "device": "cpu", "eval_mode": True, "versions": _versions(),
            "inputs": [p.name for p in ctx.images], "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "ckpt": {k: str(v.relative_to(ctx.out)) for k, v in extra.pop("ckpt", {}).items()}, **extra}


def _scores(queries, gallery):
    return queries @ gallery.T


# ------------------------------------------------------------------------------------------------
# Pic2Word


def run_pic2word(ctx: Ctx) -> None:
    import pandas  # noqa: F401  (imported before the pyarrow stub, as data.py imports it)
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(2)
    root = ctx.checkout("pic2word")
    sys.path[:0] = [str(root / "src"), str(root)]
    with stub_modules("wandb", "braceexpand", "pyarrow", "torch.utils.tensorboard",
                      torch_utils_tensorboard={"SummaryWriter": None}):
        eval_retrieval = importlib.import_module("eval_retrieval")
        eval_utils = importlib.import_module("eval_utils")
        data = importlib.import_module("data")
        oc_clip = importlib.import_module("third_party.open_clip.clip")

    args = argparse.Namespace(model=str(ctx.openai_file), middle_dim=512, n_layer=2, precision="amp", gpu=None,
                              distributed=False, dp=False, resume=str(ctx.files["pic2word"]), batch_size=MAX_BATCH,
                              workers=0, target_pad=False)
    model, img2text, preprocess_val = eval_retrieval.load_model(args)  # eval_retrieval.py:43-113
    model.eval(), img2text.eval()

    # spies and hooks
    tokenize_spy = Spy(data.tokenize)
    data.tokenize = tokenize_spy
    metrics_spies = {"cirr": Spy(eval_utils.get_metrics_cirr, catch=True), "fiq": Spy(eval_utils.get_metrics_fashion)}
    eval_utils.get_metrics_cirr, eval_utils.get_metrics_fashion = metrics_spies["cirr"], metrics_spies["fiq"]
    compose_spy = Spy(model.encode_text_img_retrieval)
    model.encode_text_img_retrieval = compose_spy
    hooks = Hooks()
    hooks.pre(model.visual, "pixels")
    hooks.post(model.visual, "image_raw")
    hooks.io(img2text, "phi")
    hooks.handles.append(model.token_embedding.register_forward_hook(
        lambda mod, a, out: hooks._put("text_ids", a[0].detach().clone())))
    hooks.pre(model.transformer, "text_input_embeds")  # LND
    hooks.post(model.ln_final, "text_hidden")

    def loader(dataset):  # eval_retrieval.py:181-194, with batch 8 and no workers (stand-in 2)
        return DataLoader(dataset, batch_size=MAX_BATCH, shuffle=False, num_workers=0, pin_memory=False,
                          drop_last=False)

    fake = str(ctx.data / "pic2word")
    result = {}
    for kind in ("cirr", "fiq"):
        hooks.clear()
        tokenize_spy.calls.clear()
        compose_spy.calls.clear()
        metrics_spies[kind].calls.clear()
        metrics_spies[kind].errors.clear()
        log("pic2word", kind)
        with torch.no_grad():
            if kind == "cirr":  # eval_retrieval.py:175-199
                source = data.CIRR(transforms=preprocess_val, root=fake)
                target = data.CIRR(transforms=preprocess_val, root=fake, mode="imgs")
                returned = eval_utils.evaluate_cirr(model, img2text, args, loader(source), loader(target))
                captions = [source.target_caps[i] for i in range(N_IMAGES)]
                texts = ["a photo of * , {}".format(c) for c in captions]  # data.py:129
            else:  # eval_retrieval.py:231-255
                source = data.FashionIQ(cloth="dress", transforms=preprocess_val, root=fake, is_return_target_path=True)
                target = data.FashionIQ(cloth="dress", transforms=preprocess_val, root=fake, mode="imgs")
                returned = eval_utils.evaluate_fashion(model, img2text, args, loader(source), loader(target))
                texts = ["a photo of * , {} and {}".format(c2, c1) for c1, c2 in source.ref_caps]  # data.py:228
        assert len(source) == N_IMAGES and len(target) == N_IMAGES
        # the prompt strings the datasets tokenized (data.py): recorded by the tokenize spy
        seen = [call[0][0] for call in tokenize_spy.calls]
        assert all(t in seen for t in texts), "prompt reconstruction differs from what data.py tokenized"
        calls = metrics_spies[kind].calls  # feats order: composed, image, text, mixture (eval_utils.py)
        assert len(calls) == 4
        gallery = calls[0][1]["image_features"]
        feats = {name: call[1]["ref_features"] for name, call in zip(("composed", "image", "text", "mixture"), calls)}
        ids, composed_raw = compose_spy.calls[-1][0][0], compose_spy.calls[-1][2]
        text_calls = hooks.get("text_ids")
        composed_call = max(i for i, t in enumerate(text_calls) if torch.equal(t, ids))
        split_id = int(oc_clip.tokenize(["*"])[0][1])
        result[kind] = {
            "texts": texts, "input_ids": ids.clone(), "gallery": gallery, "feats": feats,
            "composed_raw": composed_raw, "pseudo": hooks.get("phi_out")[0], "phi_in": hooks.get("phi_in")[0],
            "pixels": hooks.get("pixels")[0], "gallery_raw": hooks.get("image_raw")[0],
            "ref_pixels": hooks.get("pixels")[-1],
            "input_embeds_q0": hooks.get("text_input_embeds")[composed_call][:, 0],  # LND -> row 0
            "hidden_q0": hooks.get("text_hidden")[composed_call][0],
            "metrics": [call[2] for call in calls], "returned": returned,
            "metric_errors": list(metrics_spies[kind].errors),
            "split_id": split_id, "eot_positions": (ids == model.end_id).nonzero()[:, 1].clone(),
            "marker_positions": (ids == split_id).nonzero()[:, 1].clone(),
        }
        assert torch.equal(result[kind]["ref_pixels"], result[kind]["pixels"]), "ref and gallery pixels differ"
    c, f = result["cirr"], result["fiq"]
    record = {
        "texts": {"cirr": c["texts"], "fiq": f["texts"]},
        "input_ids": {"cirr": c["input_ids"], "fiq": f["input_ids"]},
        "pixels": c["pixels"],
        "image_features": c["gallery"],
        "pseudo_tokens": c["pseudo"],
        "query_features": c["feats"]["composed"],
        "fiq_query_features": f["feats"]["composed"],
        "scores": {"cirr": _scores(c["feats"]["composed"], c["gallery"]),
                   "fiq": _scores(f["feats"]["composed"], f["gallery"])},
        "intermediates": {
            "image_embeds_raw": c["gallery_raw"], "phi_input": c["phi_in"],
            "query_features_raw": c["composed_raw"], "fiq_query_features_raw": f["composed_raw"],
            "fiq_pseudo_tokens": f["pseudo"], "fiq_image_features": f["gallery"],
            "text_input_embeds_q0": c["input_embeds_q0"], "text_hidden_q0": c["hidden_q0"],
            "eot_positions": {"cirr": c["eot_positions"], "fiq": f["eot_positions"]},
            "marker_positions": {"cirr": c["marker_positions"], "fiq": f["marker_positions"]},
            "baselines": {"cirr": {k: v for k, v in c["feats"].items() if k != "composed"},
                          "fiq": {k: v for k, v in f["feats"].items() if k != "composed"}},
        },
        "metrics": {"cirr": dict(zip(("composed", "image", "text", "mixture"), c["metrics"])),
                    "fiq": dict(zip(("composed", "image", "text", "mixture"), f["metrics"])),
                    "official_errors": {"cirr": c["metric_errors"], "fiq": f["metric_errors"]}},
        "meta": _meta(ctx, "pic2word", ckpt={"checkpoint": ctx.files["pic2word"], "clip_openai": ctx.openai_file},
                      marker="*", marker_id=c["split_id"],
                      prompt={"cirr": "a photo of * , {caption}", "fiq": "a photo of * , {captions[1]} and {captions[0]}"},
                      preprocess="model/clip.py _transform(224, is_train=False): Resize(224, bicubic), CenterCrop(224), "
                                 "convert RGB, ToTensor, Normalize (no --target-pad)",
                      functions=["src/eval_retrieval.py:43 load_model", "model/clip.py:132 load", "src/eval_utils.py:286 evaluate_cirr",
                                 "src/eval_utils.py:452 evaluate_fashion", "model/model.py:468 encode_text_img_retrieval",
                                 "model/model.py:27 IM2TEXT", "src/data.py:123 CIRR.return_valdata, :220 FashionIQ.return_all",
                                 "src/eval_utils.py:544 get_metrics_fashion, :558 get_metrics_cirr"],
                      notes=["pseudo token replaces the first '*' (id 265) of row 0's ids, for every row "
                             "(model.py:480-489)", "pooled at the first id 49407 (model.py:478-479, 498)",
                             "FashionIQ: one order, captions[1] first; no strip()",
                             "Phi (img2text) input: unnormalised encode_image output",
                             "metrics: the official get_metrics_cirr raises on every CIRR layout (gallery names are "
                             "full paths, data.py:137, reference names bare, data.py:133); features were recorded "
                             "before it and the error kept in metrics['official_errors']"]),
    }
    _save_ref(ctx, "pic2word", record)


# ------------------------------------------------------------------------------------------------
# SEARLE / LinCIR / RTD


def _searle_family_run(ctx, method, *, validate, utils, dsets, clip_mod, encode_name, image_encoder, text_encoder,
                       phi, preprocess, phi_args, hooks):
    """Run the validate.py path of SEARLE / LinCIR / RTD on the fake CIRR and FashionIQ folders."""
    import torch
    import torch.nn.functional as F

    tok_spy = Spy(clip_mod.tokenize)
    clip_mod.tokenize = tok_spy
    enc_spy = Spy(getattr(validate, encode_name))
    setattr(validate, encode_name, enc_spy)
    cirr_root, fiq_root = str(ctx.data / "cirr"), str(ctx.data / "fashioniq")
    out = {}
    with torch.no_grad():
        for kind in ("cirr", "fiq"):
            log(method, kind)
            # pseudo tokens: validate.py main -> extract_pseudo_tokens_with_phi over the relative val set
            hooks.clear()
            if kind == "cirr":
                rel_nodup = dsets.CIRRDataset(cirr_root, "val", "relative", preprocess, no_duplicates=True)
            else:
                rel_nodup = dsets.FashionIQDataset(fiq_root, "val", ["dress", "toptee", "shirt"], "relative",
                                                   preprocess, no_duplicates=True)
            pseudo, names = utils.extract_pseudo_tokens_with_phi(image_encoder, phi, rel_nodup, *phi_args)
            assert names == [f"img{i}" for i in range(N_IMAGES)], names
            phi_pixels = hooks.get("vision_pixels")[0]
            phi_in, phi_out = hooks.get("phi_in")[0], hooks.get("phi_out")[0]
            assert torch.equal(phi_out, pseudo)
            # *_val_retrieval: gallery features of the classic split, then *_generate_val_predictions
            hooks.clear()
            if kind == "cirr":
                classic = dsets.CIRRDataset(cirr_root, "val", "classic", preprocess)
                relative = dsets.CIRRDataset(cirr_root, "val", "relative", preprocess)
            else:
                classic = dsets.FashionIQDataset(fiq_root, "val", ["dress"], "classic", preprocess)
                relative = dsets.FashionIQDataset(fiq_root, "val", ["dress"], "relative", preprocess)
            index_features, index_names = utils.extract_image_features(classic, image_encoder)
            assert index_names == [f"img{i}" for i in range(N_IMAGES)], index_names
            gallery_pixels = hooks.get("vision_pixels")[0]
            hooks.clear()
            tok_spy.calls.clear()
            enc_spy.calls.clear()
            if kind == "cirr":
                pred, ref_names, target_names, _ = validate.cirr_generate_val_predictions(text_encoder, relative, names,
                                                                                           pseudo)
            else:
                pred, target_names = validate.fiq_generate_val_predictions(text_encoder, relative, names, pseudo)
            texts = [list(call[0][0]) for call in tok_spy.calls]
            ids = [call[2].clone() for call in tok_spy.calls]
            raw = [call[2].clone() for call in enc_spy.calls]
            for call, i in zip(enc_spy.calls, ids):
                assert torch.equal(call[0][1].to(i.dtype), i)
            hidden_in = hooks.get("text_input_embeds")
            hidden = hooks.get("text_hidden")
            gallery = F.normalize(index_features, dim=-1).float()  # *_compute_val_metrics
            entry = {
                "texts": texts, "ids": ids, "raw": raw, "pred": pred, "pseudo": pseudo, "phi_in": phi_in,
                "phi_pixels": phi_pixels, "pixels": gallery_pixels, "gallery_raw": index_features, "gallery": gallery,
                "input_embeds_q0": hidden_in[0][0], "hidden_q0": hidden[0][0],
                "eot_positions": ids[0].argmax(dim=-1), "marker_positions": (ids[0] == 259).nonzero()[:, 1],
            }
            if kind == "fiq":
                entry["fwd"] = F.normalize(raw[0])
                entry["rev"] = F.normalize(raw[1])
            # the official metric functions on the same features (they re-run the predictions)
            if kind == "cirr":
                entry["metrics"] = validate.cirr_compute_val_metrics(relative, text_encoder, index_features,
                                                                     index_names, names, pseudo)
            else:
                entry["metrics"] = validate.fiq_compute_val_metrics(relative, text_encoder, index_features,
                                                                    index_names, names, pseudo)
            out[kind] = entry
    return out


def _searle_family_record(ctx, method, out, meta_extra) -> dict:
    import torch
    c, f = out["cirr"], out["fiq"]
    assert torch.equal(c["pseudo"], f["pseudo"])
    return {
        "texts": {"cirr": c["texts"][0], "fiq": f["texts"][0], "fiq_reversed": f["texts"][1]},
        "input_ids": {"cirr": c["ids"][0], "fiq": f["ids"][0], "fiq_reversed": f["ids"][1]},
        "pixels": c["pixels"],
        "image_features": c["gallery"],
        "pseudo_tokens": c["pseudo"],
        "query_features": c["pred"],
        "fiq_query_features": f["pred"],
        "scores": {"cirr": _scores(c["pred"], c["gallery"]), "fiq": _scores(f["pred"], f["gallery"])},
        "intermediates": {
            "image_embeds_raw": c["gallery_raw"], "phi_input": c["phi_in"], "phi_pixels": c["phi_pixels"].float(),
            "query_features_raw": c["raw"][0], "fiq_query_features_fwd": f["fwd"], "fiq_query_features_rev": f["rev"],
            "fiq_query_features_raw": {"fwd": f["raw"][0], "rev": f["raw"][1]},
            "fiq_image_features": f["gallery"], "fiq_pseudo_tokens": f["pseudo"],
            "text_input_embeds_q0": c["input_embeds_q0"], "text_hidden_q0": c["hidden_q0"],
            "eot_positions": {"cirr": c["eot_positions"], "fiq": f["eot_positions"]},
            "marker_positions": {"cirr": c["marker_positions"], "fiq": f["marker_positions"]},
        },
        "metrics": {"cirr": c["metrics"], "fiq": f["metrics"]},
        "meta": _meta(ctx, method, **meta_extra),
    }


def run_searle(ctx: Ctx) -> None:
    import clip
    import torch

    torch.set_num_threads(2)
    sys.path[:0] = [str(ctx.checkout("searle") / "src")]
    validate = importlib.import_module("validate")
    utils = importlib.import_module("utils")
    dsets = importlib.import_module("datasets")  # SEARLE's src/datasets.py
    data_utils = importlib.import_module("data_utils")
    phi_mod = importlib.import_module("phi")
    for mod in (validate, utils):
        mod.DataLoader = small_dataloader(mod.DataLoader)
    device = utils.device
    # validate.py main, --eval-type phi / searle-xl (:446-475), clip_model_name = the openai file (stand-in 4)
    clip_model, clip_preprocess = clip.load(str(ctx.openai_file), device=device, jit=False)
    phi = phi_mod.Phi(input_dim=clip_model.visual.output_dim, hidden_dim=clip_model.visual.output_dim * 4,
                      output_dim=clip_model.token_embedding.embedding_dim, dropout=0.5).to(device)
    phi = phi.eval()
    phi.load_state_dict(torch.load(ctx.files["searle"], map_location=device)[phi.__class__.__name__])
    preprocess = data_utils.targetpad_transform(1.25, clip_model.visual.input_resolution)  # default --preprocess-type
    clip_model = clip_model.float().to(device)
    clip_model = clip_model.float().eval().requires_grad_(False)  # as *_val_retrieval re-load it
    hooks = Hooks()
    hooks.pre(clip_model.visual, "vision_pixels")
    hooks.io(phi, "phi")
    hooks.pre(clip_model.transformer, "text_input_embeds", pick=lambda a, k: a[0].permute(1, 0, 2))  # LND -> NLD
    hooks.post(clip_model.ln_final, "text_hidden")
    out = _searle_family_run(ctx, "searle", validate=validate, utils=utils, dsets=dsets, clip_mod=clip,
                             encode_name="encode_with_pseudo_tokens", image_encoder=clip_model, text_encoder=clip_model,
                             phi=phi, preprocess=preprocess, phi_args=(), hooks=hooks)
    record = _searle_family_record(ctx, "searle", out, dict(
        ckpt={"phi": ctx.files["searle"], "clip_openai": ctx.openai_file}, marker="$", marker_id=259,
        prompt={"cirr": "a photo of $ that {caption}",
                "fiq": "a photo of $ that {c0.strip('.?, ')} and {c1.strip('.?, ')}; averaged with the reversed order "
                       "as F.normalize((F.normalize(fwd) + F.normalize(rev)) / 2)"},
        preprocess="src/data_utils.py targetpad_transform(1.25, 224): TargetPad (pads before RGB conversion), "
                   "Resize(224, bicubic), CenterCrop(224), convert RGB, ToTensor, Normalize (--preprocess-type "
                   "targetpad, the default)",
        functions=["src/validate.py:438-488 main (phi / searle-xl)", "src/utils.py:74 extract_pseudo_tokens_with_phi",
                   "src/utils.py:22 extract_image_features", "src/validate.py:133 cirr_generate_val_predictions",
                   "src/validate.py:25 fiq_generate_val_predictions", "src/encode_with_pseudo_tokens.py:5",
                   "src/validate.py:176 cirr_compute_val_metrics", "src/validate.py:75 fiq_compute_val_metrics",
                   "src/datasets.py:10 FashionIQDataset, :133 CIRRDataset", "src/data_utils.py:53 targetpad_transform"],
        notes=["Phi input: unnormalised encode_image output", "first '$' (259) per row replaced (nonzero + cumsum)",
               "pooled at text.argmax(-1) (first 49407)", "openai clip.load rounds weights to fp16 (build_model "
               "convert_weights) before .float()"]))
    _save_ref(ctx, "searle", record)


def run_lincir_family(ctx: Ctx, method: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import clip
    import torch
    import transformers  # noqa: F401  (before the 'datasets' stub: transformers probes importlib.util.find_spec)
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401
    from transformers import CLIPVisionModelWithProjection  # noqa: F401

    torch.set_num_threads(2)
    root = ctx.checkout(method)
    sys.path[:0] = [str(root)]
    stubs = ("webdataset", "spacy", "datasets") + (("sng_parser",) if method == "rtd" else ())
    with stub_modules(*stubs):
        validate = importlib.import_module("validate")
        utils = importlib.import_module("utils")
        loader = importlib.import_module("loader")
        models = importlib.import_module("models")
    for mod in (validate, utils):
        mod.DataLoader = small_dataloader(mod.DataLoader)
    device = utils.device
    # validate.py main, --eval-type phi (LinCIR :553-566; RTD :555-574)
    args = argparse.Namespace(clip_model_name="large", cache_dir=str(ctx.hf_cache), mixed_precision="fp16",
                              l2_normalize=False, preprocess_type="clip", eval_type="phi")
    image_encoder, clip_preprocess, text_encoder, tokenizer = models.build_text_encoder(args)
    if method == "rtd":  # RTD validate.py:559-563
        text_encoder.load_state_dict(
            torch.load(ctx.files["rtd"], map_location=device)[text_encoder.__class__.__name__])
        text_encoder = text_encoder.eval()
    phi = models.Phi(input_dim=text_encoder.config.projection_dim, hidden_dim=text_encoder.config.projection_dim * 4,
                     output_dim=text_encoder.config.hidden_size, dropout=0.5).to(device)
    phi.load_state_dict(torch.load(ctx.files["lincir"], map_location=device)[phi.__class__.__name__])
    phi = phi.eval()
    preprocess = clip_preprocess  # --preprocess-type clip (default)
    image_encoder = image_encoder.float().to(device)
    text_encoder = text_encoder.float().to(device)
    assert not image_encoder.training and not text_encoder.training
    hooks = Hooks()
    hooks.pre(image_encoder, "vision_pixels", pick=lambda a, k: k["pixel_values"])
    hooks.io(phi, "phi")
    hooks.pre(text_encoder.text_model.encoder, "text_input_embeds", pick=lambda a, k: k["inputs_embeds"])
    hooks.post(text_encoder.text_model.final_layer_norm, "text_hidden")
    out = _searle_family_run(ctx, method, validate=validate, utils=utils, dsets=loader, clip_mod=clip,
                             encode_name="encode_with_pseudo_tokens_HF", image_encoder=image_encoder,
                             text_encoder=text_encoder, phi=phi, preprocess=preprocess, phi_args=(args,), hooks=hooks)
    assert out["cirr"]["phi_pixels"].dtype == torch.float16
    ckpts = {"phi": ctx.files["lincir"], "clip_hf": ctx.hf_dir}
    if method == "rtd":
        ckpts["text_encoder"] = ctx.files["rtd"]
    v = "validate.py"
    record = _searle_family_record(ctx, method, out, dict(
        ckpt=ckpts, marker="$", marker_id=259,
        prompt={"cirr": "a photo of $ that {caption}",
                "fiq": "a photo of $ that {c0.strip('.?, ')} and {c1.strip('.?, ')}; averaged with the reversed order "
                       "as F.normalize((F.normalize(fwd) + F.normalize(rev)) / 2)"},
        preprocess="models.py build_text_encoder CLIPImageProcessor (convert RGB first, resize shortest edge 224 "
                   "bicubic, center crop 224, rescale 1/255, normalize) (--preprocess-type clip, the default); "
                   "the pseudo-token pass feeds pixel_values.half() (utils.py extract_pseudo_tokens_with_phi)",
        hf_tokenizer_in_build_text_encoder="stand-in SDXL tokenizer_2 (pad '!'); not used by validation",
        functions=[f"{v} main --eval-type phi", "models.py build_text_encoder", "utils.py extract_pseudo_tokens_with_phi",
                   "utils.py extract_image_features", f"{v} cirr_generate_val_predictions",
                   f"{v} fiq_generate_val_predictions", "encode_with_pseudo_tokens.py encode_with_pseudo_tokens_HF",
                   f"{v} cirr_compute_val_metrics", f"{v} fiq_compute_val_metrics"],
        notes=["every '$' (259) replaced (torch.where)", "pooled at argmax of the ids (first 49407)",
               "causal mask built by the repo's own _make_causal_mask (HF 4.34 copy) and passed as "
               "causal_attention_mask; the HF encoder API of transformers 4.x", "Phi input: unnormalised image_embeds "
               "(--l2_normalize off) of fp16-rounded pixels",
               "build_text_encoder loads both towers in fp16 (mixed_precision forced to 'fp16'), then .float()"]))
    _save_ref(ctx, method, record)


# ------------------------------------------------------------------------------------------------


def worker(ctx: Ctx, name: str) -> None:
    if name != "build":
        make_fake_data(ctx)
    if name in ("lincir", "rtd"):
        make_fake_hub_cache(ctx)
    if name == "build":
        build(ctx)
    elif name == "pic2word":
        run_pic2word(ctx)
    elif name == "searle":
        run_searle(ctx)
    elif name in ("lincir", "rtd"):
        run_lincir_family(ctx, name)
    else:
        raise SystemExit(f"unknown worker {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True, help="folder holding the official checkouts")
    parser.add_argument("--inputs", required=True, help="folder with the images and inputs.json")
    parser.add_argument("--out", required=True, help="output root (ckpt/, layouts/, ref/, standins_clip/)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--hf-dir", default="/work/scratch/hf", help="where the offline HF tokenizer folder goes")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the weights even if standins_clip/build.json exists")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.nice(0) < 10:
        os.nice(10 - os.nice(0))
    ctx = Ctx(args)
    if args.worker:
        worker(ctx, args.worker)
        return 0
    base = [sys.executable, str(Path(__file__).resolve()), "--official", str(ctx.official), "--inputs",
            str(ctx.inputs), "--out", str(ctx.out), "--hf-dir", str(ctx.hf_tok_dir.parent)]
    stamp = ctx.standins / "build.json"
    steps = ([] if stamp.exists() and not args.rebuild and json.loads(stamp.read_text()).get("seed") == SEED
             else ["build"]) + list(args.methods)
    for step in steps:
        log("step", step)
        done = subprocess.run(base + ["--worker", step])
        if done.returncode:
            log("step", step, "failed with", done.returncode)
            return done.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
