#!/usr/bin/env python
"""
Accuracy benchmark: a grid over corpus x noise type x noise rate x clean rows per class x epochs x method x seed.

Every run goes through the package's own recipe (`recipes/train.py`, i.e. `mlc_text.pipeline.main`) in a fresh
process, with the same encoder, budget, clean set and noisy labels for every method of a cell (the split, the noise
and the training seed all follow `seed`). One line per run is appended to `bench/results/accuracy.jsonl`; runs
already there are skipped, so an interrupted grid resumes where it stopped.

Protocol (the paper's): a fixed number of epochs and the final checkpoint, evaluated once on the test split. The
validation split (held-out training rows with their noisy labels) is reported beside it, never instead of it; nothing
is tuned on the test split. With `--select_on_trusted K`, K trusted rows per class are held out of training instead
(for every method alike), the model is evaluated on them five times per run and the best checkpoint is kept
(`load_best_model_at_end`).

    python bench/accuracy.py                       # the default grid (see --help), resumable
    python bench/accuracy.py --dry_run             # list the runs and which are done
    python bench/accuracy.py --noise_rates 0.2 0.4 0.6 --seeds 0 1 2 --methods mlc finetune
    python bench/accuracy.py --precision bf16      # bf16 autocast: rows of their own, never mixed with fp32 rows
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rows import (  # noqa: E402
    BENCH_BATCH_SIZE,
    KEY_FIELDS,
    RUN_FILE,
    clean_epochs,
    mlc_protocol,
    row_value,
    run_folder_name,
)
from mlc_text.config import MLCTrainingArguments  # noqa: E402
from mlc_text.data import CORPORA  # noqa: E402
from mlc_text.meta_grad import resolve_meta_gradient  # noqa: E402
from mlc_text.methods import METHODS  # noqa: E402
from mlc_text.noise import NOISE_TYPES  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["ag_news"], choices=sorted(CORPORA))
    parser.add_argument("--noise_types", nargs="+", default=["uniform", "flip"])
    parser.add_argument("--noise_rates", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument("--clean_per_class", nargs="+", type=int, default=[100])
    parser.add_argument("--epochs", nargs="+", type=float, default=[1.0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["finetune", "clean_only", "finetune_clean_batch", "mlc", "l2rw", "glc", "oracle"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--model", default="minilm-l6", help="Alias, Hub id or local path of the encoder.")
    parser.add_argument("--max_train_samples", type=int, default=2000, help="Noisy training rows before the split.")
    parser.add_argument("--max_test_samples", type=int, default=2000)
    parser.add_argument("--validation_size", type=int, default=500)
    parser.add_argument(
        "--select_on_trusted",
        type=int,
        default=0,
        help="Trusted rows per class held out of training to pick the best of five checkpoints (0: the final one).",
    )
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, or bf16 autocast (the recipe's --bf16; on CPU only worth it with AVX512-BF16 or AMX).",
    )
    parser.add_argument("--batch_size", type=int, default=BENCH_BATCH_SIZE)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument(
        "--meta_learning_rates",
        nargs="+",
        type=float,
        default=[MLCTrainingArguments.meta_learning_rate],
        help="MLC runs once per value (default: the package's default meta learning rate).",
    )
    parser.add_argument(
        "--mlc_settings",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="MLCTrainingArguments for the mlc runs only, e.g. skip_connection=true gradient_steps=3 "
        "(part of the run's key; the report shows them beside the method).",
    )
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "accuracy.jsonl"))
    parser.add_argument("--runs_dir", default=None, help="Where the runs' folders go (default: a temporary folder).")
    parser.add_argument("--data_dir", default=os.environ.get("MLC_TEXT_DATA_DIR"))
    parser.add_argument("--dry_run", action="store_true", help="List the runs, marking those already done.")
    args = parser.parse_args(argv)
    _check(args)
    return args


def parse_settings(items: list[str]) -> dict:
    """`KEY=VALUE` strings to a dict; values are read as JSON where they parse (true, 3, 1e-4), else kept as text."""
    fields = {field.name for field in dataclasses.fields(MLCTrainingArguments)}
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--mlc_settings: {item!r} is not KEY=VALUE")
        if key not in fields:
            raise SystemExit(f"--mlc_settings: {key!r} is not an MLCTrainingArguments field")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def settings_key(settings: dict) -> str | None:
    """The canonical text of `--mlc_settings` in a run's key, `None` when there are none."""
    return ",".join(f"{key}={json.dumps(settings[key])}" for key in sorted(settings)) or None


