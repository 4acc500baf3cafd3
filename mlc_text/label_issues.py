"""
Which training labels are likely wrong: every noisy training row ranked by how much the trained model believes its
given label (low first), written as `label_issues.csv`, and scored against the true labels when a simulated split
knows them (precision and recall at k).

The score of a row is the probability of its given label under the trained main net's softmax (the
*self-confidence* ranking of cleanlab, Northcutt et al., 2021), for every method: in our benchmark it found more wrong
labels than MLC's corrector did (docs/label_issues.md); the corrector's soft label is shown beside it, and can rank.
Pure numpy; no Trainer, no tokenizer. The file's format is described in docs/label_issues.md.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LABEL_ISSUES_NAME",
    "LABEL_ISSUE_COLUMNS",
    "RANKINGS",
    "label_issues_table",
    "label_quality",
    "precision_recall_at_k",
    "rank_label_issues",
    "softmax",
    "write_label_issues",
]

LABEL_ISSUES_NAME = "label_issues.csv"
RANKINGS = ("self_confidence", "corrector")
LABEL_ISSUE_COLUMNS = (
    "rank",
    "index",
    "given_label",
    "label_quality",
    "corrected_label",
    "corrector_confidence",
    "predicted_label",
    "predicted_probability",
    "true_label",
    "text",
)


def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax of `(N, K)` logits, computed stably in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got shape {logits.shape}")
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _probabilities(probabilities: Any, name: str) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, K) with K >= 2, got shape {probabilities.shape}")
    if probabilities.size and not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{name} must be probabilities (rows summing to 1); pass logits through softmax first")
    return probabilities


def _labels(labels: Any, name: str, num_rows: int, num_classes: int, allow_unknown: bool = False) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != num_rows:
        raise ValueError(f"{name} must have one label per row ({num_rows}), got {labels.shape[0]}")
    low = -1 if allow_unknown else 0
    bad = (labels < low) | (labels >= num_classes)
    if bad.any():
        accepted = f"-1 (unknown) or 0..{num_classes - 1}" if allow_unknown else f"0..{num_classes - 1}"
        raise ValueError(f"{name} must be in {accepted}, got {labels[bad][0]} at row {int(np.argmax(bad))}")
    return labels


def label_quality(probabilities: Any, given_labels: Any) -> np.ndarray:
    """
    The probability each row's given label gets (cleanlab's *self-confidence* when `probabilities` are the model's
    own predictions): near 0 means the model believes another class.

    Args:
        probabilities (array-like of shape `(N, K)`): Rows summing to one (a softmax, or the corrector's soft labels).
        given_labels (array-like of shape `(N,)`): The labels the rows were trained with, in 0..K-1.

    Returns:
        `np.ndarray` of shape `(N,)`.
    """
    probabilities = _probabilities(probabilities, "probabilities")
    given = _labels(given_labels, "given_labels", *probabilities.shape)
    return probabilities[np.arange(len(given)), given]


def rank_label_issues(quality: Any) -> np.ndarray:
    """
    The row order of a label-issue list: lowest `quality` first (most likely wrong), ties in row order.

    Args:
        quality (array-like of shape `(N,)`): From [`label_quality`].

    Returns:
        `np.ndarray` of row positions.
    """
    quality = np.asarray(quality, dtype=np.float64).reshape(-1)
    if np.isnan(quality).any():
        raise ValueError(f"quality must not hold NaN, got one at row {int(np.argmax(np.isnan(quality)))}")
    return np.argsort(quality, kind="stable")


def label_issues_table(
    *,
    index: Sequence[int],
    texts: Sequence[str],
    given_labels: Any,
    predicted_probabilities: Any,
    label_names: Sequence[str],
    corrected_probabilities: Any = None,
    true_labels: Any = None,
    rank_by: str = "self_confidence",
) -> list[dict[str, Any]]:
    """
    One row per noisy training row, most likely wrong label first (the columns of `LABEL_ISSUE_COLUMNS`).

    Args:
        index (`Sequence[int]`): Each row's `index` (its row in the training file).
        texts (`Sequence[str]`): The rows' texts.
        given_labels (array-like of shape `(N,)`): The labels trained with (ids).
        predicted_probabilities (array-like of shape `(N, K)`): The main net's softmax.
        label_names (`Sequence[str]`): Class names by id; labels appear by name.
        corrected_probabilities (array-like of shape `(N, K)`, *optional*): The label corrector's soft labels (MLC),
            shown beside the prediction.
        true_labels (array-like of shape `(N,)`, *optional*): True labels, -1 where unknown (shown, never used to
            rank).
        rank_by (`str`, *optional*, defaults to `"self_confidence"`): What ranks the rows: `"self_confidence"` (the
            main net's probability of the given label) or `"corrector"` (the corrector's, which needs
            `corrected_probabilities`).

    Returns:
        `list[dict]`: The ranked rows; `corrected_label`, `corrector_confidence` and an unknown `true_label` are
        `None` (empty cells in the CSV).
    """
    predicted = _probabilities(predicted_probabilities, "predicted_probabilities")
    num_rows, num_classes = predicted.shape
    if len(label_names) != num_classes:
        raise ValueError(f"label_names must name the {num_classes} classes, got {len(label_names)}: {label_names}")
    if len(index) != num_rows or len(texts) != num_rows:
        raise ValueError(f"index and texts must have {num_rows} rows each, got {len(index)} and {len(texts)}")
    given = _labels(given_labels, "given_labels", num_rows, num_classes)
    true = (
        np.full(num_rows, -1) if true_labels is None else _labels(true_labels, "true_labels", *predicted.shape, True)
    )
    corrected = None if corrected_probabilities is None else _probabilities(corrected_probabilities, "corrected")
    if corrected is not None and corrected.shape != predicted.shape:
        raise ValueError(f"corrected_probabilities must have shape {predicted.shape}, got {corrected.shape}")
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    if rank_by == "corrector" and corrected is None:
        raise ValueError("rank_by='corrector' needs corrected_probabilities")
    quality = label_quality(corrected if rank_by == "corrector" else predicted, given)
    names = [str(name) for name in label_names]
    rows = []
    for rank, row in enumerate(rank_label_issues(quality), start=1):
        rows.append(
            {
                "rank": rank,
                "index": int(index[row]),
                "given_label": names[given[row]],
                "label_quality": float(quality[row]),
                "corrected_label": None if corrected is None else names[int(corrected[row].argmax())],
                "corrector_confidence": None if corrected is None else float(corrected[row].max()),
                "predicted_label": names[int(predicted[row].argmax())],
                "predicted_probability": float(predicted[row].max()),
                "true_label": names[true[row]] if true[row] >= 0 else None,
                "text": texts[row],
            }
        )
    return rows


def write_label_issues(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """
    Writes [`label_issues_table`]'s rows as CSV (a header of `LABEL_ISSUE_COLUMNS`; `None` as an empty cell,
    probabilities with 6 decimals).

    Returns:
        `Path`: the written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_ISSUE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in LABEL_ISSUE_COLUMNS})
    return path


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else value


