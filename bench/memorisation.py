#!/usr/bin/env python
"""
How much of the label noise did a trained model learn? Reads the run folders that `bench/accuracy.py` left (each
holds `bench_args.json` and the final model), rebuilds each run's noisy training rows from its seeds, and scores the
final model on them and on the test rows:

- `memorised`: of the training rows whose label the noise changed, the share where the model predicts the *given*
  (wrong) label; `recovered`: the share where it predicts the true one.
- `train_accuracy_on_clean_labels`: accuracy on the training rows the noise left alone.
- `test_accuracy` (which must match the run's own, a check that the rows were rebuilt right) and
  `test_to_noise_partner`: the share of test rows predicted as the class the noise most often gives to their true
  class (under flip noise, the one class each true class is flipped to; null where the noise has no single such
  class, as under uniform noise).

One line per run is appended to `--output`, with the run's key (its cell and method, from the `bench_run.json` that
`bench/accuracy.py` writes into each run's folder) so that `bench/report.py` can tabulate it; runs already there are
skipped.

    python bench/memorisation.py --runs_dir /tmp/accuracy-runs --pattern 'ag_news-*-flip-0.4-c100-*'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rows import finished_run_folders, load_run_key, runs_in  # noqa: E402
from mlc_text.data import prepare_corpus  # noqa: E402
from mlc_text.pipeline import parse_args as parse_recipe_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", required=True, help="The --runs_dir of bench/accuracy.py.")
    parser.add_argument("--pattern", default="*", help="Shell pattern of the run folder names to score.")
    parser.add_argument("--max_train_rows", type=int, default=1000, help="Noisy training rows scored (the first N).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "memorisation-cpu.jsonl"))
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs_dir):
        raise SystemExit(f"--runs_dir {args.runs_dir!r} is not a folder")
    if args.max_train_rows < 1:
        raise SystemExit(f"--max_train_rows must be >= 1, got {args.max_train_rows}")
    return args


def run_folders(runs_dir: str, pattern: str) -> list[str]:
    return finished_run_folders(runs_dir, pattern, needs="model.safetensors")


@torch.inference_mode()
def predict(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    predictions = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        predictions.append(model(**inputs).logits.argmax(-1).numpy())
    return np.concatenate(predictions)


def _share(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if hits.size else None


def noise_partner(transition_matrix) -> np.ndarray | None:
    """
    Per true class, the wrong label the noise gives it most often; `None` where some class has no single such label
    (uniform noise) or there is no matrix (a corpus's own noisy labels).
    """
    if transition_matrix is None:
        return None
    matrix = np.array(transition_matrix, dtype=float)
    np.fill_diagonal(matrix, -1.0)
    top_two = np.sort(matrix, axis=1)[:, -2:]
    return matrix.argmax(axis=1) if np.all(top_two[:, 1] > top_two[:, 0]) else None


def score(folder: str, max_train_rows: int, batch_size: int) -> dict:
    _, data_args, noise_args, _ = parse_recipe_args([os.path.join(folder, "bench_args.json")])
    corpus = prepare_corpus(data_args, noise_args)
    train = corpus.train.select(range(min(max_train_rows, len(corpus.train))))
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    given, true = np.asarray(train["label"]), np.asarray(train["true_label"])
    predicted = predict(model, tokenizer, train["text"], data_args.max_length, batch_size)
    wrong = given != true
    test_true = np.asarray(corpus.test["label"])
    test_predicted = predict(model, tokenizer, corpus.test["text"], data_args.max_length, batch_size)
    partner = noise_partner(corpus.noise_report.get("transition_matrix"))
    to_partner = None if partner is None else float((test_predicted == partner[test_true]).mean())
    with open(os.path.join(folder, "results.json")) as handle:
        recorded = json.load(handle)
    run = load_run_key(folder)
    return {
        "run": os.path.basename(folder),
        **run,
        "train_rows_scored": int(len(train)),
        "wrong_rows_scored": int(wrong.sum()),
        "memorised": _share(predicted[wrong] == given[wrong]),
        "recovered": _share(predicted[wrong] == true[wrong]),
        "train_accuracy_on_clean_labels": _share(predicted[~wrong] == true[~wrong]),
        "test_accuracy": float((test_predicted == test_true).mean()),
        "recorded_test_accuracy": recorded["metrics"]["test"]["test_accuracy"],
        "test_to_noise_partner": to_partner,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    folders = run_folders(args.runs_dir, args.pattern)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    done = runs_in(args.output)
    folders = [folder for folder in folders if os.path.basename(folder) not in done]
    print(f"{len(done)} runs already in {args.output}; {len(folders)} to score")
    for folder in tqdm(folders, desc="memorisation", unit="run"):
        start = time.perf_counter()
        row = score(folder, args.max_train_rows, args.batch_size)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        with open(args.output, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        tqdm.write(json.dumps(row))


if __name__ == "__main__":
    main()
