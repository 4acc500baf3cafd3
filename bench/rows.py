"""
What `bench/accuracy.py` (which writes `bench/results/accuracy.jsonl` and the runs' folders), `bench/report.py` (which
reads the results) and `bench/memorisation.py` (which reads the runs' folders) share.
"""

from __future__ import annotations

import hashlib
import json
import re

# Fields that rows written before they were recorded lack, with the one value those rows used.
LEGACY_DEFAULTS = {"validation_size": 500}

# Written by bench/accuracy.py into each run's folder: the run's key (the fields below), beside bench_args.json (the
# recipe's arguments), so that a tool reading the folder knows which cell and method it holds.
RUN_FILE = "bench_run.json"

# What identifies a run: a line with the same values is not run again.
KEY_FIELDS = (
    "corpus",
    "model",
    "noise_type",
    "noise_rate",
    "num_clean_per_class",
    "epochs",
    "method",
    "seed",
    "max_train_samples",
    "validation_size",
    "max_length",
    "meta_learning_rate",
    "mlc_settings",
)


def row_value(row: dict, name: str):
    """`row[name]`, or the value every row that lacks the field was run with (`None` if there is none)."""
    return row.get(name, LEGACY_DEFAULTS.get(name))


def _safe(text) -> str:
    return re.sub(r"[^A-Za-z0-9=.,_]", "_", str(text))


def run_folder_name(run: dict) -> str:
    """
    The folder of one run under `--runs_dir`: the run's key in readable form (the model by its last path part), then a
    short hash of the whole key, so two runs that differ in any key field (the number of rows, the model's folder)
    never share, and overwrite, a folder.
    """
    model = _safe(str(run["model"]).rstrip("/").rsplit("/", 1)[-1])
    name = f"{run['corpus']}-{model}-{run['noise_type']}-{run['noise_rate']}-c{run['num_clean_per_class']}"
    name += f"-n{run['max_train_samples']}-v{row_value(run, 'validation_size')}-L{run['max_length']}"
    name += f"-e{run['epochs']}-s{run['seed']}-{run['method']}"
    if run.get("meta_learning_rate") is not None:
        name += f"-mlr{run['meta_learning_rate']:g}"
    if run.get("mlc_settings"):
        name += "-" + _safe(run["mlc_settings"])
    key = json.dumps([row_value(run, field) for field in KEY_FIELDS])
    return f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