def precision_recall_at_k(quality: Any, given_labels: Any, true_labels: Any, k: int | None = None) -> dict | None:
    """
    How well a ranking finds the wrong labels, over the rows whose true label is known: flag the `k` lowest-quality
    rows and count how many of them are truly wrong (given label != true label).

    With the default `k` (the number of truly wrong labels), precision and recall at k are the same number, and a
    random ranking scores `wrong_share` on average.

    Args:
        quality (array-like of shape `(N,)`): From [`label_quality`].
        given_labels (array-like of shape `(N,)`): The labels trained with.
        true_labels (array-like of shape `(N,)`): True labels, -1 where unknown.
        k (`int`, *optional*): Rows flagged; defaults to the number of truly wrong labels.

    Returns:
        `dict` with `k`, `precision_at_k`, `recall_at_k` (`None` when k or the number of wrong labels is 0),
        `wrong_share` (the share of known rows whose label is wrong) and `num_known`; or `None` when no true label
        is known.
    """
    quality = np.asarray(quality, dtype=np.float64).reshape(-1)
    given = np.asarray(given_labels, dtype=np.int64).reshape(-1)
    true = np.asarray(true_labels, dtype=np.int64).reshape(-1)
    if not quality.shape == given.shape == true.shape:
        raise ValueError(
            f"quality, given_labels and true_labels must have one value per row, got {quality.shape[0]}, "
            f"{given.shape[0]} and {true.shape[0]}"
        )
    known = true >= 0
    if not known.any():
        return None
    wrong = (given != true)[known]
    num_wrong = int(wrong.sum())
    k = num_wrong if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= int(known.sum()):
        raise ValueError(f"k must be an integer in 0..{int(known.sum())} (the rows with a known label), got {k!r}")
    found = int(wrong[rank_label_issues(quality[known])[:k]].sum())
    return {
        "k": int(k),
        "precision_at_k": found / k if k else None,
        "recall_at_k": found / num_wrong if num_wrong and k else None,
        "wrong_share": num_wrong / int(known.sum()),
        "num_known": int(known.sum()),
    }
