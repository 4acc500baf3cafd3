"""
What we measure: `compute_metrics` for the [`~transformers.Trainer`] (accuracy, macro F1, any further `evaluate`
metric), and how well the label corrector corrects ([`correction_stats`], [`learned_transition_matrix`]).

Accuracy and macro F1 come from an `evaluate` module shipped in `mlc_text/metrics_modules/`, loaded by path, so they
work offline; `evaluate.load("accuracy")` would fetch its script from the Hub.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
from transformers import EvalPrediction

from .noise import confusion_counts

__all__ = [
    "SHIPPED_METRICS",
    "build_compute_metrics",
    "correction_stats",
    "empirical_transition_matrix",
    "learned_transition_matrix",
    "load_metric",
]

CLASSIFICATION_MODULE = Path(__file__).parent / "metrics_modules" / "classification.py"
# Names served by the shipped module (which computes both `accuracy` and `macro_f1`); they need no network.
SHIPPED_METRICS = ("accuracy", "macro_f1", "classification")


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """
    Loads an `evaluate` metric, offline for the shipped names.

    Args:
        name (`str`):
            `"accuracy"`, `"macro_f1"` or `"classification"` load our shipped module (it returns both `accuracy` and
            `macro_f1`); any other name (a Hub metric such as `"precision"`, or a path) goes to `evaluate.load`.
        kwargs:
            Passed to `evaluate.load`; `keep_in_memory` defaults to `True` so that several processes never share
            cache files.

    Returns:
        `evaluate.EvaluationModule`: the loaded metric.

    Raises:
        ValueError: if `name` is not a non-empty string, or `evaluate.load` cannot load it (offline, any name that is
            not shipped).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric name must be a non-empty string, got {name!r}")
    kwargs.setdefault("keep_in_memory", True)
    if name in SHIPPED_METRICS:
        return evaluate.load(str(CLASSIFICATION_MODULE), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except Exception as error:  # evaluate raises FileNotFoundError, ConnectionError, ... depending on the case
        raise ValueError(
            f"could not load metric {name!r} with evaluate.load ({type(error).__name__}: {error}). "
            f"Offline, only the shipped metrics work: {', '.join(SHIPPED_METRICS)}; other evaluate metrics need "
            "the Hugging Face Hub (or a local path to a metric script)."
        ) from error


def build_compute_metrics(extra_metrics: Sequence[str] = ()) -> Callable[[EvalPrediction], dict[str, float]]:
    """
    Builds the `compute_metrics` function of a [`~transformers.Trainer`]; metrics are loaded once, here.

    Args:
        extra_metrics (`Sequence[str]`, *optional*, defaults to `()`):
            Further metric names for [`load_metric`], computed on the same class predictions; each must accept
            `predictions` and `references` and return a dict.

    Returns:
        `Callable[[EvalPrediction], dict]`: maps logits (or class ids) and labels to `{"accuracy": ...,
        "macro_f1": ..., **extra}`. Rows whose label is negative (`-100`, ignored) are left out.
    """
    if isinstance(extra_metrics, str):
        raise ValueError(f"extra_metrics must be a sequence of metric names, got the string {extra_metrics!r}")
    classification = load_metric("classification")
    extras = [load_metric(name) for name in dict.fromkeys(extra_metrics) if name not in SHIPPED_METRICS]

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions, references = _class_predictions(eval_prediction)
        results = classification.compute(predictions=predictions, references=references)
        for metric in extras:
            results.update(metric.compute(predictions=predictions, references=references))
        return results

    return compute_metrics


def _class_predictions(eval_prediction: EvalPrediction) -> tuple[np.ndarray, np.ndarray]:
    """Argmax of the logits (the first output when the model returns several), and the labels, minus ignored rows."""
    logits = eval_prediction.predictions
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = _to_numpy(logits)
    references = _to_numpy(eval_prediction.label_ids).reshape(-1)
    predictions = logits.argmax(axis=-1) if logits.ndim == 2 else logits.reshape(-1)
    if predictions.shape != references.shape:
        raise ValueError(
            f"compute_metrics needs one prediction per label: logits of shape {tuple(logits.shape)} give "
            f"{predictions.shape[0]} predictions for {references.shape[0]} labels; expected logits (N, num_labels) "
            "or class ids (N,)"
        )
    kept = references >= 0
    return predictions[kept].astype(np.int64), references[kept].astype(np.int64)


def correction_stats(corrected_probs, noisy_labels, true_labels=None) -> dict[str, float | int | None]:
    """
    How well the corrected (soft) labels recover the true labels of noisy rows.

    Args:
        corrected_probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            The corrector's label distributions.
        noisy_labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            The given (possibly corrupted) labels.
        true_labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`, *optional*):
            The true labels, `-1` where unknown; `None` means all unknown.

    Returns:
        `dict` with, over rows whose true label is known: `correction_accuracy` (corrected argmax == true label),
        `noisy_label_accuracy` (noisy label == true label), `fixed_share` (corrected argmax == true label among
        corrupted rows, noisy != true), `broken_share` (corrected argmax != true label among rows whose noisy label
        was right); over all rows: `agreement_with_noisy` (corrected argmax == noisy label) and `mean_entropy` (in
        nats); and the counts `num_rows`, `num_known`, `num_corrupted`. A share with no rows to count is `None`.
    """
    probs = _as_probabilities(corrected_probs, "corrected_probs")
    num_rows, num_classes = probs.shape
    noisy = _as_labels(noisy_labels, "noisy_labels", num_rows, num_classes)
    true = (
        np.full(num_rows, -1)
        if true_labels is None
        else _as_labels(true_labels, "true_labels", num_rows, num_classes, allow_unknown=True)
    )
    corrected = probs.argmax(axis=1)
    known = true >= 0
    corrupted = known & (noisy != true)
    clean = known & (noisy == true)
    return {
        "correction_accuracy": _share(corrected == true, known),
        "noisy_label_accuracy": _share(noisy == true, known),
        "fixed_share": _share(corrected == true, corrupted),
        "broken_share": _share(corrected != true, clean),
        "agreement_with_noisy": _share(corrected == noisy, np.ones(num_rows, dtype=bool)),
        "mean_entropy": float(_entropy(probs).mean()) if num_rows else None,
        "num_rows": int(num_rows),
        "num_known": int(known.sum()),
        "num_corrupted": int(corrupted.sum()),
    }


def learned_transition_matrix(corrected_probs, noisy_labels, num_classes: int) -> np.ndarray:
    """
    The correction the label corrector has learned: the mean corrected label of the rows of each noisy class.

    Args:
        corrected_probs (`np.ndarray` or `torch.Tensor` of shape `(N, num_classes)`):
            The corrector's label distributions.
        noisy_labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            The given labels.
        num_classes (`int`):
            Number of classes K.

    Returns:
        `np.ndarray` of shape `(K, K)`: row j is the mean corrected distribution over rows whose noisy label is j (an
        estimate of P(true label | noisy label j)); NaN where no row has noisy label j.
    """
    probs = _as_probabilities(corrected_probs, "corrected_probs")
    _check_num_classes(num_classes)
    if probs.shape[1] != num_classes:
        raise ValueError(
            f"corrected_probs has {probs.shape[1]} columns but num_classes is {num_classes}; they must be equal"
        )
    noisy = _as_labels(noisy_labels, "noisy_labels", len(probs), num_classes)
    sums = np.zeros((num_classes, num_classes))
    np.add.at(sums, noisy, probs)
    counts = np.bincount(noisy, minlength=num_classes)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def empirical_transition_matrix(true_labels, noisy_labels, num_classes: int) -> np.ndarray:
    """
    The noise actually applied: P(noisy label | true label), counted and row-normalised.

    Args:
        true_labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            The true labels; rows with `-1` (unknown) are ignored.
        noisy_labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            The given labels.
        num_classes (`int`):
            Number of classes K.

    Returns:
        `np.ndarray` of shape `(K, K)`: entry (i, j) is the share of rows of true class i labelled j; NaN rows for
        classes with no row.
    """
    _check_num_classes(num_classes)
    true = _as_labels(true_labels, "true_labels", None, num_classes, allow_unknown=True)
    noisy = _as_labels(noisy_labels, "noisy_labels", len(true), num_classes)
    known = true >= 0
    counts = confusion_counts(true[known], noisy[known], num_classes)
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.asarray(values)


def _as_probabilities(values, name: str) -> np.ndarray:
    probs = _to_numpy(values).astype(np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"{name} must have shape (num_rows, num_classes), got shape {tuple(probs.shape)}")
    return probs


def _as_labels(
    values, name: str, num_rows: int | None, num_classes: int | None = None, allow_unknown: bool = False
) -> np.ndarray:
    """Integer class ids of shape (num_rows,), each in [0, num_classes), or -1 (unknown) when `allow_unknown`."""
    labels = _to_numpy(values)
    if labels.ndim != 1 or (num_rows is not None and len(labels) != num_rows):
        expected = "(num_rows,)" if num_rows is None else f"({num_rows},) to match the other inputs"
        raise ValueError(f"{name} must have shape {expected}, got shape {tuple(labels.shape)}")
    if labels.dtype.kind == "f":  # gathered labels often arrive as floats
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"{name} must hold integer class ids, got non-integer values such as {labels[:5]}")
    labels = labels.astype(np.int64)
    lowest = -1 if allow_unknown else 0
    bad = (labels < lowest) | (labels >= (np.inf if num_classes is None else num_classes))
    if bad.any():
        accepted = f"in [0, {num_classes})" if num_classes is not None else ">= 0"
        unknown = " or -1 (unknown)" if allow_unknown else ""
        raise ValueError(f"{name} must be class ids {accepted}{unknown}, got {labels[bad][0]}")
    return labels


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def _share(hits: np.ndarray, rows: np.ndarray) -> float | None:
    return float(hits[rows].mean()) if rows.any() else None


def _entropy(probs: np.ndarray) -> np.ndarray:
    # 0 * log 0 = 0: one-hot rows have zero entropy, not NaN.
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -(probs * logs).sum(axis=1)
