from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import TrainingArguments

from mlc_text import reporting
from mlc_text.reporting import (
    format_results_table,
    plot_correction_matrix,
    plot_learning_curves,
    plot_method_comparison,
    to_json_safe,
    write_model_card,
    write_results_json,
)

PNG_MAGIC = b"\x89PNG"
NOISE = {"type": "uniform", "rate": 0.4, "realised_rate": np.float64(0.3975)}
TEST_METRICS = {"test_accuracy": np.float32(0.875), "test_macro_f1": 0.8612, "test_loss": 0.41, "test_runtime": 3.2}
LABEL_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == PNG_MAGIC


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    header, _ = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header)


def test_write_results_json(tmp_path):
    path = write_results_json(
        tmp_path / "run",
        method="mlc",
        corpus="ag_news",
        model="minilm-l6",
        noise=NOISE,
        metrics={"test": TEST_METRICS, "eval": {"eval_accuracy": np.float64(0.9)}},
        correction_accuracy=np.float64(0.8),
        wall_s=12.5,
        extra={"seed": np.int64(42), "matrix": np.eye(2), "loss": float("nan"), "tensor": torch.tensor([1.5])},
    )
    results = json.loads(path.read_text())
    assert path.name == "results.json"
    for key in ("method", "corpus", "model", "noise", "metrics", "correction_accuracy", "wall_s"):
        assert key in results
    assert results["noise"] == {"type": "uniform", "rate": 0.4, "realised_rate": 0.3975}
    assert results["metrics"]["test"]["test_accuracy"] == 0.875
    assert results["metrics"]["eval"] == {"eval_accuracy": 0.9}
    assert (results["seed"], results["matrix"], results["loss"], results["tensor"]) == (
        42,
        [[1, 0], [0, 1]],
        None,
        [1.5],
    )


def test_write_results_json_bad_inputs(tmp_path):
    settings = dict(method="mlc", corpus="c", model="m", metrics={}, correction_accuracy=None, wall_s=1.0)
    with pytest.raises(ValueError, match=r"noise must be a dict with the keys \['type', 'rate', 'realised_rate'\]"):
        write_results_json(tmp_path, noise={"type": "uniform"}, **settings)
    with pytest.raises(ValueError, match=r"extra may not replace the keys \['method'\]"):
        write_results_json(tmp_path, noise=NOISE, extra={"method": "x"}, **settings)
    with pytest.raises(ValueError, match="metrics must map split names"):
        write_results_json(tmp_path, noise=NOISE, **{**settings, "metrics": {"test_accuracy": 0.5}})


def test_to_json_safe():
    assert to_json_safe({1: (np.float32(0.5), float("inf"))}) == {"1": [0.5, None]}


def test_plot_learning_curves(tmp_path):
    history = [
        {"loss": 1.2, "clean_loss": 1.1, "step": 10},
        {"loss": 0.9, "clean_loss": 0.8, "step": 20},
        {"eval_accuracy": 0.7, "eval_loss": 0.8, "step": 20},
        {"train_loss": 1.0, "step": 20},
    ]
    path = plot_learning_curves(history, tmp_path / "plots" / "curves.png")
    assert is_png(path)
    assert is_png(plot_learning_curves(history[:1], tmp_path / "loss_only.png"))


def test_plot_learning_curves_with_what_happened_to_the_noisy_rows(tmp_path, monkeypatch):
    history = [
        {"loss": 1.2, "clean_loss": 1.1, "agreement_with_noisy": 0.4, "correction_accuracy": 0.5, "step": 10},
        {"eval_accuracy": 0.6, "step": 10},
        {"loss": 0.9, "clean_loss": 0.8, "agreement_with_noisy": 0.6, "correction_accuracy": 0.7, "step": 20},
        {"eval_accuracy": 0.7, "step": 20},
        {"loss": 0.8, "weight_on_corrupted": 0.2, "step": 30},
    ]
    drawn = []
    monkeypatch.setattr(reporting, "_draw_panel", lambda axes, *panel: drawn.append(panel))
    path = plot_learning_curves(history, tmp_path / "curves.png", eval_label="trusted rows", noisy_label_accuracy=0.7)
    assert is_png(path)
    titles = [title for title, *_ in drawn]
    assert titles == ["losses", "accuracy", "noisy training rows"]
    _, _, accuracy, _ = drawn[1]
    assert accuracy == {"trusted rows": [(10, 0.6), (20, 0.7)]}  # one point per evaluation, not a single one
    _, _, noisy_rows, references = drawn[2]
    assert noisy_rows["corrected label = given label"] == [(10, 0.4), (20, 0.6)]
    assert noisy_rows["L2RW weight on corrupted rows"] == [(30, 0.2)]
    assert references == {"given labels right": 0.7, "corrupted share": pytest.approx(0.3)}


