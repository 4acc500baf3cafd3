"""
Data for training on noisy labels: from a corpus loaded by corpora.py, split the training rows into a small clean
(trusted) set and a noisy pool, corrupt the pool's labels with simulated noise (or use real noisy labels), take the
validation rows, and tokenize.

Columns after [`prepare_corpus`]:

- `train` (noisy rows): `text`, `label` (the noisy label, what is trained on), `true_label` (the original label; -1
  where unknown with real noise), `is_corrupted` (bool), `index` (row of the training file).
- `clean`: `text`, `label` (true), `true_label` (= `label`), `index`.
- `validation`: as `train` when held out of the noisy pool; as `clean` when taken from the clean set or a file.
- `test`: `text`, `label` (true).

Every random step draws from its own stream of `split_seed` (or `noise_seed`), so the same seeds give byte-identical
splits and noisy labels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

from .corpora import (
    CORPORA,
    DATA_EXTENSIONS,
    CorpusInfo,
    _add_column,
    _int_column,
    get_corpus_info,
    load_corpus,
    load_user_files,
    resolve_data_dir,
)
from .data_config import (
    VALIDATION_SOURCES,
    DataArguments,
    NoiseArguments,
    _check_fraction,
    _check_integer,
    _check_max_length,
)
from .noisy_labels import (
    _realised,
    _stream_seed,
    _use_real_noise,
    _with_true_label,
    add_label_noise,
    save_noise_report,
)

__all__ = [
    "CORPORA",
    "DATA_EXTENSIONS",
    "VALIDATION_SOURCES",
    "CorpusInfo",
    "NoisyCorpus",
    "add_label_noise",
    "get_corpus_info",
    "load_corpus",
    "load_user_files",
    "prepare_corpus",
    "resolve_data_dir",
    "save_noise_report",
    "split_clean_noisy",
    "tokenize_corpus",
]

logger = logging.getLogger(__name__)


@dataclass
class NoisyCorpus:
    """
    A corpus ready for training on noisy labels (column names in the module docstring).

    Args:
        train (`Dataset`): The noisy training rows.
        clean (`Dataset`): The clean (trusted) rows; may be empty when no clean rows were asked for.
        validation (`Dataset` or `None`): Validation rows.
        test (`Dataset` or `None`): Test rows.
        label_names (`list[str]`): Class names; label id i is `label_names[i]`.
        noise_report (`dict`): What noise was asked for and what was realised on `train` (see [`prepare_corpus`]).
        name (`str` or `None`): The corpus name (`custom` for user files).
        hub_id (`str` or `None`): The Hub id of a named corpus.
    """

    train: Dataset
    clean: Dataset
    validation: Dataset | None
    test: Dataset | None
    label_names: list[str]
    noise_report: dict[str, Any]
    name: str | None = None
    hub_id: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ------------------------------------------------------------------------------------------ clean / noisy split


def _class_name(label: int, label_names: Sequence[str] | None) -> str:
    return f"class {label} ({label_names[label]})" if label_names is not None else f"class {label}"


def _clean_counts(
    class_counts: np.ndarray,
    num_clean_per_class: int | None,
    clean_fraction: float | None,
    label_names: Sequence[str] | None,
) -> np.ndarray:
    """Clean rows wanted per class, after checking that each class can give them."""
    if (num_clean_per_class is None) == (clean_fraction is None):
        raise ValueError(
            "give exactly one of num_clean_per_class and clean_fraction, got "
            f"num_clean_per_class={num_clean_per_class!r} and clean_fraction={clean_fraction!r}"
        )
    if num_clean_per_class is not None:
        _check_integer("num_clean_per_class", num_clean_per_class, minimum=0)
        wanted = np.full(class_counts.size, num_clean_per_class, dtype=np.int64)
    else:
        _check_fraction("clean_fraction", clean_fraction)
        # Rounded half up, and at least one row, so that every class is represented.
        wanted = np.maximum(1, np.floor(clean_fraction * class_counts + 0.5)).astype(np.int64)
    if wanted.sum() == 0:
        return wanted
    for label, (have, want) in enumerate(zip(class_counts, wanted)):
        if have == 0:
            raise ValueError(f"{_class_name(label, label_names)} is missing from the training data (0 rows)")
        if have < want:
            raise ValueError(
                f"{_class_name(label, label_names)} has {have} training rows, fewer than the {want} clean rows asked"
            )
    return wanted


def split_clean_noisy(
    dataset: Dataset,
    num_classes: int,
    num_clean_per_class: int | None = None,
    clean_fraction: float | None = None,
    seed: int = 0,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> tuple[Dataset, Dataset]:
    """
    Splits rows into a clean (trusted) set, stratified by class, and the noisy pool (every other row).

    Rows whose label is negative (unknown true label) always go to the noisy pool.

    Args:
        dataset (`Dataset`): Rows with labels in 0..K-1 in `label_column`.
        num_classes (`int`): Number of classes K.
        num_clean_per_class (`int`, *optional*): Exactly this many clean rows per class (0 for none).
        clean_fraction (`float`, *optional*): Instead, `round(clean_fraction * class count)` rows per class (at
            least 1), with `clean_fraction` in (0, 1). Give exactly one of the two.
        seed (`int`, *optional*, defaults to 0): Seed of `np.random.default_rng` that picks the clean rows.
        label_column (`str`, *optional*, defaults to `"label"`): Column holding the true labels.
        label_names (sequence of `str`, *optional*): Class names, for error messages.

    Returns:
        `tuple[Dataset, Dataset]`: `(clean, noisy)`, both in the input's row order, each with an `index` column (the
        row's position in `dataset`, or the `index` column `dataset` already has) to check that they do not overlap.
    """
    labels = _int_column(dataset, label_column)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{label_column} must be in 0..{num_classes - 1}, got {labels.max()}")
    class_counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    wanted = _clean_counts(class_counts, num_clean_per_class, clean_fraction, label_names)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:want] for label, want in enumerate(wanted)]
    clean_rows = np.sort(np.concatenate(chosen)).astype(np.int64)
    noisy_rows = np.setdiff1d(np.arange(len(dataset)), clean_rows)
    if "index" not in dataset.column_names:
        dataset = _add_column(
            dataset, "index", np.arange(len(dataset), dtype=np.int64), feature=datasets.Value("int64")
        )
    return dataset.select(clean_rows), dataset.select(noisy_rows)


# ----------------------------------------------------------------------------------------------- prepare
def _load(data_args: DataArguments) -> tuple[DatasetDict, list[str], CorpusInfo | None]:
    if data_args.corpus is not None:
        raw, label_names = load_corpus(data_args.corpus, data_args.data_dir)
        return raw, label_names, get_corpus_info(data_args.corpus)
    raw, label_names = load_user_files(
        data_args.train_file,
        test_file=data_args.test_file,
        validation_file=data_args.validation_file,
        text_column=data_args.text_column,
        label_column=data_args.label_column,
        noisy_label_column=data_args.noisy_label_column,
    )
    return raw, label_names, None


def _shuffle(dataset: Dataset, seed: int) -> Dataset:
    """Adds `index` (the row in the file), then shuffles: the shared files are ordered by source."""
    dataset = _add_column(dataset, "index", np.arange(len(dataset), dtype=np.int64), feature=datasets.Value("int64"))
    return dataset.select(np.random.default_rng(_stream_seed(seed, "shuffle")).permutation(len(dataset)))


def _subset(dataset: Dataset | None, size: int | None, seed: int) -> Dataset | None:
    """A seeded random subset of `size` rows in their original order (the shared files are ordered by source)."""
    if dataset is None or not size or size >= len(dataset):  # None or 0: no cap
        return dataset
    return dataset.select(np.sort(np.random.default_rng(seed).choice(len(dataset), size=size, replace=False)))


def _clean_arguments(data_args: DataArguments) -> dict[str, Any]:
    # num_clean_per_class has a default (100), so an explicit clean_fraction takes precedence over it.
    if data_args.clean_fraction is not None:
        return {"clean_fraction": data_args.clean_fraction}
    return {"num_clean_per_class": data_args.num_clean_per_class or 0}


def _heldout_validation(pool: Dataset, size: int) -> tuple[Dataset, Dataset]:
    if size >= len(pool):
        raise ValueError(
            f"validation_size={size} leaves no noisy training rows (the noisy pool has {len(pool)}): lower "
            "validation_size, or use validation_source='clean' or 'none'"
        )
    if size > len(pool) // 2:
        logger.warning(f"the held-out validation split takes {size} of the {len(pool)} noisy rows")
    return pool.select(range(size)), pool.select(range(size, len(pool)))


def _clean_validation(clean: Dataset, size: int, data_args: DataArguments, label_names) -> tuple[Dataset, Dataset]:
    if size >= len(clean):
        raise ValueError(
            f"validation_size={size} must be smaller than the clean set ({len(clean)} rows) with "
            "validation_source='clean'"
        )
    seed = _stream_seed(data_args.split_seed, "clean_validation")
    validation, clean = split_clean_noisy(
        clean, len(label_names), clean_fraction=size / len(clean), seed=seed, label_names=label_names
    )
    return _with_true_label(validation), clean


def _validation_split(
    raw: DatasetDict, pool: Dataset, clean: Dataset, data_args: DataArguments, label_names: list[str]
) -> tuple[Dataset | None, Dataset, Dataset]:
    """`(validation, noisy pool, clean)` after taking validation rows from a file, the pool or the clean set."""
    if "validation" in raw:
        validation = _with_true_label(raw["validation"].select_columns(["text", "label"]))
    elif data_args.validation_source == "heldout":
        validation, pool = _heldout_validation(pool, data_args.validation_size)
    elif data_args.validation_source == "clean":
        validation, clean = _clean_validation(clean, data_args.validation_size, data_args, label_names)
    else:
        validation = None
    seed = _stream_seed(data_args.split_seed, "eval_subset")
    return _subset(validation, data_args.max_eval_samples, seed), pool, clean


def _noisy_pool(pool: Dataset, data_args: DataArguments, noise_args: NoiseArguments, matrix, num_classes: int):
    if data_args.noisy_label_column is not None:
        if noise_args.noise_type != "none":
            logger.warning(
                f"noisy_label_column={data_args.noisy_label_column!r} holds real noisy labels: "
                f"noise_type={noise_args.noise_type!r} is ignored, no simulated noise is added"
            )
        return _use_real_noise(pool, num_classes)
    return add_label_noise(
        pool, noise_args.noise_type, noise_args.noise_rate, num_classes, noise_args.noise_seed, matrix
    )


def prepare_corpus(data_args: DataArguments, noise_args: NoiseArguments) -> NoisyCorpus:
    """
    Loads, splits and corrupts a corpus. Every argument is checked before any data is read.

    Steps: shuffle the training rows (seeded by `split_seed`); take the clean rows, stratified by class
    (`clean_fraction` when set, else `num_clean_per_class`); corrupt the labels of the remaining rows (the noisy
    pool) with `noise_args`, or use the real noisy labels of `noisy_label_column`; take the validation rows
    (`validation_file` when given, else per `validation_source`: `heldout` takes the first `validation_size` rows of
    the pool, which keep their noisy `label`, as a practitioner's validation data would, and their `true_label`;
    `clean` takes about `validation_size` rows out of the clean set, stratified; `none`); keep the first
    `max_train_samples` noisy rows; draw `max_eval_samples` / `max_test_samples` seeded random rows.

    A row's noisy label depends only on the seeds and the row, not on `validation_size` or the caps.

    Args:
        data_args ([`DataArguments`]): Corpus or files, clean split, validation, caps and `split_seed`.
        noise_args ([`NoiseArguments`]): Noise type, rate, matrix and `noise_seed`.

    Returns:
        [`NoisyCorpus`]: Its `noise_report` holds `type`, `rate`, `seed`, `transition_matrix` (the matrix used;
        `None` for real noise) and the noise realised on the `train` rows (`realised_rate`, `expected_rate`,
        `counts`, `realised_matrix`, `true_class_counts`, `noisy_class_counts`, `num_rows`, `rows_with_true_label`),
        plus `rows` per split and `split_seed`.
    """
    data_args.check()
    known_classes = len(CORPORA[data_args.corpus].label_names) if data_args.corpus else None
    matrix = noise_args.check(known_classes)
    raw, label_names, info = _load(data_args)
    num_classes = len(label_names)
    noise_args.check(num_classes)
    train = _shuffle(raw["train"], data_args.split_seed)
    split_stream = _stream_seed(data_args.split_seed, "split")
    clean, pool = split_clean_noisy(
        train, num_classes, seed=split_stream, label_names=label_names, **_clean_arguments(data_args)
    )
    clean = clean.remove_columns([name for name in ("noisy_label",) if name in clean.column_names])
    pool, report = _noisy_pool(pool, data_args, noise_args, matrix, num_classes)
    validation, pool, clean = _validation_split(raw, pool, clean, data_args, label_names)
    train = pool.select(range(min(len(pool), data_args.max_train_samples or len(pool))))
    test = _subset(raw.get("test"), data_args.max_test_samples, _stream_seed(data_args.split_seed, "test_subset"))
    splits = {"train": train, "clean": _with_true_label(clean), "validation": validation, "test": test}
    report = _realised(report, train, num_classes)
    report["rows"] = {name: len(split) for name, split in splits.items() if split is not None}
    report["split_seed"] = data_args.split_seed
    return NoisyCorpus(
        **splits,
        label_names=label_names,
        noise_report=report,
        name=info.name if info else "custom",
        hub_id=info.hub_id if info else None,
    )


# ---------------------------------------------------------------------------------------------- tokenize
def tokenize_corpus(
    corpus: NoisyCorpus,
    tokenizer,
    max_length: int,
    main_process_first: contextlib.AbstractContextManager | None = None,
    overwrite_cache: bool = False,
) -> NoisyCorpus:
    """
    Tokenizes every split with truncation to `max_length` and no padding: pad per batch with a
    `DataCollatorWithPadding`, which is much cheaper than padding every row to `max_length`.

    Args:
        corpus ([`NoisyCorpus`]): From [`prepare_corpus`].
        tokenizer: A Hugging Face tokenizer.
        max_length (`int`): Tokens per text (>= 8); lowered to the tokenizer's `model_max_length` if above it.
        main_process_first (context manager, *optional*): Run inside it, e.g.
            `training_args.main_process_first(desc="tokenization")`, so that the main process fills the cache first.
        overwrite_cache (`bool`, *optional*, defaults to `False`): Recompute instead of loading cached results.

    Returns:
        [`NoisyCorpus`]: The same corpus with the tokenizer's columns (`input_ids`, `attention_mask`, ...) in place
        of `text`; `label`, `true_label`, `is_corrupted` and `index` are kept.
    """
    _check_max_length(max_length)
    if "text" not in corpus.train.column_names:
        raise ValueError(f"corpus.train has no text column (is it tokenized already?): {corpus.train.column_names}")
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length is not None and model_max_length < max_length:
        logger.warning(f"max_length={max_length} is above the tokenizer's limit; using {model_max_length}")
        max_length = model_max_length

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    with main_process_first if main_process_first is not None else contextlib.nullcontext():
        splits = {
            split: getattr(corpus, split).map(
                encode,
                batched=True,
                remove_columns=["text"],
                load_from_cache_file=not overwrite_cache,
                desc=f"Tokenizing {split}",
            )
            for split in ("train", "clean", "validation", "test")
            if getattr(corpus, split) is not None
        }
    return replace(corpus, **splits)
