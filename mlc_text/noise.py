"""
Simulated label noise in pure numpy: class-conditional transition matrices, seeded corruption, and a report of the
noise actually realised. No Hugging Face imports, so the maths can be read and tested on its own.

A transition matrix `C` is K x K with `C[i, j] = P(noisy label = j | true label = i)`; each row sums to 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLASS_CONDITIONAL",
    "NOISE_TYPES",
    "build_transition_matrix",
    "confusion_counts",
    "corrupt",
    "flip_matrix",
    "load_matrix",
    "noise_report",
    "uniform_matrix",
    "validate_transition_matrix",
]

NOISE_TYPES = ("uniform", "flip", "matrix", "instance", "none")
# Noise types drawn row by row from a transition matrix (`instance` depends on the text: see instance_noise.py).
CLASS_CONDITIONAL = ("uniform", "flip", "matrix", "none")


def _check_num_classes(num_classes: int, minimum: int = 1) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < minimum:
        raise ValueError(f"num_classes must be an integer >= {minimum}, got {num_classes!r}")


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {rate!r}")


def uniform_matrix(num_classes: int, rate: float) -> np.ndarray:
    r"""
    Uniform noise as in the MLC paper (and GLC): with probability `rate` the label is redrawn uniformly over all K
    classes, so `C = rate / K * ones + (1 - rate) * I`.

    The redraw can land on the true class, so the expected share of labels that change is `rate * (K - 1) / K`.

    Args:
        num_classes (`int`): Number of classes K.
        rate (`float`): Noise rate in [0, 1].

    Returns:
        `np.ndarray`: The K x K transition matrix (float64).
    """
    _check_num_classes(num_classes)
    _check_rate(rate)
    return rate / num_classes * np.ones((num_classes, num_classes)) + (1.0 - rate) * np.eye(num_classes)


def flip_matrix(num_classes: int, rate: float, seed: int) -> np.ndarray:
    """
    Flip (pair) noise: row i keeps `1 - rate` on the diagonal and puts `rate` on ONE other class, drawn by `seed`.

    Args:
        num_classes (`int`): Number of classes K (at least 2).
        rate (`float`): Noise rate in [0, 1]; the expected share of labels that change is exactly `rate`.
        seed (`int`): Seed of `np.random.default_rng` that picks each row's target class.

    Returns:
        `np.ndarray`: The K x K transition matrix (float64).
    """
    _check_num_classes(num_classes, minimum=2)
    _check_rate(rate)
    rng = np.random.default_rng(seed)
    # Draw among the K - 1 other classes, then skip over the diagonal.
    offsets = rng.integers(0, num_classes - 1, size=num_classes)
    rows = np.arange(num_classes)
    targets = np.where(offsets < rows, offsets, offsets + 1)
    matrix = (1.0 - rate) * np.eye(num_classes)
    matrix[rows, targets] += rate
    return matrix


def validate_transition_matrix(matrix: Any, num_classes: int) -> np.ndarray:
    """
    Checks that `matrix` is a K x K row-stochastic matrix: finite, non-negative, each row summing to 1 (atol 1e-6).

    Args:
        matrix (array-like): The candidate transition matrix.
        num_classes (`int`): Number of classes K.

    Returns:
        `np.ndarray`: The matrix as float64.

    Raises:
        `ValueError`: naming the shape, the negative entry or the row whose sum is off.
    """
    _check_num_classes(num_classes)
    try:
        array = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"transition matrix must be a {num_classes} x {num_classes} array of numbers: {error}"
        ) from None
    if array.shape != (num_classes, num_classes):
        raise ValueError(f"transition matrix must be {num_classes} x {num_classes}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("transition matrix must hold finite numbers, got NaN or inf")
    if (array < 0).any():
        row, column = np.argwhere(array < 0)[0]
        raise ValueError(
            f"transition matrix must be non-negative, got {array[row, column]} at row {row}, column {column}"
        )
    sums = array.sum(axis=1)
    bad = np.flatnonzero(~np.isclose(sums, 1.0, rtol=0.0, atol=1e-6))
    if bad.size:
        raise ValueError(f"transition matrix rows must sum to 1, got row {bad[0]} summing to {sums[bad[0]]:.6g}")
    return array


def load_matrix(spec: str | Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """
    Reads a transition matrix given inline (nested lists, an array, or a JSON string such as `"[[0.8, 0.2], [0.3,
    0.7]]"`) or as the path of a JSON file holding such a list. Shape and rows are checked by
    [`validate_transition_matrix`].

    Args:
        spec (`str`, nested sequence or `np.ndarray`): The matrix or where to read it.

    Returns:
        `np.ndarray`: The matrix as float64 (not yet validated).
    """
    if not isinstance(spec, str):
        return np.asarray(spec, dtype=np.float64)
    text = spec
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as handle:
            text = handle.read()
    try:
        return np.asarray(json.loads(text), dtype=np.float64)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(
            f"noise_matrix must be a JSON file or inline JSON list of K rows of K numbers, got {spec!r} ({error})"
        ) from None


def build_transition_matrix(
    noise_type: str,
    rate: float,
    num_classes: int,
    seed: int = 0,
    matrix: str | Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """
    The transition matrix of a noise type.

    Args:
        noise_type (`str`): `uniform` ([`uniform_matrix`]), `flip` ([`flip_matrix`]), `matrix` (the given `matrix`)
            or `none` (identity).
        rate (`float`): Noise rate in [0, 1]; checked for every type, unused by `matrix` and `none`.
        num_classes (`int`): Number of classes K.
        seed (`int`, *optional*, defaults to 0): Seed of the flip targets.
        matrix (array-like or `str`, *optional*): With `matrix` only: the matrix, or inline JSON / a JSON file.

    Returns:
        `np.ndarray`: A validated K x K row-stochastic matrix.
    """
    if noise_type == "instance":
        raise ValueError("noise_type='instance' depends on each row's text and has no transition matrix")
    if noise_type not in CLASS_CONDITIONAL:
        raise ValueError(f"noise_type must be one of {', '.join(CLASS_CONDITIONAL)}, got {noise_type!r}")
    _check_rate(rate)
    _check_num_classes(num_classes)
    if noise_type != "matrix" and matrix is not None:
        raise ValueError(f"a noise matrix is only used with noise_type='matrix', got noise_type={noise_type!r}")
    if noise_type == "uniform":
        return uniform_matrix(num_classes, rate)
    if noise_type == "flip":
        return flip_matrix(num_classes, rate, seed)
    if noise_type == "none":
        return np.eye(num_classes)
    if matrix is None:
        raise ValueError("noise_type='matrix' needs a transition matrix (noise_matrix: JSON file or inline JSON)")
    return validate_transition_matrix(load_matrix(matrix), num_classes)


def _as_labels(labels: Any, num_classes: int, name: str = "labels") -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    if array.min() < 0 or array.max() >= num_classes:
        bad = array[(array < 0) | (array >= num_classes)][0]
        raise ValueError(f"{name} must be in 0..{num_classes - 1}, got {bad}")
    return array.astype(np.int64)


def corrupt(labels: Sequence[int] | np.ndarray, matrix: Any, seed: int) -> np.ndarray:
    """
    Draws each noisy label from the row of its true label: `noisy[n] ~ Categorical(matrix[labels[n]])`.

    Vectorised (one uniform draw per label, inverted through the row's cumulative sums), so a given `seed` gives the
    same noisy labels for the same inputs, and row n's draw depends only on n and the seed.

    Args:
        labels (sequence of `int`): True labels in 0..K-1.
        matrix (array-like): K x K transition matrix (validated here).
        seed (`int`): Seed of `np.random.default_rng`.

    Returns:
        `np.ndarray`: The noisy labels (int64), same length as `labels`.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"transition matrix must be K x K with K >= 1, got shape {matrix.shape}")
    num_classes = matrix.shape[0]
    matrix = validate_transition_matrix(matrix, num_classes)
    labels = _as_labels(labels, num_classes)
    draws = np.random.default_rng(seed).random(labels.size)
    cumulative = np.cumsum(matrix, axis=1)
    noisy = (cumulative[labels] <= draws[:, None]).sum(axis=1)
    # Rows may sum to 1 - 1e-6: a draw above the last cumulative sum falls on the last class with mass.
    return np.minimum(noisy, num_classes - 1).astype(np.int64)


