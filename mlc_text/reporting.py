"""
What people read after a run: `results.json`, plots (learning curves, learned correction vs true noise, methods
side by side), a printable results table and a Hub model card (`README.md`).

Plots are drawn on the Agg canvas directly (no `pyplot`), so they never touch a global backend or leak figures.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .meta_net import CORRECTOR_WEIGHTS_NAME

__all__ = [
    "MODEL_CARD_NAME",
    "RESULTS_NAME",
    "format_results_table",
    "plot_correction_matrix",
    "plot_learning_curves",
    "plot_method_comparison",
    "to_json_safe",
    "write_model_card",
    "write_results_json",
]

RESULTS_NAME = "results.json"
MODEL_CARD_NAME = "README.md"
NOISE_KEYS = ("type", "rate", "realised_rate")
RESULT_KEYS = ("method", "corpus", "model", "noise", "metrics", "correction_accuracy", "wall_s")
CARD_TAGS = ["text-classification", "noisy-labels", "meta-label-correction"]
# Hyper-parameters worth a line in the model card, when the training arguments have them.
CARD_HYPERPARAMETERS = (
    "learning_rate",
    "meta_learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "clean_batch_size",
    "gradient_accumulation_steps",
    "gradient_steps",
    "meta_update_interval",
    "skip_connection",
    "seed",
)
METHOD_DESCRIPTIONS = {
    "mlc": (
        "Meta Label Correction (Zheng et al., AAAI 2021): a label corrector network maps each noisy row's features "
        "and given label to a corrected soft label; the classifier trains on the corrected labels, and the corrector "
        "is trained by the meta-gradient of the loss on a small clean (trusted) set after a virtual step."
    ),
    "finetune": "Plain fine-tuning on the noisy rows and the clean rows together, with their given labels.",
    "clean_only": "Plain fine-tuning on the small clean (trusted) set only.",
    "oracle": "Fine-tuning on the noisy rows with their true labels, plus the clean rows: an upper bound.",
    "glc": (
        "Gold Loss Correction (Hendrycks et al., 2018): the noise transition matrix is estimated on the clean rows "
        "and the classifier is trained with the forward-corrected loss on the noisy rows."
    ),
    "l2rw": (
        "Learning to Reweight (Ren et al., 2018): each noisy row is weighted by the meta-gradient of the clean loss."
    ),
    "finetune_clean_batch": (
        "Fine-tuning on the noisy rows with their given labels, with a clean batch beside each noisy batch weighted "
        "as MLC weights it: MLC without its label corrector."
    ),
    "finetune_then_clean": (
        "Continuous fine-tuning (Zhu et al., ACL 2023): plain fine-tuning on the noisy and clean rows, then "
        "fine-tuning on the clean rows alone."
    ),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def to_json_safe(value: Any) -> Any:
    """
    Converts numpy / torch values, tuples, paths and enums to plain JSON types; NaN and infinities become `None`
    (JSON has no NaN), and anything else unknown its `str`.
    """
    if isinstance(value, Mapping):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_json_safe(item) for item in value]
    if hasattr(value, "detach"):  # torch.Tensor
        return to_json_safe(value.detach().cpu().tolist())
    if isinstance(value, (np.ndarray, np.generic)):
        return to_json_safe(value.tolist())
    if isinstance(value, enum.Enum):
        return to_json_safe(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_results_json(
    output_dir: str | os.PathLike,
    *,
    method: str,
    corpus: str,
    model: str,
    noise: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, Any]],
    correction_accuracy: float | None,
    wall_s: float,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """
    Writes the summary of one run to `<output_dir>/results.json`.

    Args:
        output_dir (`str` or `os.PathLike`): the run's folder (created if missing).
        method (`str`): the method, e.g. `"mlc"`.
        corpus (`str`): the corpus name or Hub id.
        model (`str`): the base model.
        noise (`Mapping`): `type`, `rate` and `realised_rate` (the share of noisy rows actually corrupted).
        metrics (`Mapping[str, Mapping]`): metrics per split, e.g. `{"test": {"test_accuracy": 0.9, ...}}`.
        correction_accuracy (`float`, *optional*): share of noisy rows whose corrected label is right (MLC only).
        wall_s (`float`): wall-clock seconds of the run.
        extra (`Mapping`, *optional*): further top-level keys; they may not replace the ones above.

    Returns:
        `Path`: the written file.
    """
    noise = _check_noise(noise)
    if not isinstance(metrics, Mapping) or not all(isinstance(split, Mapping) for split in metrics.values()):
        raise ValueError(f"metrics must map split names to metric dicts, e.g. {{'test': {{...}}}}, got {metrics!r}")
    clashes = sorted(set(extra or {}) & set(RESULT_KEYS))
    if clashes:
        raise ValueError(f"extra may not replace the keys {clashes}; use other names than {list(RESULT_KEYS)}")
    results = {
        "method": method,
        "corpus": corpus,
        "model": model,
        "noise": noise,
        "metrics": metrics,
        "correction_accuracy": correction_accuracy,
        "wall_s": wall_s,
        **(extra or {}),
    }
    path = Path(output_dir) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json_safe(results), indent=2, allow_nan=False) + "\n")
    return path


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


def format_results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """
    Formats rows as a Markdown table (also readable as plain text): floats with 4 decimals, missing values as `-`.

    Args:
        rows (`Sequence[Mapping]`): one dict per line.
        columns (`Sequence[str]`): the keys to show, in order.

    Returns:
        `str`: the table, without a trailing newline.
    """
    columns = [str(column) for column in columns]
    if not columns:
        raise ValueError("columns must name at least one key to show, got none")
    cells = [[_format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(3, len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    lines = [columns, ["-" * width for width in widths], *cells]
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines)


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    corpus: str,
    label_names: Sequence[str] | None,
    noise: Mapping[str, Any],
    method: str,
    metrics: Mapping[str, Any],
    correction_accuracy: float | None = None,
    training_args: Any = None,
) -> Path:
    """
    Writes a Hub model card, `<output_dir>/README.md`: YAML metadata (with a `model-index` of the test metrics),
    then the noise settings, the method, the metrics, how to load the model and, for MLC, the label corrector.

    Args:
        output_dir (`str` or `os.PathLike`): the saved model's folder (created if missing).
        base_model (`str`): the model fine-tuned (a Hub id goes into the metadata; a local path only into the text).
        corpus (`str`): the corpus name or Hub id.
        label_names (`Sequence[str]`, *optional*): class names, by id.
        noise (`Mapping`): `type`, `rate` and `realised_rate`.
        method (`str`): the method, e.g. `"mlc"`.
        metrics (`Mapping`): test metrics, e.g. `{"test_accuracy": 0.9, "test_macro_f1": 0.89}`.
        correction_accuracy (`float`, *optional*): share of noisy rows whose corrected label is right.
        training_args (`TrainingArguments` or `Mapping`, *optional*): hyper-parameters to list; `hub_model_id` names
            the model in the loading example.

    Returns:
        `Path`: the written card.
    """
    noise = _check_noise(noise)
    model_id = _get(training_args, "hub_model_id") or Path(output_dir).resolve().name
    metadata = _card_metadata(model_id, base_model, corpus, metrics)
    sections = [
        _card_intro(model_id, base_model, corpus, method),
        _card_noise(noise),
        f"## Method\n\n{METHOD_DESCRIPTIONS.get(method, f'Method `{method}`.')}",
        _card_metrics(metrics, correction_accuracy),
        _card_labels(label_names),
        _card_usage(model_id),
        _card_corrector(model_id) if method == "mlc" else "",
        _card_hyperparameters(training_args),
    ]
    front_matter = yaml.safe_dump(to_json_safe(metadata), sort_keys=False, allow_unicode=True)
    path = Path(output_dir) / MODEL_CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\n{front_matter}---\n\n" + "\n\n".join(s for s in sections if s) + "\n")
    return path


def _card_metadata(model_id: str, base_model: str, corpus: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"library_name": "transformers"}
    if _is_hub_id(base_model):
        metadata["base_model"] = base_model
    if _is_hub_id(corpus):
        metadata["datasets"] = [corpus]
    metadata.update(tags=CARD_TAGS, pipeline_tag="text-classification", metrics=["accuracy", "f1"])
    results = [
        {"type": kind, "value": _metric(metrics, key), "name": name, **({"args": args} if args else {})}
        for key, kind, name, args in (
            ("accuracy", "accuracy", "Test accuracy", None),
            ("macro_f1", "f1", "Test macro F1", {"average": "macro"}),
        )
        if _is_number(_metric(metrics, key))
    ]
    if results:
        task = {"type": "text-classification", "name": "Text Classification"}
        dataset = {"name": corpus, "type": corpus, "split": "test"}
        metadata["model-index"] = [
            {"name": model_id, "results": [{"task": task, "dataset": dataset, "metrics": results}]}
        ]
    return metadata


def _card_intro(model_id: str, base_model: str, corpus: str, method: str) -> str:
    base = f"[{base_model}](https://huggingface.co/{base_model})" if _is_hub_id(base_model) else f"`{base_model}`"
    return (
        f"# {model_id}\n\n"
        f"A text classifier fine-tuned from {base} on `{corpus}`, trained on **noisy labels** with the method "
        f"`{method}`, with mlc-text (Meta Label Correction for Hugging Face transformers). "
        "The noisy training rows carry labels corrupted on purpose (see the noise settings); a small clean set of "
        "rows with true labels is trusted."
    )


def _card_noise(noise: Mapping[str, Any]) -> str:
    rate = noise["rate"]
    rows = [
        {"setting": "type", "value": noise["type"]},
        {"setting": "rate", "value": f"{rate:g}" if _is_number(rate) else rate},
        {"setting": "realised rate", "value": noise["realised_rate"]},
    ]
    return (
        "## Noise settings\n\n"
        f"{format_results_table(rows, ['setting', 'value'])}\n\n"
        "The realised rate is the share of noisy training rows whose label was actually changed."
    )


def _card_metrics(metrics: Mapping[str, Any], correction_accuracy: float | None) -> str:
    # Timings and throughput say little about the model; the card keeps quality metrics only.
    skipped = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    rows = [
        {"metric": name, "value": value}
        for name, value in metrics.items()
        if _is_number(value) and not name.endswith(skipped)
    ]
    if correction_accuracy is not None:
        rows.append({"metric": "correction_accuracy (noisy training rows)", "value": correction_accuracy})
    if not rows:
        return "## Metrics\n\nNo test metrics were recorded."
    return f"## Metrics\n\n{format_results_table(rows, ['metric', 'value'])}"


def _card_labels(label_names: Sequence[str] | None) -> str:
    if not label_names:
        return ""
    rows = [{"id": index, "label": name} for index, name in enumerate(label_names)]
    return f"## Labels\n\n{format_results_table(rows, ['id', 'label'])}"


def _card_usage(model_id: str) -> str:
    return (
        "## How to use\n\n"
        "A plain `transformers` model: loading and using it does not need `mlc_text`.\n\n"
        "```python\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        f'model = AutoModelForSequenceClassification.from_pretrained("{model_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")\n'
        'inputs = tokenizer(["An example sentence."], return_tensors="pt")\n'
        "predicted = model(**inputs).logits.argmax(-1).item()\n"
        "print(model.config.id2label[predicted])\n"
        "```"
    )


def _card_corrector(model_id: str) -> str:
    return (
        "## Label corrector\n\n"
        f"The MLC label corrector (the meta-network that maps features and noisy label to a corrected soft label) is "
        f"saved beside the model as `{CORRECTOR_WEIGHTS_NAME}`. The classifier does not need it; to inspect or reuse "
        "it, download this folder and call `mlc_text.LabelCorrector.from_pretrained(folder)`:\n\n"
        "```python\n"
        "from huggingface_hub import snapshot_download\n"
        "from mlc_text import LabelCorrector\n\n"
        f'corrector = LabelCorrector.from_pretrained(snapshot_download("{model_id}"))\n'
        "```"
    )


def _card_hyperparameters(training_args: Any) -> str:
    lines = [
        f"- {name}: {to_json_safe(value)}"
        for name in CARD_HYPERPARAMETERS
        if (value := _get(training_args, name)) is not None and not (name == "max_steps" and value <= 0)
    ]
    return "## Training hyper-parameters\n\n" + "\n".join(lines) if lines else ""


def _check_noise(noise: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(noise, Mapping) or any(key not in noise for key in NOISE_KEYS):
        raise ValueError(f"noise must be a dict with the keys {list(NOISE_KEYS)} (values may be None), got {noise!r}")
    return dict(noise)


def _get(source: Any, name: str) -> Any:
    """A field of training arguments given as a dataclass, any object, a mapping or None."""
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _metric(metrics: Mapping[str, Any], name: str) -> Any:
    return metrics.get(f"test_{name}", metrics.get(name))


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


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
