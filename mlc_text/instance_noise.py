"""
Instance-dependent label noise: wrong labels where a weak text classifier finds a row ambiguous, and towards the class
it confuses the row with, as annotators and labelling rules err. Unlike the class-conditional noise of `noise.py`, the
chance that a label is wrong depends on the text, not on its class alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["weak_model_probabilities", "instance_dependent_noise"]


def weak_model_probabilities(texts: Sequence[str], labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """
    Out-of-fold class probabilities of a bag-of-words model (TF-IDF and logistic regression, two folds): each row's
    probabilities come from the model fitted on the other half, so they show how confusable the row is.

    Returns:
        `np.ndarray` of shape `(rows, num_classes)`.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, dtype=np.int64)
    folds = np.random.default_rng(seed).permutation(len(labels)) % 2
    probabilities = np.zeros((len(labels), num_classes))
    for fold in (0, 1):
        train, held_out = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        vectorizer = TfidfVectorizer(min_df=2, max_features=50_000, sublinear_tf=True)
        features = vectorizer.fit_transform([texts[i] for i in train])
        model = LogisticRegression(max_iter=300, C=1.0).fit(features, labels[train])
        predicted = model.predict_proba(vectorizer.transform([texts[i] for i in held_out]))
        probabilities[np.ix_(held_out, model.classes_)] = predicted
    return probabilities


def instance_dependent_noise(
    texts: Sequence[str], labels: Sequence[int], num_classes: int, rate: float, seed: int
) -> np.ndarray:
    """
    Relabels the `round(rate * rows)` rows to which a weak model ([`weak_model_probabilities`]) gives the lowest
    probability of their true class, each to the class that model finds most likely among the others.

    Args:
        texts (sequence of `str`): The rows' texts.
        labels (sequence of `int`): True labels in 0..K-1.
        num_classes (`int`): K.
        rate (`float`): Share of rows to relabel, in [0, 1).
        seed (`int`): Seed of the weak model's folds.

    Returns:
        `np.ndarray`: The noisy labels (int64); exactly `round(rate * rows)` differ from `labels`.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1) for instance-dependent noise, got {rate!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(texts) != len(labels):
        raise ValueError(f"texts and labels differ in length: {len(texts)} vs {len(labels)}")
    noisy = labels.copy()
    count = int(round(rate * len(labels)))
    if count == 0:
        return noisy
    probabilities = weak_model_probabilities(texts, labels, num_classes, seed)
    rows = np.arange(len(labels))
    ambiguity = probabilities[rows, labels]
    chosen = np.argsort(ambiguity, kind="stable")[:count]
    others = probabilities.copy()
    others[rows, labels] = -np.inf
    noisy[chosen] = others[chosen].argmax(axis=1)
    return noisy
