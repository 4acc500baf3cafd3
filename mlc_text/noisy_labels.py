"""
Noisy labels on a `datasets.Dataset`: simulated noise (class-conditional, from noise.py's transition matrices, or
instance-dependent, from instance_noise.py) or the real noisy labels of a user's column, with a report of the noise
realised; and the seeded random streams every data step draws from.
"""

from __future__ import annotations

import json
import os
from typing import Any

import datasets
import numpy as np
from datasets import Dataset

from .corpora import _add_column, _int_column
from .instance_noise import instance_dependent_noise
from .noise import build_transition_matrix, corrupt, noise_report

__all__ = ["add_label_noise", "save_noise_report"]

# One independent random stream per step, derived from the user's seed (see `_stream_seed`).
_STREAMS = {"shuffle": 0, "split": 1, "clean_validation": 2, "eval_subset": 3, "test_subset": 4, "corrupt": 5}


def _stream_seed(seed: int, stream: str) -> int:
    """An independent seed for one random step, so that changing one step leaves the others' draws unchanged."""
    return int(np.random.SeedSequence([int(seed), _STREAMS[stream]]).generate_state(1)[0])


def add_label_noise(
    noisy_dataset: Dataset,
    noise_type: str,
    noise_rate: float,
    num_classes: int,
    seed: int,
    matrix: Any = None,
) -> tuple[Dataset, dict[str, Any]]:
    """
    Corrupts the `label` column with simulated noise.

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
