from __future__ import annotations

import numpy as np
import pytest

from mlc_text.data import add_label_noise, prepare_corpus
from mlc_text.data_config import NoiseArguments
from mlc_text.instance_noise import instance_dependent_noise, weak_model_probabilities

WORDS = [["goal", "match", "team"], ["stock", "market", "shares"], ["chip", "software", "market"]]


def topic_rows(count: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Class c draws words from its own list; classes 1 and 2 share 'market', so some of their rows are ambiguous."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    texts = [" ".join(rng.choice(WORDS[label], size=4)) for label in labels]
    return texts, labels


def test_weak_model_probabilities_are_out_of_fold_distributions():
    texts, labels = topic_rows(300)
    probabilities = weak_model_probabilities(texts, labels, 3, seed=0)
    assert probabilities.shape == (300, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.8


def test_instance_noise_relabels_the_most_ambiguous_rows_to_their_closest_class():
    texts, labels = topic_rows(300)
    noisy = instance_dependent_noise(texts, labels, 3, rate=0.2, seed=0)
    changed = noisy != labels
    assert changed.sum() == 60  # exactly round(rate * rows)
    probabilities = weak_model_probabilities(texts, labels, 3, seed=0)
    own = probabilities[np.arange(300), labels]
    assert own[changed].max() <= own[~changed].min()  # the least certain rows, and only those
    others = probabilities.copy()
    others[np.arange(300), labels] = -1
    np.testing.assert_array_equal(noisy[changed], others[changed].argmax(axis=1))
    # the shared word makes classes 1 and 2 the confusable pair: most wrong labels stay within it
    pairs = list(zip(labels[changed], noisy[changed]))
    assert np.mean([set(pair) == {1, 2} for pair in pairs]) > 0.5
    np.testing.assert_array_equal(instance_dependent_noise(texts, labels, 3, rate=0.0, seed=0), labels)


def test_instance_noise_rejects_a_rate_of_one():
    texts, labels = topic_rows(20)
    with pytest.raises(ValueError, match=r"noise_rate must be in \[0, 1\) for instance-dependent noise, got 1.0"):
        instance_dependent_noise(texts, labels, 3, rate=1.0, seed=0)


def test_add_label_noise_instance_reports_the_realised_noise():
    from datasets import Dataset

    texts, labels = topic_rows(200)
    noisy, report = add_label_noise(Dataset.from_dict({"text": texts, "label": labels}), "instance", 0.3, 3, seed=1)
    assert report["type"] == "instance" and report["transition_matrix"] is None
    assert report["realised_rate"] == pytest.approx(0.3)
    assert np.array_equal(noisy["is_corrupted"], np.asarray(noisy["label"]) != np.asarray(noisy["true_label"]))


def test_prepare_corpus_with_instance_noise(data_dir):
    from mlc_text.data_config import DataArguments

    args = DataArguments(corpus="yelp_review_full", data_dir=data_dir, num_clean_per_class=10, validation_size=50)
    corpus = prepare_corpus(args, NoiseArguments(noise_type="instance", noise_rate=0.4))
    rate = corpus.noise_report["realised_rate"]
    assert 0.3 < rate < 0.5  # 40% of the pool; the validation rows take their share
    # neighbouring star ratings are what a bag-of-words model confuses: most wrong labels are one star off
    true, noisy = np.asarray(corpus.train["true_label"]), np.asarray(corpus.train["label"])
    wrong = true != noisy
    assert np.mean(np.abs(true[wrong] - noisy[wrong]) == 1) > 0.5
    with pytest.raises(ValueError, match="for noise_type='instance'"):
        prepare_corpus(args, NoiseArguments(noise_type="instance", noise_rate=1.0))
