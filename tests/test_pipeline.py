"""The recipes' shared harness end to end: every method on a tiny encoder and a few hundred AG News rows."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification

from mlc_text.config import METHODS
from mlc_text.label_issues import LABEL_ISSUE_COLUMNS
from mlc_text.pipeline import EVALUATION_DEFAULTS, RECIPE_DEFAULTS, compare, end_process_group, main, parse_args

from .test_cli import tiny_scale, write_user_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def tiny_argv(model_dir: str, output_dir, data_dir: str, *extra: str) -> list[str]:
    return [
        *("--corpus", "ag_news", "--model_name_or_path", model_dir, "--output_dir", str(output_dir)),
        *("--data_dir", data_dir),
        *("--max_train_samples", "96", "--max_test_samples", "48", "--validation_size", "24"),
        *("--num_clean_per_class", "6", "--max_length", "32", "--per_device_train_batch_size", "16"),
        *("--per_device_eval_batch_size", "64", "--logging_steps", "2", "--disable_tqdm", "True"),
        *("--dataloader_pin_memory", "False", "--seed", "0"),
        *extra,
    ]


def assert_plain_classifier(folder) -> None:
    """The saved model and tokenizer load and run in a process that never imports mlc_text."""
    code = (
        "import sys; from transformers import AutoModelForSequenceClassification, AutoTokenizer;"
        "m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]);"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "print(m.config.id2label[0], m(**t(['stocks fell'], return_tensors='pt')).logits.shape[-1],"
        " 'mlc_text' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["World", "4", "False"]
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.label2id == {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_its_outputs(method, tiny_model_dir, data_dir, tmp_path):
    output_dir = tmp_path / method
    results = main(argv=tiny_argv(tiny_model_dir, output_dir, data_dir, "--method", method))

    written = json.loads((output_dir / "results.json").read_text())
    assert written["method"] == results["method"] == method and written["corpus"] == "ag_news"
    assert written["model"] == tiny_model_dir
    assert written["noise"]["type"] == "uniform" and written["noise"]["rate"] == 0.4
    assert 0.1 < written["noise"]["realised_rate"] < 0.5  # 0.4 * 3/4 expected: uniform noise may keep the label
    test = written["metrics"]["test"]
    assert 0.0 <= test["test_accuracy"] <= 1.0 and 0.0 <= test["test_macro_f1"] <= 1.0
    assert "eval_accuracy" in written["metrics"]["eval"] and written["wall_s"] > 0
    assert written["rows"] == {"train": 96, "clean": 24, "validation": 24, "test": 48}

    report = json.loads((output_dir / "noise_report.json").read_text())
    assert report["realised_rate"] == written["noise"]["realised_rate"]
    assert (output_dir / "learning_curves.png").read_bytes()[:8] == PNG_MAGIC
    card = (output_dir / "README.md").read_text()
    assert "uniform" in card and method in card and "AutoModelForSequenceClassification" in card
    # the clean batch the run drew (clean_batch_size=None resolved): MLC a quarter of the noisy batch of 16, L2RW all
    clean_batch = {"mlc": 4, "l2rw": 16, "finetune_clean_batch": 16}.get(method)
    if clean_batch:
        assert f"- clean_batch_size: {clean_batch}\n" in card
    else:
        assert "clean_batch_size" not in card

    if method == "mlc":
        assert_plain_classifier(output_dir)
        assert 0.0 <= written["correction_accuracy"] <= 1.0
        assert (output_dir / "label_corrector.pt").is_file()
        assert (output_dir / "correction_matrix.png").read_bytes()[:8] == PNG_MAGIC
        matrix = written["correction"]["learned_correction_matrix"]
        assert len(matrix) == 4 and all(abs(sum(row) - 1) < 1e-4 for row in matrix)
    else:
        assert written["correction_accuracy"] is None
    if method == "glc":
        assert len(written["glc_transition_matrix"]) == 4
    assert_label_issues(output_dir, written, corrects_labels=method == "mlc")


def assert_label_issues(output_dir, results: dict, corrects_labels: bool) -> None:
    """label_issues.csv: every noisy training row once, least believed label first; precision at k in results."""
    with (output_dir / "label_issues.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(LABEL_ISSUE_COLUMNS)
    assert len(table) == results["rows"]["train"] == len({row["index"] for row in table})
    quality = [float(row["label_quality"]) for row in table]
    assert quality == sorted(quality) and [int(row["rank"]) for row in table] == list(range(1, len(table) + 1))
    assert all((row["corrected_label"] != "") == corrects_labels for row in table)
    wrong = sum(row["given_label"] != row["true_label"] for row in table)  # simulated noise: every true label known
    issues = results["label_issues"]
    assert issues["ranked_by"] == "self_confidence" and issues["k"] == wrong > 0 and issues["num_known"] == len(table)
    assert issues["precision_at_k"] == issues["recall_at_k"] and 0.0 <= issues["precision_at_k"] <= 1.0
    assert issues["wrong_share"] == pytest.approx(wrong / len(table)) == results["noise"]["realised_rate"]


def test_compare_runs_methods_on_the_same_split(tiny_model_dir, data_dir, tmp_path):
    rows = compare(["finetune", "clean_only"], argv=tiny_argv(tiny_model_dir, tmp_path, data_dir, "--max_steps", "2"))
    assert [row["method"] for row in rows] == ["finetune", "clean_only"]
    assert json.loads((tmp_path / "comparison.json").read_text()) == rows
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    reports = [json.loads((tmp_path / name / "noise_report.json").read_text()) for name in ("finetune", "clean_only")]
    assert reports[0] == reports[1]


def test_arguments_from_a_json_file_keep_the_recipe_defaults(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "method": "l2rw", "noise_rate": 0.2}))
    model_args, data_args, noise_args, training_args = parse_args([str(path)], {"num_clean_per_class": 7})
    assert training_args.method == "l2rw" and noise_args.noise_rate == 0.2 and data_args.num_clean_per_class == 7
    assert model_args.model_name_or_path == "minilm-l6"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("--method", "mwnet"),
            "method must be one of mlc, finetune, clean_only, finetune_then_clean, glc, l2rw, finetune_clean_batch, oracle, got 'mwnet'",
        ),
        (("--corpus", "yahoo"), "yahoo"),
        (("--method", "clean_only", "--num_clean_per_class", "0"), "method 'clean_only' needs clean rows"),
        (
            ("--method", "finetune_clean_batch", "--clean_in_main_loss", "false"),
            "clean_in_main_loss=False is not accepted",
        ),
        (("--noise_rate", "1.5"), "noise_rate"),
        (("--max_length", "4"), "max_length"),
    ],
)
def test_bad_settings_are_refused_before_any_work(extra, message, tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        main(argv=tiny_argv(tiny_model_dir, tmp_path / "out", data_dir, *extra))
    assert not (tmp_path / "out" / "noise_report.json").exists()


def test_a_previous_run_is_not_overwritten(tiny_model_dir, data_dir, tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a previous run .*--overwrite_output_dir"):
        main(argv=tiny_argv(tiny_model_dir, tmp_path, data_dir))
    assert (tmp_path / "results.json").read_text() == "{}"


def test_offline_without_data_says_where_to_put_the_files(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLC_TEXT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    argv = tiny_argv(tiny_model_dir, tmp_path / "out", str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match=r"ag_news.*train\.jsonl"):
        main(argv=argv)


def test_recipe_runs_under_accelerate_launch(tiny_model_dir, data_dir, tmp_path):
    """The documented entry point: `accelerate launch recipes/train_agnews.py ...` with the CPU config."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate, "launch", "--config_file", os.path.join(root, "recipes/accelerate_configs/cpu.yaml")]
    command += [os.path.join(root, "recipes/train_agnews.py")]
    command += tiny_argv(tiny_model_dir, tmp_path, data_dir, "--max_steps", "1")
    # The recipe validates on trusted rows (EVALUATION_DEFAULTS): enough of them to take 16 out.
    command += ["--num_clean_per_class", "12", "--validation_size", "16"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| mlc " in out.stdout and "test_accuracy" in out.stdout
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "mlc"


def test_push_to_hub_offline_fails_clearly_after_saving(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = tiny_argv(tiny_model_dir, tmp_path, data_dir, "--method", "finetune", "--max_steps", "2")
    argv += ["--push_to_hub", "True", "--hub_model_id", "someone/mlc-agnews", "--report_to", "tensorboard"]
    with pytest.raises(RuntimeError, match="push_to_hub to 'someone/mlc-agnews' failed.*saved locally"):
        main(argv=argv)
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "finetune"
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # report_to tensorboard wrote its logs


def test_best_checkpoint_on_validation_is_loaded_when_asked(tiny_model_dir, data_dir, tmp_path):
    argv = tiny_argv(tiny_model_dir, tmp_path, data_dir, "--method", "mlc", "--max_steps", "4")
    argv += ["--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    argv += ["--load_best_model_at_end", "True", "--metric_for_best_model", "accuracy"]
    main(argv=argv)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_accuracy" in entry and entry.get("step") in (2, 4)]
    assert [entry["step"] for entry in evals][:2] == [2, 4]
    best = max(evals[:2], key=lambda entry: entry["eval_accuracy"])
    assert state["best_metric"] == best["eval_accuracy"]
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert (tmp_path / f"checkpoint-{best['step']}" / "mlc_state.pt").is_file()  # corrector state in checkpoints


def test_recipe_compare_runs_on_your_own_files(tiny_model_dir, tmp_path):
    """Issue 27's command: recipes/compare.py names AG News as its default corpus, and --train_file wins over it."""
    train, test = write_user_files(tmp_path / "my", extension="jsonl")
    command = [sys.executable, str(ROOT / "recipes" / "compare.py"), "--methods", "finetune,l2rw"]
    command += ["--train_file", str(train), "--test_file", str(test), "--noisy_label_column", "noisy_label"]
    command += ["--label_column", "label", "--noise_type", "none", "--num_clean_per_class", "20"]
    command += ["--validation_size", "40", "--output_dir", str(tmp_path / "out"), *tiny_scale(tiny_model_dir)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| finetune " in out.stdout and "| l2rw " in out.stdout
    for method in ("finetune", "l2rw"):
        results = json.loads((tmp_path / "out" / method / "results.json").read_text())
        assert results["corpus"] == "custom" and results["label_issues"]["num_known"] == 40
        assert (tmp_path / "out" / method / "label_issues.csv").is_file()


@pytest.mark.parametrize(
    ("argv", "corpus"),
    [
        ([], "ag_news"),  # the recipe's default
        (["--train_file", "my.csv"], None),  # your file wins over the recipe's default corpus
        (["--corpus", "imdb"], "imdb"),
        (["--corpus", "None", "--train_file", "my.csv"], None),
        (["--corpus", "ag_news", "--train_file", "my.csv"], "ag_news"),  # both said: refused when the data loads
    ],
)
def test_a_recipe_default_corpus_applies_only_without_train_file(argv, corpus):
    assert parse_args(argv, {"corpus": "ag_news"})[1].corpus == corpus


def test_a_recipe_default_corpus_yields_to_a_train_file_in_an_argument_file(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("train_file: my.csv\noutput_dir: out\n")
    assert parse_args([str(path)], {"corpus": "ag_news"})[1].corpus is None
    path.write_text("output_dir: out\n")
    assert parse_args([str(path)], {"corpus": "ag_news"})[1].corpus == "ag_news"


def test_naming_a_corpus_and_files_is_refused_with_both_named(tiny_model_dir, data_dir, tmp_path):
    train, _ = write_user_files(tmp_path / "my")
    argv = tiny_argv(tiny_model_dir, tmp_path / "out", data_dir, "--train_file", str(train))
    with pytest.raises(ValueError, match="train_file are for your own files, got them with corpus='ag_news'"):
        main(argv=argv)


def test_recipes_evaluate_on_trusted_rows_during_training(tiny_model_dir, data_dir, tmp_path):
    argv = tiny_argv(tiny_model_dir, tmp_path, data_dir, "--method", "mlc", "--max_steps", "5")
    argv += ["--num_clean_per_class", "12", "--validation_size", "16"]
    results = main({**EVALUATION_DEFAULTS, "corpus": "ag_news"}, argv)
    assert results["rows"] == {"train": 96, "clean": 32, "validation": 16, "test": 48}  # validation: trusted rows
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    evals = [entry["step"] for entry in state["log_history"] if "eval_accuracy" in entry]
    assert evals[:5] == [1, 2, 3, 4, 5]  # eval_steps 0.2 of 5 steps, then the final do_eval
    assert all("agreement_with_noisy" in entry for entry in state["log_history"] if "loss" in entry)
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluation_defaults_leave_the_accuracy_benchmark_unchanged(data_dir, tmp_path):
    """bench/accuracy.py runs recipes/train.py (EVALUATION_DEFAULTS): its explicit arguments must override them."""
    from .test_bench import load

    accuracy = load("accuracy")
    args = accuracy.parse_args(["--data_dir", data_dir, "--output", str(tmp_path / "a.jsonl")])
    path = tmp_path / "bench_args.json"
    path.write_text(json.dumps(accuracy.recipe_arguments(accuracy.grid(args)[0], args, str(tmp_path))))
    recipe = parse_args([str(path)], {**RECIPE_DEFAULTS, **EVALUATION_DEFAULTS})
    plain = parse_args([str(path)], RECIPE_DEFAULTS)
    assert recipe[:3] == plain[:3]  # model, data (validation_source, validation_size) and noise arguments
    assert recipe[3].eval_strategy == plain[3].eval_strategy == "no"
    changed = {
        field.name
        for field in dataclasses.fields(recipe[3])
        if getattr(recipe[3], field.name) != getattr(plain[3], field.name)
    }
    assert changed <= {"eval_steps"}  # unused with eval_strategy "no"


def test_compare_asks_for_the_clean_stage_only_where_a_method_has_one(tmp_path, monkeypatch):
    import mlc_text.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda model, data, noise, args: seen.setdefault(args.method, args))
    monkeypatch.setattr(pipeline, "result_row", lambda results: {"method": results.method})
    monkeypatch.setattr(pipeline, "plot_method_comparison", lambda rows, path: None)
    monkeypatch.setattr(pipeline, "format_results_table", lambda rows, columns: "")
    argv = ["--output_dir", str(tmp_path), "--finish_on_clean", "True", "--report_to", "none"]
    compare(["mlc", "l2rw", "finetune", "finetune_then_clean"], argv)  # the baselines' arguments refuse it as asked
    assert {method: args.finish_on_clean for method, args in seen.items()} == {
        "mlc": True,
        "l2rw": True,
        "finetune": None,
        "finetune_then_clean": None,
    }


def test_a_launched_run_leaves_its_process_group_and_a_plain_one_has_none_to_leave(tmp_path):
    end_process_group()  # one process, no group: nothing to do
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("entry", ["main", "compare"])
def test_main_and_compare_end_the_group_their_run_created_and_leave_the_callers(tmp_path, monkeypatch, entry):
    import mlc_text.pipeline as pipeline

    stores = iter(range(10))

    def launched_run(model, data, noise, args):  # as the training arguments do under `accelerate launch`
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / str(next(stores))}", rank=0, world_size=1)
        return {"corpus": "ag_news", "model": "m", "noise": "none", "method": args.method}

    monkeypatch.setattr(pipeline, "run", launched_run)
    monkeypatch.setattr(pipeline, "result_row", lambda results: {"method": results["method"]})
    monkeypatch.setattr(pipeline, "plot_method_comparison", lambda rows, path: None)
    monkeypatch.setattr(pipeline, "format_results_table", lambda rows, columns: "")
    argv = ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    (tmp_path / "out").mkdir()  # the runs, faked here, would make it
    call = (lambda: main(argv=argv)) if entry == "main" else (lambda: compare(["finetune", "clean_only"], argv))
    call()
    assert not dist.is_initialized()  # the run's own group, ended
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'caller'}", rank=0, world_size=1)
    try:
        call()
        assert dist.is_initialized()  # the caller's group, kept
    finally:
        dist.destroy_process_group()