def test_plot_learning_curves_nothing_to_plot(tmp_path):
    path = tmp_path / "curves.png"
    assert plot_learning_curves([{"train_runtime": 3.0, "step": 5}], path) is None
    assert plot_learning_curves([], path) is None
    assert not path.exists()


def test_plot_correction_matrix(tmp_path):
    learned = np.full((4, 4), 0.1) + 0.6 * np.eye(4)
    learned[2] = np.nan
    true_matrix = np.full((4, 4), 0.1) + 0.6 * np.eye(4)
    assert is_png(plot_correction_matrix(learned, true_matrix, tmp_path / "m.png", LABEL_NAMES))
    assert is_png(plot_correction_matrix(learned, true_matrix, tmp_path / "ids.png"))


def test_plot_correction_matrix_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"same shape \(K, K\), got shapes \(4, 4\) and \(3, 3\)"):
        plot_correction_matrix(np.eye(4), np.eye(3), tmp_path / "m.png")
    with pytest.raises(ValueError, match="label_names must have 4 names"):
        plot_correction_matrix(np.eye(4), np.eye(4), tmp_path / "m.png", LABEL_NAMES[:3])


def test_plot_method_comparison(tmp_path):
    rows = [
        {"method": "mlc", "test_accuracy": 0.88},
        {"method": "mlc", "test_accuracy": 0.86},
        {"method": "finetune", "test_accuracy": np.float64(0.81)},
        {"method": "glc", "test_accuracy": None},
    ]
    assert is_png(plot_method_comparison(rows, tmp_path / "comparison.png"))
    assert is_png(plot_method_comparison(rows, tmp_path / "wall.png", metric="wall_s"))
    with pytest.raises(ValueError, match="'method' key"):
        plot_method_comparison([{"test_accuracy": 0.5}], tmp_path / "bad.png")


def test_format_results_table():
    rows = [
        {"method": "mlc", "test_accuracy": 0.91234, "correction_accuracy": None, "wall_s": 1234.56},
        {"method": "finetune", "test_accuracy": np.float32(0.8), "wall_s": 3},
    ]
    lines = format_results_table(rows, ["method", "test_accuracy", "correction_accuracy", "wall_s"]).splitlines()
    assert len(lines) == 4
    assert lines[0].split("|")[1].strip() == "method"
    assert set(lines[1].replace("|", "").replace(" ", "")) == {"-"}
    assert [cell.strip() for cell in lines[2].split("|")[1:-1]] == ["mlc", "0.9123", "-", "1234.6"]
    assert [cell.strip() for cell in lines[3].split("|")[1:-1]] == ["finetune", "0.8000", "-", "3"]
    with pytest.raises(ValueError, match="columns must name at least one key"):
        format_results_table(rows, [])


def test_write_model_card_mlc(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-5, seed=7, report_to="none")
    path = write_model_card(
        tmp_path / "agnews-mlc",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        corpus="fancyzhx/ag_news",
        label_names=LABEL_NAMES,
        noise=NOISE,
        method="mlc",
        metrics=TEST_METRICS,
        correction_accuracy=0.83,
        training_args=args,
    )
    text = path.read_text()
    metadata = front_matter(text)
    assert path.name == "README.md"
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metadata["datasets"] == ["fancyzhx/ag_news"]
    assert metadata["tags"] == ["text-classification", "noisy-labels", "mlc-text", "meta-label-correction"]
    assert metadata["pipeline_tag"] == "text-classification"
    result = metadata["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.875, "f1": 0.8612}
    for needle in ("uniform", "| rate ", "0.4 ", "0.3975", "AutoModelForSequenceClassification.from_pretrained"):
        assert needle in text
    assert "label_corrector.pt" in text and "Sci/Tech" in text and "seed: 7" in text
    assert "test_runtime" not in text


def test_write_model_card_baseline_with_local_base_model(tmp_path):
    path = write_model_card(
        tmp_path,
        base_model=str(tmp_path),
        corpus="my_corpus",
        label_names=None,
        noise={"type": "asymmetric", "rate": 0.2, "realised_rate": None},
        method="finetune",
        metrics={},
    )
    text = path.read_text()
    metadata = front_matter(text)
    assert "base_model" not in metadata and "model-index" not in metadata
    assert "meta-label-correction" not in metadata["tags"]  # a fine-tuned model is not tagged as MLC's
    assert "asymmetric" in text and "0.2" in text
    assert "label_corrector.pt" not in text
    with pytest.raises(ValueError, match="noise must be a dict"):
        write_model_card(tmp_path, base_model="m", corpus="c", label_names=None, noise=None, method="mlc", metrics={})
