"""Every shipped real config, at real architecture size, on the CPU: 2 training steps and an evaluation.

The tests swap tiny backbones in; this builds BLIP ViT-B/16 at 384 px with BERT-base and CLIP
ViT-L/14 with random weights (the BERT WordPiece tokenizer for both: nothing is downloaded), makes
placeholder-image trees of the real annotation files (the first ``--queries`` queries of CIRR val
and of each FashionIQ val category, with every image they name; the val files also serve as the
training split) and a CIRCO-layout tree, and runs each config of ``configs/`` that names a real
dataset through ``cirlab train`` (2 steps, batch 4, validation at the end) or ``cirlab eval``, in
order of the chains (a Combiner over its stage I, a re-ranker over its filter, SPN over its first
stage, RTD over its Phi). Per config it records the seconds per training step (``s_per_step`` of
metrics.jsonl), the whole command's wall time and its peak memory (RSS), and prints one table;
``.ci/run`` runs it after the tests.

    python benchmarks/real_size_smoke.py --data ../shared/data --work /tmp/real-size --out real_size_smoke.json

``spn/*_generate.yaml`` (captions from an MLLM endpoint) is left out: it needs a captioner server.
The GPU profile of the same models at the papers' batch sizes is ``benchmarks/real_size.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STEPS = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.epochs=1", "trainer.num_workers=0",
         "trainer.log_every_steps=1", "trainer.eval_at_start=false", "trainer.precision=fp32",
         "trainer.checkpoint_every_steps=null", "trainer.eval_every_steps=null", "trainer.eval_every_epochs=1",
         "trainer.schedule={name: constant}"]
# (config, dataset, command, extra overrides with {run:NAME} for an earlier run's model folder)
PLAN = [
    ("zeroshot/cirr_zeroshot_blip.yaml", "cirr", "eval", []),
    ("zeroshot/fashioniq_zeroshot_clip.yaml", "fashioniq", "eval", []),
    ("bidirectional/cirr_text.yaml", "cirr", "train", []),
    ("bidirectional/cirr_combiner.yaml", "cirr", "train", ["model.backbone={run:bidirectional/cirr_text}"]),
    ("bidirectional/fashioniq_text.yaml", "fashioniq", "train", []),
    ("bidirectional/fashioniq_combiner.yaml", "fashioniq", "train",
     ["model.backbone={run:bidirectional/fashioniq_text}"]),
    ("rerank/cirr_filter.yaml", "cirr", "train", []),
    ("rerank/cirr_reranker.yaml", "cirr", "train", ["model.backbone={run:rerank/cirr_filter}",
                                                    "method.reranker_init={blip}", "method.eval_queries=4"]),
    ("rerank/fashioniq_filter.yaml", "fashioniq", "train", []),
    ("rerank/fashioniq_reranker.yaml", "fashioniq", "train", ["model.backbone={run:rerank/fashioniq_filter}",
                                                              "method.reranker_init={blip}", "method.eval_queries=4"]),
    ("spn/cirr_bank_filter.yaml", "cirr", "train", ["model.backbone={run:rerank/cirr_filter}"]),
    ("spn/cirr_bank_sum.yaml", "cirr", "train", ["model.backbone={run:bidirectional/cirr_text}"]),
    ("spn/cirr_bank_zeroshot.yaml", "cirr", "train", ["model.backbone={clip}"]),
    ("spn/fashioniq_bank_filter.yaml", "fashioniq", "train", ["model.backbone={run:rerank/fashioniq_filter}"]),
    ("spn/fashioniq_bank_sum.yaml", "fashioniq", "train", ["model.backbone={run:bidirectional/fashioniq_text}"]),
    ("spn/fashioniq_bank_zeroshot.yaml", "fashioniq", "train", ["model.backbone={clip}"]),
    ("projection/cirr_pic2word.yaml", "cirr", "train", []),
    ("projection/cirr_lincir.yaml", "cirr", "train", ["method.captions={work}/captions.txt"]),
    ("rtd/cirr_rtd.yaml", "cirr", "train", ["model.backbone={run:projection/cirr_lincir}",
                                                  "method.triplets={work}/triplets.json", "trainer.eval_every_steps=2"]),
]

# left out, with the reason: no model is trained, the cost is the captioner's (a served VLM)
NOT_PLANNED = {"spn/cirr_generate.yaml": "captions through a chat-model server",
               "spn/fashioniq_generate.yaml": "captions through a chat-model server"}


def unplanned() -> list[str]:
    """Shipped experiment configs on a real benchmark that the plan leaves out (a new one must be added)."""
    import yaml

    planned = {config for config, *_ in PLAN}
    real = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and isinstance(raw.get("method"), dict):
            if (raw.get("defaults") or {}).get("data") != "shapes":
                real.append(path.relative_to(REPO / "configs").as_posix())
    return [c for c in real if c not in planned and c not in NOT_PLANNED]


NEEDED = {k for *_, extra in PLAN for o in extra for k in re.findall(r"\{run:([^}]+)\}", o)}


def placeholder(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)


def cirr_tree(data: Path, out: Path, n: int, rng: np.random.Generator) -> Path:
    """cirr_dataset/ with the first ``n`` CIRR val queries as its val and train split."""
    queries = json.loads((data / "cirr" / "captions" / "cap.rc2.val.json").read_text())[:n]
    relpaths = json.loads((data / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    names = {x for q in queries for x in (q["reference"], q["target_hard"], *q["img_set"]["members"])}
    split = {name: relpaths[name] for name in sorted(names)}
    root = out / "cirr_dataset"
    for name in ("val", "train"):
        for sub, stem, obj in (("captions", "cap", queries), ("image_splits", "split", split)):
            (root / "cirr" / sub).mkdir(parents=True, exist_ok=True)
            (root / "cirr" / sub / f"{stem}.rc2.{name}.json").write_text(json.dumps(obj))
    for rel in split.values():
        placeholder(root / rel, rng)
    return root


def fashioniq_tree(data: Path, out: Path, n: int, rng: np.random.Generator) -> Path:
    """fashionIQ_dataset/ with the first ``n`` val queries of each category as its val and train split."""
    root = out / "fashionIQ_dataset"
    for category in ("dress", "shirt", "toptee"):
        queries = json.loads((data / "fashioniq" / "captions" / f"cap.{category}.val.json").read_text())[:n]
        ids = sorted({x for q in queries for x in (q["candidate"], q["target"])})
        for name in ("val", "train"):
            for sub, stem, obj in (("captions", "cap", queries), ("image_splits", "split", ids)):
                (root / sub).mkdir(parents=True, exist_ok=True)
                (root / sub / f"{stem}.{category}.{name}.json").write_text(json.dumps(obj))
        for image_id in ids:
            placeholder(root / "images" / f"{image_id}.png", rng)
    return root


def circo_tree(out: Path, n: int, rng: np.random.Generator) -> Path:
    """CIRCO/ in its layout: ``n`` val queries over a COCO-unlabeled gallery of 4 n images."""
    root = out / "CIRCO"
    images = [{"id": 1000 + i, "file_name": f"{1000 + i:012d}.jpg"} for i in range(4 * n)]
    queries = [{"id": q, "reference_img_id": 1000 + 4 * q, "target_img_id": 1001 + 4 * q,
                "gt_img_ids": [1001 + 4 * q, 1002 + 4 * q], "relative_caption": "is on a red table",
                "shared_concept": "a cup"} for q in range(n)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "val.json").write_text(json.dumps(queries))
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({"images": images}))
    for image in images:
        placeholder(root / "COCO2017_unlabeled" / "unlabeled2017" / image["file_name"], rng)
    return root


def backbones(work: Path) -> dict[str, Path]:
    """BLIP ViT-B/16 (384 px) + BERT-base and CLIP ViT-L/14, random weights, as backbone folders."""
    import torch

    from cirlab.models import blip_base_config, build_backbone, clip_config, save_backbone

    out = {"blip": work / "blip-base", "clip": work / "clip-vit-large-patch14"}
    for kind, config in (("blip", blip_base_config), ("clip", lambda: clip_config("ViT-L/14"))):
        if not (out[kind] / "config.json").is_file():
            torch.manual_seed(0)
            save_backbone(build_backbone(config()), out[kind])
    return out


def child(argv: list[str]) -> int:
    """Run one cirlab command in this process and print its peak RSS (for the parent to read)."""
    from cirlab.cli import main

    code = main(argv)
    print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    return code


def run_one(config: str, dataset: str, command: str, extra: list[str], roots: dict, work: Path,
            folders: dict, log) -> dict:
    name = config.removesuffix(".yaml")
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    fill = {"{blip}": str(folders["blip"]), "{clip}": str(folders["clip"]), "{work}": str(work),
            **{f"{{run:{k}}}": str(work / "runs" / k / "model") for k in done_runs(work)}}
    sets = []
    for s in extra:
        for key, value in fill.items():
            s = s.replace(key, value)
        sets.append(s)
    backbone = [f"model.backbone={folders['clip' if 'clip' in config or config.startswith(('projection/', 'rtd/')) else 'blip']}"]
    overrides = [f"data.root={roots[dataset]}", *backbone, *sets]
    argv = [command, "--config", str(REPO / "configs" / config), "--run-dir", str(run_dir)]
    argv += [f"--set={o}" for o in (overrides + (STEPS if command == "train" else []))]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log.write(f"### {config}\n{proc.stdout}\n{proc.stderr}\n")
    peak = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    row = {"config": config, "command": command, "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
           "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 2**20, 2)}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        steps = [r["s_per_step"] for r in map(json.loads, metrics.read_text().splitlines())
                 if r.get("event") == "train" and "s_per_step" in r]
        row["s_per_step"] = round(float(np.median(steps)), 2) if steps else None
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    # each run's checkpoints and, unless a later config builds on it, its model: real-size runs
    # take 1 to 5 GB each
    for checkpoint in run_dir.glob("*.pt"):
        checkpoint.unlink()
    if name not in NEEDED:
        shutil.rmtree(run_dir / "model", ignore_errors=True)
    return row


def done_runs(work: Path) -> list[str]:
    base = work / "runs"
    return [str(p.parent.parent.relative_to(base)) for p in base.rglob("model/composer.json")] if base.is_dir() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the real annotation files (cirr/, fashioniq/)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (data trees, backbones, runs)")
    parser.add_argument("--queries", type=int, default=8, help="val queries per dataset (per FashionIQ category)")
    parser.add_argument("--configs", nargs="+", help="only these configs (paths under configs/)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    missing = unplanned()
    if missing and not args.configs:
        print(f"real_size_smoke: shipped real configs missing from PLAN: {', '.join(missing)}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    roots = {"cirr": cirr_tree(args.data, args.work, args.queries, rng),
             "fashioniq": fashioniq_tree(args.data, args.work, args.queries, rng),
             "circo": circo_tree(args.work, args.queries, rng)}
    objects = ("dog", "car", "cup", "chair", "bird", "lamp")
    captions = [f"a {colour} {thing} on a table" for colour in ("red", "blue", "green") for thing in objects]
    (args.work / "captions.txt").write_text("\n".join(captions) + "\n")
    triplet = {"reference_caption": "a dog on a sofa", "conditioning_caption": "make it a cat",
               "target_caption": "a cat on a sofa"}
    (args.work / "triplets.json").write_text(json.dumps([triplet] * 16))
    folders = backbones(args.work)
    rows = []
    with open(args.work / "smoke.log", "w") as log:
        for config, dataset, command, extra in PLAN:
            if args.configs and config not in args.configs:
                continue
            row = run_one(config, dataset, command, extra, roots, args.work, folders, log)
            rows.append(row)
            print(json.dumps(row), flush=True)
        circo = run_circo(roots["circo"], args.work, folders, log)
        rows.append(circo)
        print(json.dumps(circo), flush=True)
    print("| config | status | s / step | wall s | peak RSS GB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['status']} | {r.get('s_per_step') or '-'} | {r['wall_s']} | {r['peak_rss_gb']} |")
    if args.out:
        args.out.write_text(json.dumps({"queries": args.queries, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def run_circo(root: Path, work: Path, folders: dict, log) -> dict:
    """The CIRCO layout through ``cirlab eval --model`` of the CLIP folder (its zero-shot model)."""
    out = work / "runs" / "circo"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["eval", "--model", str(folders["clip"]), "--dataset", "circo", "--root", str(root), "--split", "val",
            "--run-dir", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    log.write(f"### circo\n{proc.stdout}\n{proc.stderr}\n")
    peak = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    row = {"config": "circo (cirlab eval --model <CLIP folder>)", "command": "eval",
           "status": "ok" if proc.returncode == 0 and (out / "metrics.json").is_file() else f"exit {proc.returncode}",
           "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak / 2**20, 2)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return row


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
