#!/usr/bin/env python
"""
Yelp reviews with simulated label noise: `--corpus yelp_polarity` (2 classes, the default) or `yelp_review_full`
(5 classes, 1-5 stars).

    accelerate launch recipes/train_yelp.py
    accelerate launch recipes/train_yelp.py --corpus yelp_review_full --num_clean_per_class 20
"""

from mlc_text.pipeline import main

if __name__ == "__main__":
    # The shared Yelp files are small (698 / 800 training rows): fewer clean rows per class leave noisy ones to learn.
    main({"corpus": "yelp_polarity", "num_clean_per_class": 50, "max_length": 128})
