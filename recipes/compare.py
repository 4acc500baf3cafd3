#!/usr/bin/env python
"""
Several methods over one noisy split, side by side (same clean rows, same noisy labels, same encoder and budget).

    python recipes/compare.py --methods mlc,finetune,clean_only --corpus ag_news --noise_type flip --noise_rate 0.4

Every other argument is a recipe argument (see recipes/train_agnews.py); outputs go to <output_dir>/<method>.
"""

import sys

from mlc_text.pipeline import compare


def split_methods(argv: list[str]) -> tuple[list[str], list[str]]:
    methods, rest = "mlc,finetune,clean_only", []
    iterator = iter(argv)
    for token in iterator:
        if token == "--methods":
            methods = next(iterator, "")
        elif token.startswith("--methods="):
            methods = token.split("=", 1)[1]
        else:
            rest.append(token)
    return [method for method in methods.split(",") if method], rest


if __name__ == "__main__":
    methods, argv = split_methods(sys.argv[1:])
    compare(methods, argv, defaults={"corpus": "ag_news"})
