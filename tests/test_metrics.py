from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction

from mlc_text.metrics import (
    CLASSIFICATION_MODULE,
    SHIPPED_METRICS,
    build_compute_metrics,
    correction_stats,
    empirical_transition_matrix,
    learned_transition_matrix,
    load_metric,
)

PREDICTIONS = [0, 1, 2, 2, 1, 0, 0, 2]
REFERENCES = [0, 1, 1, 2, 1, 2, 0, 0]

# Hand-made corrector output: 6 rows, 3 classes. Row 5's true label is unknown (-1).
CORRECTED = np.array(
    [
        [0.8, 0.1, 0.1],  # argmax 0, noisy 0, true 0: clean label, kept
        [0.1, 0.7, 0.2],  # argmax 1, noisy 0, true 1: corrupted, fixed
        [0.2, 0.2, 0.6],  # argmax 2, noisy 2, true 1: corrupted, not fixed
        [0.3, 0.6, 0.1],  # argmax 1, noisy 1, true 1: clean label, kept
        [0.5, 0.4, 0.1],  # argmax 0, noisy 2, true 2: clean label, broken
        [1.0, 0.0, 0.0],  # argmax 0, noisy 1, true unknown
    ]
)
NOISY = np.array([0, 0, 2, 1, 2, 1])
TRUE = np.array([0, 1, 1, 1, 2, -1])


def entropy(row) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


def test_shipped_module_loads_by_path_and_matches_sklearn():
    metric = evaluate.load(str(CLASSIFICATION_MODULE), keep_in_memory=True)
    results = metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert results["accuracy"] == pytest.approx(accuracy_score(REFERENCES, PREDICTIONS))
    assert results["macro_f1"] == pytest.approx(f1_score(REFERENCES, PREDICTIONS, average="macro"))
    assert results["accuracy"] == pytest.approx(5 / 8)


@pytest.mark.parametrize("name", SHIPPED_METRICS)
def test_load_metric_shipped_names_work_offline(name):
    results = load_metric(name).compute(predictions=PREDICTIONS, references=REFERENCES)
    assert set(results) == {"accuracy", "macro_f1"}
    assert results["accuracy"] == pytest.approx(0.625)


def test_load_metric_unknown_name_names_the_offline_metrics():
    with pytest.raises(ValueError, match=r"'mlc_text_no_such_metric'.*accuracy, macro_f1, classification"):
        load_metric("mlc_text_no_such_metric")


@pytest.mark.skipif(not hub_constants.HF_HUB_OFFLINE, reason="checks the offline failure of a Hub metric")
def test_load_metric_hub_metric_offline_is_a_clear_error():
    with pytest.raises(ValueError, match="Offline, only the shipped metrics work"):
        load_metric("precision")


@pytest.mark.parametrize("name", ["", None, 3])
def test_load_metric_refuses_non_names(name):
    with pytest.raises(ValueError, match="non-empty string"):
        load_metric(name)


def test_compute_metrics_from_logits():
    logits = np.eye(3)[PREDICTIONS] * 2.0 - 1.0
    results = build_compute_metrics()(EvalPrediction(predictions=logits, label_ids=np.array(REFERENCES)))
    assert results["accuracy"] == pytest.approx(accuracy_score(REFERENCES, PREDICTIONS))
    assert results["macro_f1"] == pytest.approx(f1_score(REFERENCES, PREDICTIONS, average="macro"))


def test_compute_metrics_takes_first_output_and_skips_ignored_labels():
    logits = np.eye(3)[PREDICTIONS + [1]]
    labels = np.array(REFERENCES + [-100])
    hidden = np.zeros((len(labels), 4))
    results = build_compute_metrics()(EvalPrediction(predictions=(logits, hidden), label_ids=labels))
    assert results["accuracy"] == pytest.approx(0.625)


def test_compute_metrics_with_extra_metric_script(tmp_path):
    script = tmp_path / "error_count.py"
    script.write_text(
        "import datasets\nimport evaluate\n\n\n"
        "class ErrorCount(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        features = {'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}\n"
        "        return evaluate.MetricInfo(description='', citation='', features=datasets.Features(features))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'errors': sum(p != r for p, r in zip(predictions, references))}\n"
    )
    compute_metrics = build_compute_metrics(["accuracy", str(script)])
    results = compute_metrics(EvalPrediction(predictions=np.eye(3)[PREDICTIONS], label_ids=np.array(REFERENCES)))
    assert set(results) == {"accuracy", "macro_f1", "errors"}
    assert results["errors"] == 3


