"""
An `evaluate` metric shipped inside mlc-text: accuracy and macro F1 of class predictions.

`evaluate.load("accuracy")` fetches its script from the Hub, which fails offline; this file is loaded by path
(`evaluate.load(path_to_this_file)`, or `mlc_text.metrics.load_metric("classification")`) and needs no network.
"""

from __future__ import annotations

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score

__all__ = ["Classification"]

_DESCRIPTION = """
Accuracy (share of predictions equal to the reference) and macro F1 (the unweighted mean of the per-class F1
scores, so that rare classes count as much as frequent ones) of integer class predictions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    labels (`list[int]`, *optional*): the classes macro F1 averages over; defaults to every class seen in
        `predictions` or `references`. Pass all class ids so that a class never predicted nor seen counts as 0.

Returns:
    `dict` with `accuracy` and `macro_f1`, floats in [0, 1].

Examples:
    >>> metric = evaluate.load("mlc_text/metrics_modules/classification.py")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 2])
    {'accuracy': 0.6666666666666666, 'macro_f1': 0.5555555555555555}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    """Accuracy and macro F1 of class predictions, computed with scikit-learn."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references, labels=None) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("classification metric needs at least one prediction, got 0")
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
        }
