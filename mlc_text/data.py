"""
Data for training on noisy labels: load a named corpus (local folder first, else the Hub) or your own files, split
the training rows into a small clean (trusted) set and a noisy pool, corrupt the pool's labels with simulated noise
(or use real noisy labels), and tokenize.

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
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from .instance_noise import instance_dependent_noise
from .noise import NOISE_TYPES, build_transition_matrix, corrupt, load_matrix, noise_report

if TYPE_CHECKING:
    from .config import DataArguments, NoiseArguments

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

DATA_EXTENSIONS = ("jsonl", "json", "csv", "parquet")
VALIDATION_SOURCES = ("heldout", "clean", "none")
MIN_MAX_LENGTH = 8
_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
_INTEGER = re.compile(r"[+-]?\d+")
# One independent random stream per step, derived from the user's seed (see `_stream_seed`).
_STREAMS = {"shuffle": 0, "split": 1, "clean_validation": 2, "eval_subset": 3, "test_subset": 4, "corrupt": 5}


@dataclass(frozen=True)
class CorpusInfo:
    """A named corpus: its short name, its Hub id and its class names (label id i is `label_names[i]`)."""

    name: str
    hub_id: str
    label_names: tuple[str, ...]


CORPORA: dict[str, CorpusInfo] = {
    info.name: info
    for info in (
        CorpusInfo("ag_news", "fancyzhx/ag_news", ("World", "Sports", "Business", "Sci/Tech")),
        CorpusInfo("yelp_polarity", "fancyzhx/yelp_polarity", ("negative", "positive")),
        CorpusInfo(
            "yelp_review_full", "Yelp/yelp_review_full", ("1 star", "2 stars", "3 stars", "4 stars", "5 stars")
        ),
        CorpusInfo("imdb", "stanfordnlp/imdb", ("neg", "pos")),
    )
}


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


# ------------------------------------------------------------------------------------------------ loading
def get_corpus_info(name: str) -> CorpusInfo:
    """The [`CorpusInfo`] of a named corpus; the error lists the accepted names."""
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {name!r}")
    return CORPORA[name]


def resolve_data_dir(data_dir: str | None = None) -> str | None:
    """The local data folder: `data_dir` if given, else the environment variable `MLC_TEXT_DATA_DIR`, else `None`."""
    return data_dir or os.environ.get("MLC_TEXT_DATA_DIR") or None


def _check_file(path: str, split: str) -> str:
    extension = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if extension not in _BUILDERS:
        raise ValueError(f"{split} file {path!r} must end in one of .{', .'.join(DATA_EXTENSIONS)}")
    if not os.path.isfile(path):
        raise ValueError(f"{split} file {path!r} does not exist")
    return _BUILDERS[extension]


def _read_file(path: str, split: str) -> Dataset:
    builder = _check_file(path, split)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{split} file {path!r} is empty: the {split} split needs at least one row")
    try:
        dataset = datasets.load_dataset(builder, data_files={split: path}, split=split)
    except Exception as error:
        if "corresponds to no data" in str(error):  # datasets' words for a header-only file
            raise ValueError(f"{split} file {path!r} has no rows: the {split} split needs at least one row") from error
        raise ValueError(f"could not read {split} file {path!r} ({type(error).__name__}: {error})") from error
    if len(dataset) == 0:
        raise ValueError(f"{split} file {path!r} has no rows: the {split} split needs at least one row")
    return dataset


def _find_split_file(folder: str, split: str) -> str | None:
    for extension in DATA_EXTENSIONS:
        path = os.path.join(folder, f"{split}.{extension}")
        if os.path.isfile(path):
            return path
    return None


def _is_offline() -> bool:
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def _where_to_put(info: CorpusInfo, data_dir: str | None) -> str:
    folder = os.path.join(data_dir or "<data_dir>", info.name)
    return (
        f"corpus {info.name!r} was not found locally and the Hub ({info.hub_id}) cannot be reached. Put its files at "
        f"{os.path.join(folder, 'train.jsonl')} and {os.path.join(folder, 'test.jsonl')} (rows like "
        '{"text": ..., "label": 0}; .json, .csv and .parquet work too) and pass --data_dir, or set the environment '
        "variable MLC_TEXT_DATA_DIR to that folder"
    )


def _load_from_hub(info: CorpusInfo, data_dir: str | None) -> DatasetDict:
    try:
        # Offline, this still succeeds when the Hub copy is in the local cache.
        loaded = datasets.load_dataset(info.hub_id)
    except Exception as error:
        if _is_offline() or isinstance(error, (ConnectionError, TimeoutError)) or "connect" in str(error).lower():
            raise ValueError(_where_to_put(info, data_dir)) from error
        raise
    return DatasetDict({split: loaded[split] for split in ("train", "test")})


def load_corpus(name: str, data_dir: str | None = None) -> tuple[DatasetDict, list[str]]:
    """
    Loads a named corpus: from `<data_dir>/<name>/train.{jsonl,json,csv,parquet}` and `test.*` when that folder
    exists, else from the Hub.

    Args:
        name (`str`): One of `CORPORA` (`ag_news`, `yelp_polarity`, `yelp_review_full`, `imdb`).
        data_dir (`str`, *optional*): Local data folder; defaults to the environment variable `MLC_TEXT_DATA_DIR`.

    Returns:
        `tuple[DatasetDict, list[str]]`: Splits `train` and `test` with columns `text` and `label` (int64, checked
        to lie in 0..K-1), and the class names.
    """
    info = get_corpus_info(name)
    data_dir = resolve_data_dir(data_dir)
    folder = os.path.join(data_dir, name) if data_dir else None
    paths = {split: _find_split_file(folder, split) for split in ("train", "test")} if folder else {}
    if any(paths.values()):
        missing = [split for split, path in paths.items() if path is None]
        if missing:
            raise ValueError(f"{folder!r} has no {missing[0]}.{{{','.join(DATA_EXTENSIONS)}}} file")
        raw = {split: _read_file(path, split) for split, path in paths.items()}
        logger.info(f"Loaded {name} from {folder}")
    else:
        raw = dict(_load_from_hub(info, data_dir))
    return _standardise(raw, "text", "label", label_names=list(info.label_names))


def load_user_files(
    train_file: str,
    test_file: str | None = None,
    validation_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    noisy_label_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[DatasetDict, list[str]]:
    """
    Loads your own files (csv, json/jsonl or parquet, by extension).

    Labels may be integers (0..K-1, with K = the largest training label + 1, or `len(label_names)`) or strings
    (mapped to ids in sorted order, numerically when they all look like integers; the same mapping for every split).
    With `noisy_label_column`, the training file's `label_column` holds the true labels where known: missing values
    (empty, null, or -1) become -1.

    Args:
        train_file (`str`): Training rows.
        test_file (`str`, *optional*): Test rows (true labels).
        validation_file (`str`, *optional*): Validation rows (true labels).
        text_column (`str`, *optional*, defaults to `"text"`): Column holding the text.
        label_column (`str`, *optional*, defaults to `"label"`): Column holding the (true) label.
        noisy_label_column (`str`, *optional*): Training column holding real noisy labels.
        label_names (sequence of `str`, *optional*): Known class names; integer labels must then lie in
            0..len(label_names)-1 and string labels must be among them.

    Returns:
        `tuple[DatasetDict, list[str]]`: Splits with columns `text`, `label` (int64) and, where the file has it,
        `noisy_label` (int64); and the class names.
    """
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: path for split, path in files.items() if path is not None}
    for split, path in files.items():  # refuse every bad path before reading any file
        _check_file(path, split)
    if noisy_label_column is not None and noisy_label_column == label_column:
        raise ValueError(f"noisy_label_column must differ from label_column, both are {label_column!r}")
    raw = {split: _read_file(path, split) for split, path in files.items()}
    return _standardise(raw, text_column, label_column, noisy_label_column, label_names, files)


# --------------------------------------------------------------------------------------- label validation
def _values(dataset: Dataset, column: str) -> list:
    """A column as a Python list, read in one batch (iterating a `Dataset` column goes row by row)."""
    return dataset.select_columns([column])[:][column]


def _add_column(dataset: Dataset, name: str, values: Any, feature: datasets.Value | None = None) -> Dataset:
    if len(dataset) == 0:  # datasets cannot add a column to an empty selection of a larger table
        dataset = Dataset.from_dict({column: [] for column in dataset.column_names}, features=dataset.features)
    return dataset.add_column(name, values, feature=feature)


def _int_column(dataset: Dataset, column: str) -> np.ndarray:
    return np.asarray(dataset.select_columns([column]).with_format("arrow")[:][column].to_numpy(), dtype=np.int64)


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def _is_unknown(value: Any) -> bool:
    """A missing true label, or -1: allowed in the true-label column of a real-noise training file."""
    return _is_missing(value) or (not isinstance(value, bool) and str(value).strip() in ("-1", "-1.0"))


def _label_kind(value: Any, where: str) -> str | None:
    """`None` for a missing value, else `int`, `intstr` (a string like "3") or `str`."""
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"labels must be integers or strings, got the boolean {value!r} in {where}")
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer():
            return "int"
        raise ValueError(f"labels must be whole numbers or strings, got {value!r} in {where}")
    if isinstance(value, str):
        return "intstr" if _INTEGER.fullmatch(value.strip()) else "str"
    raise ValueError(f"labels must be integers or strings, got {type(value).__name__} {value!r} in {where}")


@dataclass
class _LabelColumn:
    split: str
    column: str
    values: list
    allow_unknown: bool  # the true labels of a real-noise training file: missing or -1 means unknown

    def where(self, row: int) -> str:
        return f"{self.split} column {self.column!r} (row {row})"

    def known(self):
        """`(row, value)` of every label that is not an allowed unknown."""
        return (
            (row, value) for row, value in enumerate(self.values) if not (self.allow_unknown and _is_unknown(value))
        )


def _column_kinds(columns: list[_LabelColumn]) -> dict[str, tuple[Any, str]]:
    """Each kind of label found, with a first example and where it is."""
    kinds: dict[str, tuple[Any, str]] = {}
    for column in columns:
        for row, value in column.known():
            kind = _label_kind(value, column.where(row))
            if kind is None:
                raise ValueError(f"missing label in {column.where(row)}: every row needs a label")
            kinds.setdefault(kind, (value, column.where(row)))
    if len(kinds) > 1:
        examples = " and ".join(f"{value!r} in {where}" for value, where in kinds.values())
        raise ValueError(f"labels mix integers and strings ({examples}); use one type (ids 0..K-1 or class names)")
    return kinds


def _integer_classes(columns: list[_LabelColumn], label_names: Sequence[str] | None) -> list[str]:
    train_ids = [int(value) for column in columns if column.split == "train" for _, value in column.known()]
    num_classes = len(label_names) if label_names is not None else max(train_ids) + 1
    basis = "the given label_names" if label_names is not None else "K = the largest training label + 1"
    for column in columns:
        for row, value in column.known():
            if not 0 <= int(value) < num_classes:
                raise ValueError(
                    f"labels must be in 0..{num_classes - 1} ({basis}), got {value!r} in {column.where(row)}"
                )
    return list(label_names) if label_names is not None else [str(index) for index in range(num_classes)]


def _string_classes(columns: list[_LabelColumn], label_names: Sequence[str] | None, kind: str) -> list[str]:
    if label_names is not None:
        return list(label_names)
    seen = {str(value).strip() for column in columns if column.split == "train" for _, value in column.known()}
    return sorted(seen, key=int) if kind == "intstr" else sorted(seen)


def _encode(column: _LabelColumn, mapping: dict[str, int] | None) -> np.ndarray:
    """Label ids (-1 for an allowed unknown); string labels must be in `mapping`."""
    ids = np.full(len(column.values), -1, dtype=np.int64)
    for row, value in column.known():
        if mapping is None:
            ids[row] = int(value)
        elif str(value).strip() in mapping:
            ids[row] = mapping[str(value).strip()]
        else:
            raise ValueError(
                f"label {value!r} in {column.where(row)} is not among the training labels {list(mapping)}"
            )
    return ids


def _label_classes(columns: list[_LabelColumn], label_names: Sequence[str] | None) -> tuple[list[str], dict | None]:
    """The class names, and the name -> id mapping of string labels (`None` for integer labels)."""
    kinds = _column_kinds(columns)
    if not any(True for column in columns if column.split == "train" for _ in column.known()):
        raise ValueError("the training file has no known label: at least one row needs a label")
    kind = next(iter(kinds))
    if kind == "int":
        return _integer_classes(columns, label_names), None
    names = _string_classes(columns, label_names, kind)
    return names, {name: index for index, name in enumerate(names)}


# ------------------------------------------------------------------------------------- column standardising
def _check_columns(dataset: Dataset, split: str, source: str, required: list[str]) -> None:
    for column in required:
        if column not in dataset.column_names:
            raise ValueError(
                f"column {column!r} not found in {split} ({source}); its columns are: {', '.join(dataset.column_names)}"
            )


def _text_only(dataset: Dataset, column: str, split: str) -> Dataset:
    """The text column alone, renamed `text`, after checking it holds strings and no nulls (kept memory-mapped)."""
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"text column {column!r} must hold strings, got {feature} in {split}")
    nulls = pc.is_null(dataset.data.column(column)).to_numpy(zero_copy_only=False)
    if nulls.any():
        raise ValueError(
            f"text column {column!r} has {int(nulls.sum())} missing value(s) in {split}, first at row {nulls.argmax()}"
        )
    texts = dataset.select_columns([column])
    return texts if column == "text" else texts.rename_column(column, "text")


def _standardise(
    raw: dict[str, Dataset],
    text_column: str,
    label_column: str,
    noisy_label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    files: dict[str, str] | None = None,
) -> tuple[DatasetDict, list[str]]:
    """Checks columns and labels of every split, then rebuilds each as `text`, `label` (and `noisy_label`)."""
    label_columns = []
    for split, dataset in raw.items():
        source = f"file {files[split]!r}" if files else "the corpus"
        noisy = noisy_label_column if noisy_label_column in dataset.column_names or split == "train" else None
        _check_columns(dataset, split, source, [text_column, label_column] + ([noisy] if noisy else []))
        label_columns.append(_LabelColumn(split, label_column, _values(dataset, label_column), noisy is not None))
        if noisy:
            label_columns.append(_LabelColumn(split, noisy, _values(dataset, noisy), False))
    names, mapping = _label_classes(label_columns, label_names)
    if len(names) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, the labels hold {len(names)}: {names}")
    encoded: dict[str, dict[str, np.ndarray]] = {split: {} for split in raw}
    for column in label_columns:
        encoded[column.split]["label" if column.column == label_column else "noisy_label"] = _encode(column, mapping)
    standard = {}
    for split, dataset in raw.items():
        standard[split] = _text_only(dataset, text_column, split)
        for name, ids in encoded[split].items():
            standard[split] = standard[split].add_column(name, ids, feature=datasets.Value("int64"))
    return DatasetDict(standard), names


# ------------------------------------------------------------------------------------------ clean / noisy split
def _stream_seed(seed: int, stream: str) -> int:
    """An independent seed for one random step, so that changing one step leaves the others' draws unchanged."""
    return int(np.random.SeedSequence([int(seed), _STREAMS[stream]]).generate_state(1)[0])


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


