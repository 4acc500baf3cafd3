#!/usr/bin/env python
"""
AG News (4 classes) with simulated label noise: MLC by default, or any baseline with --method.

    accelerate launch recipes/train_agnews.py                                   # offline defaults, ~5 min on 2 CPU cores
    accelerate launch recipes/train_agnews.py --method finetune --noise_type flip --noise_rate 0.4
    python recipes/train_agnews.py args.yaml                                    # every argument from a file
"""

from mlc_text.pipeline import main

if __name__ == "__main__":
    main({"corpus": "ag_news"})
