#!/bin/bash
# One lent GPU call: set up (setup.sh), the step-cost benchmark, then an accuracy grid cut at a deadline. It runs
# from the repo root on the device with an ignored folder .gpu/ carried beside the tree, holding this script,
# setup.sh, wheels of the packages the device lacks, MiniLM's tokenizer and config with its weights in fp16 (to fit
# the transfer limit) and AG News gzipped. Its results go to $OUT (bench/results/*-gpu.jsonl and *-cuda.json when
# kept). On a GPU machine with the package installed, the same grid is just the bench/accuracy.py calls below.
#   bash .gpu/run.sh            on the device ($OUT set, python3 with CUDA torch)
#   SKIP_WHEEL=multiprocess SMOKE=1 PY=.venv/bin/python OUT=/tmp/gpu-out bash .gpu/run.sh   plumbing check on CPU
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-out}
PY=${PY:-python3}
DEADLINE=$((T0 + ${GRID_SECONDS:-565}))   # workers get no new run after this; in-flight runs are killed
mkdir -p "$OUT" /tmp/logs /tmp/runs
SETUP=$OUT/setup.txt
PY=$PY bash -e .gpu/setup.sh >"$SETUP" 2>&1 || { echo "setup failed"; tail -30 "$SETUP"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD MLC_TEXT_DATA_DIR=/tmp/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
$PY - >>"$SETUP" 2>&1 <<'EOF' || { echo "import check failed"; tail -30 "$SETUP"; exit 1; }
import importlib, torch
for name in ("torch", "transformers", "datasets", "accelerate", "evaluate", "tokenizers", "pyarrow", "fsspec",
             "huggingface_hub", "sklearn", "numpy"):
    print(name, importlib.import_module(name).__version__)
import mlc_text, transformers
from transformers import AutoModelForSequenceClassification
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
m = AutoModelForSequenceClassification.from_pretrained("/tmp/minilm", num_labels=4)
print("minilm loaded", sum(p.numel() for p in m.parameters()), next(m.parameters()).dtype)
EOF
echo "setup done in $(( $(date +%s) - T0 )) s"; tail -14 "$SETUP"

if [ -z "$SMOKE" ]; then
  git rev-parse --short HEAD 2>&1 | head -1
  timeout 120 $PY bench/step_cost.py --device cuda --model minilm --model bert-base-random \
    --output "$OUT/step_cost-cuda.json" >"$OUT/step_cost.log" 2>&1
  echo "step_cost rc $? at $(( $(date +%s) - T0 )) s"; tail -25 "$OUT/step_cost.log"
  cp bench/results/epoch_cost-cuda.json "$OUT/" 2>/dev/null
fi

COMMON="--corpora ag_news --max_train_samples 4000 --runs_dir /tmp/runs --output $OUT/accuracy-gpu.jsonl"
[ -n "$SMOKE" ] && COMMON="$COMMON --max_train_samples 200 --max_test_samples 64 --validation_size 40"
C1="--noise_types flip --noise_rates 0.4 --clean_per_class 20 --epochs 1"
C2="--noise_types flip --noise_rates 0.6 --clean_per_class 100 --epochs 1"
C3="--noise_types flip --noise_rates 0.4 --clean_per_class 100 --epochs 1"
C4="--noise_types uniform --noise_rates 0.8 --clean_per_class 100 --epochs 1"
C5="--noise_types uniform --noise_rates 0.8 --clean_per_class 20 --epochs 1"
C6="--noise_types flip --noise_rates 0.4 --clean_per_class 100 --epochs 3"
C7="--noise_types uniform --noise_rates 0.8 --clean_per_class 100 --epochs 3"
SKIP="--methods mlc --meta_learning_rates 3e-4 --mlc_settings skip_connection=true"

acc() {  # one bench/accuracy.py call, cut at the deadline
  local left=$((DEADLINE - $(date +%s)))
  [ $left -lt 15 ] && return 0
  timeout $left $PY bench/accuracy.py $COMMON "$@" || echo "accuracy.py rc $? ($*)"
}
cell() {  # all methods of one cell at one seed, the likeliest-read first
  local seed=$1; shift
  acc --seeds $seed "$@" --methods finetune clean_only
  acc --seeds $seed "$@" $SKIP
  acc --seeds $seed "$@" --methods oracle mlc glc l2rw --meta_learning_rates 3e-5
}
worker_a() { for c in "$C1" "$C3" "$C5" "$C7"; do cell $1 $c; done; }
worker_b() { for c in "$C2" "$C4" "$C6"; do cell $1 $c; done; }
worker_bf16() { acc --seeds 0 1 2 $C1 $SKIP bf16=true; }
worker_gsteps() { acc --seeds 0 1 2 $C1 $SKIP gradient_steps=3; }
worker_skiplr() { for c in "$C1" "$C5"; do acc --seeds 0 1 2 $c $SKIP skip_learning_rate=0.03; done; }

collect() {
  for f in /tmp/logs/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | tail -n 12; done >"$OUT/log.txt" 2>&1
  $PY - >"$OUT/skip_weights.jsonl" 2>/dev/null <<'EOF'
import glob, json, os
for path in sorted(glob.glob("/tmp/runs/*/trainer_state.json")):
    history = json.load(open(path))["log_history"]
    weights = [entry["skip_weight"] for entry in history if "skip_weight" in entry]
    if weights:
        print(json.dumps({"run": os.path.basename(os.path.dirname(path)), "first": weights[0], "last": weights[-1],
                          "min": min(weights), "max": max(weights)}))
EOF
}

WORKERS=()
for s in 0 1 2; do
  worker_a $s >/tmp/logs/a$s.log 2>&1 & WORKERS+=($!)
  worker_b $s >/tmp/logs/b$s.log 2>&1 & WORKERS+=($!)
done
worker_bf16 >/tmp/logs/bf16.log 2>&1 & WORKERS+=($!)
worker_gsteps >/tmp/logs/gsteps.log 2>&1 & WORKERS+=($!)
worker_skiplr >/tmp/logs/skiplr.log 2>&1 & WORKERS+=($!)
( while sleep 20; do collect; done ) &
COLLECTOR=$!
wait "${WORKERS[@]}"
kill $COLLECTOR 2>/dev/null
pkill -f recipes/train.py
collect
echo "grid done at $(( $(date +%s) - T0 )) s: $(wc -l <"$OUT/accuracy-gpu.jsonl" 2>/dev/null) runs"
cat "$OUT/log.txt" | tail -60
