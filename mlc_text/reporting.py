"""
What people read after a run: `results.json` and the printed results table (results.py), the Hub model card
(model_card.py) and, here, the plots: learning curves, the learned correction beside the true noise, and methods side
by side. Every name of the three is importable from here.

Plots are drawn on the Agg canvas directly (no `pyplot`), so they never touch a global backend or leak figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .model_card import CARD_HYPERPARAMETERS, CARD_TAGS, METHOD_DESCRIPTIONS, MODEL_CARD_NAME, write_model_card
from .results import (
    NOISE_KEYS,
    RESULT_KEYS,
    RESULTS_NAME,
    _is_number,
    format_results_table,
    results_summary,
    to_json_safe,
    write_results,
    write_results_json,
)

__all__ = [
    "CARD_HYPERPARAMETERS",
    "CARD_TAGS",
    "LOSS_SERIES",
    "METHOD_DESCRIPTIONS",
    "MODEL_CARD_NAME",
    "NOISE_KEYS",
    "NOISY_ROW_SERIES",
    "RESULTS_NAME",
    "RESULT_KEYS",
    "format_results_table",
    "plot_correction_matrix",
    "plot_learning_curves",
    "plot_method_comparison",
    "results_summary",
    "to_json_safe",
    "write_model_card",
    "write_results",
    "write_results_json",
]

# What the panels of `plot_learning_curves` draw: (key in log_history, legend) per panel.
LOSS_SERIES = (("loss", "train loss"), ("clean_loss", "clean loss"))
NOISY_ROW_SERIES = (
    ("agreement_with_noisy", "corrected label = given label"),
    ("correction_accuracy", "corrected label = true label"),
    ("weight_on_corrupted", "L2RW weight on corrupted rows"),
)


def plot_learning_curves(
    log_history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    eval_label: str = "eval accuracy",
    noisy_label_accuracy: float | None = None,
) -> Path | None:
    """
    Plots, against `step`, from a [`~transformers.TrainerState`]'s `log_history`: the training and clean losses
    (`loss`, `clean_loss`); the eval accuracy (`eval_accuracy`); and what the run did to the noisy training rows,
    logged every logging step: MLC's `agreement_with_noisy` (share of rows whose corrected label is the given one)
    and `correction_accuracy` (share whose corrected label is the true one), L2RW's `weight_on_corrupted`.

    Args:
        log_history (`Sequence[Mapping]`): the logged entries; entries without `step` or the key are skipped.
        path (`str` or `os.PathLike`): where to write the PNG.
        eval_label (`str`, *optional*, defaults to `"eval accuracy"`): legend of the eval accuracy, e.g. which
            rows it is measured on.
        noisy_label_accuracy (`float`, *optional*): share of the noisy rows whose given label is right (1 - the
            realised noise rate), drawn as a reference: a corrector that fixed every wrong label and kept every right
            one would reach it in agreement, and equal weights put `1 - noisy_label_accuracy` on corrupted rows.

    Returns:
        `Path` of the PNG, or `None` (and no file) when no entry has anything to plot.
    """
    losses = {label: _series(log_history, key) for key, label in LOSS_SERIES}
    noisy_rows = {label: _series(log_history, key) for key, label in NOISY_ROW_SERIES}
    references = {}
    if noisy_label_accuracy is not None and _is_number(noisy_label_accuracy):
        if noisy_rows[NOISY_ROW_SERIES[0][1]] or noisy_rows[NOISY_ROW_SERIES[1][1]]:
            references["given labels right"] = float(noisy_label_accuracy)
        if noisy_rows[NOISY_ROW_SERIES[2][1]]:
            references["corrupted share"] = 1.0 - float(noisy_label_accuracy)
    panels = [
        ("losses", "loss", losses, {}),
        ("accuracy", "accuracy", {eval_label: _series(log_history, "eval_accuracy")}, {}),
        ("noisy training rows", "share of rows", noisy_rows, references),
    ]
    panels = [(title, ylabel, {k: v for k, v in series.items() if v}, refs) for title, ylabel, series, refs in panels]
    panels = [panel for panel in panels if panel[2]]
    if not panels:
        return None
    figure = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
    for axes, (title, ylabel, series, refs) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw_panel(axes, title, ylabel, series, refs)
    return _save(figure, path)


def _draw_panel(axes, title: str, ylabel: str, series: dict, references: dict) -> None:
    for label, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=label)
    for label, value in references.items():
        axes.axhline(value, linestyle="--", linewidth=1, color="grey")
        axes.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    if ylabel != "loss":  # shares: the full range, so that a flat line reads as flat
        axes.set_ylim(-0.02, 1.02)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def plot_correction_matrix(
    learned: np.ndarray, true_matrix: np.ndarray, path: str | os.PathLike, label_names: Sequence[str] | None = None
) -> Path:
    """
    Draws the learned correction next to the true noise, as two annotated heatmaps.

    Args:
        learned (`np.ndarray` of shape `(K, K)`): row j = mean corrected label over rows with noisy label j (see
            [`~mlc_text.metrics.learned_transition_matrix`]); NaN rows are left blank.
        true_matrix (`np.ndarray` of shape `(K, K)`): the noise applied, P(noisy label | true label).
        path (`str` or `os.PathLike`): where to write the PNG.
        label_names (`Sequence[str]`, *optional*): K class names; class ids when omitted.

    Returns:
        `Path`: the written PNG.
    """
    learned, true_matrix = np.asarray(learned, dtype=float), np.asarray(true_matrix, dtype=float)
    if learned.ndim != 2 or learned.shape[0] != learned.shape[1] or learned.shape != true_matrix.shape:
        raise ValueError(
            "learned and true_matrix must be square matrices of the same shape (K, K), got shapes "
            f"{learned.shape} and {true_matrix.shape}"
        )
    num_classes = learned.shape[0]
    names = [str(index) for index in range(num_classes)] if label_names is None else [str(n) for n in label_names]
    if len(names) != num_classes:
        raise ValueError(f"label_names must have {num_classes} names (one per class), got {len(names)}: {names}")
    size = max(4.0, 0.6 * num_classes + 2)
    figure = Figure(figsize=(2 * size + 1, size), layout="constrained")
    left, right = figure.subplots(1, 2)
    _heatmap(left, learned, names, "Learned correction\nmean corrected label per noisy label", "noisy label")
    image = _heatmap(right, true_matrix, names, "True noise\nP(noisy label | true label)", "true label")
    right.set_xlabel("noisy label")
    left.set_xlabel("corrected label")
    figure.colorbar(image, ax=[left, right], shrink=0.8)
    return _save(figure, path)


def plot_method_comparison(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, metric: str = "test_accuracy"
) -> Path:
    """
    Bar chart of one metric per method; several rows of a method (seeds) give their mean and standard deviation.

    Args:
        rows (`Sequence[Mapping]`): one dict per run, with `method` and `metric`; a missing value shows as `n/a`.
        path (`str` or `os.PathLike`): where to write the PNG.
        metric (`str`, *optional*, defaults to `"test_accuracy"`): the key to compare.

    Returns:
        `Path`: the written PNG.
    """
    if not rows or not all(isinstance(row, Mapping) and "method" in row for row in rows):
        raise ValueError(f"rows must be a non-empty list of dicts that each have a 'method' key, got {rows!r}")
    values: dict[str, list[float]] = {}
    for row in rows:
        values.setdefault(str(row["method"]), [])
        if _is_number(row.get(metric)):
            values[str(row["method"])].append(float(row[metric]))
    methods = list(values)
    means = [float(np.mean(values[m])) if values[m] else 0.0 for m in methods]
    errors = [float(np.std(values[m])) if len(values[m]) > 1 else 0.0 for m in methods]
    figure = Figure(figsize=(max(4.0, 1.2 * len(methods) + 1), 4), layout="constrained")
    axes = figure.subplots()
    bars = axes.bar(methods, means, yerr=errors, capsize=4, color="tab:blue")
    labels = [f"{mean:.4f}" if values[m] else "n/a" for m, mean in zip(methods, means)]
    axes.bar_label(bars, labels=labels, padding=2)
    if all(0 <= value <= 1 for value in means):
        axes.set_ylim(0, 1.1)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} by method")
    return _save(figure, path)


def _series(log_history: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    return [
        (entry["step"], float(entry[key])) for entry in log_history if "step" in entry and _is_number(entry.get(key))
    ]


def _heatmap(axes, matrix: np.ndarray, names: list[str], title: str, ylabel: str):
    image = axes.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(names))
    axes.set_xticks(ticks, names, rotation=45, ha="right")
    axes.set_yticks(ticks, names)
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    for (row, column), value in np.ndenumerate(matrix):
        text = "n/a" if np.isnan(value) else f"{value:.2f}"
        color = "white" if not np.isnan(value) and value > 0.6 else "black"
        axes.text(column, row, text, ha="center", va="center", color=color, fontsize=8)
    return image


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=120)
    return path
