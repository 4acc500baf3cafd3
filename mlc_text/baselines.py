"""
The methods MLC is compared with, trained on the same data, encoder and budget:

* `finetune` / `clean_only` / `oracle`: plain fine-tuning ([`FinetuneTrainer`]) on noisy + clean rows, on the clean
  rows alone, or on noisy rows with their *true* labels + clean rows (an upper bound, for benchmarks only);
* `glc`: Gold Loss Correction (Hendrycks et al., 2018): a model fine-tuned on the noisy rows estimates the noise
  transition matrix on the clean rows ([`estimate_transition_matrix`]); a fresh model is then trained with the
  forward-corrected loss on noisy rows and the plain loss on clean rows ([`GLCTrainer`]);
* `l2rw`: Learning to Reweight (Ren et al., 2018) ([`L2RWTrainer`]): per-example weights from the meta-gradient of the
  clean loss, through the same virtual step as MLC;
* `finetune_clean_batch`: plain fine-tuning on the given noisy labels with a clean batch beside each noisy batch,
  weighted as MLC and L2RW weight it ([`CleanBatchFinetuneTrainer`]): MLC with the corrector replaced by the given
  labels, or L2RW with equal weights. It measures how much of their result the clean batch alone gives.

Each method's builder (`build_*_trainer`, named by its entry in methods.py) makes its trainer over a run's data.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import datasets
import numpy as np
import torch
from torch import nn
from transformers import Trainer

from .autodiff import LossScale, loss_and_grads
from .base_trainer import CleanDataTrainer, MainStep
from .clean_batches import MetaBatch
from .clean_stage import FinetuneTrainer, clean_stage_arguments
from .l2rw import l2rw_weights
from .main_loss import MainLossWeights
from .methods import MethodContext, check_clean_batch_finetune, get_method, model_columns

__all__ = [
    "CleanBatchFinetuneTrainer",
    "FinetuneTrainer",
    "GLCTrainer",
    "L2RWTrainer",
    "build_clean_batch_finetune_trainer",
    "build_clean_only_trainer",
    "build_finetune_then_clean_trainer",
    "build_finetune_trainer",
    "build_glc_trainer",
    "build_l2rw_trainer",
    "build_oracle_trainer",
    "check_clean_batch_finetune",
    "estimate_transition_matrix",
    "forward_corrected_loss",
]

logger = logging.getLogger(__name__)


@torch.no_grad()
def estimate_transition_matrix(trainer: Trainer, clean_dataset, num_labels: int) -> np.ndarray:
    """
    GLC's estimate of C[i, j] = P(noisy label j | true label i): the mean predicted distribution of a model trained on
    the noisy labels, over the clean rows of true class i.

    Raises:
        ValueError: if a class has no clean row (its row of C cannot be estimated).
    """
    output = trainer.predict(clean_dataset)
    probabilities = torch.softmax(torch.as_tensor(output.predictions, dtype=torch.float64), dim=-1).numpy()
    labels = np.asarray(output.label_ids)
    matrix = np.zeros((num_labels, num_labels))
    for label in range(num_labels):
        rows = labels == label
        if not rows.any():
            raise ValueError(
                f"GLC needs clean rows of every class to estimate the transition matrix; class {label} has none"
            )
        matrix[label] = probabilities[rows].mean(axis=0)
    return matrix


def forward_corrected_loss(logits: torch.Tensor, noisy_labels: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """-log P(noisy label | x) with P(noisy | x) = softmax(logits) @ C (rows of C: true class), per row."""
    probabilities = torch.softmax(logits.float(), dim=-1) @ matrix.to(torch.float32)
    picked = probabilities.gather(1, noisy_labels.unsqueeze(1)).squeeze(1)
    return -torch.log(picked.clamp_min(1e-12))


class GLCTrainer(FinetuneTrainer):
    """
    Second stage of GLC: trains on rows whose `is_clean` column tells which loss applies (plain cross-entropy for
    clean rows, the forward-corrected loss with `transition_matrix` for noisy ones).

    Attributes:
        transition_matrix (`np.ndarray`): the estimate C it trains with, as given (results.json reports it).
    """

    def __init__(self, *args, transition_matrix: np.ndarray, **kwargs):
        super().__init__(*args, **kwargs)
        self.transition_matrix = np.asarray(transition_matrix)
        self._matrix = torch.as_tensor(self.transition_matrix, dtype=torch.float32)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "is_clean" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "is_clean"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, is_clean = inputs.pop("labels"), inputs.pop("is_clean", None)
        outputs = model(**inputs)
        logits = outputs.logits
        losses = forward_corrected_loss(logits, labels, self._matrix.to(logits.device))
        if is_clean is not None:
            plain = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
            losses = torch.where(is_clean.bool(), plain, losses)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {key: value for key, value in inputs.items() if key not in ("is_clean", "true_label")}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


def _add_clean_term(
    model: nn.Module,
    num_noisy: int,
    noisy_loss: torch.Tensor,
    noisy_grads: dict[str, torch.Tensor],
    clean_inputs: dict[str, torch.Tensor],
    clean_labels: torch.Tensor,
    autocast=contextlib.nullcontext,
    loss_scale: LossScale | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Adds a step's clean batch to its main loss with MLC's weights ([`MainLossWeights`]). `noisy_grads` (fresh from
    [`loss_and_grads`], read nowhere else) become the gradient of that loss in place, so no second copy of the
    gradient is made. `loss_scale`: as in `loss_and_grads`.

    Returns:
        `(main loss, the clean batch's loss at the model's weights)`, both detached.
    """
    weights = MainLossWeights.for_rows(num_noisy, len(clean_labels))
    clean_loss, clean_grads = loss_and_grads(
        model, clean_inputs, clean_labels, autocast=autocast, loss_scale=loss_scale
    )
    loss = weights.weigh_noisy_(noisy_loss, noisy_grads)
    loss, _ = weights.add_clean(loss, noisy_grads, clean_loss, clean_grads)
    return loss, clean_loss


