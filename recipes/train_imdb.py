#!/usr/bin/env python
"""
IMDB movie reviews (2 classes) with simulated label noise.

    accelerate launch recipes/train_imdb.py
    accelerate launch recipes/train_imdb.py --max_length 256 --max_train_samples 8000
"""

from mlc_text.pipeline import main

if __name__ == "__main__":
    main({"corpus": "imdb", "max_length": 128})
