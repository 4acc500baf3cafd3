"""What `bench/accuracy.py` (which writes `bench/results/accuracy.jsonl`) and `bench/report.py` (which reads it) share."""

from __future__ import annotations

# Fields that rows written before they were recorded lack, with the one value those rows used.
LEGACY_DEFAULTS = {"validation_size": 500}


def row_value(row: dict, name: str):
    """`row[name]`, or the value every row that lacks the field was run with (`None` if there is none)."""
    return row.get(name, LEGACY_DEFAULTS.get(name))
