"""
`results.json`, the summary of one run that the recipes write and bench/ reads, and the results table the recipes
print ([`format_results_table`]).
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RESULTS_NAME",
    "format_results_table",
    "results_summary",
    "to_json_safe",
    "write_results",
    "write_results_json",
]

RESULTS_NAME = "results.json"
NOISE_KEYS = ("type", "rate", "realised_rate")
RESULT_KEYS = ("method", "corpus", "model", "noise", "metrics", "correction_accuracy", "wall_s")


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


def results_summary(
    *,
    method: str,
    corpus: str,
    model: str,
    noise: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, Any]],
    correction_accuracy: float | None,
    wall_s: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The summary of one run, what `results.json` holds: the keys below first, then `extra`'s.

    Args:
        method (`str`): the method, e.g. `"mlc"`.
        corpus (`str`): the corpus name or Hub id.
        model (`str`): the base model.
        noise (`Mapping`): `type`, `rate` and `realised_rate` (the share of noisy rows actually corrupted).
        metrics (`Mapping[str, Mapping]`): metrics per split, e.g. `{"test": {"test_accuracy": 0.9, ...}}`.
        correction_accuracy (`float`, *optional*): share of noisy rows whose corrected label is right (MLC only).
        wall_s (`float`): wall-clock seconds of the run.
        extra (`Mapping`, *optional*): further top-level keys; they may not replace the ones above.

    Returns:
        `dict[str, Any]`: the summary (values as given; [`write_results`] makes them JSON-safe).
    """
    noise = _check_noise(noise)
    if not isinstance(metrics, Mapping) or not all(isinstance(split, Mapping) for split in metrics.values()):
        raise ValueError(f"metrics must map split names to metric dicts, e.g. {{'test': {{...}}}}, got {metrics!r}")
    clashes = sorted(set(extra or {}) & set(RESULT_KEYS))
    if clashes:
        raise ValueError(f"extra may not replace the keys {clashes}; use other names than {list(RESULT_KEYS)}")
    return {
        "method": method,
        "corpus": corpus,
        "model": model,
        "noise": noise,
        "metrics": metrics,
        "correction_accuracy": correction_accuracy,
        "wall_s": wall_s,
        **(extra or {}),
    }


def write_results(output_dir: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Writes a [`results_summary`] to `<output_dir>/results.json` (the folder is created if missing)."""
    path = Path(output_dir) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json_safe(results), indent=2, allow_nan=False) + "\n")
    return path


def write_results_json(output_dir: str | os.PathLike, **fields: Any) -> Path:
    """
    Writes the summary of one run to `<output_dir>/results.json`: [`results_summary`] of `fields` (keyword
    arguments: `method`, `corpus`, `model`, `noise`, `metrics`, `correction_accuracy`, `wall_s`, optional `extra`),
    by [`write_results`].

    Returns:
        `Path`: the written file.
    """
    return write_results(output_dir, results_summary(**fields))


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


def _check_noise(noise: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(noise, Mapping) or any(key not in noise for key in NOISE_KEYS):
        raise ValueError(f"noise must be a dict with the keys {list(NOISE_KEYS)} (values may be None), got {noise!r}")
    return dict(noise)


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
