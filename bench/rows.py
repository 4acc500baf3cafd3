"""
What `bench/accuracy.py` (which writes `bench/results/accuracy.jsonl` and the runs' folders), `bench/report.py` (which
reads the results), and `bench/memorisation.py` and `bench/train_logs.py` (which read the runs' folders) share.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re

from mlc_text.config import MLC_FINISHES_ON_CLEAN, MLCTrainingArguments, default_clean_batch_size
from mlc_text.meta_split import main_loss_rows

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
    "select_on_trusted",
    "max_length",
    "meta_learning_rate",
    "mlc_settings",
    # An MLC run on the package's defaults of its day (no --mlc_settings, the default meta learning rate): without it
    # a row of today's defaults and an older row at the same meta learning rate (from before the defaults changed)
    # would share a key. Rows written before the field existed read as False.
    "mlc_defaults",
    # fp32, or bf16 (CPU or CUDA autocast, the recipe's --bf16); rows written before the field existed ran in fp32.
    "precision",
    # An MLC run's meta-gradient path as it ran ("auto" resolved): a row of the defaults after they became "auto" (fd
    # in fp32) is not one of the jvp defaults before. Rows without the field: `LEGACY_DEFAULTS`.
    "meta_gradient",
    # Whether an MLC run ended with the clean stage (its settings, else the package default of its day); rows written
    # before the field existed ran it only when their --mlc_settings asked.
    "finish_on_clean",
    # An MLC run's clean batch and meta_update_interval as they ran (its settings, else the package defaults of its
    # day); rows written before the fields existed ran the settings' values, else 32 (the batch) and 1.
    "clean_batch_size",
    "meta_update_interval",
    # How many of an MLC run's epochs over the noisy rows had the clean batch in the main loss (its
    # clean_in_main_loss_epochs, capped at the run's epochs; without the setting, all of them): a one-epoch run is the
    # same whether the limit is one epoch or none, a three-epoch run is not.
    "clean_in_main_loss_epochs",
    # An MLC run's clean_in_main_loss_passes as it ran (its settings, else the package default of its day; None: no
    # limit); rows written before the field existed had no limit unless their settings set one. Whether the limit
    # changed a run is [`clean_passes_in_main_loss`]'s to say.
    "clean_in_main_loss_passes",
)

# The benchmark's batch size (bench/accuracy.py --batch_size), which every row ran with.
BENCH_BATCH_SIZE = 32
# A row's passes limit is recorded as it ran; the report asks whether today's default would have run it alike.
PASSES = "clean_in_main_loss_passes"


def settings_of(row: dict) -> dict:
    """
    A row's `mlc_settings` (the canonical `KEY=JSON` text, joined by commas, that bench/accuracy.py writes) as a dict
    of values: `meta_gradient="fd",skip_init=2` -> `{"meta_gradient": "fd", "skip_init": 2}`. The one reader of that
    text.
    """
    settings = {}
    for item in filter(None, (row.get("mlc_settings") or "").split(",")):
        key, _, text = item.partition("=")
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return settings


def mlc_protocol(batch_size: int = BENCH_BATCH_SIZE, epochs: float = 1.0, clean_in_main_loss: bool = True) -> dict:
    """
    The MLC settings whose package defaults changed over the rows' history, at today's defaults for a noisy batch of
    `batch_size` and a run of `epochs` (with or without the clean batch in its main loss). Every MLC row records them
    as it ran (key fields above), so rows of two days' defaults differ.
    """
    return {
        "clean_batch_size": default_clean_batch_size(batch_size),
        "finish_on_clean": MLC_FINISHES_ON_CLEAN,
        "meta_update_interval": MLCTrainingArguments.meta_update_interval,
        "clean_in_main_loss_epochs": clean_epochs({"clean_in_main_loss": clean_in_main_loss}, epochs),
        PASSES: MLCTrainingArguments.clean_in_main_loss_passes,  # the limit ([`clean_passes_in_main_loss`])
    }


def clean_epochs(
    settings: dict, epochs: float, default: float | None = MLCTrainingArguments.clean_in_main_loss_epochs
) -> float:
    """
    What an MLC run of `epochs` with these `--mlc_settings` records as its `clean_in_main_loss_epochs`: the epochs
    with the clean batch in the main loss, capped at the run's (the setting's value, else `default`, the package's of
    the run's day); all of them without a limit, and for a run without the clean batch in the main loss, whose limit
    does not apply.
    """
    if settings.get("clean_in_main_loss") is False:
        return float(epochs)
    limit = settings.get("clean_in_main_loss_epochs", default)
    return float(epochs if limit is None else min(float(limit), epochs))  # float: "inf" from --mlc_settings


def passes_limit(value) -> float:
    """A `clean_in_main_loss_passes` limit as a number: `None` (no limit) and "inf" or JSON's Infinity as inf."""
    return math.inf if value is None else float(value)


