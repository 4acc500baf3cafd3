#!/usr/bin/env python
"""
Several methods over one noisy split, side by side (same clean rows, same noisy labels, same encoder and budget).
The same as `mlc-text compare`.

    python recipes/compare.py --methods mlc,finetune,clean_only --noise_type flip --noise_rate 0.4   # AG News
    python recipes/compare.py --methods finetune,clean_only,mlc,l2rw --train_file my/train.jsonl \
        --test_file my/test.jsonl --noisy_label_column noisy_label --label_column label --noise_type none

Every other argument is a recipe argument (`--help` lists them); outputs go to <output_dir>/<method>. AG News is the
default corpus only when neither --corpus nor --train_file is given.
"""

import sys

from mlc_text.cli import run_command

if __name__ == "__main__":
    run_command("compare", sys.argv[1:], defaults={"corpus": "ag_news"})
