"""Official-side references for the BLIP family: random, real-size checkpoints in the released layout,
and the outputs the official code computes from them on shared inputs.

Kinds (one seed each, ``torch.manual_seed(SEEDS[kind])`` at the start of the kind's process):

* ``blip-base``      salesforce/BLIP ``model_base.pth``: ``{'model': BLIP_Pretrain.state_dict()}`` (ViT-B/16 at
  224 px, momentum copies, queues, ``text_decoder``). Reference: ``blip_retrieval`` (BLIP_Retrieval at 384 px,
  pos_embed interpolated by BLIP's ``load_checkpoint``) and ``train_retrieval.evaluation`` with ``k_test`` = 8.
* ``bi-blip4cir``    Bi-Blip4CIR stage I ``tuned_blip_mean.pt`` (BLIPTextEncoder) + stage II ``combiner_mean.pt``;
  the image side is ``BLIPImgEncoder(model_base.pth)``, exactly as ``validate.py`` builds it.
* ``rerank-stage1``  Candidate-Reranking-CIR ``blip_stage1`` (BLIP_Retrieval) ``blip_mean.pt``.
* ``rerank-stage2``  Candidate-Reranking-CIR ``blip_stage2`` (BLIP_NLVR, duplicated attention) ``blip_mean.pt``;
  scores come from ``validate_stage2.generate_cirr_val_predictions`` (z_t from stage I).
* ``spn-blip4cir``   SPN4CIR blip4cir stage-2 ``best.pt`` (``{'epoch', 'state_dict': CIRPlus.state_dict()}``),
  started from the ``rerank-stage1`` checkpoint as SPN4CIR's README does.

Weights: the official constructor (seeded), loading ``model_base.pth`` where the official flow does, then
LayerNorm weight = 1 + 0.1 N(0,1), bias = 0.1 N(0,1); position embeddings += 0.02 N(0,1); every Linear
bias += 0.02 N(0,1) (and the zero-initialised MLM-head bias).  Tensors that came from another checkpoint also
get a "fine-tune delta" p += 0.1 * std(p) * N(0,1) per tensor, so that none equals its source: the momentum
copies of blip-base; the Bi-Blip4CIR text side; every tensor of rerank-stage1, rerank-stage2 (this also makes
stage II's self0/self1 copies differ) and spn-blip4cir.  Deliberately stricter than a real run: in the released
files the frozen ViTs (and stage I's vision_proj) still equal model_base's; here each file's own copy differs,
so a match proves every part is read from the right file and used where the official code uses it (e.g. the
stage-II ViT tokens feed stage I's z_t in validate_stage2).  Bi-Blip4CIR's image side is model_base's by
construction (BLIPImgEncoder always loads model_base.pth).
Saved files are written by the official ``save_model`` functions; their optimizer states are rebuilt with the
training scripts' parameter groups and filled with zeros (``step`` a Python int) for exactly the parameters the
training loss reaches (Adam keeps no state for a parameter whose grad stays None); no training is run.

Usage (cwd must hold ``bert-base-uncased/`` for the offline tokenizer)::

    cd /work/scratch/hf && PYTHONPATH=/work/scratch/tf425:/work/scratch/tv /work/scratch/refenv/bin/python \
        /work/main/benchmarks/compat/official_blip.py --official /work/scratch/official \
        --inputs /work/scratch/compat/inputs --out /work/scratch/compat [--kinds blip-base ...]

Each kind runs in its own child process (the repositories share module names: utils, data_utils, blip, med,
models), one after the other.  Outputs: ``ckpt/<kind>/``, ``layouts/<kind>.json``, ``ref/<kind>.pt``.

Stand-ins (nothing from the official repositories is copied here; these only let their code run offline,
on CPU, under torch 2.13):

1. ``rich`` (not installed): a module whose ``print`` is the builtin print (the repos only do
   ``from rich import print``).
2. ``torch.load`` defaults to ``weights_only=False`` when the caller does not say (torch >= 2.6 changed the
   default; the repos predate it and the Candidate-Reranking top-K file holds numpy string arrays).
3. blip-base construction: ``torch.hub.load_state_dict_from_url`` returns ``{'model': {}}`` (the DeiT
   download BLIP_Pretrain starts from) and ``med.BertModel/BertLMHeadModel.from_pretrained('bert-base-uncased',
   config=...)`` builds the class from that config (no hub); weights are random anyway.
4. BLIP ``train_retrieval`` import: inert modules for ``ruamel_yaml``, ``cv2``, ``pycocotools.coco``,
   ``pycocoevalcap.eval`` (imported at module level, never used by ``evaluation``), and the module global
   ``args = Namespace(distributed=False)`` that ``evaluation`` reads.
5. Config ``pretrained`` URLs (model_base.pth) are replaced by the local ``ckpt/blip-base/model_base.pth``;
   relative ``configs/...json`` paths are passed as absolute paths to the same files (SPN4CIR's
   ``BLIP_Retrieval.__init__`` default ``med_config`` is rewritten to the absolute path).
6. Datasets: the official dataset classes read synthetic annotation JSONs written to a temporary folder
   (``data_utils.base_path`` pointed there for Bi-Blip4CIR / Candidate-Reranking; SPN4CIR takes a
   ``data_path``); image paths in them are absolute paths to the shared input images.
7. CUDA: SPN4CIR ``CIRPlus(device=cpu)`` and ``utils.extract_index_features`` default device cpu (it defaults
   to ``torch.device('cuda')``); SPN ``validate.args`` namespace (read as a module global).
8. The optimizers whose state the training scripts save are rebuilt here with the scripts' parameter
   groups (cited per kind in the layout JSON), since the training functions cannot be called (they need the
   datasets, comet_ml and CUDA); the files themselves are written by the repositories' ``save_model``.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

KINDS = ["blip-base", "bi-blip4cir", "rerank-stage1", "rerank-stage2", "spn-blip4cir"]
DEPENDS = {
    "blip-base": [],
    "bi-blip4cir": ["blip-base"],
    "rerank-stage1": ["blip-base"],
    "rerank-stage2": ["blip-base", "rerank-stage1"],
    "spn-blip4cir": ["blip-base", "rerank-stage1"],
}
SEEDS = {"blip-base": 1001, "bi-blip4cir": 1002, "rerank-stage1": 1003, "rerank-stage2": 1004, "spn-blip4cir": 1005}
REPO = {"blip-base": "BLIP", "bi-blip4cir": "Bi-Blip4CIR", "rerank-stage1": "Candidate-Reranking-CIR",
        "rerank-stage2": "Candidate-Reranking-CIR", "spn-blip4cir": "SPN4CIR"}
REPO_URL = {"BLIP": "salesforce/BLIP", "Bi-Blip4CIR": "Cuberick-Orion/Bi-Blip4CIR",
            "Candidate-Reranking-CIR": "Cuberick-Orion/Candidate-Reranking-CIR", "SPN4CIR": "BUAADreamer/SPN4CIR"}
CKPT_FILES = {
    "blip-base": ["model_base.pth"],
    "bi-blip4cir": ["saved_models/tuned_blip_mean.pt", "saved_models/combiner_mean.pt"],
    "rerank-stage1": ["saved_models/blip_mean.pt"],
    "rerank-stage2": ["saved_models/blip_mean.pt"],
    "spn-blip4cir": ["best.pt"],
}
# Released sizes where the official repository states them (Candidate-Reranking-CIR DOWNLOAD.md, CIRR files).
RELEASED_BYTES = {("rerank-stage1", "saved_models/blip_mean.pt"): 1995000835,
                  ("rerank-stage2", "saved_models/blip_mean.pt"): 2772083982}

LN_W, LN_B, POS, BIAS, DELTA = 0.1, 0.1, 0.02, 0.02, 0.1


# --------------------------------------------------------------------------------------------- helpers
def _inert_module(name: str, **attrs) -> types.ModuleType:
    """A module that imports fine; any attribute not given raises when used."""
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)

    def _missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def _fail(*_a, **_k):
            raise RuntimeError(f"stand-in module {name}.{attr} used; it should not be")
        return _fail
    mod.__getattr__ = _missing
    return mod


def install_common_standins():
    import torch
    sys.modules.setdefault("rich", _inert_module("rich", print=builtins.print))
    if not getattr(torch.load, "_official_blip_standin", False):
        original = torch.load

        @functools.wraps(original)
        def load(*args, **kwargs):
            kwargs.setdefault("weights_only", False)
            return original(*args, **kwargs)
        load._official_blip_standin = True
        torch.load = load
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def cite(repo_dir: Path, rel: str, line: int, must: str) -> str:
    """file:line, checked against the checkout so a stale citation fails loudly."""
    text = (repo_dir / rel).read_text().splitlines()[line - 1]
    if must not in text:
        raise RuntimeError(f"citation {rel}:{line} no longer holds {must!r}: {text.strip()!r}")
    return f"{rel}:{line}"


def git_head(repo_dir: Path) -> str:
    return subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def perturb(module, *, delta_prefixes=(), recipe_prefixes=("",)):
    """The brief's recipe on every module under ``recipe_prefixes``; a per-tensor fine-tune delta on
    parameters under ``delta_prefixes``.  Tied parameters are touched once (they stay tied)."""
    import torch
    from torch import nn
    done_delta, done_recipe = set(), set()
    with torch.no_grad():
        for name, param in module.named_parameters(remove_duplicate=True):
            if not name.startswith(tuple(delta_prefixes)) or id(param) in done_delta:
                continue
            done_delta.add(id(param))
            if param.is_floating_point() and param.numel() > 1:
                param.add_(DELTA * param.float().std() * torch.randn_like(param))
        for mname, mod in module.named_modules(remove_duplicate=False):
            if not mname.startswith(tuple(recipe_prefixes)):
                continue
            if isinstance(mod, nn.LayerNorm):
                if id(mod.weight) not in done_recipe:
                    done_recipe.add(id(mod.weight))
                    mod.weight.copy_(1.0 + LN_W * torch.randn_like(mod.weight))
                if mod.bias is not None and id(mod.bias) not in done_recipe:
                    done_recipe.add(id(mod.bias))
                    mod.bias.copy_(LN_B * torch.randn_like(mod.bias))
            elif isinstance(mod, nn.Linear) and mod.bias is not None and id(mod.bias) not in done_recipe:
                done_recipe.add(id(mod.bias))
                mod.bias.add_(BIAS * torch.randn_like(mod.bias))
        for name, param in module.named_parameters(remove_duplicate=True):
            if not name.startswith(tuple(recipe_prefixes)) or id(param) in done_recipe:
                continue
            if name.endswith("pos_embed") or name.endswith("position_embeddings.weight"):
                done_recipe.add(id(param))
                param.add_(POS * torch.randn_like(param))
            elif name.endswith("predictions.bias"):  # BertLMPredictionHead.bias, zero-initialised
                done_recipe.add(id(param))
                param.add_(BIAS * torch.randn_like(param))


def fill_adam_state(optimizer, module, gets_grad=lambda name: True, step: int = 1):
    """What a saved Adam/AdamW state holds after training (zeros here): an entry per parameter that the
    training loss reaches.  torch's Adam skips parameters whose ``.grad`` stays None, so parameters the
    training forward never uses are listed in ``param_groups`` but have no ``state`` entry.  ``step`` is a
    Python int, as torch <= 1.11 stored it (the released Candidate-Reranking sizes match that, see report).
    Returns the names of the parameters left without state."""
    import torch
    names = {id(p): n for n, p in module.named_parameters()}
    without = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if gets_grad(names[id(p)]):
                optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            else:
                without.append(names[id(p)])
    return without


def describe_checkpoint(obj: dict, path: Path) -> dict:
    """Top-level kinds, every tensor's shape, dtypes, shared storages and the optimizer summary."""
    import torch
    top, tensors, non_f32, opt = {}, {}, {}, {}
    storages: dict = {}
    dtypes: dict = {}
    for key, value in obj.items():
        if isinstance(value, dict) and key.lower().startswith("optimizer"):
            top[key] = "optimizer_state_dict"
            groups = []
            for g in value["param_groups"]:
                groups.append({k: (len(v) if k == "params" else v) for k, v in g.items()
                               if k == "params" or isinstance(v, (int, float, str, bool, tuple, list, type(None)))})
                groups[-1]["n_params"] = groups[-1].pop("params")
            state_keys = sorted({k for s in value["state"].values() for k in s})
            opt[key] = {"param_groups": groups, "n_state_entries": len(value["state"]), "state_keys": state_keys,
                        "state_tensor_numel": int(sum(t.numel() for s in value["state"].values()
                                                      for t in s.values() if torch.is_tensor(t)))}
        elif isinstance(value, dict) and all(torch.is_tensor(v) for v in value.values()):
            top[key] = "state_dict"
            for name, t in value.items():
                full = f"{key}/{name}"
                tensors[full] = list(t.shape)
                dtypes[str(t.dtype).replace("torch.", "")] = dtypes.get(str(t.dtype).replace("torch.", ""), 0) + 1
                if t.dtype != torch.float32:
                    non_f32[full] = str(t.dtype).replace("torch.", "")
                sid = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                storages.setdefault(sid, []).append(full)
        else:
            top[key] = type(value).__name__
    shared = [names for names in storages.values() if len(names) > 1]
    return {"top_level": top, "tensors": tensors, "n_tensors": len(tensors),
            "dtype": "float32", "dtype_counts": dtypes, "non_float32": non_f32,
            "shared_storage": shared, "optimizer": opt, "file_bytes": path.stat().st_size}