def confusion_counts(true_labels: np.ndarray, noisy_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts of (true, noisy) label pairs: entry (i, j) = rows with true label i and noisy label j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(true_labels), np.asarray(noisy_labels)), 1)
    return counts


def noise_report(
    true_labels: Sequence[int] | np.ndarray,
    noisy_labels: Sequence[int] | np.ndarray,
    num_classes: int,
    matrix: Any = None,
) -> dict[str, Any]:
    """
    The noise actually realised in a set of labels (JSON-serialisable).

    Args:
        true_labels (sequence of `int`): True labels in 0..K-1.
        noisy_labels (sequence of `int`): Noisy labels in 0..K-1, same length.
        num_classes (`int`): Number of classes K.
        matrix (array-like, *optional*): The transition matrix the noisy labels were drawn from; adds
            `expected_rate`, the share of labels expected to change given these true labels.

    Returns:
        `dict` with `num_rows`, `counts` (K x K ints, `counts[i][j]` = rows with true i and noisy j),
        `realised_matrix` (counts normalised per row; a class without rows gets a row of zeros), `realised_rate`
        (share of rows whose noisy label differs from the true one; `None` without rows), `true_class_counts` and
        `noisy_class_counts`.
    """
    _check_num_classes(num_classes)
    true_labels = _as_labels(true_labels, num_classes, "true_labels")
    noisy_labels = _as_labels(noisy_labels, num_classes, "noisy_labels")
    if true_labels.shape != noisy_labels.shape:
        raise ValueError(f"true_labels and noisy_labels differ in length: {true_labels.size} vs {noisy_labels.size}")
    counts = confusion_counts(true_labels, noisy_labels, num_classes)
    row_sums = counts.sum(axis=1, keepdims=True)
    realised = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    report = {
        "num_rows": int(true_labels.size),
        "counts": counts.tolist(),
        "realised_matrix": realised.tolist(),
        "realised_rate": float(np.mean(true_labels != noisy_labels)) if true_labels.size else None,
        "true_class_counts": counts.sum(axis=1).tolist(),
        "noisy_class_counts": counts.sum(axis=0).tolist(),
    }
    if matrix is not None:
        stay = np.diag(validate_transition_matrix(matrix, num_classes))
        report["expected_rate"] = float(np.mean(1.0 - stay[true_labels])) if true_labels.size else None
    return report
