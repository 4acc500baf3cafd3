"""
Plain fine-tuning ([`FinetuneTrainer`]) and the clean stage: a last stage of plain fine-tuning on the trusted rows
alone, after a method's stage on the noisy rows (continuous fine-tuning; Zhu et al., ACL 2023, "Weaker Than You
Think"). `finetune_then_clean` is fine-tuning followed by it; `finish_on_clean` adds it to MLC, L2RW and
`finetune_clean_batch`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from transformers import Trainer

from .autodiff import install_cpu_grad_scaler

__all__ = ["CLEAN_STAGE_DIR", "FinetuneTrainer", "clean_stage_arguments", "train_on_clean_rows"]

logger = logging.getLogger(__name__)

# The folder under `output_dir` of a clean stage run inside another trainer (its own log, never a checkpoint).
CLEAN_STAGE_DIR = "clean_stage"


class FinetuneTrainer(Trainer):
    """Plain fine-tuning; the loss is a plain mean, so gradient accumulation and several processes scale it right."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # BERT-style classifiers accept **kwargs, which makes the Trainer believe the loss is already scaled for
        # gradient accumulation (and multiply it by the world size).
        self.model_accepts_loss_kwargs = False
        install_cpu_grad_scaler(self.accelerator)  # fp16 on CPU as on a GPU (accelerate gives it neither there)


# Schedules that need an evaluation each epoch, which a stage inside another trainer does not run.
_EVALUATED_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def clean_stage_arguments(args, output_dir: str | None = None):
    """
    The arguments of a clean stage: `args.clean_stage_epochs` epochs (a fresh optimizer and schedule at
    `learning_rate`), with no step budget of the stage before, and a warm-up of 10% of the stage where `args` gives
    one in steps (the stage before's count would not fit a stage of a few dozen steps). With `output_dir`, a stage that
    only logs there: no evaluation, checkpoint nor report (the stage before it owns those), and a linear schedule in
    place of one that needs evaluations.
    """
    changes = {"num_train_epochs": args.clean_stage_epochs, "max_steps": -1}
    if args.warmup_steps >= 1:
        changes["warmup_steps"] = 0.1
    if output_dir is not None:
        changes.update(
            output_dir=output_dir,
            eval_strategy="no",
            eval_on_start=False,
            save_strategy="no",
            load_best_model_at_end=False,
            report_to=[],
            push_to_hub=False,
        )
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) in _EVALUATED_SCHEDULES:
            changes.update(lr_scheduler_type="linear", lr_scheduler_kwargs={})
    return dataclasses.replace(args, **changes)


def train_on_clean_rows(trainer: Trainer, clean_dataset) -> dict[str, float]:
    """
    Runs the clean stage on `trainer`'s model, in place: plain fine-tuning on `clean_dataset` (the trusted rows with
    their true `label`) with `trainer`'s arguments, collator and tokenizer, under `<output_dir>/clean_stage`.

    Returns:
        The stage's training metrics, their names prefixed with `clean_stage_`.
    """
    args = clean_stage_arguments(trainer.args, os.path.join(trainer.args.output_dir, CLEAN_STAGE_DIR))
    stage = FinetuneTrainer(
        model=trainer.model,
        args=args,
        train_dataset=clean_dataset,
        data_collator=trainer.data_collator,
        processing_class=trainer.processing_class,
    )
    logger.info(f"clean stage: {args.num_train_epochs:g} epochs of fine-tuning on {len(clean_dataset)} trusted rows")
    output = stage.train()
    return {f"clean_stage_{name.removeprefix('train_')}": value for name, value in output.metrics.items()}