# ------------------------------------------------------------------------------------------------- noise
def add_label_noise(
    noisy_dataset: Dataset,
    noise_type: str,
    noise_rate: float,
    num_classes: int,
    seed: int,
    matrix: Any = None,
) -> tuple[Dataset, dict[str, Any]]:
    """
    Corrupts the `label` column with simulated class-conditional noise.

    Args:
        noisy_dataset (`Dataset`): Rows whose `label` holds the true labels.
        noise_type (`str`): `uniform`, `flip`, `matrix` or `none` (see [`~noise.build_transition_matrix`]), or
            `instance` (see [`~instance_noise.instance_dependent_noise`]; needs a `text` column).
        noise_rate (`float`): Noise rate in [0, 1].
        num_classes (`int`): Number of classes K.
        seed (`int`): Seed of the flip targets and (through its own stream) of the corruption.
        matrix (array-like or `str`, *optional*): The transition matrix for `noise_type="matrix"`.

    Returns:
        `tuple[Dataset, dict]`: The rows with `true_label` (the original), `label` (the noisy label) and
        `is_corrupted` (bool); and the report: `type`, `rate`, `seed`, `transition_matrix` (the matrix used) and the
        realised noise of [`~noise.noise_report`] (`realised_rate`, `expected_rate`, `counts`, `realised_matrix`,
        class counts).
    """
    if "true_label" in noisy_dataset.column_names:
        raise ValueError("noisy_dataset already has a true_label column: its labels were corrupted before")
    true = _int_column(noisy_dataset, "label")
    if noise_type == "instance":
        if "text" not in noisy_dataset.column_names:
            raise ValueError("noise_type='instance' needs the rows' text (a `text` column) to fit its weak model")
        noisy = instance_dependent_noise(noisy_dataset["text"], true, num_classes, noise_rate, seed)
        transition = None
    else:
        transition = build_transition_matrix(noise_type, noise_rate, num_classes, seed, matrix)
        noisy = true.copy() if noise_type == "none" else corrupt(true, transition, _stream_seed(seed, "corrupt"))
    dataset = _relabel(noisy_dataset.rename_column("label", "true_label"), noisy, true)
    report = {
        "type": noise_type,
        "rate": noise_rate,
        "seed": seed,
        "transition_matrix": None if transition is None else transition.tolist(),
    }
    return dataset, {**report, **noise_report(true, noisy, num_classes, transition)}