def save_layout(out: Path, kind: str, repo_dir: Path, files: dict, extra: dict):
    import torch
    layout = {"kind": kind, "official_repo": REPO_URL[REPO[kind]], "commit": git_head(repo_dir), "seed": SEEDS[kind],
              "files": {}}
    for fname, info in files.items():
        path = out / "ckpt" / kind / fname
        obj = torch.load(path, map_location="cpu")
        desc = describe_checkpoint(obj, path)
        desc.update(info)
        released = RELEASED_BYTES.get((kind, fname))
        if released:
            desc["released_file_bytes"] = released
        layout["files"][fname] = desc
        del obj
    layout.update(extra)
    if len(files) == 1:  # flat form for single-file kinds: the brief's keys at the top
        (fname, only), = layout.pop("files").items()
        layout["file"] = fname
        for key in ("saved_by", "top_level", "tensors", "dtype"):
            layout[key] = only.pop(key)
        layout.update(only)
    (out / "layouts").mkdir(parents=True, exist_ok=True)
    (out / "layouts" / f"{kind}.json").write_text(json.dumps(layout, indent=1) + "\n")


def load_inputs(inputs: Path):
    spec = json.loads((inputs / "inputs.json").read_text())
    names = [Path(n).stem for n in spec["images"]]
    paths = [str((inputs / n).resolve()) for n in spec["images"]]
    return spec, names, paths