def test_compute_metrics_shape_mismatch_is_a_clear_error():
    compute_metrics = build_compute_metrics()
    with pytest.raises(ValueError, match=r"3 predictions for 4 labels"):
        compute_metrics(EvalPrediction(predictions=np.zeros((3, 2)), label_ids=np.zeros(4, dtype=int)))


def test_build_compute_metrics_refuses_a_bare_string():
    with pytest.raises(ValueError, match="sequence of metric names"):
        build_compute_metrics("accuracy")


def test_correction_stats_hand_computed():
    stats = correction_stats(CORRECTED, NOISY, TRUE)
    assert stats["correction_accuracy"] == pytest.approx(3 / 5)
    assert stats["noisy_label_accuracy"] == pytest.approx(3 / 5)
    assert stats["fixed_share"] == pytest.approx(1 / 2)
    assert stats["broken_share"] == pytest.approx(1 / 3)
    assert stats["agreement_with_noisy"] == pytest.approx(3 / 6)
    assert stats["mean_entropy"] == pytest.approx(np.mean([entropy(row) for row in CORRECTED]))
    assert (stats["num_rows"], stats["num_known"], stats["num_corrupted"]) == (6, 5, 2)


def test_correction_stats_accepts_torch_and_float_labels():
    expected = correction_stats(CORRECTED, NOISY, TRUE)
    stats = correction_stats(
        torch.tensor(CORRECTED, dtype=torch.float32), torch.tensor(NOISY).float(), torch.tensor(TRUE)
    )
    assert stats == pytest.approx(expected)


def test_correction_stats_without_corrupted_rows():
    stats = correction_stats(CORRECTED[:2], np.array([0, 1]), np.array([0, 1]))
    assert stats["fixed_share"] is None
    assert stats["noisy_label_accuracy"] == 1.0
    assert stats["correction_accuracy"] == 1.0


def test_correction_stats_with_all_true_labels_unknown():
    for true in (None, np.full(len(NOISY), -1)):
        stats = correction_stats(CORRECTED, NOISY, true)
        assert stats["correction_accuracy"] is None and stats["fixed_share"] is None
        assert stats["agreement_with_noisy"] == pytest.approx(0.5)
        assert stats["num_known"] == 0


@pytest.mark.parametrize(
    ("probs", "noisy", "true", "message"),
    [
        (CORRECTED, NOISY[:5], TRUE, r"noisy_labels must have shape \(6,\)"),
        (CORRECTED, NOISY, TRUE[:4], r"true_labels must have shape \(6,\)"),
        (CORRECTED[0], NOISY[:1], TRUE[:1], r"corrected_probs must have shape \(num_rows, num_classes\)"),
        (CORRECTED, np.array([0, 0, 3, 1, 2, 1]), TRUE, r"noisy_labels must be class ids in \[0, 3\), got 3"),
        (CORRECTED, np.array([0, 0, -1, 1, 2, 1]), TRUE, r"noisy_labels must be class ids in \[0, 3\), got -1"),
        (CORRECTED, NOISY, np.array([0, 1, 1, 1, 2, -2]), r"or -1 \(unknown\), got -2"),
        (CORRECTED, NOISY + 0.5, TRUE, "integer class ids"),
    ],
)
def test_correction_stats_bad_inputs(probs, noisy, true, message):
    with pytest.raises(ValueError, match=message):
        correction_stats(probs, noisy, true)


def test_learned_transition_matrix_rows_are_means_and_empty_rows_nan():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    noisy = rng.choice([0, 1, 3], size=50)
    matrix = learned_transition_matrix(torch.tensor(probs), noisy, num_classes=4)
    assert matrix.shape == (4, 4)
    assert np.isnan(matrix[2]).all()
    np.testing.assert_allclose(matrix[[0, 1, 3]].sum(axis=1), 1.0)
    np.testing.assert_allclose(matrix[1], probs[noisy == 1].mean(axis=0))


def test_learned_transition_matrix_bad_inputs():
    with pytest.raises(ValueError, match="3 columns but num_classes is 4"):
        learned_transition_matrix(CORRECTED, NOISY, num_classes=4)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        learned_transition_matrix(CORRECTED, NOISY, num_classes=0)


def test_empirical_transition_matrix_counts_and_ignores_unknown():
    true = np.array([0, 0, 0, 0, 1, 1, -1])
    noisy = np.array([0, 0, 0, 1, 1, 0, 1])
    matrix = empirical_transition_matrix(true, noisy, num_classes=3)
    np.testing.assert_allclose(matrix[:2], [[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]])
    assert np.isnan(matrix[2]).all()
    with pytest.raises(ValueError, match=r"noisy_labels must have shape \(7,\)"):
        empirical_transition_matrix(true, noisy[:3], num_classes=3)
