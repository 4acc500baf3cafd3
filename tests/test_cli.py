"""The `mlc-text` command: help (MLC's arguments first), dispatch, and `compare` on a user's files with real noise."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlc_text import cli

CLASS_WORDS = {
    "world": "election minister war embassy treaty parliament",
    "sports": "match goal coach season league striker",
    "business": "stocks market profit shares bank merger",
    "tech": "software chip internet startup robot laptop",
}


def write_user_files(
    folder: Path, extension: str = "csv", rows_per_class: int = 50, known_per_class: int = 30, seed: int = 0
) -> tuple[Path, Path]:
    """
    A user's corpus with real noise: `train.<ext>` with `text`, `noisy_label` (30% wrong) and `label` (the trusted
    label for `known_per_class` rows per class, empty elsewhere), and `test.<ext>` with `text` and `label`.
    """
    rng = np.random.default_rng(seed)
    names = list(CLASS_WORDS)

    def rows(count: int, known: int) -> list[dict]:
        out = []
        for label, name in enumerate(names):
            for row in range(count):
                words = [*rng.choice(CLASS_WORDS[name].split(), 6), *rng.choice(["the", "a", "new", "today"], 3)]
                wrong = names[(label + 1 + int(rng.integers(3))) % len(names)]
                noisy = wrong if rng.random() < 0.3 else name
                out.append({"text": " ".join(words), "noisy_label": noisy, "label": name if row < known else ""})
        return [out[i] for i in rng.permutation(len(out))]

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, split_rows, columns in (
        ("train", rows(rows_per_class, known_per_class), ["text", "noisy_label", "label"]),
        ("test", rows(10, 10), ["text", "label"]),
    ):
        path = folder / f"{split}.{extension}"
        if extension == "csv":
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(split_rows)
        else:
            lines = [json.dumps({key: row[key] or None for key in columns}) for row in split_rows]
            path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return tuple(paths)


def tiny_scale(model_dir: str, *extra: str) -> list[str]:
    """What makes a user's command a test: the tiny encoder and a handful of steps."""
    return [
        *("--model_name_or_path", model_dir, "--max_steps", "3", "--max_length", "32"),
        *("--per_device_train_batch_size", "16", "--logging_steps", "1", "--disable_tqdm", "True"),
        *("--dataloader_pin_memory", "False", "--log_level", "warning"),
        *extra,
    ]


def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_console_script_is_installed_and_lists_the_commands():
    script = Path(sys.executable).parent / "mlc-text"
    assert script.is_file(), f"{script} is missing: `make install` installs the console script (setup.cfg)"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: mlc-text <command>" in out.stdout and "train" in out.stdout and "compare" in out.stdout


def test_module_entry_point_reports_the_version():
    out = subprocess.run([sys.executable, "-m", "mlc_text.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().startswith("mlc-text 0.")


def test_train_help_lists_mlc_arguments_first_with_the_defaults_that_apply(capsys):
    text = help_text(capsys, "train")
    groups = [line for line in text.splitlines() if re.match(r"^[a-z].*:$", line)]
    assert groups[:2] == ["options:", "method and Meta Label Correction (MLCTrainingArguments' own fields):"]
    assert groups[-1] == "training loop (transformers.TrainingArguments):"
    position = {name: re.search(rf"^  --{name} ", text, flags=re.M).start() for name in ("method", "learning_rate")}
    assert position["method"] < text.index("--meta_learning_rate") < position["learning_rate"]
    assert "(default: clean)" in text  # validation_source: the recipes' trusted-row evaluation
    assert "(default: 2000)" in text  # max_train_samples: the recipes' budget, not the dataclass's None


def test_compare_help_lists_methods(capsys):
    text = help_text(capsys, "compare")
    assert text.startswith("usage: mlc-text compare --methods")
    assert text.index("--methods") < text.index("--meta_learning_rate")


def test_unknown_command_names_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fit' (choose from 'train', 'compare')" in capsys.readouterr().err
    with pytest.raises(ValueError, match="command must be one of train, compare, got 'fit'"):
        cli.run_command("fit", [])


def test_split_methods():
    assert cli.split_methods(["--methods", "mlc,l2rw", "--seed", "1"]) == (["mlc", "l2rw"], ["--seed", "1"])
    assert cli.split_methods(["--methods=finetune, mlc"]) == (["finetune", "mlc"], [])
    assert cli.split_methods([]) == (["mlc", "finetune", "clean_only"], [])


def test_compare_on_user_files_with_real_noisy_labels(tiny_model_dir, tmp_path):
    train, test = write_user_files(tmp_path / "my")
    argv = ["compare", "--methods", "finetune,mlc", "--train_file", str(train), "--test_file", str(test)]
    argv += ["--noisy_label_column", "noisy_label", "--label_column", "label", "--noise_type", "none"]
    argv += ["--num_clean_per_class", "20", "--validation_size", "40", "--output_dir", str(tmp_path / "out")]
    argv += tiny_scale(tiny_model_dir, "--report_to", "tensorboard")
    assert cli.main(argv) == 0

    rows = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [row["method"] for row in rows] == ["finetune", "mlc"]
    for method in ("finetune", "mlc"):
        folder = tmp_path / "out" / method
        results = json.loads((folder / "results.json").read_text())
        assert results["corpus"] == "custom" and results["noise"]["type"] == "real"
        # 30 trusted rows per class: 20 clean (10 of them validate), 10 left in the noisy pool with their true label.
        assert results["rows"] == {"train": 120, "clean": 40, "validation": 40, "test": 40}
        issues = results["label_issues"]
        assert issues["ranked_by"] == "self_confidence"
        assert ("corrector_precision_at_k" in issues) == (method == "mlc")
        assert issues["num_known"] == 40 and 0 < issues["k"] < 40 and 0.0 <= issues["precision_at_k"] <= 1.0
        with (folder / "label_issues.csv").open(newline="") as handle:
            table = list(csv.DictReader(handle))
        assert len(table) == 120 and len({row["index"] for row in table}) == 120
        assert set(row["given_label"] for row in table) <= set(CLASS_WORDS)
        quality = [float(row["label_quality"]) for row in table]
        assert quality == sorted(quality)
        assert sum(row["true_label"] != "" for row in table) == 40
        state = json.loads((folder / "trainer_state.json").read_text())
        assert len([entry for entry in state["log_history"] if "eval_accuracy" in entry]) >= 3  # during training
    events = list((tmp_path / "out" / "mlc").rglob("events.out.tfevents.*"))
    assert events, "report_to tensorboard wrote no event file"
    tags = tensorboard_tags(events[0].parent)
    assert {"train/loss", "train/agreement_with_noisy", "eval/accuracy"} <= tags


def tensorboard_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])