def write_cirr_annotations(root: Path, names, paths, captions):
    """cap.rc2.val.json / split.rc2.val.json in CIRR's format; query i = (image i, caption i)."""
    n = len(names)
    triplets = [{"pairid": i, "reference": names[i], "target_hard": names[(i + 1) % n], "caption": captions[i],
                 "target_soft": {names[(i + 1) % n]: 1.0},
                 "img_set": {"id": i, "members": [names[(i + k) % n] for k in range(6)]}} for i in range(n)]
    (root / "cirr" / "captions").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(triplets))
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text(json.dumps(dict(zip(names, paths))))
    return triplets


def write_fiq_annotations(root: Path, names, pairs, dress_type="dress"):
    n = len(names)
    triplets = [{"candidate": names[i], "target": names[(i + 1) % n], "captions": list(pairs[i])} for i in range(n)]
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.{dress_type}.val.json").write_text(json.dumps(triplets))
    (root / "image_splits" / f"split.{dress_type}.val.json").write_text(json.dumps(names))
    return triplets


class TokenizerRecorder:
    """Wraps an official tokenizer; keeps every call's text and the BatchEncoding it returned.  The official
    code edits ``input_ids[:, 0]`` in place after the call, so the kept tensors show the ids as fed."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.calls = []

    def __call__(self, text, *args, **kwargs):
        out = self._tok(text, *args, **kwargs)
        self.calls.append((list(text) if isinstance(text, (list, tuple)) else [text], out, dict(kwargs)))
        return out

    def __getattr__(self, name):
        return getattr(self._tok, name)


def pixels_from(transform, paths):
    import PIL.Image
    import torch
    return torch.stack([transform(PIL.Image.open(p)) for p in paths])


def meta(kind: str, repo_dir: Path, extra: dict | None = None) -> dict:
    import torch
    import transformers
    info = {"kind": kind, "official_repo": REPO_URL[REPO[kind]], "commit": git_head(repo_dir),
            "seed": SEEDS[kind], "precision": "fp32", "mode": "eval (model.eval(), torch.no_grad())",
            "device": "cpu", "torch": str(torch.__version__), "transformers": str(transformers.__version__),
            "python": platform.python_version()}
    info.update(extra or {})
    return info


# ------------------------------------------------------------------------------------------ blip-base
def run_blip_base(official: Path, inputs: Path, out: Path):
    import torch
    import torch.nn.functional as F
    repo = official / "BLIP"
    sys.path.insert(0, str(repo))
    install_common_standins()
    for name in ("ruamel_yaml", "cv2", "pycocotools", "pycocotools.coco", "pycocoevalcap", "pycocoevalcap.eval"):
        sys.modules.setdefault(name, _inert_module(name))
    sys.modules["pycocotools"].coco = sys.modules["pycocotools.coco"]
    sys.modules["pycocoevalcap"].eval = sys.modules["pycocoevalcap.eval"]
    import models.med as med
    import models.blip_pretrain as blip_pretrain_mod
    from models.blip_retrieval import blip_retrieval
    torch.manual_seed(SEEDS["blip-base"])

    # stand-in 3: no DeiT / bert-base-uncased download; random weights anyway
    real_hub = torch.hub.load_state_dict_from_url
    torch.hub.load_state_dict_from_url = lambda *a, **k: {"model": {}}
    for cls in (med.BertModel, med.BertLMHeadModel):  # inherited from PreTrainedModel; shadowed, then removed
        cls.from_pretrained = classmethod(lambda c, _name, config=None, **kw: c(config, **kw))
    cfg_pre = {"image_size": 224, "vit": "base", "vit_grad_ckpt": False, "vit_ckpt_layer": 0, "queue_size": 57600}
    model = blip_pretrain_mod.BLIP_Pretrain(med_config=str(repo / "configs/bert_config.json"),
                                            image_size=cfg_pre["image_size"], vit=cfg_pre["vit"],
                                            vit_grad_ckpt=cfg_pre["vit_grad_ckpt"],
                                            vit_ckpt_layer=cfg_pre["vit_ckpt_layer"], queue_size=cfg_pre["queue_size"])
    torch.hub.load_state_dict_from_url = real_hub
    for cls in (med.BertModel, med.BertLMHeadModel):
        del cls.from_pretrained
    perturb(model, delta_prefixes=("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m."))
    ckdir = out / "ckpt" / "blip-base"
    ckdir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, ckdir / "model_base.pth")
    tied = sum(1 for n, p in model.text_decoder.named_parameters()
               if any(p is q for q in model.text_encoder.parameters()))
    del model

    # reference: BLIP's retrieval path (train_retrieval.py main + evaluation)
    import train_retrieval
    from data.utils import pre_caption
    train_retrieval.args = argparse.Namespace(distributed=False)
    import yaml
    config = yaml.safe_load((repo / "configs/retrieval_coco.yaml").read_text())
    config["k_test"] = 8  # 8 texts / 8 images here (config value 256)
    model = blip_retrieval(pretrained=str(ckdir / "model_base.pth"), image_size=config["image_size"],
                           vit=config["vit"], vit_grad_ckpt=config["vit_grad_ckpt"],
                           vit_ckpt_layer=config["vit_ckpt_layer"], queue_size=config["queue_size"],
                           negative_all_rank=config["negative_all_rank"], med_config=str(repo / "configs/med_config.json"))
    model.eval()
    spec, names, paths = load_inputs(inputs)
    sys.path.insert(0, str(official / "Bi-Blip4CIR" / "src"))
    import data_utils as bb_data  # the CIR repos' targetpad transform (shared pixels)
    sys.path.pop(0)
    pixels = pixels_from(bb_data.targetpad_transform(1.25, 384), paths)
    texts = [pre_caption(c, 30) for c in spec["cirr_captions"]]  # coco_karpathy_retrieval_eval: max_words=30

    class _Eval(torch.utils.data.Dataset):
        def __init__(self):
            self.text, self.image = texts, names

        def __len__(self):
            return len(pixels)

        def __getitem__(self, i):
            return pixels[i], i
    loader = torch.utils.data.DataLoader(_Eval(), batch_size=8, shuffle=False)
    with torch.no_grad():
        score_i2t, score_t2i = train_retrieval.evaluation(model, loader, torch.device("cpu"), config)
        # the same steps evaluation() takes (train_retrieval.py:87-105, 127-133), kept for localisation
        tok = model.tokenizer(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        text_out = model.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, mode="text")
        text_feat = F.normalize(model.text_proj(text_out.last_hidden_state[:, 0, :]))
        vit = model.visual_encoder(pixels)
        image_feat = F.normalize(model.vision_proj(vit[:, 0, :]), dim=-1)
        enc_ids = tok.input_ids.clone()
        enc_ids[:, 0] = model.tokenizer.enc_token_id
        atts = torch.ones(vit.shape[:-1], dtype=torch.long)
        grounded = model.text_encoder(enc_ids, attention_mask=tok.attention_mask, encoder_hidden_states=vit,
                                      encoder_attention_mask=atts, return_dict=True).last_hidden_state
        itm_logits = model.itm_head(grounded[:, 0, :])
        grounded_feat = F.normalize(model.text_proj(grounded[:, 0, :]), dim=-1)
    ref = {
        "texts": texts, "texts_raw": list(spec["cirr_captions"]), "image_names": names,
        "input_ids": tok.input_ids, "attention_mask": tok.attention_mask, "input_ids_enc": enc_ids,
        "pixels": pixels, "image_features": image_feat, "text_features": text_feat,
        "query_features": grounded_feat, "grounded_features": grounded_feat,
        "itm_logits_diag": itm_logits, "scores": image_feat @ text_feat.T,
        "score_i2t_eval": torch.from_numpy(score_i2t), "score_t2i_eval": torch.from_numpy(score_t2i),
        "vit_last_hidden_0": vit[0], "vit_cls": vit[:, 0, :], "text_cls_0": text_out.last_hidden_state[0, 0],
        "text_last_hidden_0": text_out.last_hidden_state[0], "grounded_cls": grounded[:, 0, :],
        "pos_embed_384": model.visual_encoder.pos_embed.detach().clone(),
        "meta": meta("blip-base", repo, {
            "enc_token_id": int(model.tokenizer.enc_token_id), "bos_token_id": int(model.tokenizer.bos_token_id),
            "tokenizer_len": len(model.tokenizer), "image_size_reference": 384, "image_size_checkpoint": 224,
            "pixels": "Bi-Blip4CIR data_utils.targetpad_transform(1.25, 384) (shared CIR preprocessing, not BLIP's "
                      "square Resize((384,384)) test transform)",
            "texts": "BLIP data/utils.py pre_caption(caption, 30) of the raw CIRR captions, as "
                     "coco_karpathy_retrieval_eval does",
            "scores": "scores[i, j] = image_features[i] . text_features[j] (ITC); score_i2t_eval / score_t2i_eval are "
                      "train_retrieval.evaluation's matrices (ITM score + ITC sim, k_test=8)",
            "query_features": "grounded [ENC] features of (image i, text i): normalize(text_proj(CLS))",
        }),
    }
    (out / "ref").mkdir(parents=True, exist_ok=True)
    torch.save(ref, out / "ref" / "blip-base.pt")
    save_layout(out, "blip-base", repo, {"model_base.pth": {
        "saved_by": cite(repo, "pretrain.py", 142, "torch.save(save_obj"),
        "save_obj_written_by_script": ["model", "optimizer", "config", "epoch"],
        "released_top_level_note": "loaders read only checkpoint['model'] (models/blip.py:224); this file holds "
                                   "{'model'} as the released model_base.pth is used (optimizer/config/epoch are "
                                   "what pretrain.py:136-141 adds during training)",
        "class": "models.blip_pretrain.BLIP_Pretrain(image_size=224, vit='base', queue_size=57600)",
        "text_decoder_params_tied_to_text_encoder": tied,
    }}, {"reference": {
        "built_by": cite(repo, "models/blip_retrieval.py", 264, "def blip_retrieval"),
        "pos_embed_interpolation": cite(repo, "models/vit.py", 298, "mode='bicubic'"),
        "evaluation": cite(repo, "train_retrieval.py", 69, "def evaluation"),
        "load_checkpoint": cite(repo, "models/blip.py", 215, "def load_checkpoint"),
    }})


# ---------------------------------------------------------------------------------------- bi-blip4cir
def run_bi_blip4cir(official: Path, inputs: Path, out: Path):
    import torch
    import torch.nn.functional as F
    from torch import optim
    repo = official / "Bi-Blip4CIR"
    src = repo / "src"
    sys.path.insert(0, str(src))
    install_common_standins()
    import data_utils
    import utils
    import validate
    from combiner import Combiner
    from blip_modules.blip_text_encoder import BLIPTextEncoder
    from blip_modules.blip_img_encoder import BLIPImgEncoder
    torch.manual_seed(SEEDS["bi-blip4cir"])
    model_base = out / "ckpt" / "blip-base" / "model_base.pth"
    med_config = str(src / "blip_modules/med_config.json")

    # stage I checkpoint: BLIPTextEncoder fine-tuned (clip_fine_tune.py), saved by utils.save_model
    text_enc = BLIPTextEncoder(str(model_base), med_config, use_pretrained_proj_layer=True)
    perturb(text_enc, delta_prefixes=("",))
    lr = 5e-5  # README CIRR stage-I command
    optimizer = optim.AdamW(  # the groups of clip_fine_tune.py:353-359
        [{"params": [p for n, p in text_enc.named_parameters() if "text_proj" not in n], "lr": lr, "weight_decay": 0.05},
         {"params": [p for n, p in text_enc.named_parameters() if "text_proj" in n], "lr": lr * 100,
          "weight_decay": 0.05}])
    # stage I trains in mode='text': the cross-attention weights never get a gradient
    no_state_text = fill_adam_state(optimizer, text_enc, lambda name: "crossattention" not in name)
    ckroot = out / "ckpt" / "bi-blip4cir"
    ckdir = ckroot / "saved_models"
    epoch = 5
    utils.save_model("tuned_blip_mean", epoch, text_enc, ckroot, optimizer)  # the official save (utils.py:131)
    # stage II checkpoint: Combiner (combiner_train.py), README dims
    combiner = Combiner(256, 2560, 5120)
    perturb(combiner)
    optimizer = optim.Adam(combiner.parameters(), lr=2e-5)  # combiner_train.py:340
    fill_adam_state(optimizer, combiner)
    utils.save_model("combiner_mean", epoch, combiner, ckroot, optimizer)
    del text_enc, combiner, optimizer

    # reference: validate.py main() flow
    text_enc = BLIPTextEncoder(str(model_base), med_config, use_pretrained_proj_layer=True)
    img_enc = BLIPImgEncoder(str(model_base)).eval()
    state = torch.load(ckdir / "tuned_blip_mean.pt", map_location="cpu")
    text_enc.load_state_dict(state["BLIPTextEncoder"])
    text_enc.eval()
    combiner = Combiner(256, 640 * 4, 640 * 8)
    combiner.load_state_dict(torch.load(ckdir / "combiner_mean.pt", map_location="cpu")["Combiner"])
    combiner.eval()
    preprocess = data_utils.targetpad_transform(1.25, 384)
    spec, names, paths = load_inputs(inputs)
    tmp = Path(tempfile.mkdtemp(prefix="bb4cir_", dir=out))
    try:
        write_cirr_annotations(tmp / "cirr_dataset", names, paths, spec["cirr_captions"])
        write_fiq_annotations(tmp / "fashionIQ_dataset", names, spec["fiq_captions"])
        data_utils.base_path = tmp  # stand-in 6
        rec = TokenizerRecorder(text_enc.tokenizer)
        text_enc.tokenizer = rec
        text_enc = text_enc.float().eval()
        img_enc = img_enc.float().eval()
        with torch.no_grad():
            classic = data_utils.CIRRDataset("val", "classic", preprocess)
            index_features, index_names = utils.extract_index_features(classic, img_enc)
            assert index_names == names, index_names
            relative = data_utils.CIRRDataset("val", "relative", preprocess)
            n_calls = len(rec.calls)
            q1, ref_names, _, _ = validate.generate_cirr_val_predictions(text_enc, relative, utils.element_wise_sum,
                                                                         index_names, index_features)
            texts, enc, _ = rec.calls[n_calls]
            assert ref_names == names
            q2, _, _, _ = validate.generate_cirr_val_predictions(text_enc, relative, combiner.combine_features,
                                                                 index_names, index_features)
            text_raw = text_enc(texts, max_length=77, device="cpu")
            gallery = F.normalize(index_features, dim=-1).float()  # validate.py:178
            fiq_rel = data_utils.FashionIQDataset("val", ["dress"], "relative", preprocess)
            n_calls = len(rec.calls)
            f1, _ = validate.generate_fiq_val_predictions(text_enc, fiq_rel, utils.element_wise_sum,
                                                          index_names, index_features)
            fiq_texts, fiq_enc, _ = rec.calls[n_calls]
            f2, _ = validate.generate_fiq_val_predictions(text_enc, fiq_rel, combiner.combine_features,
                                                          index_names, index_features)
            fiq_text_raw = text_enc(fiq_texts, max_length=77, device="cpu")
            vit = img_enc.visual_encoder(pixels_from(preprocess, paths[:1]))
        pixels = pixels_from(preprocess, paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = {
        "texts": texts, "input_ids": enc["input_ids"].clone(), "attention_mask": enc["attention_mask"].clone(),
        "image_names": names, "pixels": pixels,
        "image_features": F.normalize(index_features, dim=-1), "image_features_raw": index_features,
        "text_features_raw": text_raw,
        "query_features": q1, "scores": q1 @ gallery.T,
        "query_features_stage2": q2, "scores_stage2": q2 @ gallery.T,
        "fiq": {"category": "dress", "texts": fiq_texts, "input_ids": fiq_enc["input_ids"].clone(),
                "attention_mask": fiq_enc["attention_mask"].clone(), "text_features_raw": fiq_text_raw,
                "query_features": f1, "scores": f1 @ gallery.T, "query_features_stage2": f2,
                "scores_stage2": f2 @ gallery.T},
        "vit_last_hidden_0": vit[0], "pos_embed_384": img_enc.visual_encoder.pos_embed.detach().clone(),
        "meta": meta("bi-blip4cir", repo, {
            "image_side": "BLIPImgEncoder(ckpt/blip-base/model_base.pth): visual_encoder + vision_proj of model_base "
                          "(pos_embed interpolated 197->577); not part of the tuned checkpoint",
            "query_features": "validate.generate_cirr_val_predictions with utils.element_wise_sum: "
                              "normalize(vision_proj(CLS) + text_proj(text CLS)), both unnormalised before the sum",
            "query_features_stage2": "same with Combiner.combine_features (eval)",
            "scores": "query @ normalize(index_features).T (validate.py:181 distances = 1 - this)",
            "texts": "CIRRDataset.__prepend_text__(caption, forward=True): ' [FORWARD] ' before every chunk of "
                     "caption.split('and'); tokenizer padding='longest', max_length=77, first token [CLS] (no [ENC])",
            "fiq": "FashionIQDataset prepend per caption, then generate_fiq_val_predictions joins "
                   "f\"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}\"; reference = image i",
            "queries": "query i = (image i, CIRR caption i); gallery = the 8 images (reference not removed)",
            "combiner": "Combiner(256, 2560, 5120), dropout inactive in eval, logit_scale 100 unused here",
        }),
    }
    (out / "ref").mkdir(parents=True, exist_ok=True)
    torch.save(ref, out / "ref" / "bi-blip4cir.pt")
    save_layout(out, "bi-blip4cir", repo, {
        "saved_models/tuned_blip_mean.pt": {
            "saved_by": cite(repo, "src/utils.py", 131, "torch.save"),
            "called_from": cite(repo, "src/clip_fine_tune.py", 493, "save_model('tuned_blip_mean'"),
            "class": "blip_modules.blip_text_encoder.BLIPTextEncoder (text_encoder + text_proj only)",
            "optimizer_built_as": cite(repo, "src/clip_fine_tune.py", 353, "optim.AdamW"),
            "loaded_by": cite(repo, "src/validate.py", 341, 'load_state_dict(state_dict["BLIPTextEncoder"])'),
            "params_without_optimizer_state": no_state_text,
        },
        "saved_models/combiner_mean.pt": {
            "saved_by": cite(repo, "src/utils.py", 131, "torch.save"),
            "called_from": cite(repo, "src/combiner_train.py", 470, "save_model('combiner_mean'"),
            "class": "combiner.Combiner(blip_feature_dim=256, projection_dim=2560, hidden_dim=5120)",
            "optimizer_built_as": cite(repo, "src/combiner_train.py", 340, "optim.Adam"),
            "loaded_by": cite(repo, "src/validate.py", 362, 'load_state_dict(state_dict["Combiner"])'),
        }}, {"image_encoder_source": "model_base.pth (blip-base), loaded by " +
             cite(repo, "src/blip_modules/blip_img_encoder.py", 61, "load_checkpoint(visual_encoder")})


# ---------------------------------------------------------------------------------- Candidate-Reranking
def _rerank_imports(official: Path):
    repo = official / "Candidate-Reranking-CIR"
    sys.path.insert(0, str(repo / "src"))
    install_common_standins()
    import yaml
    cfg1 = yaml.safe_load((repo / "configs/retrieval_coco.yaml").read_text())
    cfg2 = yaml.safe_load((repo / "configs/nlvr.yaml").read_text())
    return repo, cfg1, cfg2


def _build_stage1(repo, cfg1, model_base):
    from blip_stage1 import blip_stage1
    return blip_stage1(pretrained=str(model_base), image_size=cfg1["image_size"], vit=cfg1["vit"],
                       vit_grad_ckpt=cfg1["vit_grad_ckpt"], vit_ckpt_layer=cfg1["vit_ckpt_layer"],
                       med_config=str(repo / "configs/med_config.json"))


def _build_stage2(repo, cfg2, model_base):
    from blip_stage2 import blip_stage2
    return blip_stage2(pretrained=str(model_base), image_size=cfg2["image_size"],
                       med_config=str(repo / "configs/med_config.json"), vit=cfg2["vit"],
                       vit_grad_ckpt=cfg2["vit_grad_ckpt"], vit_ckpt_layer=cfg2["vit_ckpt_layer"])


def _save_rerank(model, kind_dir: Path, class_key: str, gets_grad=lambda name: True):
    import torch
    import utils
    for p in model.visual_encoder.parameters():  # not blip_img_tune (default): stage*_train.py
        p.requires_grad = False
    optimizer = torch.optim.AdamW(params=filter(lambda p: p.requires_grad, model.parameters()), lr=2e-5,
                                  weight_decay=0.05)  # lr: Instructions_CIRR.md; weight_decay: configs/*.yaml
    without = fill_adam_state(optimizer, model, gets_grad)
    assert model.__class__.__name__ == class_key
    utils.save_model("blip_mean", 5, model, kind_dir, optimizer)  # the official save (utils.py:146)
    return kind_dir / "saved_models" / "blip_mean.pt", without


def run_rerank_stage1(official: Path, inputs: Path, out: Path):
    import torch
    repo, cfg1, _ = _rerank_imports(official)
    import data_utils
    import validate
    from utils import extract_index_features
    torch.manual_seed(SEEDS["rerank-stage1"])
    model_base = out / "ckpt" / "blip-base" / "model_base.pth"
    model = _build_stage1(repo, cfg1, model_base)
    perturb(model, delta_prefixes=("",))
    # target features come from img_embed under torch.no_grad (stage1_train.py:397-403): vision_proj gets no grad
    ckpt, no_state = _save_rerank(model, out / "ckpt" / "rerank-stage1", "BLIP_Retrieval",
                        lambda name: not name.startswith("vision_proj."))
    del model

    # reference: validate.py __main__ flow (blip_stage1(pretrained) + load_state_dict(['BLIP_Retrieval']))
    model = _build_stage1(repo, cfg1, model_base)
    model.load_state_dict(torch.load(ckpt, map_location="cpu")["BLIP_Retrieval"])
    model = model.float().eval()
    rec = TokenizerRecorder(model.tokenizer)
    model.tokenizer = rec
    preprocess = data_utils.targetpad_transform(1.25, 384)
    spec, names, paths = load_inputs(inputs)
    tmp = Path(tempfile.mkdtemp(prefix="rerank1_", dir=out))
    try:
        write_cirr_annotations(tmp / "cirr_dataset", names, paths, spec["cirr_captions"])
        write_fiq_annotations(tmp / "fashionIQ_dataset", names, spec["fiq_captions"])
        data_utils.base_path = tmp
        with torch.no_grad():
            classic = data_utils.CIRRDataset("val", "classic", preprocess)
            index_features, index_features_p, index_names = extract_index_features(classic, model, blip_stage1=True)
            assert index_names == names
            relative = data_utils.CIRRDataset("val", "relative", preprocess)
            n_calls = len(rec.calls)
            q, ref_names, _, _ = validate.generate_cirr_val_predictions(model, relative, index_names, index_features)
            texts, enc, _ = rec.calls[n_calls]
            z_t = model.img_txt_fusion(index_features[:1], None, texts[:1], train=False, return_raw=True)
            fiq_rel = data_utils.FashionIQDataset("val", ["dress"], "relative", preprocess)
            n_calls = len(rec.calls)
            fq, _ = validate.generate_fiq_val_predictions(model, fiq_rel, index_names, index_features)
            fiq_texts, fiq_enc, _ = rec.calls[n_calls]
        pixels = pixels_from(preprocess, paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = {
        "texts": texts, "input_ids": enc["input_ids"].clone(), "attention_mask": enc["attention_mask"].clone(),
        "image_names": names, "pixels": pixels, "image_features": index_features_p,
        "query_features": q, "scores": q @ index_features_p.float().T,
        "vit_last_hidden": index_features, "vit_last_hidden_0": index_features[0],
        "z_t_0": z_t.last_hidden_state[0], "grounded_cls_0": z_t.last_hidden_state[0, 0],
        "fiq": {"category": "dress", "texts": fiq_texts, "input_ids": fiq_enc["input_ids"].clone(),
                "attention_mask": fiq_enc["attention_mask"].clone(), "query_features": fq,
                "scores": fq @ index_features_p.float().T},
        "meta": meta("rerank-stage1", repo, {
            "image_features": "img_embed(..., return_pool_and_normalized=True)[1] = normalize(vision_proj(CLS))",
            "query_features": "validate.generate_cirr_val_predictions: img_txt_fusion = normalize(text_proj(CLS)) "
                              "of the text encoder with [ENC] first, cross-attending the reference ViT tokens; "
                              "then F.normalize again",
            "scores": "query @ index_features_p.T (validate.py compute_cirr_val_metrics: distances = 1 - this)",
            "texts": "raw CIRR captions (no prepend); padding='longest' over the batch of 8; input_ids[:,0]=[ENC]",
            "z_t_0": "img_txt_fusion(ref 0, None, [caption 0], return_raw=True).last_hidden_state[0] (single "
                     "caption, no padding) = what stage II receives for query 0",
        }),
    }
    (out / "ref").mkdir(parents=True, exist_ok=True)
    torch.save(ref, out / "ref" / "rerank-stage1.pt")
    save_layout(out, "rerank-stage1", repo, {"saved_models/blip_mean.pt": {
        "saved_by": cite(repo, "src/utils.py", 146, "torch.save"),
        "called_from": cite(repo, "src/stage1_train.py", 499, "save_model('blip_mean'"),
        "class": "blip_stage1.BLIP_Retrieval(image_size=384, vit='base', vit_grad_ckpt=True, vit_ckpt_layer=4)",
        "optimizer_built_as": cite(repo, "src/stage1_train.py", 356, "torch.optim.AdamW"),
        "visual_frozen_by": cite(repo, "src/stage1_train.py", 327, "model.visual_encoder.parameters()"),
        "loaded_by": cite(repo, "src/validate.py", 390, 'load_state_dict(state_dict["BLIP_Retrieval"])'),
        "params_without_optimizer_state": no_state,
    }}, {})


def run_rerank_stage2(official: Path, inputs: Path, out: Path):
    import numpy as np
    import torch
    repo, cfg1, cfg2 = _rerank_imports(official)
    import data_utils
    import validate_stage2
    from utils import extract_index_features
    torch.manual_seed(SEEDS["rerank-stage2"])
    model_base = out / "ckpt" / "blip-base" / "model_base.pth"
    model = _build_stage2(repo, cfg2, model_base)
    # facts about the duplication at load (blip_stage2.load_checkpoint), before any perturbation
    sd = model.state_dict()
    lay = "text_encoder.encoder.layer.0."
    dup_equal = {
        "attention.self0.query.weight == attention.self1.query.weight":
            bool(torch.equal(sd[lay + "attention.self0.query.weight"], sd[lay + "attention.self1.query.weight"])),
        "crossattention.self0.key.weight == crossattention.self1.key.weight":
            bool(torch.equal(sd[lay + "crossattention.self0.key.weight"], sd[lay + "crossattention.self1.key.weight"])),
        "attention.output.LayerNormA.weight == LayerNormB.weight":
            bool(torch.equal(sd[lay + "attention.output.LayerNormA.weight"],
                             sd[lay + "attention.output.LayerNormB.weight"])),
    }
    base = torch.load(model_base, map_location="cpu")["model"]
    dup_equal["attention.self0.query.weight == model_base attention.self.query.weight"] = bool(torch.equal(
        sd[lay + "attention.self0.query.weight"], base[lay + "attention.self.query.weight"]))
    del base, sd
    perturb(model, delta_prefixes=("",))
    ckpt, no_state = _save_rerank(model, out / "ckpt" / "rerank-stage2", "BLIP_NLVR")
    del model

    # reference: validate_stage2.py __main__ flow
    stage1 = _build_stage1(repo, cfg1, model_base)
    stage1.load_state_dict(torch.load(out / "ckpt" / "rerank-stage1" / "saved_models" / "blip_mean.pt",
                                      map_location="cpu")["BLIP_Retrieval"])
    stage1 = stage1.float().eval()
    model = _build_stage2(repo, cfg2, model_base)
    model.load_state_dict(torch.load(ckpt, map_location="cpu")["BLIP_NLVR"])
    model = model.float().eval()
    rec1, rec2 = TokenizerRecorder(stage1.tokenizer), TokenizerRecorder(model.tokenizer)
    stage1.tokenizer, model.tokenizer = rec1, rec2
    preprocess = data_utils.targetpad_transform(1.25, 384)
    spec, names, paths = load_inputs(inputs)
    n = len(names)
    tmp = Path(tempfile.mkdtemp(prefix="rerank2_", dir=out))
    try:
        triplets = write_cirr_annotations(tmp / "cirr_dataset", names, paths, spec["cirr_captions"])
        sorted_names = np.array([names] * n)  # every query scores every image, in input order
        targets = [t["target_hard"] for t in triplets]
        labels = torch.tensor(sorted_names == np.array(targets)[:, None])
        members = [[m for m in t["img_set"]["members"] if m != t["reference"]] for t in triplets]
        group_labels = torch.tensor(np.array(members) == np.array(targets)[:, None])
        topk = tmp / "cirr_top_8_val.pt"
        torch.save({"sorted_index_names": sorted_names, "target_names": targets, "index_names": names,
                    "labels": labels, "group_labels": group_labels, "split": "val"}, topk)
        data_utils.base_path = tmp
        with torch.no_grad():
            classic = data_utils.CIRRDataset("val", "classic", preprocess, load_topk=str(topk), K=n)
            index_features, index_names = extract_index_features(classic, model, blip_stage2=True)
            assert index_names == names
            relative = data_utils.CIRRDataset("val", "relative", preprocess, load_topk=str(topk), K=n)
            logits, group_logits, ref_names, _, group_noref = validate_stage2.generate_cirr_val_predictions(
                model, stage1, relative, index_names, index_features)
            assert ref_names == names
            # query 0 spelled out with the same official calls (validate_stage2.py:242-252) for localisation
            r0 = index_features[:1]
            z_t = stage1.img_txt_fusion(r0, None, spec["cirr_captions"][:1], train=False, return_raw=True)
            logits_0 = model.img_txt_fusion_val(z_t, index_features, spec["cirr_captions"][:1])
        pixels = pixels_from(preprocess, paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    texts = [c[0][0] for c in rec2.calls[:n * 2:2]]  # per query: main call, then the group call
    ids2 = [c[1]["input_ids"].clone() for c in rec2.calls[:n * 2:2]]
    ids1 = [c[1]["input_ids"].clone() for c in rec1.calls[:n * 2:2]]
    ref = {
        "texts": texts, "input_ids": ids2, "input_ids_stage1": ids1, "image_names": names, "pixels": pixels,
        "image_features": index_features[:, 0, :], "vit_last_hidden": index_features,
        "vit_last_hidden_0": index_features[0],
        "scores": logits, "group_scores": group_logits, "group_members_noref": group_noref,
        "z_t_0": z_t.last_hidden_state[0], "scores_0_direct": logits_0,
        "meta": meta("rerank-stage2", repo, {
            "scores": "validate_stage2.generate_cirr_val_predictions: scores[i, j] = "
                      "BLIP_NLVR.img_txt_fusion_val(z_t_i, ViT2(image j), caption i) = cls_head(cat(CLS0, CLS1))[:, 0]; "
                      "candidates = all 8 images in input order (K=8 top-K file written for it)",
            "z_t": "stage-I text encoder ([ENC], grounded) last_hidden_state with the reference tokens from the "
                   "STAGE-II ViT (extract_index_features(classic, model, blip_stage2=True) feeds both): "
                   "validate_stage2.py:293 (index features) and :244 (z_t)",
            "image_features": "stage-II ViT CLS token (577x768 tokens in vit_last_hidden); stage II has no vision_proj",
            "group_scores": "the same for the 5 group members (img_set.members minus the reference)",
            "texts": "raw CIRR captions, tokenised one query at a time (padding='longest' on one caption)",
            "duplication_at_load_from_model_base": dup_equal,
        }),
    }
    (out / "ref").mkdir(parents=True, exist_ok=True)
    torch.save(ref, out / "ref" / "rerank-stage2.pt")
    save_layout(out, "rerank-stage2", repo, {"saved_models/blip_mean.pt": {
        "saved_by": cite(repo, "src/utils.py", 146, "torch.save"),
        "called_from": cite(repo, "src/stage2_train.py", 553, "save_model('blip_mean'"),
        "class": "blip_stage2.BLIP_NLVR(image_size=384 (configs/nlvr.yaml), vit='base', drop_path_rate=0.1)",
        "loaded_by": cite(repo, "src/validate_stage2.py", 360, 'load_state_dict(state_dict["BLIP_NLVR"])'),
        "optimizer_built_as": cite(repo, "src/stage2_train.py", 404, "torch.optim.AdamW"),
        "visual_frozen_by": cite(repo, "src/stage2_train.py", 372, "model.visual_encoder.parameters()"),
        "params_without_optimizer_state": no_state,
    }}, {"duplication_at_load": cite(repo, "src/blip_stage2.py", 161, "'crossattention.self.' in key"),
         "duplication_facts_before_perturbation": dup_equal})


# ------------------------------------------------------------------------------------------ SPN4CIR
def run_spn(official: Path, inputs: Path, out: Path):
    import torch
    repo = official / "SPN4CIR"
    src = repo / "blip4cir"
    sys.path.insert(0, str(src))
    install_common_standins()
    import blip_cir
    defaults = list(blip_cir.BLIP_Retrieval.__init__.__defaults__)
    defaults[0] = str(src / "configs/med_config.json")  # stand-in 5 (relative to the repo root there)
    blip_cir.BLIP_Retrieval.__init__.__defaults__ = tuple(defaults)
    import utils
    utils.extract_index_features.__defaults__ = (torch.device("cpu"),)  # stand-in 7
    import data_utils
    import validate
    from models import CIRPlus
    torch.manual_seed(SEEDS["spn-blip4cir"])
    model_base = out / "ckpt" / "blip-base" / "model_base.pth"
    stage1 = out / "ckpt" / "rerank-stage1" / "saved_models" / "blip_mean.pt"
    cpu = torch.device("cpu")
    # train.py main(): CIRPlus(blip_model_name, tau, transform, device, plus) + load_ckpt(stage-1, is_origin=True)
    model = CIRPlus(str(model_base), tau=0.02, transform="targetpad", device=cpu, plus=True)
    model.load_ckpt(str(stage1), True)
    perturb(model, delta_prefixes=("blip.",))  # every part, the frozen ViT included (see module docstring)
    with torch.no_grad():
        model.tau.add_(0.001)
    ckpt = out / "ckpt" / "spn-blip4cir" / "best.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    utils.save_model("best", 2, model, ckpt.parent)  # the official save (utils.py:64)
    del model

    # reference: validate.py __main__ (CIRPlus(blip_model_name); load_ckpt(model_path, load_origin=False))
    model = CIRPlus(str(model_base), device=cpu)
    model.eval()
    model.load_ckpt(str(ckpt), False)
    blip = model.blip.float().eval()
    rec = TokenizerRecorder(blip.tokenizer)
    blip.tokenizer = rec
    preprocess = data_utils.targetpad_transform(1.25, model.input_dim)
    spec, names, paths = load_inputs(inputs)
    tmp = Path(tempfile.mkdtemp(prefix="spn_", dir=out))
    try:
        write_cirr_annotations(tmp / "cirr", names, paths, spec["cirr_captions"])
        write_fiq_annotations(tmp / "fiq", names, spec["fiq_captions"])
        validate.args = argparse.Namespace(data_path=str(tmp / "cirr"), fiq_val_type=0)
        with torch.no_grad():
            classic = data_utils.CIRDataset("cirr", "val", "classic", preprocess, str(tmp / "cirr"))
            index_features, index_features_p, index_names = utils.extract_index_features(classic, blip)
            assert index_names == names
            relative = data_utils.CIRDataset("cirr", "val", "relative", preprocess, str(tmp / "cirr"))
            n_calls = len(rec.calls)
            q, ref_names, _, _ = validate.generate_cirr_val_predictions(blip, relative, index_names, index_features)
            texts, enc, _ = rec.calls[n_calls]
            assert ref_names == names
            z_t = blip.img_txt_fusion(index_features[:1], None, texts[:1], train=False, return_raw=True)
            fiq_rel = data_utils.CIRDataset("fiq", "val", "relative", preprocess, str(tmp / "fiq"), ["dress"])
            n_calls = len(rec.calls)
            fq, _ = validate.generate_fiq_val_predictions(blip, fiq_rel, index_names, index_features)
            fiq_texts, fiq_enc, _ = rec.calls[n_calls]
        pixels = pixels_from(preprocess, paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r1 = torch.load(out / "ref" / "rerank-stage1.pt", map_location="cpu")
    ref = {
        "texts": texts, "input_ids": enc["input_ids"].clone(), "attention_mask": enc["attention_mask"].clone(),
        "image_names": names, "pixels": pixels, "image_features": index_features_p,
        "query_features": q, "scores": q @ index_features_p.float().T,
        "vit_last_hidden_0": index_features[0], "z_t_0": z_t.last_hidden_state[0],
        "fiq": {"category": "dress", "texts": fiq_texts, "input_ids": fiq_enc["input_ids"].clone(),
                "attention_mask": fiq_enc["attention_mask"].clone(), "query_features": fq,
                "scores": fq @ index_features_p.float().T},
        "meta": meta("spn-blip4cir", repo, {
            "image_features_max_abs_diff_to_rerank_stage1": float((index_features_p - r1["image_features"]).abs().max()),
            "query_features": "validate.generate_cirr_val_predictions: BLIP_Retrieval.img_txt_fusion "
                              "(normalize(text_proj([ENC] CLS))), F.normalize again",
            "scores": "query @ index_features_p.T (validate.py compute_cirr_val_metrics)",
            "texts": "raw captions (CIRDataset val: captions[0]); FIQ: f\"{c1.strip('.?, ').capitalize()} and "
                     "{c2.strip('.?, ')}\" without any prepend",
            "weights": "started from ckpt/rerank-stage1/saved_models/blip_mean.pt (load_ckpt is_origin=True, "
                       "strict=False), then every tensor perturbed (the ViT too, although SPN's stage 2 trains on "
                       "cached image features and leaves it equal to stage I in a real run)",
        }),
    }
    (out / "ref").mkdir(parents=True, exist_ok=True)
    torch.save(ref, out / "ref" / "spn-blip4cir.pt")
    save_layout(out, "spn-blip4cir", repo, {"best.pt": {
        "saved_by": cite(repo, "blip4cir/utils.py", 64, "torch.save"),
        "called_from": cite(repo, "blip4cir/train.py", 191, "save_model('best'"),
        "class": "models.CIRPlus (blip = blip_cir.BLIP_Retrieval at 384 px, tau); no optimizer in the file",
        "loaded_by": cite(repo, "blip4cir/models.py", 43, "self.load_state_dict(saved_state_dict['state_dict']"),
    }}, {"stage1_source": "Candidate-Reranking-CIR stage-I blip_mean.pt ['BLIP_Retrieval'] loaded by " +
         cite(repo, "blip4cir/models.py", 41, 'saved_state_dict["BLIP_Retrieval"]')})


RUNNERS = {"blip-base": run_blip_base, "bi-blip4cir": run_bi_blip4cir, "rerank-stage1": run_rerank_stage1,
           "rerank-stage2": run_rerank_stage2, "spn-blip4cir": run_spn}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--_child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    official, inputs, out = args.official.resolve(), args.inputs.resolve(), args.out.resolve()
    if args._child:
        RUNNERS[args._child](official, inputs, out)
        return
    if not Path("bert-base-uncased/vocab.txt").is_file():
        sys.exit("run from a folder holding bert-base-uncased/ (the offline BERT tokenizer), e.g. /work/scratch/hf")
    for kind in [k for k in KINDS if k in args.kinds]:
        for dep in DEPENDS[kind]:
            if dep not in args.kinds and not (out / "ckpt" / dep / CKPT_FILES[dep][0]).is_file():
                sys.exit(f"{kind} needs {dep}'s checkpoint; run --kinds {dep} first")
        print(f"== {kind} (seed {SEEDS[kind]})", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--official", str(official), "--inputs", str(inputs),
               "--out", str(out), "--_child", kind]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
