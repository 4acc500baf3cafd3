from __future__ import annotations

import json
import time

import numpy as np
import pytest

from mlc_text.noise import (
    CLASS_CONDITIONAL,
    build_transition_matrix,
    corrupt,
    flip_matrix,
    load_matrix,
    noise_report,
    uniform_matrix,
    validate_transition_matrix,
)

NUM_ROWS = 10_000
NUM_CLASSES = 4
MATRIX = [[0.7, 0.1, 0.1, 0.1], [0.0, 0.8, 0.2, 0.0], [0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.35, 0.65]]


def balanced_labels(num_rows: int = NUM_ROWS, num_classes: int = NUM_CLASSES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(num_rows) % num_classes)


def reference_corrupt(labels: np.ndarray, matrix: np.ndarray, seed: int) -> np.ndarray:
    """Row-by-row sampling from the same uniform draws: what the vectorised `corrupt` must match exactly."""
    draws = np.random.default_rng(seed).random(len(labels))
    rows = np.cumsum(matrix, axis=1)
    return np.array(
        [min(np.searchsorted(rows[label], draw, side="right"), len(matrix) - 1) for label, draw in zip(labels, draws)]
    )


def test_uniform_matrix_follows_the_paper():
    matrix = uniform_matrix(4, 0.4)
    np.testing.assert_allclose(np.diag(matrix), 0.7)
    np.testing.assert_allclose(matrix[~np.eye(4, dtype=bool)], 0.1)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_flip_matrix_puts_the_rate_on_one_other_class():
    matrix = flip_matrix(10, 0.3, seed=0)
    np.testing.assert_allclose(np.diag(matrix), 0.7)
    off_diagonal = matrix * ~np.eye(10, dtype=bool)
    assert ((off_diagonal > 0).sum(axis=1) == 1).all()
    np.testing.assert_allclose(off_diagonal.sum(axis=1), 0.3)
    np.testing.assert_array_equal(matrix, flip_matrix(10, 0.3, seed=0))
    assert not np.array_equal(matrix, flip_matrix(10, 0.3, seed=1))


def test_flip_matrix_needs_two_classes():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        flip_matrix(1, 0.2, seed=0)


@pytest.mark.parametrize("noise_type", CLASS_CONDITIONAL)
@pytest.mark.parametrize("rate", [0.2, 0.6])
def test_realised_noise_matches_the_request(noise_type, rate):
    labels = balanced_labels()
    matrix = build_transition_matrix(
        noise_type, rate, NUM_CLASSES, seed=0, matrix=MATRIX if noise_type == "matrix" else None
    )
    noisy = corrupt(labels, matrix, seed=1)
    report = noise_report(labels, noisy, NUM_CLASSES, matrix)
    assert abs(report["realised_rate"] - report["expected_rate"]) < 0.02
    np.testing.assert_allclose(report["realised_matrix"], matrix, atol=0.04)
    if noise_type == "flip":
        assert report["expected_rate"] == pytest.approx(rate)
    if noise_type == "uniform":  # a uniform redraw may land on the true class
        assert report["expected_rate"] == pytest.approx(rate * (NUM_CLASSES - 1) / NUM_CLASSES)
    if noise_type == "none":
        np.testing.assert_array_equal(noisy, labels)


@pytest.mark.parametrize("noise_type", ["uniform", "flip", "matrix"])
def test_corrupt_is_seeded(noise_type):
    labels = balanced_labels()
    matrix = build_transition_matrix(
        noise_type, 0.4, NUM_CLASSES, seed=0, matrix=MATRIX if noise_type == "matrix" else None
    )
    np.testing.assert_array_equal(corrupt(labels, matrix, seed=7), corrupt(labels, matrix, seed=7))
    assert not np.array_equal(corrupt(labels, matrix, seed=7), corrupt(labels, matrix, seed=8))


def test_corrupt_matches_the_row_by_row_reference():
    labels = balanced_labels(2000)
    matrix = np.asarray(MATRIX)
    np.testing.assert_array_equal(corrupt(labels, matrix, seed=3), reference_corrupt(labels, matrix, seed=3))


