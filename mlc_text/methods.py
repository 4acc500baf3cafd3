"""
The methods the recipes run, in one registry: each method's name, where its trainer's builder is, whether it needs
trusted rows, what the model card says of it and the tags of its trainer. `MLCTrainingArguments.method`, the
pipeline, the model card and bench/accuracy.py read it; adding a method is one entry here plus its trainer and
builder (docs/method.md, "Adding a method").
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = [
    "METHODS",
    "MODEL_INPUTS",
    "REGISTRY",
    "Method",
    "MethodContext",
    "check_clean_batch_finetune",
    "get_method",
    "model_columns",
]

# The tokenizer's columns a model reads; the other columns of a tokenized split are labels and bookkeeping.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_columns(dataset, *labels: str):
    """`dataset` with the model's input columns ([`MODEL_INPUTS`]) and the `labels` columns only, in its order."""
    keep = [*(name for name in MODEL_INPUTS if name in dataset.column_names), *labels]
    return dataset.select_columns([name for name in dataset.column_names if name in keep])


def check_clean_batch_finetune(args) -> None:
    """Refuses `clean_in_main_loss=False` for `finetune_clean_batch`, whose point is the clean batch."""
    if not args.clean_in_main_loss:
        raise ValueError(
            "method 'finetune_clean_batch' always trains on the clean batch; clean_in_main_loss=False is not accepted "
            "(use method 'finetune' for plain fine-tuning)"
        )


@dataclass(frozen=True)
class Method:
    """
    One method of the registry.

    Args:
        name (`str`): what `--method` names it.
        build (`str`): its builder, `"module:function"` (a module of this package when it starts with a dot):
            `function(context: MethodContext) -> Trainer`. A name rather than the function: the trainers read
            `MLCTrainingArguments`, whose `method` field reads this registry, so the registry cannot import them.
        description (`str`): the model card's "Method" section.
        needs_clean_rows (`bool`, defaults to `True`): runs are refused without trusted rows.
        corrects_labels (`bool`, defaults to `False`): its trainer has `correct_labels` (a label corrector): the run
            reports correction statistics, shows its labels in label_issues.csv and describes it in the model card.
        tags (`tuple[str, ...]`): its trainer's `_tag_names`.
        stage_dir (`str`, *optional*): the folder under `output_dir` of a first training stage, kept out of a push.
        check (`Callable`, *optional*): refuses settings the method cannot use, before any work (`args -> None`).
        accepts_clean_stage (`bool`, defaults to `False`): its trainer runs the clean stage of `finish_on_clean`.
    """

    name: str
    build: str
    description: str
    needs_clean_rows: bool = True
    corrects_labels: bool = False
    tags: tuple[str, ...] = ()
    stage_dir: str | None = None
    check: Callable[[Any], None] | None = None
    accepts_clean_stage: bool = False

    def builder(self) -> Callable[[MethodContext], Any]:
        """The builder function that `build` names."""
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module, __package__), function)


REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "mlc",
            ".trainer:build_mlc_trainer",
            "Meta Label Correction (Zheng et al., AAAI 2021): a label corrector network maps each noisy row's features "
            "and given label to a corrected soft label; the classifier trains on the corrected labels, and the "
            "corrector is trained by the meta-gradient of the loss on a small clean (trusted) set after a virtual step. "
            "Unless `finish_on_clean=False`, training ends with a clean stage: fine-tuning on the trusted rows alone "
            "(continuous fine-tuning, Zhu et al., ACL 2023).",
            corrects_labels=True,
            tags=("mlc-text", "meta-label-correction", "noisy-labels"),
            accepts_clean_stage=True,
        ),
        Method(
            "finetune",
            ".baselines:build_finetune_trainer",
            "Plain fine-tuning on the noisy rows and the clean rows together, with their given labels.",
            needs_clean_rows=False,
        ),
        Method(
            "clean_only",
            ".baselines:build_clean_only_trainer",
            "Plain fine-tuning on the small clean (trusted) set only.",
        ),
        Method(
            "finetune_then_clean",
            ".baselines:build_finetune_then_clean_trainer",
            "Continuous fine-tuning (Zhu et al., ACL 2023): plain fine-tuning on the noisy and clean rows, then "
            "fine-tuning on the clean rows alone.",
            needs_clean_rows=False,
            stage_dir="noisy_stage",
        ),
        Method(
            "glc",
            ".baselines:build_glc_trainer",
            "Gold Loss Correction (Hendrycks et al., 2018): the noise transition matrix is estimated on the clean rows "
            "and the classifier is trained with the forward-corrected loss on the noisy rows.",
            stage_dir="glc_noisy_model",
        ),
        Method(
            "l2rw",
            ".baselines:build_l2rw_trainer",
            "Learning to Reweight (Ren et al., 2018): each noisy row is weighted by the meta-gradient of the clean "
            "loss.",
            tags=("mlc-text", "learning-to-reweight", "noisy-labels"),
            accepts_clean_stage=True,
        ),
        Method(
            "finetune_clean_batch",
            ".baselines:build_clean_batch_finetune_trainer",
            "Fine-tuning on the noisy rows with their given labels, with a clean batch beside each noisy batch weighted "
            "as MLC weights it: MLC without its label corrector.",
            tags=("mlc-text", "noisy-labels"),
            check=check_clean_batch_finetune,
            accepts_clean_stage=True,
        ),
        Method(
            "oracle",
            ".baselines:build_oracle_trainer",
            "Fine-tuning on the noisy rows with their true labels, plus the clean rows: an upper bound.",
            needs_clean_rows=False,
        ),
    )
}
METHODS = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """
    The registry's entry for `name`.

    Raises:
        ValueError: for a name the registry does not hold, listing those it does.
    """
    if name not in REGISTRY:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return REGISTRY[name]


@dataclass
class MethodContext:
    """
    What a method's builder gets: the run's data and settings, and what every trainer of the run shares.

    Args:
        method ([`Method`]): the method being built.
        corpus ([`~mlc_text.data.NoisyCorpus`]): the tokenized splits.
        model_factory (`Callable`): returns a fresh pretrained model, seeded (a two-stage method calls it twice).
        args ([`MLCTrainingArguments`]): the run's arguments.
        trainer_kwargs (`dict`): the keyword arguments of every trainer of the run (`processing_class`,
            `data_collator`, `compute_metrics`, `eval_dataset`).
    """

    method: Method
    corpus: Any
    model_factory: Callable[[], Any]
    args: Any
    trainer_kwargs: dict[str, Any]

    def model(self):
        """A fresh pretrained model."""
        return self.model_factory()

    @cached_property
    def noisy(self):
        """The noisy training rows, with the model's inputs and their given `label` only."""
        return model_columns(self.corpus.train, "label")

    @cached_property
    def clean(self):
        """The trusted rows, with the model's inputs and their true `label` only."""
        return model_columns(self.corpus.clean, "label")

    def with_args(self, **changes):
        """The run's arguments with `changes`."""
        return dataclasses.replace(self.args, **changes)

    def stage_args(self):
        """The arguments of a first stage: in `<output_dir>/<stage_dir>`, not evaluated, saved nor reported."""
        return self.with_args(
            output_dir=os.path.join(self.args.output_dir, self.method.stage_dir),
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            report_to=[],
        )

    def clean_data_trainer(self, trainer_class):
        """A [`~mlc_text.base_trainer.CleanDataTrainer`] subclass on the noisy rows with the trusted rows beside."""
        return trainer_class(
            model=self.model(),
            args=self.args,
            train_dataset=self.corpus.train,
            clean_dataset=self.corpus.clean,
            **self.trainer_kwargs,
        )