def clean_passes_in_main_loss(row: dict, limit: float | None, batch_size: int = BENCH_BATCH_SIZE) -> float | None:
    """
    How many times, on average, an MLC row's clean batch would have shown each trusted row in the main loss under a
    passes limit of `limit` (`None` or inf: none), counted as `MLCTrainer.clean_in_main_loss_now` does: the steps
    that start within the row's `clean_in_main_loss_epochs` (of ceil(noisy rows / `batch_size`) steps each) and with
    fewer than `limit` passes done (steps x rows per step / trusted rows), x the clean batch's rows in the main loss
    (the batch at most the trusted rows that feed it) / those rows. `None` for a row without its row counts. Two
    limits ran a row alike when this is the same for both.
    """
    used = row.get("rows") or {}
    if row.get("method") != "mlc" or not used.get("train") or not used.get("clean"):
        return None
    settings = settings_of(row)
    if settings.get("clean_in_main_loss") is False:
        return 0.0
    meta_split = settings.get("meta_split", MLCTrainingArguments.meta_split)
    trusted = used["clean"]
    if meta_split == "rows":  # each class's rows less its share for the meta objective (half up, at least one)
        per_class = row["num_clean_per_class"] - row_value(row, "select_on_trusted")
        share = settings.get("meta_split_fraction", MLCTrainingArguments.meta_split_fraction)
        trusted = trusted // per_class * (per_class - max(1, math.floor(share * per_class + 0.5)))
    per_step = main_loss_rows(min(row_value(row, "clean_batch_size"), trusted), meta_split)
    steps = math.ceil(row_value(row, "clean_in_main_loss_epochs") * math.ceil(used["train"] / batch_size))
    limit = passes_limit(limit)
    if math.isfinite(limit):
        first_over = max(0, math.floor(limit * trusted / per_step) - 2)
        while first_over * per_step / trusted < limit:  # the trainer's own test, not its rounded inverse
            first_over += 1
        steps = min(steps, first_over)
    return steps * per_step / trusted


def _clean_epochs_of(row: dict) -> float | None:
    """An MLC row's `clean_in_main_loss_epochs` from before it was recorded (no limit was the default then)."""
    return clean_epochs(settings_of(row), row.get("epochs", 1.0), default=None) if row.get("method") == "mlc" else None


def _legacy_setting(name: str, before):
    """An MLC row's `name` from before it was recorded: its `--mlc_settings`' value, else `before` (that day's default)."""

    def value(row: dict):
        if row.get("method") != "mlc":
            return None
        return settings_of(row).get(name, before)

    return value


# Fields that rows written before they were recorded lack, with the value those rows used (a function of the row
# where it depends on the row).
LEGACY_DEFAULTS = {
    "validation_size": 500,
    "select_on_trusted": 0,
    "mlc_defaults": False,
    "precision": "fp32",
    # jvp: the default from the first row that has mlc_defaults until the defaults became "auto"; the clean stage ran
    # only where the settings asked.
    "meta_gradient": _legacy_setting("meta_gradient", "jvp"),
    "finish_on_clean": _legacy_setting("finish_on_clean", False),
    "clean_batch_size": _legacy_setting("clean_batch_size", BENCH_BATCH_SIZE),
    "meta_update_interval": _legacy_setting("meta_update_interval", 1),
    "clean_in_main_loss_epochs": _clean_epochs_of,
    PASSES: _legacy_setting(PASSES, None),
}


def row_value(row: dict, name: str):
    """`row[name]`, or the value every row that lacks the field was run with (`None` if there is none)."""
    if name in row:
        return row[name]
    legacy = LEGACY_DEFAULTS.get(name)
    return legacy(row) if callable(legacy) else legacy


def safe_name(text) -> str:
    """`text` with every character a file name should not carry (a slash above all) made `_`."""
    return re.sub(r"[^A-Za-z0-9=.,_]", "_", str(text))


def run_folder_name(run: dict) -> str:
    """
    The folder of one run under `--runs_dir`: the run's key in readable form (the model by its last path part), then a
    short hash of the whole key, so two runs that differ in any key field (the number of rows, the model's folder)
    never share, and overwrite, a folder.
    """
    model = safe_name(str(run["model"]).rstrip("/").rsplit("/", 1)[-1])
    name = f"{run['corpus']}-{model}-{run['noise_type']}-{run['noise_rate']}-c{run['num_clean_per_class']}"
    name += f"-n{run['max_train_samples']}-v{row_value(run, 'validation_size')}-L{run['max_length']}"
    name += f"-e{run['epochs']}-s{run['seed']}-{run['method']}"
    if row_value(run, "select_on_trusted"):
        name += f"-sel{row_value(run, 'select_on_trusted')}"
    if run.get("meta_learning_rate") is not None:
        name += f"-mlr{run['meta_learning_rate']:g}"
    if run.get("mlc_settings"):
        name += "-" + safe_name(run["mlc_settings"])
    key = json.dumps([row_value(run, field) for field in KEY_FIELDS])
    return f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def finished_run_folders(runs_dir: str, pattern: str, needs: str) -> list[str]:
    """
    The folders under `runs_dir` whose names match the shell `pattern` and that hold `needs` (a file a finished run
    leaves). Refuses, before anything is read, folders without their run's key ([`RUN_FILE`]), so that no tool writes
    half an output.
    """
    names = sorted(name for name in os.listdir(runs_dir) if fnmatch.fnmatch(name, pattern))
    folders = [os.path.join(runs_dir, name) for name in names]
    done = [folder for folder in folders if os.path.exists(os.path.join(folder, needs))]
    if not done:
        raise SystemExit(f"no finished run (a folder with {needs}) matches {pattern!r} in {runs_dir}")
    unkeyed = [os.path.basename(folder) for folder in done if not os.path.exists(os.path.join(folder, RUN_FILE))]
    if unkeyed:
        raise SystemExit(
            f"{len(unkeyed)} run folder(s) lack {RUN_FILE}, e.g. {unkeyed[0]!r}: they were not written by "
            "bench/accuracy.py (or by a version before it recorded each run's key)"
        )
    return done


def load_run_key(folder: str) -> dict:
    with open(os.path.join(folder, RUN_FILE)) as handle:
        return json.load(handle)


def runs_in(path: str) -> set[str]:
    """Names of the run folders that already have a line in `path` (a rerun skips them, so an interrupted one resumes)."""
    if not os.path.exists(path):
        return set()
    with open(path) as handle:
        return {json.loads(line)["run"] for line in handle if line.strip()}