def code_version() -> str | None:
    """The checkout's commit (short), with `-dirty` if the package or recipes have uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "mlc_text", "recipes"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def device_name() -> str:
    """What the runs train on: the first GPU's name, else `cpu` (the recipe uses the GPU whenever there is one)."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _check(args: argparse.Namespace) -> None:
    """Every value is checked before the first run starts, so a typo cannot cost a finished half grid."""
    args.mlc_settings = parse_settings(args.mlc_settings)
    bad_methods = [method for method in args.methods if method not in METHODS]
    if bad_methods:
        raise SystemExit(f"--methods: {bad_methods} not among {', '.join(METHODS)}")
    bad_types = [kind for kind in args.noise_types if kind not in NOISE_TYPES or kind == "matrix"]
    if bad_types:
        raise SystemExit(f"--noise_types: {bad_types} not among {', '.join(t for t in NOISE_TYPES if t != 'matrix')}")
    bad_rates = [rate for rate in args.noise_rates if not 0.0 <= rate <= 1.0]
    if bad_rates:
        raise SystemExit(f"--noise_rates: {bad_rates} outside [0, 1]")
    if any(count < 1 for count in args.clean_per_class):
        raise SystemExit(f"--clean_per_class: {args.clean_per_class} must all be >= 1")
    if args.select_on_trusted < 0 or any(args.select_on_trusted >= count for count in args.clean_per_class):
        raise SystemExit(
            f"--select_on_trusted {args.select_on_trusted} must be >= 0 and leave trusted rows to train on "
            f"(below every --clean_per_class, {args.clean_per_class})"
        )
    if any(epochs <= 0 for epochs in args.epochs):
        raise SystemExit(f"--epochs: {args.epochs} must all be > 0")
    if args.data_dir is None or not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data_dir (or MLC_TEXT_DATA_DIR) {args.data_dir!r} is not a folder with the corpora")


def grid(args: argparse.Namespace) -> list[dict]:
    runs = []
    # Seeds outermost: a grid cut short has every cell at one seed rather than some cells at all seeds.
    for seed, corpus, kind, rate, clean, epochs, method in itertools.product(
        args.seeds, args.corpora, args.noise_types, args.noise_rates, args.clean_per_class, args.epochs, args.methods
    ):
        for meta_lr in args.meta_learning_rates if method == "mlc" else [None]:
            run = {
                "corpus": corpus,
                "model": args.model,
                "noise_type": kind,
                "noise_rate": rate,
                "num_clean_per_class": clean,
                "epochs": epochs,
                "method": method,
                "seed": seed,
                "max_train_samples": args.max_train_samples,
                "validation_size": args.validation_size,
                "select_on_trusted": args.select_on_trusted,
                "max_length": args.max_length,
                "precision": args.precision,
            }
            if meta_lr is not None:
                run["meta_learning_rate"] = meta_lr
                if args.mlc_settings:
                    run["mlc_settings"] = settings_key(args.mlc_settings)
                run["meta_gradient"] = resolve_meta_gradient(
                    args.mlc_settings.get("meta_gradient", MLCTrainingArguments.meta_gradient), args.precision
                )
                for name, default in mlc_protocol(args.batch_size, epochs).items():  # as it runs, defaults resolved
                    run[name] = args.mlc_settings.get(name, default)
                # recorded as the epochs it covered, not as set
                run["clean_in_main_loss_epochs"] = clean_epochs(args.mlc_settings, epochs)
            run["mlc_defaults"] = uses_mlc_defaults(run)
            runs.append(run)
    return runs


def uses_mlc_defaults(run: dict) -> bool:
    """Whether an MLC run used the package's defaults: no `--mlc_settings`, the default meta learning rate."""
    return (
        run["method"] == "mlc"
        and not run.get("mlc_settings")
        and run.get("meta_learning_rate") == MLCTrainingArguments.meta_learning_rate
    )


def run_key(row: dict) -> tuple:
    return tuple(row_value(row, name) for name in KEY_FIELDS)


def done_keys(path: str) -> set[tuple]:
    if not os.path.exists(path):
        return set()
    with open(path) as handle:
        return {run_key(json.loads(line)) for line in handle if line.strip()}


