#!/usr/bin/env python
"""
What did a method do to the noisy rows while it trained? Reads the run folders that `bench/accuracy.py` left and
summarises the diagnostics each trainer logged every `logging_steps` (each logged value is the mean over the steps
since the last log), from the run's `trainer_state.json`:

- L2RW: `weight_on_corrupted`, the share of a noisy batch's weight that fell on rows whose label the noise changed
  (the realised noise rate if the weights ignored the noise; 0 for a perfect filter), and `zero_weight_share`, the
  share of noisy rows weighted to zero;
- MLC: `correction_accuracy` (the corrected labels' argmax against the true labels), `agreement_with_noisy` (against
  the given ones), `fixed_share`, `mean_entropy`, `skip_weight`;
- both: `clean_loss`.

Per metric the line holds `<metric>_mean` (over the logs), `<metric>_first` and `<metric>_last`, with the run's key
(from its `bench_run.json`) and `realised_noise_rate`. One line per run is appended to `--output`; runs already there
are skipped. `bench/report.py --train_logs` tabulates it.

    python bench/train_logs.py --runs_dir /tmp/accuracy-runs --pattern 'ag_news-*-l2rw-*'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rows import finished_run_folders, load_run_key, runs_in  # noqa: E402

METRICS = (
    "weight_on_corrupted",
    "zero_weight_share",
    "correction_accuracy",
    "agreement_with_noisy",
    "fixed_share",
    "mean_entropy",
    "skip_weight",
    "clean_loss",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", required=True, help="The --runs_dir of bench/accuracy.py.")
    parser.add_argument("--pattern", default="*", help="Shell pattern of the run folder names to read.")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "train_logs-cpu.jsonl"))
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs_dir):
        raise SystemExit(f"--runs_dir {args.runs_dir!r} is not a folder")
    return args


def summarise(folder: str) -> dict:
    with open(os.path.join(folder, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    with open(os.path.join(folder, "results.json")) as handle:
        results = json.load(handle)
    row = {
        "run": os.path.basename(folder),
        **load_run_key(folder),
        "realised_noise_rate": results["noise"]["realised_rate"],
    }
    for metric in METRICS:
        values = [float(entry[metric]) for entry in history if isinstance(entry.get(metric), (int, float))]
        if values:
            row[f"{metric}_mean"] = sum(values) / len(values)
            row[f"{metric}_first"], row[f"{metric}_last"] = values[0], values[-1]
            row["logs"] = max(row.get("logs", 0), len(values))
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    folders = finished_run_folders(args.runs_dir, args.pattern, needs="trainer_state.json")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    done = runs_in(args.output)
    folders = [folder for folder in folders if os.path.basename(folder) not in done]
    rows = [summarise(folder) for folder in folders]  # all read before any line is written
    with open(args.output, "a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(done)} runs already in {args.output}; wrote {len(rows)}")


if __name__ == "__main__":
    main()