class _GivenLabelTrainer(CleanDataTrainer):
    # The main step of the baselines that train on the given labels with a clean batch beside: the noisy batch's
    # loss (per-row `weights`, or their mean) plus the clean batch's as MLC weighs it.
    def _given_label_step(self, model, batch: MetaBatch, loss_scale, weights=None, clean_term: bool = True):
        autocast = self.compute_loss_context_manager
        loss, grads = loss_and_grads(
            model, batch.noisy_inputs, batch.noisy_labels, autocast=autocast, weights=weights, loss_scale=loss_scale
        )
        clean_loss = None
        if clean_term:
            loss, clean_loss = _add_clean_term(
                model,
                len(batch.noisy_labels),
                loss,
                grads,
                batch.clean_inputs,
                batch.clean_labels,
                autocast,
                loss_scale,
            )
        return loss, grads, clean_loss


class L2RWTrainer(_GivenLabelTrainer):
    """
    Learning to Reweight: each step weights the noisy batch by [`~mlc_text.l2rw.l2rw_weights`] and trains on the
    weighted loss (plus the clean batch when `clean_in_main_loss`, as MLC does, so the two differ only in how they
    use the noisy rows). The clean batch is in every step's loss: `clean_in_main_loss_epochs` and
    `clean_in_main_loss_passes` are MLC's alone (the L2RW rows of the benchmark ran so).
    """

    _tag_names = list(get_method("l2rw").tags)

    def main_step(self, model, batch: MetaBatch, loss_scale: LossScale | None, true_labels) -> MainStep:
        weights, clean_loss = l2rw_weights(
            model,
            batch,
            self.optimizer,
            reduce=self.reduce,
            autocast=self.compute_loss_context_manager,
            loss_scale=loss_scale,
        )
        loss, grads, _ = self._given_label_step(model, batch, loss_scale, weights, self.args.clean_in_main_loss)
        record = functools.partial(self._record, weights, clean_loss, batch.noisy_labels, true_labels)
        return MainStep(loss, grads, record=record)

    def _record(self, weights, clean_loss, noisy_labels, true_labels) -> dict[str, float]:
        recorded = {"clean_loss": clean_loss.item(), "zero_weight_share": (weights == 0).float().mean().item()}
        if true_labels is not None and (true_labels >= 0).any():
            corrupted = (noisy_labels != true_labels) & (true_labels >= 0)
            if weights.sum() > 0:
                recorded["weight_on_corrupted"] = (weights * corrupted).sum().item() / weights.sum().item()
        return recorded


class CleanBatchFinetuneTrainer(_GivenLabelTrainer):
    """
    Fine-tuning on the noisy rows' given labels with a clean batch drawn beside each noisy batch, the loss weighted as
    MLC weighs it ([`~mlc_text.main_loss.MainLossWeights`]: `share * noisy + (1 - share) * clean`, `share` the noisy
    rows' share of the step's rows): the main loss of [`MLCTrainer`] with the corrected labels replaced by the given
    ones (and of [`L2RWTrainer`] with equal weights). The clean rows get far more weight than in `finetune`, which
    mixes them into the noisy rows once per epoch; this control tells how much of MLC's or L2RW's result comes from
    that weight rather than from correcting or weighting the noisy rows.

    The clean batch is in every step's loss: `clean_in_main_loss_epochs` and `clean_in_main_loss_passes` do not apply.

    Raises:
        ValueError: with `clean_in_main_loss=False` (the clean batch is the point of this method).
    """

    _tag_names = list(get_method("finetune_clean_batch").tags)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_clean_batch_finetune(self.args)

    def main_step(self, model, batch: MetaBatch, loss_scale: LossScale | None, true_labels) -> MainStep:
        loss, grads, clean_loss = self._given_label_step(model, batch, loss_scale)
        # The clean loss at w (L2RW and MLC log it at w').
        return MainStep(loss, grads, record=lambda: {"clean_loss": clean_loss.item()})