def _relabel(dataset: Dataset, noisy: np.ndarray, true: np.ndarray) -> Dataset:
    dataset = _add_column(dataset, "label", noisy, feature=datasets.Value("int64"))
    return _add_column(dataset, "is_corrupted", (true >= 0) & (noisy != true), feature=datasets.Value("bool"))


def _use_real_noise(dataset: Dataset, num_classes: int) -> tuple[Dataset, dict[str, Any]]:
    """Rows of a real-noise corpus: `noisy_label` becomes `label`, the true `label` (-1 if unknown) `true_label`."""
    true = _int_column(dataset, "label")
    noisy = _int_column(dataset, "noisy_label")
    dataset = _relabel(dataset.remove_columns("noisy_label").rename_column("label", "true_label"), noisy, true)
    return dataset, {"type": "real", "rate": None, "seed": None, "transition_matrix": None}


def _realised(report: dict[str, Any], dataset: Dataset, num_classes: int) -> dict[str, Any]:
    """The report's realised statistics recomputed on `dataset` (rows with a known true label)."""
    true = _int_column(dataset, "true_label")
    noisy = _int_column(dataset, "label")
    known = true >= 0
    matrix = report.get("transition_matrix")
    realised = noise_report(true[known], noisy[known], num_classes, matrix)
    return {**report, **realised, "rows_with_true_label": int(known.sum())}


def _with_true_label(dataset: Dataset) -> Dataset:
    return _add_column(dataset, "true_label", _int_column(dataset, "label"), feature=datasets.Value("int64"))


def save_noise_report(report: dict[str, Any], path: str) -> str:
    """
    Writes a noise report as indented JSON, creating the parent folder.

    Args:
        report (`dict`): A report from [`add_label_noise`] or `NoisyCorpus.noise_report`.
        path (`str`): The `.json` file to write.

    Returns:
        `str`: `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=_json_default)
        handle.write("\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# -------------------------------------------------------------------------------------- argument checks
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
    _check_data_arguments(data_args)
    known_classes = len(CORPORA[data_args.corpus].label_names) if data_args.corpus else None
    matrix = _check_noise_arguments(noise_args, known_classes)
    raw, label_names, info = _load(data_args)
    num_classes = len(label_names)
    _check_noise_arguments(noise_args, num_classes)
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
