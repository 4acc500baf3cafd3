#!/usr/bin/env python
"""
Yelp reviews with simulated label noise: `--corpus yelp_polarity` (2 classes, the default) or `yelp_review_full`
(5 classes, 1-5 stars).

    accelerate launch recipes/train_yelp.py
    accelerate launch recipes/train_yelp.py --corpus yelp_review_full --num_clean_per_class 20
"""

from mlc_text.pipeline import EVALUATION_DEFAULTS, main

if __name__ == "__main__":
    # The shared Yelp files are small (698 / 800 training rows): fewer clean rows per class leave noisy ones to learn,
    # and a quarter of the 2 x 50 of them validate.
    defaults = {"corpus": "yelp_polarity", "num_clean_per_class": 50, "max_length": 128, "validation_size": 25}
    main({**EVALUATION_DEFAULTS, **defaults})