def recipe_arguments(run: dict, args: argparse.Namespace, output_dir: str) -> dict:
    seed = run["seed"]
    return {
        "corpus": run["corpus"],
        "data_dir": args.data_dir,
        "model_name_or_path": run["model"],
        "method": run["method"],
        "noise_type": run["noise_type"],
        "noise_rate": run["noise_rate"],
        "noise_seed": seed,
        "split_seed": seed,
        "seed": seed,
        "num_clean_per_class": run["num_clean_per_class"],
        "num_train_epochs": run["epochs"],
        "max_train_samples": run["max_train_samples"],
        "max_test_samples": args.max_test_samples,
        "validation_source": "heldout",
        "validation_size": run["validation_size"],
        "max_length": run["max_length"],
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "meta_learning_rate": run.get("meta_learning_rate", MLCTrainingArguments.meta_learning_rate),
        **(args.mlc_settings if run.get("mlc_settings") else {}),
        "output_dir": output_dir,
        "overwrite_output_dir": True,
        "eval_strategy": "no",  # the final checkpoint is the one reported; do_eval still scores it on validation
        "logging_steps": 10,
        "disable_tqdm": True,
        "log_level": "warning",
        **precision_arguments(row_value(run, "precision")),
        **selection_arguments(row_value(run, "select_on_trusted"), len(CORPORA[run["corpus"]].label_names)),
    }


def precision_arguments(precision: str) -> dict:
    """The recipe's arguments for `precision`: bf16 autocast, on the CPU (`use_cpu`) when there is no GPU."""
    if precision == "fp32":
        return {}
    return {"bf16": True, **({} if torch.cuda.is_available() else {"use_cpu": True})}


def selection_arguments(per_class: int, num_classes: int) -> dict:
    """With `per_class` > 0: that many of each class's trusted rows validate five checkpoints; the best is kept."""
    if not per_class:
        return {}
    return {
        "validation_source": "clean",  # stratified: per_class rows of each class, taken out of the trusted rows
        "validation_size": per_class * num_classes,
        "eval_strategy": "steps",
        "eval_steps": 0.2,
        "save_strategy": "steps",
        "save_steps": 0.2,
        "save_total_limit": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
    }


def one_run(run: dict, args: argparse.Namespace, runs_dir: str) -> dict:
    name = run_folder_name(run)
    output_dir = os.path.join(runs_dir, name)
    os.makedirs(output_dir, exist_ok=True)
    Path(output_dir, RUN_FILE).write_text(json.dumps(run, indent=2))
    config = os.path.join(output_dir, "bench_args.json")
    Path(config).write_text(json.dumps(recipe_arguments(run, args, output_dir), indent=2))
    start = time.perf_counter()
    process = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train.py"), config], capture_output=True, text=True, cwd=ROOT
    )
    if process.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{process.stderr[-4000:]}")
    results = json.loads(Path(output_dir, "results.json").read_text())
    test, validation = results["metrics"].get("test", {}), results["metrics"].get("eval", {})
    return {
        **run,
        "test_accuracy": test.get("test_accuracy"),
        "test_macro_f1": test.get("test_macro_f1"),
        "eval_accuracy": validation.get("eval_accuracy"),
        "correction_accuracy": results.get("correction_accuracy"),
        "noisy_label_accuracy": (results.get("correction") or {}).get("noisy_label_accuracy"),
        "realised_noise_rate": results["noise"]["realised_rate"],
        "wall_s": round(time.perf_counter() - start, 1),
        "train_runtime_s": results["metrics"].get("train", {}).get("train_runtime"),
        "meta_learning_rate": run.get("meta_learning_rate"),
        "mlc_defaults": uses_mlc_defaults(run),
        "rows": results.get("rows"),
        "code_version": args.code_version,
        "device": args.device,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    args.code_version = code_version()
    args.device = device_name()
    runs = grid(args)
    done = done_keys(args.output)
    todo = [run for run in runs if run_key(run) not in done]
    if args.dry_run:
        for run in runs:
            print("done " if run_key(run) in done else "todo ", json.dumps(run))
        print(f"{len(runs) - len(todo)} done, {len(todo)} to run")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="mlc-accuracy-")
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already in {args.output}; runs go to {runs_dir}")
    for run in tqdm(todo, desc="accuracy grid", unit="run"):
        row = one_run(run, args, runs_dir)
        with open(args.output, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        tqdm.write(
            f"{run['corpus']} {run['noise_type']} {run['noise_rate']} seed {run['seed']} {run['method']:<10} "
            f"{run.get('meta_learning_rate') or '':<6} "
            f"test acc {row['test_accuracy']:.4f} ({row['wall_s']:.0f} s)"
        )


if __name__ == "__main__":
    main()
