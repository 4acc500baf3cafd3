#!/usr/bin/env python
"""
AG News (4 classes) with simulated label noise: MLC by default, or any baseline with --method.

    accelerate launch recipes/train_agnews.py                                   # offline defaults, ~5 min on 2 CPU cores
    accelerate launch recipes/train_agnews.py --method finetune --noise_type flip --noise_rate 0.4
    python recipes/train_agnews.py args.yaml                                    # every argument from a file
    python recipes/train_agnews.py --help                                       # every argument, MLC's own first

It evaluates five times per run on a quarter of the trusted rows (`EVALUATION_DEFAULTS` in mlc_text/arguments.py).
`--train_file` runs it on your own files instead of AG News (see docs/custom_corpus.md).
"""

from mlc_text.pipeline import EVALUATION_DEFAULTS, main

if __name__ == "__main__":
    main({**EVALUATION_DEFAULTS, "corpus": "ag_news"})
