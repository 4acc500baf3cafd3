"""Ranking the noisy training rows by how likely their label is wrong, the CSV, and precision / recall at k."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mlc_text.label_issues import (
    LABEL_ISSUE_COLUMNS,
    label_issues_table,
    label_quality,
    precision_recall_at_k,
    rank_label_issues,
    softmax,
    write_label_issues,
)

NAMES = ["neg", "pos", "mixed"]
# Five rows; the main net is sure of row 1's given label and doubts row 3's most.
PREDICTED = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05], [0.5, 0.25, 0.25]])
GIVEN = np.array([0, 1, 2, 0, 1])
TRUE = np.array([0, 1, -1, 1, 0])  # rows 3 and 4 are wrong, row 2 unknown


def table(**changes):
    settings = dict(
        index=[10, 11, 12, 13, 14],
        texts=["a", "b", "c", "d", "e"],
        given_labels=GIVEN,
        predicted_probabilities=PREDICTED,
        label_names=NAMES,
        true_labels=TRUE,
    )
    return label_issues_table(**{**settings, **changes})


def test_softmax_is_stable_and_sums_to_one():
    probabilities = softmax([[1000.0, 1000.0], [0.0, np.log(3.0)]])
    np.testing.assert_allclose(probabilities, [[0.5, 0.5], [0.25, 0.75]])
    with pytest.raises(ValueError, match=r"logits must have shape \(N, K\), got shape \(3,\)"):
        softmax([1.0, 2.0, 3.0])


def test_label_quality_is_the_probability_of_the_given_label():
    np.testing.assert_allclose(label_quality(PREDICTED, GIVEN), [0.7, 0.8, 0.4, 0.05, 0.25])
    with pytest.raises(ValueError, match=r"given_labels must be in 0\.\.2, got 3 at row 1"):
        label_quality(PREDICTED, [0, 3, 0, 0, 0])
    with pytest.raises(ValueError, match="one label per row"):
        label_quality(PREDICTED, [0, 1])
    with pytest.raises(ValueError, match="rows summing to 1"):
        label_quality(PREDICTED * 2, GIVEN)


def test_ranking_puts_the_least_believed_label_first_and_keeps_ties_in_row_order():
    assert rank_label_issues([0.5, 0.1, 0.5, 0.1, 0.9]).tolist() == [1, 3, 0, 2, 4]
    with pytest.raises(ValueError, match="NaN, got one at row 2"):
        rank_label_issues([0.1, 0.2, float("nan")])


def test_table_by_self_confidence_without_a_corrector():
    rows = table()
    assert [row["index"] for row in rows] == [13, 14, 12, 10, 11]  # quality 0.05, 0.25, 0.4, 0.7, 0.8
    first = rows[0]
    assert first == {
        "rank": 1,
        "index": 13,
        "given_label": "neg",
        "label_quality": pytest.approx(0.05),
        "corrected_label": None,
        "corrector_confidence": None,
        "predicted_label": "pos",
        "predicted_probability": pytest.approx(0.9),
        "true_label": "pos",
        "text": "d",
    }
    assert rows[2]["true_label"] is None  # unknown
    assert list(first) == list(LABEL_ISSUE_COLUMNS)


def test_table_by_the_corrector_when_asked():
    corrected = np.array([[0.2, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.1, 0.9], [0.6, 0.4, 0.0], [0.1, 0.8, 0.1]])
    by_default = table(corrected_probabilities=corrected)  # self-confidence ranks; the corrector is shown beside it
    assert [row["index"] for row in by_default] == [13, 14, 12, 10, 11]
    assert by_default[3]["corrected_label"] == "pos" and by_default[3]["label_quality"] == pytest.approx(0.7)
    rows = table(corrected_probabilities=corrected, rank_by="corrector")
    assert [row["index"] for row in rows] == [10, 13, 14, 12, 11]  # corrector's given-label share 0.2, 0.6, 0.8, ...
    assert rows[0]["corrected_label"] == "pos" and rows[0]["corrector_confidence"] == pytest.approx(0.8)
    assert rows[0]["label_quality"] == pytest.approx(0.2) and rows[0]["predicted_label"] == "neg"


def test_table_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="label_names must name the 3 classes, got 2"):
        table(label_names=NAMES[:2])
    with pytest.raises(ValueError, match="index and texts must have 5 rows each, got 4 and 5"):
        table(index=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"true_labels must be in -1 \(unknown\) or 0\.\.2, got -2"):
        table(true_labels=[0, 0, 0, 0, -2])
    with pytest.raises(ValueError, match=r"corrected_probabilities must have shape \(5, 3\)"):
        table(corrected_probabilities=np.full((5, 2), 0.5))
    with pytest.raises(ValueError, match="rank_by must be one of self_confidence, corrector, got 'quality'"):
        table(rank_by="quality")
    with pytest.raises(ValueError, match="rank_by='corrector' needs corrected_probabilities"):
        table(rank_by="corrector")


def test_csv_round_trip(tmp_path):
    path = write_label_issues(table(), tmp_path / "run" / "label_issues.csv")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(LABEL_ISSUE_COLUMNS) and len(rows) == 5
    assert rows[0]["index"] == "13" and rows[0]["label_quality"] == "0.050000"
    assert rows[0]["corrected_label"] == "" and rows[2]["true_label"] == ""


def test_precision_and_recall_at_k_over_the_rows_with_a_known_label():
    quality = label_quality(PREDICTED, GIVEN)
    scores = precision_recall_at_k(quality, GIVEN, TRUE)  # k = 2 wrong of 4 known; rows 3, 4 ranked first
    assert scores == {"k": 2, "precision_at_k": 1.0, "recall_at_k": 1.0, "wrong_share": 0.5, "num_known": 4}
    reversed_scores = precision_recall_at_k(-quality, GIVEN, TRUE)
    assert reversed_scores["precision_at_k"] == 0.0 and reversed_scores["recall_at_k"] == 0.0
    three = precision_recall_at_k(quality, GIVEN, TRUE, k=3)
    assert three["precision_at_k"] == pytest.approx(2 / 3) and three["recall_at_k"] == 1.0
    assert precision_recall_at_k(quality, GIVEN, TRUE, k=0)["precision_at_k"] is None
    assert precision_recall_at_k(quality, GIVEN, np.full(5, -1)) is None  # nothing known: nothing to score
    none_wrong = precision_recall_at_k(quality, GIVEN, GIVEN)
    assert none_wrong["k"] == 0 and none_wrong["precision_at_k"] is None and none_wrong["wrong_share"] == 0.0
    with pytest.raises(ValueError, match=r"k must be an integer in 0\.\.4 .*got 5"):
        precision_recall_at_k(quality, GIVEN, TRUE, k=5)
    with pytest.raises(ValueError, match="one value per row, got 5, 5 and 3"):
        precision_recall_at_k(quality, GIVEN, TRUE[:3])


def test_a_random_ranking_finds_the_wrong_share_on_average():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, size=400)
    given = np.where(rng.random(400) < 0.3, (true + 1) % 4, true)
    wrong_share = float(np.mean(given != true))
    precisions = [precision_recall_at_k(rng.random(400), given, true)["precision_at_k"] for _ in range(200)]
    assert np.mean(precisions) == pytest.approx(wrong_share, abs=0.02)
