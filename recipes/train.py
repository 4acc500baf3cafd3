#!/usr/bin/env python
"""
Any corpus from your own files (csv, json/jsonl or parquet), with simulated noise or with the noisy labels you have.
The same as `mlc-text train`.

    python recipes/train.py --train_file train.csv --test_file test.csv --text_column text --label_column label
    # real noise: the noisy labels in one column, true labels (where known, -1 or empty elsewhere) in another
    python recipes/train.py --train_file weak.jsonl --test_file gold_test.jsonl \
        --noisy_label_column weak_label --label_column gold_label --noise_type none

See docs/custom_corpus.md.
"""

from mlc_text.pipeline import EVALUATION_DEFAULTS, main

if __name__ == "__main__":
    main(EVALUATION_DEFAULTS)
