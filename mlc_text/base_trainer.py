"""
`CleanDataTrainer`: the `Trainer` every method with hand-computed gradients builds on (MLC, L2RW,
`finetune_clean_batch`). It draws a clean batch beside each noisy batch and owns the training step's protocol:
prepare the inputs, draw the clean batch, let the method compute its main loss and gradient ([`MainStep`], from
its one hook [`~CleanDataTrainer.main_step`]), average them across processes, add them to `.grad` (fp16: scaled, for
the `Trainer`'s scaler), record what the method logs and return the loss.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .autodiff import LossScale, _found_inf, _reduce_dict, install_cpu_grad_scaler, trainable_parameters
from .clean_batches import CleanBatchIterator, MetaBatch
from .clean_stage import train_on_clean_rows
from .config import MLCTrainingArguments, default_clean_batch_size
from .virtual_step import ParamDict, check_optimizer

__all__ = [
    "CleanDataTrainer",
    "MainStep",
    "MLC_STATE_NAME",
    "SUPPORTED_OPTIM_NAMES",
    "check_parallelism",
    "install_cpu_grad_scaler",
]

logger = logging.getLogger(__name__)

MLC_STATE_NAME = "mlc_state.pt"
SUPPORTED_OPTIM_NAMES = ("adamw_torch", "adamw_torch_fused", "sgd")


def check_parallelism(args) -> None:
    """
    Refuses set-ups where the virtual step would be wrong: parameters sharded across processes (FSDP) and DeepSpeed
    (whose optimizers hide the state the virtual step reads). fp16 is accepted: the hand-computed gradients are
    loss-scaled with the `Trainer`'s scaler (see [`CleanDataTrainer.loss_scale`]).
    """
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            f"MLC does not support FSDP (fsdp={args.fsdp!r}): the virtual step needs whole parameters. "
            "Supported: one process, or DDP (`accelerate launch --multi_gpu`)."
        )
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError(
            f"MLC does not support DeepSpeed (deepspeed={args.deepspeed!r}) yet: its sharded or fused optimizers hide "
            "the state the virtual step reads. Supported: one process, or DDP (`accelerate launch --multi_gpu`)."
        )


@dataclass
class MainStep:
    """
    What a method's [`~CleanDataTrainer.main_step`] computed on one micro-batch.

    Attributes:
        loss: the main loss (detached, unscaled).
        grads: its gradient by parameter name (unscaled; fresh tensors, which the base scales in place).
        reduced: whether `grads` are averaged across processes already (MLC's meta step averages them itself: its
            virtual step reads them); if not, the base averages them.
        overflow: under fp16, whether a gradient of the step held an inf or NaN (on any process); `None`: the base
            asks the loss scale after averaging.
        record: what the step logs, `{name: value}`, as a function the base calls only for a step that is kept (an
            overflowing step's losses may be inf or NaN); the means since the last log are logged.
    """

    loss: torch.Tensor
    grads: ParamDict
    reduced: bool = False
    overflow: bool | None = None
    record: Callable[[], Mapping[str, float]] | None = None


class CleanDataTrainer(Trainer):
    """
    A `Trainer` that draws a clean (trusted) batch beside each noisy batch and applies gradients it computes by hand:
    the common ground of [`MLCTrainer`], [`L2RWTrainer`] and [`CleanBatchFinetuneTrainer`]. Its `training_step` is
    the protocol every such method shares; a method implements [`~CleanDataTrainer.main_step`] alone, which returns
    its main loss and gradient (and what it records) for a noisy batch and its clean batch. Checkpoints keep the clean
    stream's position plus `extra_state()`.

    Args:
        model: a sequence classifier.
        args: [`MLCTrainingArguments`].
        train_dataset: the noisy rows, tokenized (`label` = noisy label; optional `true_label`, never trained on).
        clean_dataset: the trusted rows, tokenized (`label` = true label).
        trusted_dataset: every trusted row, for the clean stage of `args.finish_on_clean`; `None`: `clean_dataset`
            (a subclass that keeps some trusted rows out of the clean batches passes them all here).
        **kwargs: everything else `transformers.Trainer` takes.
    """

    # `finish_on_clean=None` means this: off for the baselines, which follow their papers; MLC turns it on.
    finish_on_clean_by_default = False
    # `clean_batch_size=None`: this share of the noisy batch, or the whole batch size when `None`.
    clean_batch_share: float | None = None

    def __init__(
        self,
        model: nn.Module,
        args: MLCTrainingArguments,
        train_dataset=None,
        clean_dataset=None,
        trusted_dataset=None,
        **kwargs,
    ):
        if not isinstance(args, MLCTrainingArguments):
            raise TypeError(f"args must be MLCTrainingArguments, got {type(args).__name__}")
        check_parallelism(args)
        if kwargs.get("optimizers", (None, None))[0] is None and args.optim not in SUPPORTED_OPTIM_NAMES:
            raise ValueError(
                f"the virtual step supports optim in {', '.join(SUPPORTED_OPTIM_NAMES)}, got optim={args.optim!r}"
            )
        if clean_dataset is None or len(clean_dataset) == 0:
            raise ValueError(f"{type(self).__name__} needs a non-empty clean_dataset (trusted rows with true labels)")
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        # BERT-style classifiers accept **kwargs, which makes the Trainer believe the loss is already scaled for
        # gradient accumulation; our losses are plain means.
        self.model_accepts_loss_kwargs = False
        install_cpu_grad_scaler(self.accelerator)
        self._warn_missing_classes(clean_dataset, model.config.num_labels)
        self.trusted_dataset = clean_dataset if trusted_dataset is None else trusted_dataset
        self.clean_batches = self._clean_stream(clean_dataset, "clean", seed_offset=0)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list)}

    def _warn_missing_classes(self, clean_dataset, num_labels: int) -> None:
        column = "label" if "label" in clean_dataset.column_names else "labels"
        missing = sorted(set(range(num_labels)) - set(int(label) for label in clean_dataset[column]))
        id2label = getattr(self.model.config, "id2label", {}) or {}
        for label in missing:
            logger.warning(
                f"the clean set has no row of class {label} ({id2label.get(label, label)}): the meta objective "
                "cannot teach the corrector about it"
            )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # Keep the true labels of noisy rows: they feed the correction metrics, never the loss.
        if "true_label" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "true_label"]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        check_optimizer(optimizer)
        return optimizer

    @property
    def clean_batch_size(self) -> int:
        """Rows per clean batch and process: `args.clean_batch_size`, or the trainer's default when `None`."""
        if self.args.clean_batch_size is not None:
            return self.args.clean_batch_size
        batch_size = self.args.per_device_train_batch_size
        return default_clean_batch_size(batch_size, self.clean_batch_share) if self.clean_batch_share else batch_size

    @property
    def finishes_on_clean(self) -> bool:
        """Whether `train` ends with the clean stage: `args.finish_on_clean`, or the trainer's default when `None`."""
        if self.args.finish_on_clean is None:
            return self.finish_on_clean_by_default
        return self.args.finish_on_clean

    def train(self, *args, **kwargs):
        """`Trainer.train`, then, with `finish_on_clean`, the clean stage on every trusted row (clean_stage.py)."""
        output = super().train(*args, **kwargs)
        if self.finishes_on_clean:
            output.metrics.update(train_on_clean_rows(self, self.trusted_dataset))
        return output

    # ------------------------------------------------------------------------------------------- the step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """
        One micro-batch: the noisy batch and its clean batch, the method's [`main_step`], the gradient averaged across
        processes and added to `.grad` (the `Trainer`'s optimizer step follows), what the method records.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        true_labels = inputs.pop("true_label", None)  # the correction metrics read them; no loss does
        noisy_labels = inputs.pop("labels")
        batch = self._meta_batch(inputs, noisy_labels)
        unwrapped = self.accelerator.unwrap_model(model)  # differentiated by hand: DDP's hooks never run
        loss_scale = self.loss_scale()
        step = self.main_step(unwrapped, batch, loss_scale, true_labels)
        if not step.reduced:
            _reduce_dict(self.reduce, step.grads)
        overflow = step.overflow
        if overflow is None:  # the scaler then skips the optimizer step
            overflow = _found_inf(loss_scale, self.reduce)
        self.accumulate_main_grads(unwrapped, step.grads, loss_scale, overflow=overflow)
        if not overflow and step.record is not None:
            for key, value in step.record().items():
                self._metrics["train"][key].append(value)
        return step.loss.to(self.args.device) / self.current_gradient_accumulation_steps

    def main_step(
        self, model: nn.Module, batch: MetaBatch, loss_scale: LossScale | None, true_labels: torch.Tensor | None
    ) -> MainStep:
        """
        The method's part of a training step: its main loss and gradient on `batch`. The one hook a method implements.

        Args:
            model: the unwrapped main net, in training mode.
            batch: the noisy batch (inputs and given labels) and this step's clean batch.
            loss_scale: under fp16, the scale of every backward's loss ([`LossScale`]); `None` otherwise.
            true_labels: the noisy rows' true labels where the data has them (for what the method records only).

        Returns:
            [`MainStep`]
        """
        raise NotImplementedError(f"{type(self).__name__} must implement main_step")

    def _meta_batch(self, inputs: dict[str, torch.Tensor], noisy_labels: torch.Tensor) -> MetaBatch:
        """The step's batches: the noisy batch and the next clean batch (MLC adds the rows of its meta objective)."""
        return MetaBatch(inputs, noisy_labels, *self.next_clean_batch())

    def next_clean_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next clean batch on this process: `(model inputs, true labels)`."""
        return self.next_batch_of(self.clean_batches)

    def next_batch_of(self, stream: CleanBatchIterator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next batch of a stream of trusted rows on this process: `(model inputs, true labels)`."""
        inputs = self._prepare_inputs(next(stream))
        inputs.pop("true_label", None)
        return inputs, inputs.pop("labels")

    def _clean_stream(self, dataset, description: str, seed_offset: int) -> CleanBatchIterator:
        """A further stream of trusted rows (`description` names them in logs), seeded apart by `seed_offset`."""
        dataset = self._remove_unused_columns(dataset, description=description)
        batch_size = min(self.clean_batch_size, len(dataset) // self.args.world_size)
        if batch_size < 1:
            raise ValueError(
                f"{len(dataset)} {description} rows cannot give each of the {self.args.world_size} processes a batch: "
                f"use at least {self.args.world_size} {description} rows or fewer processes"
            )
        if batch_size < self.clean_batch_size:
            logger.warning(
                f"{description} batches of {batch_size} rows instead of clean_batch_size={self.clean_batch_size}: "
                f"there are {len(dataset)} {description} rows for {self.args.world_size} process(es)"
            )
        return CleanBatchIterator(
            dataset,
            self.data_collator,
            batch_size,
            self.args.seed + seed_offset,
            self.args.process_index,
            self.args.world_size,
        )

    @property
    def reduce(self):
        """`all_reduce_mean` on several processes, else `None` (what the maths of meta_grad.py and l2rw.py take)."""
        return self.all_reduce_mean if self.accelerator.num_processes > 1 else None

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Averages `tensors` in place across processes."""
        # Hand-computed gradients bypass DDP's hooks: average them here, once, as one flat buffer.
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.accelerator.num_processes
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def loss_scale(self) -> LossScale | None:
        """
        Under fp16, the scaler's current scale for this step's hand-computed gradients (the `Trainer`'s own
        `GradScaler`, which then unscales `.grad`, skips an overflowing optimizer step and lowers the scale); else
        `None`.
        """
        scaler = self.accelerator.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = scaler.scale(torch.ones((), device=self.args.device))  # also creates the scale on its first use
        self._metrics["train"]["loss_scale"].append(scale.item())
        return LossScale(scale, self.args.device)

    def accumulate_main_grads(
        self, model: nn.Module, grads: dict[str, torch.Tensor], loss_scale: LossScale | None = None, overflow=False
    ) -> None:
        """
        Adds hand-computed gradients (already averaged across processes, unscaled) to `.grad` for the real step.
        With `loss_scale` they are written scaled, as a scaled `.backward()` leaves them, for the scaler to unscale
        and check; an `overflow` writes inf, so that the scaler skips the optimizer step and lowers the scale.
        """
        scale = 1.0 / self.current_gradient_accumulation_steps
        if loss_scale is not None:
            scale = loss_scale.scale * scale
        for name, param in trainable_parameters(model).items():
            # `grads` are fresh tensors, read nowhere after: scaled in place (no parameter-sized copy per step).
            grad = grads[name].to(param.dtype)
            if not (isinstance(scale, float) and scale == 1.0):
                grad.mul_(scale)
            param.grad = grad if param.grad is None else param.grad.add_(grad)
            if overflow:
                param.grad.fill_(float("inf"))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the means of what was recorded since the last one
            for key, values in self._metrics["train"].items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._metrics["train"].clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = dict(inputs)
        inputs.pop("true_label", None)  # evaluation data may carry it; the model must not see it
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the Trainer's own files; subclasses add to it."""
        return {"clean_batches": self.clean_batches.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.clean_batches.load_state_dict(state["clean_batches"])

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        torch.save(self.extra_state(), os.path.join(checkpoint, MLC_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, MLC_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint!r} has no {MLC_STATE_NAME}: it was not written by {type(self).__name__}"
            )
        self.load_extra_state(torch.load(path, map_location=self.args.device, weights_only=True))