def test_corrupt_is_vectorised():
    labels = balanced_labels(200_000)
    start = time.perf_counter()
    corrupt(labels, uniform_matrix(NUM_CLASSES, 0.5), seed=0)
    assert time.perf_counter() - start < 2.0


def test_corrupt_refuses_bad_labels():
    with pytest.raises(ValueError, match="labels must be in 0..3, got 4"):
        corrupt([0, 4], uniform_matrix(4, 0.2), seed=0)
    with pytest.raises(ValueError, match="labels must be integers, got dtype float64"):
        corrupt([0.0, 1.5], uniform_matrix(4, 0.2), seed=0)
    with pytest.raises(ValueError, match=r"K x K with K >= 1, got shape \(2, 3\)"):
        corrupt([0, 1], np.full((2, 3), 1 / 3), seed=0)


def test_noise_report_counts():
    report = noise_report([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], num_classes=3)
    assert report["counts"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert report["realised_matrix"] == [[0.5, 0.5, 0.0], [1 / 3, 2 / 3, 0.0], [0.0, 0.0, 0.0]]
    assert report["realised_rate"] == pytest.approx(0.4)
    assert report["true_class_counts"] == [2, 3, 0]
    assert report["noisy_class_counts"] == [2, 3, 0]
    assert report["num_rows"] == 5
    json.dumps(report)  # plain Python types only


def test_noise_report_refuses_unequal_lengths():
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        noise_report([0, 1], [0, 1, 1], num_classes=2)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.eye(3), r"must be 4 x 4, got shape \(3, 3\)"),
        (np.ones((4, 3)) / 3, r"must be 4 x 4, got shape \(4, 3\)"),
        (np.full((4, 4), 0.3), "rows must sum to 1, got row 0 summing to 1.2"),
        ([[1.2, -0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "non-negative, got -0.2 at row 0, column 1"),
        ([[np.nan, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "finite numbers"),
        ([["a", "b", "c", "d"]] * 4, "array of numbers"),
    ],
)
def test_validate_transition_matrix_errors(matrix, message):
    with pytest.raises(ValueError, match=message):
        validate_transition_matrix(matrix, 4)


def test_validate_transition_matrix_tolerance():
    matrix = np.asarray(MATRIX)
    matrix[0, 0] += 5e-7
    validate_transition_matrix(matrix, 4)


@pytest.mark.parametrize("rate", [1.3, -0.1, float("nan")])
def test_rate_outside_zero_one(rate):
    with pytest.raises(ValueError, match=rf"noise_rate must be in \[0, 1\], got {rate}"):
        build_transition_matrix("uniform", rate, 4)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_rate_bounds_are_accepted(rate):
    np.testing.assert_allclose(build_transition_matrix("flip", rate, 4).sum(axis=1), 1.0)


def test_unknown_noise_type_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="noise_type must be one of uniform, flip, matrix, none, got 'gaussian'"):
        build_transition_matrix("gaussian", 0.2, 4)


def test_none_is_the_identity():
    np.testing.assert_array_equal(build_transition_matrix("none", 0.4, 3), np.eye(3))


def test_matrix_from_inline_json_or_file(tmp_path):
    inline = json.dumps(MATRIX)
    np.testing.assert_allclose(build_transition_matrix("matrix", 0.0, 4, matrix=inline), MATRIX)
    path = tmp_path / "matrix.json"
    path.write_text(inline)
    np.testing.assert_allclose(build_transition_matrix("matrix", 0.0, 4, matrix=str(path)), MATRIX)
    np.testing.assert_allclose(load_matrix(np.asarray(MATRIX)), MATRIX)


def test_matrix_errors():
    with pytest.raises(ValueError, match="noise_type='matrix' needs a transition matrix"):
        build_transition_matrix("matrix", 0.2, 4)
    with pytest.raises(ValueError, match="only used with noise_type='matrix', got noise_type='uniform'"):
        build_transition_matrix("uniform", 0.2, 4, matrix=MATRIX)
    with pytest.raises(ValueError, match="noise_matrix must be a JSON file or inline JSON.*'not json'"):
        build_transition_matrix("matrix", 0.2, 4, matrix="not json")
    with pytest.raises(ValueError, match=r"must be 3 x 3, got shape \(4, 4\)"):
        build_transition_matrix("matrix", 0.2, 3, matrix=MATRIX)
