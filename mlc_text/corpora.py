"""
Loading text-classification corpora: a named corpus (local folder first, else the Hub) or your own files (csv,
json/jsonl, parquet), standardised to `text` and 0-based integer `label` columns (and `noisy_label` when a file holds
real noisy labels), with the class names. Splitting and corrupting them is data.py's.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

__all__ = [
    "CORPORA",
    "DATA_EXTENSIONS",
    "CorpusInfo",
    "get_corpus_info",
    "load_corpus",
    "load_user_files",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = ("jsonl", "json", "csv", "parquet")
_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
_INTEGER = re.compile(r"[+-]?\d+")


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
