"""
The accuracy benchmark's bookkeeping: resumable grid, input checks, and the report's statistics; step_cost's runner
and its tables.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_grid_resumes_from_the_lines_already_written(tmp_path, data_dir):
    accuracy = load("accuracy")
    output = tmp_path / "accuracy.jsonl"
    argv = ["--data_dir", data_dir, "--output", str(output), "--methods", "mlc", "finetune", "--seeds", "0", "1"]
    runs = accuracy.grid(accuracy.parse_args([*argv, "--meta_learning_rates", "3e-5"]))
    assert len(runs) == 2 * 2 * 2 * 2  # noise types x rates x seeds x methods
    assert [run["seed"] for run in runs[:8]] == [0] * 8  # every cell at seed 0 before any at seed 1
    two_rates = accuracy.grid(accuracy.parse_args([*argv, "--meta_learning_rates", "3e-5", "1e-3"]))
    assert len(two_rates) == 2 * 2 * 2 * 3  # MLC once per meta learning rate, each its own run
    assert len({accuracy.run_key(run) for run in two_rates}) == len(two_rates)
    output.write_text(json.dumps({**runs[0], "test_accuracy": 0.5}) + "\n")
    done = accuracy.done_keys(str(output))
    assert accuracy.run_key(runs[0]) in done and accuracy.run_key(runs[1]) not in done


def test_validation_size_is_part_of_the_key(tmp_path, data_dir):
    accuracy = load("accuracy")
    output = tmp_path / "accuracy.jsonl"
    argv = ["--data_dir", data_dir, "--output", str(output), "--methods", "finetune", "--seeds", "0"]
    (default,) = accuracy.grid(accuracy.parse_args([*argv, "--noise_types", "flip", "--noise_rates", "0.4"]))
    args = accuracy.parse_args([*argv, "--noise_types", "flip", "--noise_rates", "0.4", "--validation_size", "100"])
    (small,) = accuracy.grid(args)
    assert accuracy.recipe_arguments(small, args, str(tmp_path))["validation_size"] == 100
    old_row = {key: value for key, value in default.items() if key != "validation_size"}  # written before the field
    output.write_text(json.dumps({**old_row, "test_accuracy": 0.5}) + "\n")
    done = accuracy.done_keys(str(output))
    assert accuracy.run_key(default) in done and accuracy.run_key(small) not in done


def test_clean_in_main_loss_epochs_is_recorded_as_the_epochs_it_covered(tmp_path, data_dir):
    accuracy, report, rows = load("accuracy"), load("report"), load("rows")
    from mlc_text.config import MLCTrainingArguments

    assert MLCTrainingArguments.clean_in_main_loss_epochs == 1.0  # today's default, which the names below assume
    argv = ["--data_dir", data_dir, "--output", str(tmp_path / "a.jsonl"), "--methods", "mlc", "--seeds", "0"]

    def run(epochs, *settings):
        extra = ["--mlc_settings", *settings] if settings else []
        return accuracy.grid(accuracy.parse_args([*argv, "--epochs", epochs, *extra]))[0]

    one, three = run("1"), run("3")
    name = "clean_in_main_loss_epochs"
    assert (one[name], three[name]) == (1.0, 1.0)
    assert run("3", "clean_in_main_loss_epochs=inf")[name] == 3.0  # the command line's "throughout"
    # the passes limit as it runs: the settings' value, else today's default
    assert one["clean_in_main_loss_passes"] == MLCTrainingArguments.clean_in_main_loss_passes
    assert run("1", "clean_in_main_loss_passes=7")["clean_in_main_loss_passes"] == 7
    without = run("3", "clean_in_main_loss=false")
    assert without[name] == 3.0  # no clean batch in the main loss: the limit does not apply
    # rows from before the field: their settings' limit, else none, capped at their epochs
    assert rows.row_value({"method": "mlc", "epochs": 1.0}, name) == 1.0
    assert rows.row_value({"method": "mlc", "epochs": 3.0}, name) == 3.0
    assert rows.row_value({"method": "mlc", "epochs": 3.0, "mlc_settings": "clean_in_main_loss_epochs=1"}, name) == 1.0
    assert rows.row_value({"method": "finetune", "epochs": 3.0}, name) is None
    # one epoch is the same run under either limit: an older row of it keeps its key and its label
    older_one = {key: value for key, value in one.items() if key != name}
    assert accuracy.run_key(older_one) == accuracy.run_key(one)
    assert report.method_label(older_one) == report.method_label(one) == "mlc"
    # at three epochs an older row of the defaults (the clean batch throughout) is that variant now
    older_three = {key: value for key, value in three.items() if key != name}
    assert report.method_label(three) == "mlc"
    assert report.method_label(older_three) == "mlc@0.0003[clean_in_main_loss_epochs=3.0]"
    # a run without the clean batch in the main loss keeps the key and the name of its older rows
    older_without = {key: value for key, value in without.items() if key != name}
    assert accuracy.run_key(older_without) == accuracy.run_key(without)
    assert report.method_label(without) == "mlc@0.0003[clean_in_main_loss=false]"


def test_clean_passes_in_main_loss_counts_as_the_trainer_does():
    rows = load("rows")
    large = {"method": "mlc", "epochs": 1.0, "clean_batch_size": 8, "rows": {"train": 20000, "clean": 40}}
    # 625 steps of 8 trusted rows over 40: 125 passes; under 25, the 125 steps before the 25th pass (ceil(25 x 40 / 8))
    assert rows.clean_passes_in_main_loss(large, None) == rows.clean_passes_in_main_loss(large, float("inf")) == 125.0
    assert rows.clean_passes_in_main_loss(large, 25) == 25.0
    assert rows.clean_passes_in_main_loss(large, 24.9) == 25.0  # the step that starts below the limit still counts
    small = {**large, "rows": {"train": 4000, "clean": 80}}
    assert rows.clean_passes_in_main_loss(small, None) == rows.clean_passes_in_main_loss(small, 25) == 12.5
    # a partial last batch is a step (558 rows: 18 steps); the limit in epochs counts (3 epochs, clean batch in 1)
    few = {**large, "epochs": 3.0, "clean_in_main_loss_epochs": 1.0, "rows": {"train": 558, "clean": 40}}
    assert rows.clean_passes_in_main_loss(few, None) == 18 * 8 / 40
    # half the clean batch trains the main net under meta_split="batch"; "rows" keeps a share of each class apart
    halves = {**large, "mlc_settings": 'meta_split="batch"'}
    assert rows.clean_passes_in_main_loss(halves, None) == 625 * 4 / 40
    apart = {**small, "num_clean_per_class": 20, "mlc_settings": 'meta_split="rows",meta_split_fraction=0.25'}
    assert rows.clean_passes_in_main_loss(apart, None) == 125 * 8 / 60  # 15 of each class's 20 rows
    assert rows.clean_passes_in_main_loss({**large, "mlc_settings": "clean_in_main_loss=false"}, 25) == 0.0
    # the limit tested as the trainer tests it (step x rows / trusted < limit): 1.1 x 50 is 55.00000000000001
    one_row = {**large, "clean_batch_size": 1, "rows": {"train": 20000, "clean": 50}}
    assert rows.clean_passes_in_main_loss(one_row, 1.1) == 55 / 50
    # a clean batch larger than the trusted rows draws all of them (32 asked, 20 rows)
    capped = {**large, "clean_batch_size": 32, "rows": {"train": 4000, "clean": 20}}
    assert rows.clean_passes_in_main_loss(capped, None) == 125 * 20 / 20
    assert rows.clean_passes_in_main_loss({**large, "method": "l2rw"}, 25) is None
    assert rows.clean_passes_in_main_loss({"method": "mlc", "epochs": 1.0}, 25) is None  # no row counts


def test_a_passes_limit_names_a_row_only_where_it_changed_the_run(monkeypatch):
    report = load("report")
    from mlc_text.config import MLCTrainingArguments

    base = {**TODAYS_MLC_DEFAULTS, "method": "mlc", "epochs": 1.0, "meta_learning_rate": 3e-4, "seed": 0}
    large, small = {**base, "rows": {"train": 20000, "clean": 40}}, {**base, "rows": {"train": 4000, "clean": 80}}
    for limit in (None, 25.0):  # rows recorded before the limit (no field) and under a default of 25
        monkeypatch.setattr(MLCTrainingArguments, "clean_in_main_loss_passes", limit)
        older_large, older_small = (
            {k: v for k, v in row.items() if k != "clean_in_main_loss_passes"} for row in (large, small)
        )
        assert report.method_label(older_small) == "mlc"  # 12.5 passes: no limit of 25 reached
        assert report.method_label(older_large) == (
            "mlc" if limit is None else "mlc@0.0003[clean_in_main_loss_passes=inf]"
        )
        # a variant that set today's default is today's defaults, and one that set another limit is named by it
        set_25 = {**older_large, "mlc_defaults": False, "mlc_settings": "clean_in_main_loss_passes=25"}
        assert report.method_label(set_25) == ("mlc@0.0003[clean_in_main_loss_passes=25]" if limit is None else "mlc")
        set_50 = {**older_large, "mlc_defaults": False, "mlc_settings": "clean_in_main_loss_passes=50"}
        assert report.method_label(set_50) == "mlc@0.0003[clean_in_main_loss_passes=50]"
        # at the limit exactly (40 trusted rows, 125 steps of 8: 25 passes) the limit of 25 changes nothing
        two_classes = {**older_large, "rows": {"train": 4000, "clean": 40}}
        assert report.method_label(two_classes) == "mlc"
        # no limit is "inf" however a row spells it (unset, "inf" from the command line, JSON's Infinity)
        for spelt in ('"inf"', "Infinity"):
            inf = {**older_large, "mlc_defaults": False, "mlc_settings": f"clean_in_main_loss_passes={spelt}"}
            assert report.method_label(inf) == (
                "mlc" if limit is None else "mlc@0.0003[clean_in_main_loss_passes=inf]"
            )
        # a row of the defaults that records the limit it ran under
        assert report.method_label({**large, "clean_in_main_loss_passes": limit}) == "mlc"
        # no row counts to tell by: named when the limits differ
        bare = {key: value for key, value in older_large.items() if key != "rows"}
        assert report.method_label(bare) == ("mlc" if limit is None else "mlc@0.0003[clean_in_main_loss_passes=inf]")


def test_mlc_settings_reach_the_mlc_runs_only_and_their_key(tmp_path, data_dir):
    accuracy = load("accuracy")
    argv = ["--data_dir", data_dir, "--output", str(tmp_path / "a.jsonl"), "--methods", "mlc", "finetune"]
    argv += ["--noise_types", "flip", "--noise_rates", "0.4", "--seeds", "0", "--meta_learning_rates", "3e-5"]
    plain_runs = accuracy.grid(accuracy.parse_args(argv))
    args = accuracy.parse_args([*argv, "--mlc_settings", "skip_connection=true", "gradient_steps=3"])
    runs = accuracy.grid(args)
    mlc = next(run for run in runs if run["method"] == "mlc")
    finetune = next(run for run in runs if run["method"] == "finetune")
    assert mlc["mlc_settings"] == "gradient_steps=3,skip_connection=true" and "mlc_settings" not in finetune
    recipe = accuracy.recipe_arguments(mlc, args, str(tmp_path))
    assert recipe["skip_connection"] is True and recipe["gradient_steps"] == 3
    assert "skip_connection" not in accuracy.recipe_arguments(finetune, args, str(tmp_path))
    # a variant is its own run; the same settings' finetune run is the plain grid's
    plain_keys = {accuracy.run_key(run) for run in plain_runs}
    assert accuracy.run_key(mlc) not in plain_keys and accuracy.run_key(finetune) in plain_keys
    report = load("report")
    # MLC runs are named by their rate and settings, unless they ran the package's defaults
    assert (
        report.method_label({**mlc, "meta_learning_rate": 3e-5}) == "mlc@3e-05[gradient_steps=3,skip_connection=true]"
    )
    today = {"method": "mlc", "meta_learning_rate": 3e-4, "mlc_defaults": True, "finish_on_clean": True}
    today.update(clean_batch_size=8, meta_update_interval=5, clean_in_main_loss_passes=PASSES_DEFAULT)
    assert report.method_label(today) == "mlc"
    yesterday = {**today, "clean_batch_size": 16, "meta_update_interval": 2}
    assert report.method_label(yesterday) == "mlc@0.0003[clean_batch_size=16,meta_update_interval=2]"
    # a row of the defaults of an earlier day (no field: it ran the values of its day) is that variant now
    stage = {key: value for key, value in today.items() if key not in ("clean_batch_size", "meta_update_interval")}
    assert report.method_label(stage) == "mlc@0.0003[clean_batch_size=32,meta_update_interval=1]"
    earlier = {key: value for key, value in stage.items() if key != "finish_on_clean"}
    assert (
        report.method_label(earlier) == "mlc@0.0003[clean_batch_size=32,finish_on_clean=false,meta_update_interval=1]"
    )
    assert report.method_label({**today, "mlc_defaults": False, "meta_learning_rate": 1e-3}) == "mlc@0.001"
    # settings equal to today's defaults are dropped: that row ran what the defaults run now
    half = {**earlier, "mlc_defaults": False, "mlc_settings": "clean_batch_size=8"}
    assert report.method_label(half) == "mlc@0.0003[finish_on_clean=false,meta_update_interval=1]"
    asked = {**earlier, "mlc_defaults": False, "mlc_settings": "finish_on_clean=true"}  # asked for before the default
    assert report.method_label(asked) == "mlc@0.0003[clean_batch_size=32,meta_update_interval=1]"
    same = {**half, "mlc_settings": "clean_batch_size=8,meta_update_interval=5", "finish_on_clean": True}
    assert report.method_label(same) == "mlc"
    assert mlc["mlc_defaults"] is False and accuracy.uses_mlc_defaults(mlc) is False
    # a run on today's defaults does not share its key with an older row at the same meta learning rate
    rate = accuracy.MLCTrainingArguments.meta_learning_rate
    (default,) = accuracy.grid(accuracy.parse_args([*argv[:-1], str(rate), "--methods", "mlc"]))
    assert default["mlc_defaults"] is True and default["finish_on_clean"] is True
    legacy = {key: value for key, value in default.items() if key != "mlc_defaults"}
    assert accuracy.run_key(legacy) != accuracy.run_key(default)
    # nor with a row of the defaults from before the clean stage, or before a quarter clean batch every fifth step
    assert default["clean_batch_size"] == 8 and default["meta_update_interval"] == 5
    for field in ("finish_on_clean", "clean_batch_size", "meta_update_interval"):
        earlier = {key: value for key, value in default.items() if key != field}
        assert accuracy.run_key(earlier) != accuracy.run_key(default)
    # settings name the values a run used in its key
    (asked,) = accuracy.grid(accuracy.parse_args([*argv, "--mlc_settings", "clean_batch_size=12"]))[:1]
    assert asked["clean_batch_size"] == 12 and asked["meta_update_interval"] == 5


def test_bf16_runs_are_their_own_runs_and_rows(tmp_path, data_dir):
    accuracy, report = load("accuracy"), load("report")
    argv = ["--data_dir", data_dir, "--output", str(tmp_path / "a.jsonl"), "--methods", "clean_only", "mlc"]
    argv += ["--noise_types", "flip", "--noise_rates", "0.4", "--seeds", "0"]
    fp32, bf16 = (
        accuracy.grid(accuracy.parse_args(argv)),
        accuracy.grid(accuracy.parse_args([*argv, "--precision", "bf16"])),
    )
    args = accuracy.parse_args([*argv, "--precision", "bf16"])
    recipe = accuracy.recipe_arguments(bf16[0], args, str(tmp_path))
    assert recipe["bf16"] is True and recipe.get("use_cpu", False) is not accuracy.torch.cuda.is_available()
    assert accuracy.MLCTrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=recipe.get("use_cpu", False)
    ).bf16
    assert "bf16" not in accuracy.recipe_arguments(fp32[0], args, str(tmp_path))
    # a bf16 run never stands in for the fp32 one, and a row written before the field existed is an fp32 row
    assert {accuracy.run_key(run) for run in fp32}.isdisjoint(accuracy.run_key(run) for run in bf16)
    legacy = {key: value for key, value in fp32[0].items() if key != "precision"}
    assert accuracy.run_key(legacy) == accuracy.run_key(fp32[0])
    assert accuracy.run_folder_name(fp32[0]) != accuracy.run_folder_name(bf16[0])
    # the report names bf16 rows apart, ranked beside their method
    assert report.method_label(bf16[0]) == "clean_only (bf16)" and report.method_label(fp32[0]) == "clean_only"
    assert report.method_label(bf16[1]) == "mlc (bf16)"
    assert report.method_rank("clean_only (bf16)") == report.method_rank("clean_only")
    stats = {"test_accuracy": (0.9, None)}
    assert report.best_baseline({"clean_only (bf16)": stats, "l2rw": {"test_accuracy": (0.8, None)}}) == "l2rw"
    # the defaults' meta-gradient ("auto") as it runs: fd in fp32, jvp under bf16; nothing for the baselines
    assert (fp32[1]["meta_gradient"], bf16[1]["meta_gradient"]) == ("fd", "jvp") and "meta_gradient" not in fp32[0]
    named = accuracy.grid(accuracy.parse_args([*argv, "--mlc_settings", "meta_gradient=reference"]))
    assert named[1]["meta_gradient"] == "reference"
    with pytest.raises(SystemExit):
        accuracy.parse_args([*argv, "--precision", "fp16"])


def test_rows_without_a_recorded_meta_gradient_read_as_the_path_they_ran():
    rows = load("rows")
    assert rows.row_value({"method": "mlc", "mlc_defaults": True}, "meta_gradient") == "jvp"  # the old default
    fd = {"method": "mlc", "mlc_settings": 'meta_gradient="fd",skip_connection="per_example"'}
    assert rows.row_value(fd, "meta_gradient") == "fd"
    assert (
        rows.row_value({"method": "mlc", "mlc_settings": "meta_gradient=fd_central"}, "meta_gradient") == "fd_central"
    )
    assert rows.row_value({"method": "l2rw"}, "meta_gradient") is None
    assert rows.row_value({"method": "mlc", "meta_gradient": "fd"}, "meta_gradient") == "fd"


def test_runs_that_differ_in_any_key_field_get_their_own_folder(tmp_path, data_dir, monkeypatch):
    accuracy = load("accuracy")
    argv = ["--data_dir", data_dir, "--output", str(tmp_path / "a.jsonl"), "--methods", "mlc", "finetune"]
    argv += ["--seeds", "0", "1", "--meta_learning_rates", "3e-5", "1e-3"]
    runs = accuracy.grid(accuracy.parse_args(argv))
    runs += accuracy.grid(accuracy.parse_args([*argv, "--max_train_samples", "4000"]))
    runs += accuracy.grid(accuracy.parse_args([*argv, "--mlc_settings", "skip_connection=true"]))
    runs += accuracy.grid(accuracy.parse_args([*argv, "--model", "/some/where/other-model", "--max_length", "128"]))
    runs += accuracy.grid(
        accuracy.parse_args([*argv, "--model", "/else/other-model", "--max_length", "128"])
    )  # the same last path part
    # (the finetune runs of the skip_connection grid are the plain grid's: same key, same folder)
    names = {accuracy.run_key(run): accuracy.run_folder_name(run) for run in runs}
    assert len(names) == 112 and len(set(names.values())) == len(names)

    # The run's key goes into its folder before the recipe starts, for the tools that read the folders later.
    def fail(*args, **kwargs):
        return SimpleNamespace(returncode=1, stderr="no recipe in this test")

    monkeypatch.setattr(accuracy.subprocess, "run", fail)
    args = accuracy.parse_args(argv)
    with pytest.raises(RuntimeError, match=f"run {accuracy.run_folder_name(runs[0])} failed"):
        accuracy.one_run(runs[0], args, str(tmp_path))
    written = json.loads((tmp_path / accuracy.run_folder_name(runs[0]) / accuracy.RUN_FILE).read_text())
    assert written == runs[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mlc_settings", "not_a_field=1"], "'not_a_field' is not an MLCTrainingArguments field"),
        (["--mlc_settings", "skip_connection"], "is not KEY=VALUE"),
        (["--methods", "mwnet"], "--methods: \\['mwnet'\\] not among"),
        (["--noise_rates", "1.5"], "--noise_rates: \\[1.5\\] outside \\[0, 1\\]"),
        (["--noise_types", "matrix"], "--noise_types: \\['matrix'\\]"),
        (["--clean_per_class", "0"], "--clean_per_class"),
    ],
)
def test_bad_grids_are_refused_before_the_first_run(extra, message, tmp_path, data_dir):
    accuracy = load("accuracy")
    with pytest.raises(SystemExit, match=message):
        accuracy.parse_args(["--data_dir", data_dir, "--output", str(tmp_path / "a.jsonl"), *extra])


def test_report_means_and_gap_share(tmp_path):
    report = load("report")
    rows = []
    for seed, (finetune, clean_only, mlc, oracle) in enumerate([(0.70, 0.80, 0.84, 0.90), (0.74, 0.80, 0.86, 0.90)]):
        for method, accuracy in zip(("finetune", "clean_only", "mlc", "oracle"), (finetune, clean_only, mlc, oracle)):
            rows.append(
                {
                    "corpus": "ag_news", "model": "m", "noise_type": "flip", "noise_rate": 0.4,
                    "num_clean_per_class": 100, "epochs": 1.0, "max_train_samples": 2000, "method": method,
                    "seed": seed, "test_accuracy": accuracy, "test_macro_f1": accuracy, "wall_s": 10.0,
                    "correction_accuracy": 0.8 if method == "mlc" else None,
                    **(TODAYS_MLC_DEFAULTS if method == "mlc" else {}),
                }
            )  # fmt: skip
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"# Results\n\nkept above\n\n{report.BEGIN}\nold\n{report.END}\n\nkept below\n")
    memorised = [
        {**rows[2 + 4 * seed], "run": f"r{seed}", "wrong_rows_scored": 40 + seed, "memorised": rate, "recovered": 0.8,
         "train_accuracy_on_clean_labels": 0.9, "test_to_noise_partner": None}
        for seed, rate in ((1, 0.125), (0, 0.05))
    ]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in memorised))
    argv = ["--input", str(tmp_path / "a.jsonl"), "--results_md", str(results_md), "--figures", str(tmp_path)]
    report.main([*argv, "--memorisation", str(tmp_path / "m.jsonl")])
    cells = report.summarise(rows)
    (methods,) = cells.values()
    mean, std = methods["finetune"]["test_accuracy"]
    assert mean == pytest.approx(0.72) and std == pytest.approx(0.0282843, rel=1e-5)
    assert methods["mlc"]["gap_recovered"] == pytest.approx((0.85 - 0.80) / (0.90 - 0.80))
    text = results_md.read_text()
    assert "kept above" in text and "kept below" in text and "old" not in text
    assert "### MLC's ablations" not in text and f"]({report.DETAILS_MD})" in text
    assert "| mlc | 0,1 | 85.0 ± 1.4 |" in text and "MLC − finetune per seed: +14.0, +12.0 points" in text
    assert (tmp_path / "accuracy_ag_news_m.png").read_bytes()[:4] == b"\x89PNG"
    # one figure per corpus (and model) with every cell that has headroom: both noise settings share it
    uniform = [{**row, "noise_type": "uniform", "noise_rate": 0.8} for row in rows]
    (figure,) = report.plot(report.summarise(rows + uniform), tmp_path / "both")
    assert figure.name == "accuracy_ag_news_m.png"
    hub_model = [{**row, "model": "org/encoder"} for row in rows]
    (figure,) = report.plot(report.summarise(hub_model), tmp_path / "hub")
    assert figure.parent == tmp_path / "hub" and figure.name == "accuracy_ag_news_org_encoder.png"
    # MLC in bf16 beside float32 baselines is one series with a cell's bf16-only MLC; a bf16 twin keeps its name
    series = {"mlc (bf16)": 1, "clean_only": 2, "clean_only (bf16)": 3, "oracle": 4}
    assert report.plotted(series) == {"mlc": 1, "clean_only": 2, "clean_only (bf16)": 3, "oracle": 4}
    # a cell whose oracle is less than 4 points above clean_only has no room to show a method: no figure
    flat = [{**row, "test_accuracy": 0.82} if row["method"] == "oracle" else row for row in rows]
    assert report.plot(report.summarise(flat), tmp_path / "flat") == []
    # the per-run tables go to the details page beside RESULTS.md, created with its title
    text = (tmp_path / report.DETAILS_MD).read_text()
    assert text.startswith(f"# {report.DETAILS_TITLE}\n") and "### Cells without headroom" in text
    # per seed, seeds in order, under the cell's own title
    assert "##### ag_news, flip noise 0.4, 100 clean rows per class, 1 epoch(s), 2000 training rows, m" in text
    assert "| mlc | 0,1 | 40, 41 | 5.0, 12.5 | 80.0, 80.0 | 90.0, 90.0 | -, - | 84.00, 86.00 |" in text
    with pytest.raises(SystemExit, match="run bench/memorisation.py first"):
        report.main([*argv, "--memorisation", str(tmp_path / "missing.jsonl")])


def test_report_puts_mlc_variants_in_the_ablation_table_against_the_defaults_at_the_same_seeds():
    report = load("report")
    base = {
        "corpus": "ag_news", "model": "m", "noise_type": "flip", "noise_rate": 0.4, "num_clean_per_class": 20,
        "epochs": 1.0, "max_train_samples": 4000, "wall_s": 1.0,
    }  # fmt: skip
    runs = [  # (method, seed, meta lr, settings, precision, test accuracy)
        ("clean_only", 0, None, None, "fp32", 0.80), ("oracle", 0, None, None, "fp32", 0.90),
        ("mlc", 0, 3e-4, None, "fp32", 0.84), ("mlc", 1, 3e-4, None, "fp32", 0.86),
        ("mlc", 0, 3e-4, "skip_init=3", "fp32", 0.87),  # +3 against the defaults at seed 0 alone
        ("mlc", 0, 3e-4, "meta_split=\"rows\"", "bf16", 0.82),  # no bf16 defaults: against the fp32 ones
    ]  # fmt: skip
    rows = [
        {**base, "method": method, "seed": seed, "meta_learning_rate": rate, "mlc_settings": settings,
         "precision": precision, "test_accuracy": test, "test_macro_f1": test,
         "mlc_defaults": method == "mlc" and settings is None, "finish_on_clean": settings != 'meta_split="rows"',
         "clean_batch_size": 8, "meta_update_interval": 5, "clean_in_main_loss_passes": PASSES_DEFAULT}
        for method, seed, rate, settings, precision, test in runs
    ]  # fmt: skip
    cells = report.summarise(rows)
    (cell,) = cells
    assert "mlc@0.0003[skip_init=3]" not in report.table(cell, cells[cell])
    assert "| mlc | 0,1 | 85.0 ± 1.4 |" in report.table(cell, cells[cell])
    text = "\n".join(report.ablation_table(cells))
    assert "| mlc@0.0003[skip_init=3] | 87.0 (1) +3.0 |" in text
    assert '| mlc@0.0003[finish_on_clean=false,meta_split="rows"] (bf16) | 82.0 (1) -2.0 |' in text  # against fp32


def test_noise_partner_is_the_one_class_a_true_class_is_flipped_to():
    memorisation = load("memorisation")
    flip = [[0.6, 0.4, 0.0], [0.0, 0.6, 0.4], [0.4, 0.0, 0.6]]
    assert memorisation.noise_partner(flip).tolist() == [1, 2, 0]
    uniform = [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]
    assert memorisation.noise_partner(uniform) is None and memorisation.noise_partner(None) is None


def test_memorisation_rebuilds_the_noisy_rows_of_a_run(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from mlc_text.pipeline import main

    memorisation = load("memorisation")
    folder = tmp_path / "runs" / "flip-run"
    argv = {
        "corpus": "ag_news", "data_dir": data_dir, "model_name_or_path": tiny_model_dir, "method": "finetune",
        "noise_type": "flip", "noise_rate": 0.4, "noise_seed": 3, "split_seed": 3, "seed": 3,
        "num_clean_per_class": 6, "max_train_samples": 96, "max_test_samples": 48, "validation_size": 24,
        "max_length": 32, "per_device_train_batch_size": 16, "max_steps": 1, "output_dir": str(folder),
        "disable_tqdm": True, "dataloader_pin_memory": False,
    }  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "bench_args.json").write_text(json.dumps(argv))
    main(argv=[str(folder / "bench_args.json")])
    with pytest.raises(SystemExit, match="lack bench_run.json, e.g. 'flip-run'"):
        memorisation.run_folders(str(tmp_path / "runs"), "*")
    key = {"corpus": "ag_news", "noise_type": "flip", "noise_rate": 0.4, "method": "finetune", "seed": 3}
    (folder / "bench_run.json").write_text(json.dumps(key))
    noise_report = json.loads((folder / "noise_report.json").read_text())
    counts = noise_report["counts"]
    wrong_in_run = sum(counts[i][j] for i in range(4) for j in range(4) if i != j)

    row = memorisation.score(str(folder), max_train_rows=1000, batch_size=16)
    assert {name: row[name] for name in key} == key  # the run's key travels with its scores, for the report
    assert row["train_rows_scored"] == 96 and row["wrong_rows_scored"] == wrong_in_run > 0
    assert row["test_accuracy"] == pytest.approx(row["recorded_test_accuracy"], abs=1.5 / 48)  # padding may differ
    assert 0.0 <= row["memorised"] + row["recovered"] <= 1.0
    assert 0.0 <= row["test_to_noise_partner"] <= 1.0  # flip noise: each class has one partner

    # A model that predicts each row's given label has memorised every wrong one and recovered none.
    given = {}

    def predict_given(model, tokenizer, texts, max_length, batch_size):
        return np.array([given.get(text, -1) for text in texts])

    corpus_rows = memorisation.prepare_corpus(*memorisation.parse_recipe_args([str(folder / "bench_args.json")])[1:3])
    given.update(zip(corpus_rows.train["text"], corpus_rows.train["label"]))
    monkeypatch.setattr(memorisation, "predict", predict_given)
    row = memorisation.score(str(folder), max_train_rows=1000, batch_size=16)
    assert (row["memorised"], row["recovered"], row["train_accuracy_on_clean_labels"]) == (1.0, 0.0, 1.0)

    output = tmp_path / "memorisation.jsonl"
    for _ in range(2):  # the second call finds the run scored and skips it
        memorisation.main(["--runs_dir", str(tmp_path / "runs"), "--output", str(output), "--max_train_rows", "8"])
    (line,) = output.read_text().splitlines()
    assert json.loads(line)["run"] == "flip-run" and json.loads(line)["train_rows_scored"] == 8
    with pytest.raises(SystemExit, match="no finished run"):
        memorisation.run_folders(str(tmp_path / "runs"), "nothing-*")


def test_train_logs_summarise_what_a_run_logged_and_the_report_tabulates_it(tmp_path):
    train_logs, report = load("train_logs"), load("report")
    key = {
        "corpus": "ag_news", "model": "m", "noise_type": "flip", "noise_rate": 0.4, "num_clean_per_class": 100,
        "epochs": 1.0, "max_train_samples": 2000, "method": "l2rw", "seed": 0,
    }  # fmt: skip
    folder = tmp_path / "runs" / "l2rw-run"
    folder.mkdir(parents=True)
    history = [
        {"step": 10, "loss": 1.0, "weight_on_corrupted": 0.3, "zero_weight_share": 0.5},
        {"step": 20, "loss": 0.9, "weight_on_corrupted": 0.1, "zero_weight_share": 0.4},
        {"step": 20, "eval_accuracy": 0.8},
    ]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (folder / "results.json").write_text(json.dumps({"noise": {"realised_rate": 0.41}}))
    with pytest.raises(SystemExit, match="lack bench_run.json, e.g. 'l2rw-run'"):
        train_logs.main(["--runs_dir", str(tmp_path / "runs"), "--output", str(tmp_path / "t.jsonl")])
    assert not (tmp_path / "t.jsonl").exists()  # refused before writing anything
    (folder / "bench_run.json").write_text(json.dumps(key))

    row = train_logs.summarise(str(folder))
    assert {name: row[name] for name in key} == key and row["realised_noise_rate"] == 0.41 and row["logs"] == 2
    assert row["weight_on_corrupted_mean"] == pytest.approx(0.2)
    assert (row["weight_on_corrupted_first"], row["weight_on_corrupted_last"]) == (0.3, 0.1)
    assert "correction_accuracy_mean" not in row  # L2RW has no corrector

    output = tmp_path / "t.jsonl"
    for _ in range(2):  # the second call finds the run there and skips it
        train_logs.main(["--runs_dir", str(tmp_path / "runs"), "--output", str(output)])
    (line,) = output.read_text().splitlines()
    text = "\n".join(report.train_log_tables([json.loads(line)]))
    assert "##### ag_news, flip noise 0.4, 100 clean rows per class, 1 epoch(s), 2000 training rows, m" in text
    assert "| l2rw | 0 | 41.0 | weight on wrong rows | 20.0 | 10.0 |" in text
    assert "| l2rw | 0 | 41.0 | rows weighted 0 | 45.0 | 40.0 |" in text
    assert "| corrected label right |" not in text  # no row for what the run did not log


PASSES_DEFAULT = load("rows").MLCTrainingArguments.clean_in_main_loss_passes  # recorded by every MLC row
# What bench/accuracy.py writes for an MLC run of today's defaults.
# (for one epoch: how many epochs have the clean batch in the main loss depends on the run's)
TODAYS_MLC_DEFAULTS = {"mlc_defaults": True, **load("rows").mlc_protocol()}


def _cell_rows(epochs: float, accuracies: dict[str, float], noise_rate: float = 0.4) -> list[dict]:
    base = {
        "corpus": "ag_news", "model": "minilm-l6", "noise_type": "flip", "noise_rate": noise_rate,
        "num_clean_per_class": 20, "epochs": epochs, "max_train_samples": 4000, "validation_size": 500,
        "max_length": 64, "wall_s": 1.0, "test_macro_f1": 0.5,
    }  # fmt: skip
    rows = []
    for seed in (0, 1, 2):
        for name, accuracy in accuracies.items():
            method, _, settings = name.partition("[")
            row = {**base, "method": method, "seed": seed, "test_accuracy": accuracy + 0.001 * seed}
            if method == "mlc":
                row["meta_learning_rate"] = 3e-4
                row["meta_gradient"] = "fd"  # what the defaults' "auto" runs in fp32
                row.update(load("rows").mlc_protocol(epochs=epochs), mlc_defaults=not settings)
                if settings:
                    row["mlc_settings"] = settings.rstrip("]")
            rows.append(row)
    return rows


def test_report_checks_the_targets_over_cells_with_headroom():
    report = load("report")
    one = {"clean_only": 0.80, "finetune": 0.78, "l2rw": 0.86, "mlc": 0.87, "oracle": 0.90}
    rows = _cell_rows(1.0, one) + _cell_rows(3.0, {**one, "mlc": 0.85})  # 2 points lost from 1 to 3 epochs
    rows += _cell_rows(1.0, {"clean_only": 0.88, "mlc": 0.80, "oracle": 0.89}, noise_rate=0.6)  # no headroom
    # headroom, and MLC far behind, but one seed so far: shown, not counted
    rows += _cell_rows(1.0, {"clean_only": 0.70, "mlc": 0.60, "oracle": 0.90}, noise_rate=0.2)[:3]
    cells = report.summarise(rows)
    assert sum(report.has_headroom(methods) for methods in cells.values()) == 3
    text = "\n".join(report.targets(cells))
    assert "Over the 2 cell(s) with headroom that have 3 seeds" in text and "1 more with fewer seeds" in text
    # three seeds of MLC and clean_only are not enough: the oracle needs them too
    partial = _cell_rows(1.0, {"clean_only": 0.70, "mlc": 0.60}, noise_rate=0.3)
    partial += _cell_rows(1.0, {"oracle": 0.90}, noise_rate=0.3)[:1]
    assert "2 more with fewer seeds" in "\n".join(report.targets(report.summarise(rows + partial)))
    # nor for another method: l2rw at its one (lucky) seed is not the best other method over three seeds of MLC
    lucky = _cell_rows(1.0, {"clean_only": 0.70, "mlc": 0.80, "oracle": 0.90}, noise_rate=0.3)
    lucky += _cell_rows(1.0, {"l2rw": 0.95}, noise_rate=0.3)[:1]
    lucky_text = "\n".join(report.targets(report.summarise(rows + lucky)))
    assert "2 more with fewer seeds" in lucky_text and "| worst cell's distance" in lucky_text
    assert "| worst cell's distance to the best other method (points) | -1.0 |" in lucky_text
    assert "| 95.0 (l2rw, 1 seed(s)) |" in report.readme_table(report.summarise(lucky))
    assert "| mean gain over clean_only (points) | +6.0 | >= +3 | yes |" in text
    assert "| mean share of the clean_only→oracle gap | +0.60 | >= 0.50 | yes |" in text
    assert "| worst cell's distance to the best other method (points) | -1.0 | >= -2 | yes |" in text
    assert "| worst change from 1 to 3 epochs (points) | -2.0 over 1 cell(s) | >= -1 | no |" in text
    appendix = "\n".join(report.appendix_table(cells))
    assert "flip 0.6" in appendix and "flip 0.4" not in appendix
    # the no-headroom cell: clean_only, oracle, MLC at the defaults, and no other MLC run
    assert appendix.endswith("| 88.1 ± 0.1 | 89.1 ± 0.1 | 80.1 ± 0.1 | - |")
    readme = report.readme_table(cells)
    assert (
        "| ag_news, flip 0.4, 20/class, 1 ep. | 80.1 ± 0.1 | 86.1 ± 0.1 (l2rw) | 87.1 ± 0.1 | 90.1 ± 0.1 |" in readme
    )


def test_a_cell_run_in_bf16_alone_is_scored_like_a_float32_one():
    report = load("report")
    rows = _cell_rows(1.0, {"clean_only": 0.80, "l2rw": 0.86, "mlc": 0.87, "oracle": 0.90})
    for row in rows:
        row["precision"] = "bf16"
        row["rows"] = {"train": 4000}
    cells = report.summarise(rows)
    ((cell, methods),) = cells.items()
    assert sorted(methods) == ["clean_only", "l2rw", "mlc", "oracle"] and report.has_headroom(methods)
    assert "| mean gain over clean_only (points) | +7.0 | >= +3 | yes |" in "\n".join(report.targets(cells))
    assert "Every method under bf16 autocast.\n\nRows used: train 4000." in report.table(cell, methods)
    readme = report.readme_table(cells)
    assert "| ag_news, flip 0.4, 20/class, 1 ep., bf16 | 80.1 ± 0.1 | 86.1 ± 0.1 (l2rw) |" in readme
    assert all("--precision bf16" in command for command in report.cell_commands(cell, methods))
    no_rows = {name: {**stats, "rows": None} for name, stats in methods.items()}  # rows written before the field
    assert "Every method under bf16 autocast." in report.table(cell, no_rows)
    # one float32 run in the cell and the bf16 ones are named apart again
    rows += _cell_rows(1.0, {"finetune": 0.84})[:1]
    assert "clean_only (bf16)" in next(iter(report.summarise(rows).values()))


def test_appendix_shows_a_baseline_run_in_bf16_alone_marked_as_such():
    report = load("report")
    rows = _cell_rows(1.0, {"clean_only": 0.88, "finetune": 0.84, "oracle": 0.89}, noise_rate=0.6)
    for row in rows:
        row["precision"] = "bf16" if row["method"] == "clean_only" else "fp32"
    line = next(line for line in report.appendix_table(report.summarise(rows)) if "flip 0.6" in line)
    assert "| 88.1 ± 0.1 (bf16) | 84.1 ± 0.1 |" in line


def test_appendix_shows_mlc_at_the_defaults_once_in_the_precision_with_more_seeds():
    report = load("report")
    rows = _cell_rows(1.0, {"clean_only": 0.88, "mlc": 0.80, "oracle": 0.89}, noise_rate=0.6)
    for row in rows:
        row["precision"] = "bf16" if row["method"] == "mlc" else "fp32"
    fp32 = _cell_rows(1.0, {"mlc": 0.90}, noise_rate=0.6)[:1]  # one seed of the defaults in float32
    line = next(line for line in report.appendix_table(report.summarise(rows + fp32)) if "flip 0.6" in line)
    # the bf16 rows (three seeds) are the defaults' value; the float32 one is no "other MLC run"
    assert line.endswith("| 80.1 ± 0.1 (bf16) | - |")


def test_cell_commands_reproduce_the_cell(data_dir):
    accuracy, report = load("accuracy"), load("report")
    rows = _cell_rows(1.0, {"clean_only": 0.8, "oracle": 0.9, "mlc": 0.85, 'mlc[skip_connection="per_example"]': 0.86})
    bf16 = _cell_rows(1.0, {"clean_only": 0.8, "mlc": 0.85})[:2]  # seed 0 of each, under bf16 autocast
    for row in bf16:
        row["precision"] = "bf16"
        if row["method"] == "mlc":
            row["meta_gradient"] = "jvp"  # what "auto" takes under bf16
    rows += bf16
    for row in rows:  # the run keys bench/accuracy.py gives these rows
        row["meta_learning_rate"] = row.get("meta_learning_rate")
        row["select_on_trusted"] = 5
    ((cell, methods),) = report.summarise(rows).items()
    commands = report.cell_commands(cell, methods)
    # per precision, one command for the baselines and the defaults, one for the variant
    assert len(commands) == 3 and all("--select_on_trusted 5" in command for command in commands)
    assert sum(command.endswith("--precision bf16 --methods clean_only mlc") for command in commands) == 1
    # the results page shows the baselines' and the defaults' commands; a variant's is derived from the latter
    assert report.cell_commands(cell, methods, variants=False) == [
        command for command in commands if "--mlc_" not in command
    ]
    keys = set()
    for command in commands:
        argv = command.split()[2:] + ["--data_dir", data_dir]
        if "--precision bf16" in command:
            argv[argv.index("--seeds") + 1 : argv.index("--seeds") + 4] = ["0"]  # the bf16 rows: seed 0 only
        for run in accuracy.grid(accuracy.parse_args(argv)):
            if run["method"] == "mlc" and not run.get("mlc_settings"):
                run["meta_learning_rate"] = 3e-4  # the package default these rows ran with
                run.pop("mlc_settings", None)
            keys.add(accuracy.run_key(run))
    assert keys == {accuracy.run_key(row) for row in rows}


def test_results_page_names_a_cell_once_and_its_lines_expand_to_the_commands():
    report = load("report")
    rows = _cell_rows(1.0, {"clean_only": 0.8, "oracle": 0.9, "mlc": 0.85, 'mlc[skip_connection="per_example"]': 0.86})
    for row in rows:
        if row["method"] == "mlc":
            row["precision"] = "bf16"
    ((cell, methods),) = report.summarise(rows).items()
    first, *lines = report.commands_block(cell, methods)
    assert first.startswith("CELL=(--corpora ag_news ") and first.endswith("--seeds 0 1 2)")
    assert lines == [
        'python bench/accuracy.py "${CELL[@]}" --precision bf16 --methods mlc',
        'python bench/accuracy.py "${CELL[@]}" --methods clean_only oracle',
    ]
    cell_args = first.removeprefix("CELL=(").removesuffix(")")
    expanded = [line.replace('"${CELL[@]}"', cell_args) for line in lines]
    assert expanded == report.cell_commands(cell, methods, variants=False)
    # and bash expands the lines to the same words
    script = "\n".join([first, *(line.replace("python ", "echo python ", 1) for line in lines)])
    echoed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert echoed == expanded
    # one command: written out in full
    alone = {name: stats for name, stats in methods.items() if name == "clean_only"}
    assert report.commands_block(cell, alone) == report.cell_commands(cell, alone, variants=False)


def test_rows_from_before_the_clean_stage_default_are_reproduced_as_their_variant(data_dir):
    accuracy, report = load("accuracy"), load("report")
    rows = _cell_rows(1.0, {"clean_only": 0.8, "oracle": 0.9, "mlc": 0.85, "mlc[clean_batch_size=8]": 0.86})
    for row in rows:
        row["meta_learning_rate"] = row.get("meta_learning_rate")
        if row["method"] == "mlc":  # written before the fields: no clean stage, the settings' clean batch, interval 1
            for field in ("finish_on_clean", "clean_batch_size", "meta_update_interval"):
                del row[field]
    expected = {
        "mlc@0.0003[clean_batch_size=32,finish_on_clean=false,meta_update_interval=1]",
        "mlc@0.0003[finish_on_clean=false,meta_update_interval=1]",
    }
    ((cell, methods),) = report.summarise(rows).items()
    assert expected <= set(methods)
    labels = set()
    for command in report.cell_commands(cell, methods):
        argv = command.split()[2:] + ["--data_dir", data_dir]
        labels |= {
            report.method_label({**run, "test_accuracy": 0.0})
            for run in accuracy.grid(accuracy.parse_args(argv))
            if run["method"] == "mlc"
        }
    assert labels == expected


def test_selection_on_trusted_rows_holds_them_out_for_every_method(tmp_path, data_dir):
    accuracy = load("accuracy")
    argv = ["--data_dir", data_dir, "--methods", "mlc", "clean_only", "--clean_per_class", "20", "--seeds", "0"]
    plain = accuracy.grid(accuracy.parse_args(argv))
    args = accuracy.parse_args([*argv, "--select_on_trusted", "5"])
    runs = accuracy.grid(args)
    assert {accuracy.run_key(run) for run in runs}.isdisjoint(accuracy.run_key(run) for run in plain)
    for run in runs:
        recipe = accuracy.recipe_arguments(run, args, str(tmp_path))
        assert recipe["validation_source"] == "clean" and recipe["validation_size"] == 5 * 4  # AG News: 4 classes
        assert recipe["load_best_model_at_end"] and recipe["metric_for_best_model"] == "accuracy"
        assert recipe["eval_strategy"] == recipe["save_strategy"] == "steps" and recipe["eval_steps"] == 0.2
    recipe = accuracy.recipe_arguments(plain[0], accuracy.parse_args(argv), str(tmp_path))
    assert recipe["eval_strategy"] == "no" and recipe["validation_source"] == "heldout"
    assert "sel5" in load("rows").run_folder_name(runs[0]) and "sel" not in load("rows").run_folder_name(plain[0])
    with pytest.raises(SystemExit, match="--select_on_trusted 20 must be >= 0 and leave trusted rows"):
        accuracy.parse_args([*argv, "--select_on_trusted", "20"])


# ------------------------------------------------------------------------------------------------ step_cost
def test_step_cost_full_clean_batch_case_uses_the_whole_batch(tmp_path):
    step_cost = load("step_cost")
    args = step_cost.parse_args(["--model", "tiny-bert", "--lengths", "8", "--batch-size", "4", "--threads", "1"])
    for case in (
        step_cost.StepCase("fd", "fp32", "full_clean_batch"),
        step_cost.EpochCase("fd", full_clean_batch=True),
    ):
        trainer = step_cost.build_trainer(args, "tiny-bert", 8, case.settings(), 2, str(tmp_path / "full"))
        assert trainer.clean_batch_size == 4 and trainer.args.meta_gradient == "fd"
    plain = step_cost.build_trainer(args, "tiny-bert", 8, step_cost.StepCase("fd").settings(), 2, str(tmp_path / "p"))
    assert plain.clean_batch_size == 1  # the default: a quarter of the training batch
    assert plain.args.meta_update_interval == 1  # a step case times the meta step
    epoch = step_cost.build_trainer(
        args, "tiny-bert", 8, step_cost.EpochCase("fd", 2).settings(), 2, str(tmp_path / "e")
    )
    assert epoch.clean_batch_size == 1 and epoch.args.meta_update_interval == 2
    small = step_cost.EpochCase("fd", 5, clean_batch_size=1)
    assert small.key == "mlc:fd:every 5:clean batch 1"
    trainer = step_cost.build_trainer(args, "tiny-bert", 8, small.settings(), 2, str(tmp_path / "s"))
    assert trainer.clean_batch_size == 1 and trainer.args.meta_update_interval == 5
    assert [case.clean_rows(32) for case in (small, step_cost.EpochCase("fd", 2), step_cost.EpochCase(None))] == [
        1,
        8,
        None,
    ]
    assert step_cost.EpochCase("fd", full_clean_batch=True).clean_rows(32) == 32
    keys = [case.key for case in step_cost.epoch_cases("fp32")]
    assert "mlc:fd:every 2:clean batch 16" in keys and len(keys) == len(set(keys))


def test_step_cost_epoch_cases_are_filtered_by_key_and_an_unknown_key_is_refused():
    step_cost = load("step_cost")
    args = step_cost.parse_args(["--epoch", "--epoch-cases", "mlc:fd:every 5", "mlc:fd:every 50"])
    with pytest.raises(ValueError, match=r"--epoch-cases: unknown \['mlc:fd:every 50'\]"):
        step_cost.run_epoch_cost(args)


def test_step_cost_times_the_trainers_own_steps_in_turn(tmp_path):
    # Two trainers (fine-tuning and MLC with the forward difference) on a tiny BERT: each runs its own
    # `trainer.train()`, one optimizer step of each per round.
    from transformers import TrainerCallback

    step_cost = load("step_cost")
    args = step_cost.parse_args(["--model", "tiny-bert", "--lengths", "8", "--batch-size", "4", "--threads", "1"])
    cases = [step_cost.StepCase("plain"), step_cost.StepCase("fd")]
    trainers = {
        case.key: step_cost.build_trainer(args, "tiny-bert", 8, case.settings(), 3, str(tmp_path / case.path))
        for case in cases
    }
    assert type(trainers["plain:fp32:default"]).__name__ == "FinetuneTrainer"
    assert trainers["fd:fp32:default"].args.meta_gradient == "fd"
    order = []

    class Order(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_step_end(self, args, state, control, **kwargs):
            order.append(self.key)

    for key, trainer in trainers.items():
        trainer.add_callback(Order(key))
    times = step_cost.run_in_turns(trainers, "cpu", verbose=False)
    assert order == ["plain:fp32:default", "fd:fp32:default"] * 3
    assert all(len(values) == 3 and all(value > 0 for value in values) for values in times.values())
    assert all(trainer.state.global_step == 3 for trainer in trainers.values())
    assert step_cost.StepCase.from_key("fast:fp32:no_reuse") == step_cost.StepCase("jvp", "fp32", "no_reuse")
    with pytest.raises(ValueError, match="path in plain"):
        step_cost.StepCase("double_backward")


def test_step_cost_tables_go_between_the_docs_markers(tmp_path):
    step_cost = load("step_cost")
    machine = {"command": "python bench/step_cost.py --quick", "device": "cpu", "cpu": "AMD EPYC", "torch": "2.13"}
    machine.update(threads=2, load_avg_at_start=0.5)
    step_rows = [
        {
            "model": "minilm",
            "max_length": 64,
            "batch_size": 32,
            "path": path,
            "variant": "default",
            "precision": "fp32",
        }
        | {"step_s": seconds, "ratio_to_plain": seconds / 1.3, "peak_mem_mb": 469.0, "mem_ratio_to_plain": 1.0}
        | machine
        for path, seconds in (("plain", 1.3), ("fd", 3.0))
    ]
    epoch_rows = [
        {"model": "minilm", "max_length": 64, "batch_size": 32, "precision": "fp32", "method": "finetune"}
        | {"meta_gradient": None, "meta_update_interval": None, "step_s": 1.3, "step_ratio_to_finetune": 1.0}
        | {"epoch_s": 247.0, "epoch_ratio_to_finetune": 1.0, "measured_steps": 10, "epoch_rows": 6000}
        | {"steps_per_epoch": 188}
        | machine
    ]
    page = tmp_path / "PERFORMANCE.md"
    page.write_text(f"# Performance\n\nbefore\n{step_cost.DOCS_START}\nold table\n{step_cost.DOCS_END}\nafter\n")
    step_cost.update_docs(step_cost.render_tables(step_rows, epoch_rows), page)
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Performance\n\nbefore\n") and text.endswith("after\n")
    assert "| minilm | 64 | fd | default | fp32 | 3.00 | 2.31 | 469.00 | 1.00 |" in text
    assert "`python bench/step_cost.py --quick`" in text and "load average 0.5" in text
    assert "| finetune | - | - | - | 1.30 | 1.00 | 247.00 | 1.00 |" in text
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        step_cost.update_docs("table", tmp_path / "plain.md")
