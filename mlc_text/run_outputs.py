"""
What a run writes for people to read, after training: the final corrector's statistics and learned correction
matrix (methods that correct labels), `label_issues.csv` with its scores, `results.json`, the learning curves and the
model card. [`~mlc_text.pipeline.run`]'s last phase.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .data import NoisyCorpus
from .label_issues import (
    LABEL_ISSUES_NAME,
    label_issues_table,
    label_quality,
    precision_recall_at_k,
    softmax,
    write_label_issues,
)
from .methods import model_columns
from .metrics import correction_stats, learned_transition_matrix
from .reporting import plot_correction_matrix, plot_learning_curves, results_summary, write_model_card, write_results

__all__ = ["correction_results", "label_issues_results", "write_outputs"]


def correction_results(trainer, corrected: dict, corpus: NoisyCorpus, output_dir: str) -> dict[str, Any]:
    """Correction statistics of the final corrector over the noisy training rows, and the learned-matrix plot."""
    stats = correction_stats(corrected["corrected"], corrected["noisy_labels"], corrected["true_labels"])
    learned = learned_transition_matrix(corrected["corrected"], corrected["noisy_labels"], len(corpus.label_names))
    stats["learned_correction_matrix"] = np.asarray(learned).tolist()
    if trainer.is_world_process_zero():
        true_matrix = corpus.noise_report.get("transition_matrix")
        if true_matrix is not None:
            plot_correction_matrix(
                learned, np.asarray(true_matrix), os.path.join(output_dir, "correction_matrix.png"), corpus.label_names
            )
    return stats


def label_issues_results(
    trainer, corpus: NoisyCorpus, texts, corrected: dict | None, output_dir: str
) -> dict[str, Any]:
    """
    Writes `label_issues.csv` (every noisy training row, the likeliest wrong label first by the main net's
    self-confidence; a corrector's soft label beside it) and returns what results.json says of it: the ranking used
    and, where true labels are known, precision / recall at k (see [`~mlc_text.label_issues.precision_recall_at_k`]),
    with the corrector's own precision at k for a method that corrects labels.
    """
    logits = trainer.predict(model_columns(corpus.train, "label"), metric_key_prefix="label_issues").predictions
    predicted = softmax(logits[0] if isinstance(logits, tuple) else logits)
    soft_labels = None if corrected is None else corrected["corrected"]
    given, true = np.asarray(corpus.train["label"]), np.asarray(corpus.train["true_label"])
    if trainer.is_world_process_zero():
        table = label_issues_table(
            index=corpus.train["index"],
            texts=texts,
            given_labels=given,
            predicted_probabilities=predicted,
            label_names=corpus.label_names,
            corrected_probabilities=soft_labels,
            true_labels=true,
        )
        write_label_issues(table, os.path.join(output_dir, LABEL_ISSUES_NAME))
    summary = {"file": LABEL_ISSUES_NAME, "ranked_by": "self_confidence"}
    scores = precision_recall_at_k(label_quality(predicted, given), given, true)
    if scores is None:
        return summary
    if soft_labels is not None:  # what the corrector's ranking would have found, to compare
        summary["corrector_precision_at_k"] = precision_recall_at_k(label_quality(soft_labels, given), given, true)[
            "precision_at_k"
        ]
    return {**summary, **scores}


def write_outputs(
    trainer,
    corpus: NoisyCorpus,
    *,
    model: str,
    base_model: str,
    training_args,
    metrics: dict[str, dict[str, float]],
    correction: dict[str, Any],
    wall_s: float,
    label_issues: dict[str, Any],
) -> dict[str, Any]:
    """
    Builds the run's [`~mlc_text.results.results_summary`] and, on the main process, writes `results.json`,
    `learning_curves.png` and the model card (`base_model`: what the card names as fine-tuned).

    Returns:
        The content of `results.json`.
    """
    output_dir = training_args.output_dir
    report = corpus.noise_report
    noise = {key: report.get(key) for key in ("type", "rate", "realised_rate")}
    correction_accuracy = correction.get("correction_accuracy")
    glc_matrix = getattr(trainer, "transition_matrix", None)  # GLC's estimate (GLCTrainer.transition_matrix)
    extra = {
        "seed": training_args.seed,
        "rows": {
            split: len(getattr(corpus, split))
            for split in ("train", "clean", "validation", "test")
            if getattr(corpus, split) is not None
        },
        "correction": correction or None,
        "glc_transition_matrix": None if glc_matrix is None else np.asarray(glc_matrix).tolist(),
        "label_issues": label_issues,
    }
    results = results_summary(
        method=training_args.method,
        corpus=corpus.name,
        model=model,
        noise=noise,
        metrics=metrics,
        correction_accuracy=correction_accuracy,
        wall_s=wall_s,
        extra=extra,
    )
    if not trainer.is_world_process_zero():
        return results
    write_results(output_dir, results)
    _plot_learning_curves(trainer, corpus, noise, os.path.join(output_dir, "learning_curves.png"))
    write_model_card(
        output_dir,
        base_model=base_model,
        corpus=corpus.hub_id or corpus.name,
        label_names=corpus.label_names,
        noise=noise,
        method=training_args.method,
        metrics=metrics.get("test", {}),
        correction_accuracy=correction_accuracy,
        training_args=_as_run(training_args, trainer),
    )
    return results


def _as_run(training_args, trainer) -> dict:
    """The training arguments as the run used them: `clean_batch_size=None` resolved to the trainer's batch."""
    resolved = training_args.to_dict()
    resolved["clean_batch_size"] = getattr(trainer, "clean_batch_size", None)  # None: a method without clean batches
    return resolved


def _plot_learning_curves(trainer, corpus: NoisyCorpus, noise: dict[str, Any], path: str) -> None:
    # Held-out validation rows come from the noisy pool (they carry `is_corrupted`) and keep their given labels.
    heldout = corpus.validation is not None and "is_corrupted" in corpus.validation.column_names
    rate = noise.get("realised_rate")
    plot_learning_curves(
        trainer.state.log_history,
        path,
        eval_label=f"validation accuracy ({'given labels' if heldout else 'trusted labels'})",
        noisy_label_accuracy=1.0 - rate if isinstance(rate, (int, float)) else None,
    )
