#!/usr/bin/env bash
# cirlab as an installed library: a wheel built from the tree installs into a fresh virtualenv (torch's
# CPU wheel, then the wheel's declared dependencies pinned by requirements.lock) and, from a folder with no
# checkout, runs `cirlab --help`, `cirlab data synth`, a 2-step `cirlab pretrain` and `cirlab eval --config`
# of a shipped zero-shot config, both by their `configs/...` paths (found inside the installed package).
# A dependency missing from pyproject.toml or a config or static file left out of the wheel fails here.
# Usage: .ci/wheel_check.sh (from anywhere; PYTHON picks the interpreter of the fresh virtualenv).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
step() { echo "wheel check: $1 ($((SECONDS - t0)) s)"; }

# the files git knows (tracked, and new ones not ignored), copied: no build/ or egg-info in the checkout
# and no stale file of an earlier build in the wheel
mkdir "$work/tree"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf -) | tar -xf - -C "$work/tree"
"$repo/.venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$work/dist" "$work/tree" >/dev/null
wheel=$(ls "$work"/dist/cirlab-*.whl)
step "built $(basename "$wheel")"

"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -qq --no-compile --disable-pip-version-check torch==2.13.0
"$py" -m pip install -qq --no-compile --disable-pip-version-check "$wheel" -c "$repo/requirements.lock"
step "installed into a fresh virtualenv"

mkdir "$work/run" && cd "$work/run"  # no configs/ here: the package's own are used
export HF_HUB_OFFLINE=1 CIRLAB_DEVICE=cpu
"$py" - <<'EOF'
import importlib.resources, sysconfig
from pathlib import Path

import cirlab
from cirlab.config import CONFIG_ROOT

site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(cirlab.__file__).resolve().is_relative_to(site), f"cirlab imported from {cirlab.__file__}, not {site}"
assert CONFIG_ROOT.resolve().is_relative_to(site), CONFIG_ROOT
shipped = {p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIG_ROOT.rglob("*.yaml")}
for name in ("pretrain/shapes_blip.yaml", "zeroshot/shapes_zeroshot_blip.yaml", "serve/default.yaml"):
    assert name in shipped, f"{name} is not in the wheel ({len(shipped)} configs are)"
static = importlib.resources.files("cirlab") / "serving" / "static"
missing = [n for n in ("index.html", "app.js", "style.css") if not (static / n).is_file()]
assert not missing, f"serving/static/{missing} not in the wheel"
print(f"installed cirlab {cirlab.__version__}: {len(shipped)} configs and the web page's files")
EOF
cirlab="$work/venv/bin/cirlab"
"$cirlab" --help >/dev/null
"$cirlab" data synth --out shapes --train-scenes 8 --val-scenes 1 --test-scenes 2 --workers 1 >/dev/null
step "cirlab --help, cirlab data synth"
tiny="{embed_dim: 16, text_hidden: 32, text_layers: 1, text_heads: 2, vision_hidden: 16, stage_channels: [8, 8, 8, 8]}"
"$cirlab" pretrain --config configs/pretrain/shapes_blip.yaml --run-dir pretrain --set data.root=shapes \
    --set "model.small=$tiny" --set model.init_text=random --set trainer.max_steps=2 --set trainer.batch_size=16 \
    --set trainer.num_workers=0 --set method.eval_images=12 >pretrain.log 2>&1 || { cat pretrain.log; exit 1; }
"$cirlab" eval --config configs/zeroshot/shapes_zeroshot_blip.yaml --run-dir eval --set data.root=shapes \
    --set model.backbone=pretrain/backbone >eval.log 2>&1 || { cat eval.log; exit 1; }
"$py" -c "import json; m = json.load(open('eval/metrics.json')); assert set(m) == {'image', 'text', 'sum', 'grounded'}, m"
step "cirlab pretrain and cirlab eval --config configs/zeroshot/shapes_zeroshot_blip.yaml: passed"
