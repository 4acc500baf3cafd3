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
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer

from .meta_grad import LossScale, MetaBatch, l2rw_weights, loss_and_grads
from .trainer import CleanDataTrainer, install_cpu_grad_scaler

__all__ = [
    "CleanBatchFinetuneTrainer",
    "FinetuneTrainer",
    "GLCTrainer",
    "L2RWTrainer",
    "check_clean_batch_finetune",
    "estimate_transition_matrix",
    "forward_corrected_loss",
]


class FinetuneTrainer(Trainer):
    """Plain fine-tuning; the loss is a plain mean, so gradient accumulation and several processes scale it right."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # BERT-style classifiers accept **kwargs, which makes the Trainer believe the loss is already scaled for
        # gradient accumulation (and multiply it by the world size).
        self.model_accepts_loss_kwargs = False
        install_cpu_grad_scaler(self.accelerator)  # fp16 on CPU as on a GPU (accelerate gives it neither there)


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
    """

    def __init__(self, *args, transition_matrix: np.ndarray, **kwargs):
        super().__init__(*args, **kwargs)
        self.transition_matrix = torch.as_tensor(np.asarray(transition_matrix), dtype=torch.float32)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "is_clean" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "is_clean"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, is_clean = inputs.pop("labels"), inputs.pop("is_clean", None)
        outputs = model(**inputs)
        logits = outputs.logits
        losses = forward_corrected_loss(logits, labels, self.transition_matrix.to(logits.device))
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
    Adds a step's clean batch to its main loss, as MLC does: `share * noisy + (1 - share) * clean` with `share =
    num_noisy / (num_noisy + clean rows)`. `noisy_grads` (fresh from [`loss_and_grads`], read nowhere else) become the
    gradient of that loss in place, so no second copy of the gradient is made. `loss_scale`: as in `loss_and_grads`.

    Returns:
        `(main loss, the clean batch's loss at the model's weights)`, both detached.
    """
    share = num_noisy / (num_noisy + len(clean_labels))
    clean_loss, clean_grads = loss_and_grads(
        model, clean_inputs, clean_labels, autocast=autocast, loss_scale=loss_scale
    )
    grads = list(noisy_grads.values())
    torch._foreach_mul_(grads, share)
    torch._foreach_add_(grads, [clean_grads[name] for name in noisy_grads], alpha=1 - share)
    return share * noisy_loss + (1 - share) * clean_loss, clean_loss


def check_clean_batch_finetune(args) -> None:
    """Refuses `clean_in_main_loss=False` for `finetune_clean_batch`, whose point is the clean batch."""
    if not args.clean_in_main_loss:
        raise ValueError(
            "method 'finetune_clean_batch' always trains on the clean batch; clean_in_main_loss=False is not accepted "
            "(use method 'finetune' for plain fine-tuning)"
        )


class L2RWTrainer(CleanDataTrainer):
    """
    Learning to Reweight: each step weights the noisy batch by [`~mlc_text.meta_grad.l2rw_weights`] and trains on the
    weighted loss (plus the clean batch when `clean_in_main_loss`, as MLC does, so the two differ only in how they
    use the noisy rows).
    """

    _tag_names = ["mlc-text", "learning-to-reweight", "noisy-labels"]

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        true_labels = inputs.pop("true_label", None)
        noisy_labels = inputs.pop("labels")
        batch = MetaBatch(inputs, noisy_labels, *self.next_clean_batch())
        unwrapped = self.accelerator.unwrap_model(model)
        autocast, scale = self.compute_loss_context_manager, self.loss_scale()
        weights, clean_loss = l2rw_weights(
            unwrapped, batch, self.optimizer, reduce=self.reduce, autocast=autocast, loss_scale=scale
        )
        noisy_loss, grads = loss_and_grads(
            unwrapped, inputs, noisy_labels, autocast=autocast, weights=weights, loss_scale=scale
        )
        loss = noisy_loss
        if self.args.clean_in_main_loss:
            loss, _ = _add_clean_term(
                unwrapped,
                len(noisy_labels),
                noisy_loss,
                grads,
                batch.clean_inputs,
                batch.clean_labels,
                autocast,
                scale,
            )
        if self.reduce is not None:
            self.reduce(list(grads.values()))
        overflow = scale is not None and scale.found_inf(self.reduce)  # the scaler then skips the step
        self.accumulate_main_grads(unwrapped, grads, scale, overflow=overflow)
        if not overflow:
            self._record(weights, clean_loss, noisy_labels, true_labels)
        return loss.to(self.args.device) / self.current_gradient_accumulation_steps

    def _record(self, weights, clean_loss, noisy_labels, true_labels) -> None:
        metrics = self._metrics["train"]
        metrics["clean_loss"].append(clean_loss.item())
        metrics["zero_weight_share"].append((weights == 0).float().mean().item())
        if true_labels is not None and (true_labels >= 0).any():
            corrupted = (noisy_labels != true_labels) & (true_labels >= 0)
            if weights.sum() > 0:
                metrics["weight_on_corrupted"].append((weights * corrupted).sum().item() / weights.sum().item())


class CleanBatchFinetuneTrainer(CleanDataTrainer):
    """
    Fine-tuning on the noisy rows' given labels with a clean batch drawn beside each noisy batch, the loss
    `share * noisy + (1 - share) * clean` with `share = noisy rows / (noisy + clean rows)` of the step: the main loss
    of [`MLCTrainer`] with the corrected labels replaced by the given ones (and of [`L2RWTrainer`] with equal
    weights). The clean rows get far more weight than in `finetune`, which mixes them into the noisy rows once per
    epoch; this control tells how much of MLC's or L2RW's result comes from that weight rather than from correcting
    or weighting the noisy rows.

    Raises:
        ValueError: with `clean_in_main_loss=False` (the clean batch is the point of this method).
    """

    _tag_names = ["mlc-text", "noisy-labels"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_clean_batch_finetune(self.args)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        inputs.pop("true_label", None)
        noisy_labels = inputs.pop("labels")
        clean_inputs, clean_labels = self.next_clean_batch()
        unwrapped = self.accelerator.unwrap_model(model)
        autocast, scale = self.compute_loss_context_manager, self.loss_scale()
        noisy_loss, grads = loss_and_grads(unwrapped, inputs, noisy_labels, autocast=autocast, loss_scale=scale)
        loss, clean_loss = _add_clean_term(
            unwrapped, len(noisy_labels), noisy_loss, grads, clean_inputs, clean_labels, autocast, scale
        )
        if self.reduce is not None:
            self.reduce(list(grads.values()))
        overflow = scale is not None and scale.found_inf(self.reduce)  # the scaler then skips the step
        self.accumulate_main_grads(unwrapped, grads, scale, overflow=overflow)
        if not overflow:
            self._metrics["train"]["clean_loss"].append(clean_loss.item())  # at w (L2RW and MLC log it at w')
        return loss.to(self.args.device) / self.current_gradient_accumulation_steps
