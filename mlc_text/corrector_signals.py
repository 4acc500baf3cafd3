"""
The signals an [`MLCTrainer`] logs about its label corrector ([`step_signals`]) and what they say: the warnings a run
gives, once each, when the corrector is not learning (its soft labels stay near uniform), when its meta objective is
memorised (the clean loss at w' near zero) or when it overrides most given labels ([`signal_warnings`],
[`stayed_flat_warning`]: pure functions of the logs; the trainer gives the warnings).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .metrics import correction_stats

__all__ = ["never_corrected_warning", "signal_warnings", "stayed_flat_warning", "step_signals"]

# Mean entropy of the corrected labels, as a share of log K, above which the corrector is said to have stayed flat.
FLAT_ENTROPY_SHARE = 0.9
# A clean loss at w' below this means the main net fits the meta objective's rows: their gradient, and with it the
# meta-gradient, then carries little signal.
MEMORISED_CLEAN_LOSS = 0.05
# The corrector's argmax agreeing with the given label on fewer rows than this means it overrides most given
# labels: right only where more than half of them are wrong, and the sign of a corrector that has collapsed.
LOW_AGREEMENT = 0.5
# Share of the run after which a still-flat corrector is worth a warning (it starts near uniform).
FLAT_AFTER = 0.25
# A mean skip weight s at or above this: the corrected label is the given one, whatever the corrector's own output.
TRUSTS_EVERY_LABEL = 0.99
CORRECTION_SIGNALS = ("mean_entropy", "correction_accuracy", "fixed_share", "agreement_with_noisy")


def step_signals(
    clean_loss: torch.Tensor,
    corrected_labels: torch.Tensor,
    noisy_labels: torch.Tensor,
    true_labels: torch.Tensor | None,
    skip_weight: torch.Tensor | None,
    gather: Callable = lambda tensors: tensors,
) -> dict[str, float]:
    """
    What one MLC step records, over the batch on every process (`gather`, e.g. `accelerator.gather_for_metrics`):
    `clean_loss` (at w'; absent when NaN, on a step without meta step), the corrected labels' `mean_entropy`,
    `agreement_with_noisy` and, where `true_labels` are known (-1 elsewhere), `correction_accuracy` and
    `fixed_share`; `skip_weight`, the mean weight s of the given label, with a skip connection.
    """
    # Reading values to the host here waits for the step's queued work, which the Trainer waits for anyway right
    # after training_step (its NaN/inf check of the loss, under the default logging_nan_inf_filter): on a GPU the
    # only stall this adds is the few small host-side computations below.
    recorded = {}
    if not torch.isnan(clean_loss):
        recorded["clean_loss"] = gather(clean_loss.reshape(1)).mean().item()
    if true_labels is None:
        true_labels = torch.full_like(noisy_labels, -1)
    corrected, noisy, true = gather((corrected_labels, noisy_labels, true_labels))
    stats = correction_stats(corrected.float().cpu(), noisy.cpu(), true.cpu())
    for key in CORRECTION_SIGNALS:
        value = stats.get(key)
        if value is not None and not np.isnan(value):
            recorded[key] = float(value)
    if skip_weight is not None:
        # The mean weight s of the given label in s * onehot(y~) + (1 - s) * g: while s >= 0.5 the given label stays
        # the argmax of the corrected label.
        recorded["skip_weight"] = skip_weight.float().item()
    return recorded


def signal_warnings(
    logs: Mapping[str, float], *, step: int, max_steps: int, num_labels: int, args: Any
) -> dict[str, str]:
    """
    The warnings that one training log calls for, by kind (`"flat"`, `"memorised"`, `"overriding"`).

    Args:
        logs: a training log with the means of the recorded signals (`mean_entropy`, `clean_loss`,
            `agreement_with_noisy`); a signal that is missing is not judged.
        step: the global step of the log.
        max_steps: the run's number of steps.
        num_labels: K, the number of classes.
        args: the run's [`MLCTrainingArguments`] (the advice names its settings).

    Returns:
        `dict[str, str]`: a message per kind of warning due.
    """
    total = max(max_steps, 1)
    entropy, clean_loss = logs.get("mean_entropy"), logs.get("clean_loss")
    agreement = logs.get("agreement_with_noisy")
    flat = math.log(num_labels) * FLAT_ENTROPY_SHARE
    warnings = {}
    if entropy is not None and entropy >= flat and step >= FLAT_AFTER * total:
        warnings["flat"] = (
            f"step {step}: the label corrector's soft labels are still near uniform (mean entropy {entropy:.2f}); "
            f"near-uniform targets pull the main net towards uniform predictions. Raise meta_learning_rate (now "
            f"{args.meta_learning_rate:g}) or use skip_connection='per_example'."
        )
    if clean_loss is not None and clean_loss < MEMORISED_CLEAN_LOSS:
        advice = (
            " Add trusted rows, or compare with method='l2rw' (its weights do not fade with the clean loss);"
            " meta_split='rows' keeps trusted rows for the meta objective, at the cost of fewer in the main loss."
            if (args.meta_split != "rows")
            else " Add trusted rows, or train for fewer epochs."
        )
        warnings["memorised"] = (
            f"step {step}: the clean loss at w' is {clean_loss:.3f}: the main net fits the rows of the meta "
            f"objective, so the meta-gradient carries little signal and the corrector drifts.{advice}"
        )
    if agreement is not None and agreement < LOW_AGREEMENT:
        warnings["overriding"] = (
            f"step {step}: the corrector's label agrees with the given one on {agreement:.0%} of the noisy rows: "
            "unless more than half of your labels are wrong, it is over-correcting. Lower meta_learning_rate, use "
            "skip_connection='per_example', or select the checkpoint on trusted rows (load_best_model_at_end)."
        )
    return warnings


def stayed_flat_warning(
    log_history: Sequence[Mapping[str, Any]], *, steps: int, num_labels: int, args: Any
) -> str | None:
    """
    The warning due at the end of a run whose corrector still gave near-uniform labels at its last log, else `None`.

    Args:
        log_history: the run's logs (`TrainerState.log_history`).
        steps: the steps the run took.
        num_labels: K, the number of classes.
        args: the run's [`MLCTrainingArguments`].
    """
    entropies = [entry["mean_entropy"] for entry in log_history if "mean_entropy" in entry]
    if not entropies:
        return None
    share = entropies[-1] / math.log(num_labels)
    if share < FLAT_ENTROPY_SHARE:
        return None
    return (
        f"the label corrector's soft labels stayed near uniform (mean entropy {share:.2f} of log K at the last "
        f"log): it has barely learned in {steps} steps at meta_learning_rate="
        f"{args.meta_learning_rate:g}, and near-uniform targets pull the main net towards uniform "
        "predictions. Train longer or raise meta_learning_rate (see docs/RESULTS.md)."
    )


def never_corrected_warning(log_history: Sequence[Mapping[str, Any]], *, args: Any) -> str | None:
    """
    The warning due at the end of a run whose corrector never replaced a given label: `agreement_with_noisy` was 1 at
    every log (the corrected labels' argmax was always the given label), else `None`.
    """
    agreements = [entry["agreement_with_noisy"] for entry in log_history if "agreement_with_noisy" in entry]
    if not agreements or min(agreements) < 1.0:
        return None
    skip_weights = [entry["skip_weight"] for entry in log_history if "skip_weight" in entry]
    advice = (
        f"run meta_update_interval=1 (now {args.meta_update_interval}) with a clean batch as large as the noisy one, "
        "or train for more epochs"
    )
    if skip_weights and skip_weights[-1] >= TRUSTS_EVERY_LABEL:
        # The corrected label is the given one, one-hot: the corrector is switched off, from the start (skip_init) or
        # because the meta-gradient drove s there (more trust in every row, at a high meta learning rate).
        targets = (
            f"the corrector trusts every given label (skip weight {skip_weights[-1]:.2f} at the last log), "
            "so the main net trained on the given labels as they are"
        )
        if 1.0 / (1.0 + math.exp(-args.skip_init)) >= TRUSTS_EVERY_LABEL:  # its starting value
            advice = f"start the skip weight lower, e.g. skip_init=2.0 (now {args.skip_init})"
        else:
            rate = args.skip_learning_rate or args.meta_learning_rate
            name = "skip_learning_rate" if args.skip_learning_rate else "meta_learning_rate"
            advice = f"lower {name} (now {rate:g}): the meta-gradient drove the skip weight to 1"
    else:
        targets = "the main net trained on the given labels, softened"
    return (
        f"the label corrector never replaced a given label over {len(agreements)} logs (its argmax was the given label "
        f"on every noisy row): {targets}, and label_issues.csv / the correction matrix show no corrections. That is "
        "expected where each given label is right more often than wrong (two classes, under half flipped); where "
        f"some class's label is mostly wrong, {advice}."
    )
