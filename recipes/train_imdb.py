#!/usr/bin/env python
"""
IMDB movie reviews (2 classes) with simulated label noise.

    accelerate launch recipes/train_imdb.py
    accelerate launch recipes/train_imdb.py --max_length 256 --max_train_samples 8000
"""

from mlc_text.pipeline import EVALUATION_DEFAULTS, main

if __name__ == "__main__":
    # Two classes: 50 validation rows are a quarter of the 2 x 100 clean rows, as with AG News.
    main({**EVALUATION_DEFAULTS, "corpus": "imdb", "max_length": 128, "validation_size": 50})