# ------------------------------------------------------------------------------------- builders (methods.py)
def build_l2rw_trainer(context: MethodContext) -> L2RWTrainer:
    """`l2rw`: an [`L2RWTrainer`] on the noisy rows with the trusted rows beside them."""
    return context.clean_data_trainer(L2RWTrainer)


def build_clean_batch_finetune_trainer(context: MethodContext) -> CleanBatchFinetuneTrainer:
    """`finetune_clean_batch`: a [`CleanBatchFinetuneTrainer`] on the noisy rows with the trusted rows beside them."""
    return context.clean_data_trainer(CleanBatchFinetuneTrainer)


def build_finetune_trainer(context: MethodContext) -> FinetuneTrainer:
    """`finetune`: plain fine-tuning on the noisy rows and the trusted rows together."""
    rows = datasets.concatenate_datasets([context.noisy, context.clean])
    return FinetuneTrainer(model=context.model(), args=context.args, train_dataset=rows, **context.trainer_kwargs)


def build_oracle_trainer(context: MethodContext) -> FinetuneTrainer:
    """`oracle`: fine-tuning on the noisy rows with their *true* labels, plus the trusted rows (an upper bound)."""
    true = model_columns(context.corpus.train, "true_label").rename_column("true_label", "label")
    true = true.cast(context.noisy.features)
    rows = datasets.concatenate_datasets([true, context.clean])
    return FinetuneTrainer(model=context.model(), args=context.args, train_dataset=rows, **context.trainer_kwargs)


def _budget_steps(num_rows: int, training_args) -> int:
    """Optimizer steps that `num_train_epochs` over `num_rows` noisy rows take (or `max_steps` when set)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    rows_per_step = (
        training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
    )
    return max(1, math.ceil(training_args.num_train_epochs * math.ceil(num_rows / rows_per_step)))


def build_clean_only_trainer(context: MethodContext) -> FinetuneTrainer:
    """
    `clean_only`: fine-tuning on the trusted rows alone, cycled for as many optimizer steps as `finetune` takes over
    the noisy and trusted rows (every method gets the same budget).
    """
    args = context.with_args(max_steps=_budget_steps(len(context.corpus.train) + len(context.clean), context.args))
    return FinetuneTrainer(model=context.model(), args=args, train_dataset=context.clean, **context.trainer_kwargs)


def build_finetune_then_clean_trainer(context: MethodContext) -> FinetuneTrainer:
    """
    `finetune_then_clean`, continuous fine-tuning: the first stage (plain fine-tuning on noisy + clean rows,
    `finetune`'s budget) runs here; the returned trainer is the second stage, `clean_stage_epochs` over the clean
    rows on the same model.
    """
    stage_one_args = context.stage_args()
    stage_one = FinetuneTrainer(
        model=context.model(),
        args=stage_one_args,
        train_dataset=datasets.concatenate_datasets([context.noisy, context.clean]),
        **context.trainer_kwargs,
    )
    logger.info("finetune_then_clean stage 1: fine-tuning on the noisy and clean rows")
    stage_one.train()
    model = stage_one.model
    del stage_one
    stage_two_args = clean_stage_arguments(context.args)
    logger.info(f"finetune_then_clean stage 2: {stage_two_args.num_train_epochs:g} epochs on the clean rows")
    return FinetuneTrainer(model=model, args=stage_two_args, train_dataset=context.clean, **context.trainer_kwargs)


def build_glc_trainer(context: MethodContext) -> GLCTrainer:
    """
    `glc`: the first stage (a model fine-tuned on the noisy labels, extra to the budget) runs here and estimates the
    transition matrix on the trusted rows; the returned trainer is the second stage, a fresh model trained with the
    forward-corrected loss on the noisy rows and the plain loss on the trusted rows.
    """
    noisy, clean = context.noisy, context.clean
    stage_one_args = context.stage_args()
    stage_one = FinetuneTrainer(
        model=context.model(), args=stage_one_args, train_dataset=noisy, **context.trainer_kwargs
    )
    logger.info("GLC stage 1: fine-tuning on the noisy labels to estimate the transition matrix")
    stage_one.train()
    matrix = estimate_transition_matrix(stage_one, clean, context.corpus.num_labels)  # K of the corpus
    del stage_one
    marked = datasets.concatenate_datasets(
        [noisy.add_column("is_clean", [0] * len(noisy)), clean.add_column("is_clean", [1] * len(clean))]
    )
    return GLCTrainer(
        model=context.model(),
        args=context.args,
        train_dataset=marked,
        transition_matrix=matrix,
        **context.trainer_kwargs,
    )
