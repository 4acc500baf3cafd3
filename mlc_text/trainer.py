"""`MLCTrainer`: Meta Label Correction as a `transformers.Trainer`. Orchestration only; the maths is in meta_grad.py."""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .clean_batches import CleanBatchIterator
from .config import MLCTrainingArguments
from .meta_grad import (
    CleanPass,
    LookaheadBuffer,
    LossScale,
    MetaBatch,
    MetaStepOutput,
    check_optimizer,
    corrected_label_step,
    meta_step,
    trainable_parameters,
)
from .meta_net import (
    AnchoredCorrector,
    LabelCorrector,
    capture_head_features,
    feature_size_of,
    find_head_module,
    warm_start_corrector,
)
from .metrics import correction_stats

__all__ = [
    "CleanDataTrainer",
    "MLCTrainer",
    "MLC_STATE_NAME",
    "SUPPORTED_OPTIM_NAMES",
    "check_parallelism",
    "install_cpu_grad_scaler",
    "split_batch",
    "split_meta_rows",
]

logger = logging.getLogger(__name__)

MLC_STATE_NAME = "mlc_state.pt"
SUPPORTED_OPTIM_NAMES = ("adamw_torch", "adamw_torch_fused", "sgd")


class _CarriedCleanPass(NamedTuple):
    """The last meta step's clean pass at w', and the global step at which w' becomes the weights."""

    clean_pass: CleanPass
    for_step: int


def split_batch(inputs: dict[str, torch.Tensor], rows: int, second: bool = False) -> dict[str, torch.Tensor]:
    """The first `rows` rows of a collated batch, or (`second`) the rest."""
    return {key: value[rows:] if second else value[:rows] for key, value in inputs.items()}


def split_meta_rows(clean_dataset, num_labels: int, args: MLCTrainingArguments):
    """
    `(meta rows, main rows)`: a class-stratified share `args.meta_split_fraction` of the trusted rows (at least one
    per class), seeded by `args.seed`, kept for the meta objective; the rest train the main net.
    """
    from .data import split_clean_noisy  # the package's one stratified split

    column = "label" if "label" in clean_dataset.column_names else "labels"
    meta, main = split_clean_noisy(
        clean_dataset, num_labels, clean_fraction=args.meta_split_fraction, seed=args.seed, label_column=column
    )
    if len(main) == 0:
        raise ValueError(
            f"meta_split='rows' with meta_split_fraction={args.meta_split_fraction} leaves no trusted row for the main "
            f"loss ({len(clean_dataset)} trusted rows): lower meta_split_fraction or use meta_split='batch'"
        )
    return meta, main


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


def install_cpu_grad_scaler(accelerator) -> None:
    """
    Gives `accelerator` fp16 on CPU as it has it on a GPU: autocast to float16 around the model's forward and a
    `torch.amp.GradScaler("cpu")` in the optimizer's step. accelerate makes neither on CPU (it then trains in float32
    although `fp16=True`); set after the `Trainer`'s `__init__`, both take effect when `train()` prepares the model
    and optimizer. A no-op unless the mixed precision is fp16 on CPU without a scaler.
    """
    if accelerator.mixed_precision != "fp16" or accelerator.device.type != "cpu" or accelerator.scaler is not None:
        return
    handler = getattr(accelerator, "scaler_handler", None)
    kwargs = handler.to_kwargs() if handler is not None else {}
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", **kwargs)


class CleanDataTrainer(Trainer):
    """
    A `Trainer` that draws a clean (trusted) batch beside each noisy batch and applies gradients it computes by hand:
    the common ground of [`MLCTrainer`] and the L2RW baseline. Subclasses implement `training_step` with
    [`~CleanDataTrainer.next_clean_batch`], [`~CleanDataTrainer.accumulate_main_grads`] and
    [`~CleanDataTrainer.all_reduce_mean`]; checkpoints keep the clean stream's position plus `extra_state()`.

    Args:
        model: a sequence classifier.
        args: [`MLCTrainingArguments`].
        train_dataset: the noisy rows, tokenized (`label` = noisy label; optional `true_label`, never trained on).
        clean_dataset: the trusted rows, tokenized (`label` = true label).
        **kwargs: everything else `transformers.Trainer` takes.
    """

    def __init__(self, model: nn.Module, args: MLCTrainingArguments, train_dataset=None, clean_dataset=None, **kwargs):
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
        clean_dataset = self._remove_unused_columns(clean_dataset, description="clean")
        self.clean_batches = CleanBatchIterator(
            clean_dataset, self.data_collator, args.clean_batch_size, args.seed, args.process_index, args.world_size
        )
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

    def next_clean_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next clean batch on this process: `(model inputs, true labels)`."""
        clean_inputs = self._prepare_inputs(next(self.clean_batches))
        clean_inputs.pop("true_label", None)
        return clean_inputs, clean_inputs.pop("labels")

    @property
    def reduce(self):
        """`all_reduce_mean` on several processes, else `None` (what the functions of meta_grad.py take)."""
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


class MLCTrainer(CleanDataTrainer):
    """
    Trains a sequence classifier on noisy labels with Meta Label Correction (Zheng et al., AAAI 2021).

    Each training step draws a noisy batch (from `train_dataset`, whose `label` column holds the noisy labels and an
    optional `true_label` column the true ones, for evaluation only) and a clean batch (from `clean_dataset`, true
    labels in `label`), then: main loss at w against the corrector's labels (plus the clean batch), a virtual step
    w', the clean loss at w' and its meta-gradient, which updates the corrector, and finally the real step of w.

    Besides the loss it logs, every `logging_steps`: `clean_loss` (at w'), `meta_grad_norm`, and, over the noisy
    batches, the corrected labels' `mean_entropy` (near log K: the corrector has not learned yet),
    `agreement_with_noisy` (share of rows whose corrected argmax is the given label), `skip_weight` (with
    `skip_connection`: the weight of the given label), and where the rows carry `true_label`, `correction_accuracy`
    and `fixed_share` (wrong labels the corrector fixed).

    Args:
        model: an `AutoModelForSequenceClassification` whose head reads a pooled vector (BERT, MiniLM, DistilBERT,
            RoBERTa, ELECTRA, DeBERTa).
        args: [`MLCTrainingArguments`].
        train_dataset: the noisy rows, tokenized.
        clean_dataset: the trusted rows, tokenized.
        corrector: a [`LabelCorrector`] (or any module with the same call signature); built from `args` if `None`.
        **kwargs: everything else `transformers.Trainer` takes.
    """

    _tag_names = ["mlc-text", "meta-label-correction", "noisy-labels"]

    def __init__(
        self,
        model: nn.Module,
        args: MLCTrainingArguments,
        train_dataset=None,
        clean_dataset=None,
        corrector: nn.Module | None = None,
        **kwargs,
    ):
        self.head = self.head_module(model)  # before any work: a model without a known head fails here
        meta_rows = None
        if isinstance(args, MLCTrainingArguments) and args.meta_split == "rows" and clean_dataset is not None:
            meta_rows, clean_dataset = split_meta_rows(clean_dataset, model.config.num_labels, args)
        super().__init__(model=model, args=args, train_dataset=train_dataset, clean_dataset=clean_dataset, **kwargs)
        self.meta_batches = None if meta_rows is None else self._clean_stream(meta_rows, "meta", seed_offset=1)
        self.warm_started = False
        self.corrector = (corrector or self._build_corrector(model, model.config.num_labels)).to(args.device)
        self.meta_optimizer = torch.optim.Adam(
            self._corrector_param_groups(),
            lr=args.meta_learning_rate,
            weight_decay=args.meta_weight_decay,
            amsgrad=True,
        )
        self.anchored = AnchoredCorrector(self.corrector)
        self.lookahead = LookaheadBuffer(args.gradient_steps)
        self._pending_meta_grads: list[torch.Tensor] | None = None
        self._pending_gamma: torch.Tensor | float | None = None
        # See `reuse_clean_pass`.
        self._carried: _CarriedCleanPass | None = None
        self._overflowed = False  # fp16: a micro-batch of this optimizer step held an inf / NaN gradient
        self._warned: set[str] = set()  # the kinds of run-time warning already given

    def _clean_stream(self, dataset, description: str, seed_offset: int) -> CleanBatchIterator:
        dataset = self._remove_unused_columns(dataset, description=description)
        batch_size = min(self.args.clean_batch_size, len(dataset) // self.args.world_size)
        if batch_size < self.args.clean_batch_size:
            logger.info(f"{description} batches of {batch_size} rows: the {len(dataset)} {description} rows are fewer")
        return CleanBatchIterator(
            dataset,
            self.data_collator,
            batch_size,
            self.args.seed + seed_offset,
            self.args.process_index,
            self.args.world_size,
        )

    # ----------------------------------------------------------------------------------------------- set-up hooks
    def head_module(self, model: nn.Module) -> nn.Module:
        """The module whose input holds the features the corrector reads. Override for other architectures."""
        return find_head_module(model)

    def _build_corrector(self, model: nn.Module, num_labels: int) -> LabelCorrector:
        with torch.random.fork_rng():  # same weights on every process, and the global RNG stream is left alone
            torch.manual_seed(self.args.seed)
            return LabelCorrector(
                num_labels,
                feature_size_of(model),
                hidden_size=self.args.meta_hidden_size,
                label_embedding_size=self.args.label_embedding_size,
                skip_connection=self.args.skip_connection,
                skip_init=self.args.skip_init,
            )

    def _corrector_param_groups(self) -> list[dict]:
        """
        The corrector's parameters for its optimizer: one group, or two with `skip_learning_rate` (the skip weight
        alone in the second). `base_lr` is the learning rate that `meta_lr_follows_schedule` scales.
        """
        skip_logit = getattr(self.corrector, "skip_logit", None)
        if skip_logit is None or self.args.skip_learning_rate is None:
            return [{"params": list(self.corrector.parameters()), "base_lr": self.args.meta_learning_rate}]
        others = [param for param in self.corrector.parameters() if param is not skip_logit]
        return [
            {"params": others, "base_lr": self.args.meta_learning_rate},
            {"params": [skip_logit], "lr": self.args.skip_learning_rate, "base_lr": self.args.skip_learning_rate},
        ]

    # ---------------------------------------------------------------------------------------------- the step
    def warm_start(self) -> None:
        """The corrector's supervised warm start on every trusted row (`corrector_warm_start_steps`), once per run."""
        self.warm_started = True
        if not self.args.corrector_warm_start_steps:
            return
        streams = [self.clean_batches] + ([self.meta_batches] if self.meta_batches is not None else [])
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        features, labels = [], []
        with torch.no_grad(), capture_head_features(self.head) as store:
            for stream in streams:  # the same rows on every process: the corrector stays the same everywhere
                for start in range(0, len(stream.dataset), self.args.clean_batch_size):
                    rows = [
                        stream.dataset[index]
                        for index in range(start, min(start + self.args.clean_batch_size, len(stream.dataset)))
                    ]
                    inputs = self._prepare_inputs(stream.collate_fn(rows))
                    inputs.pop("true_label", None)
                    labels.append(inputs.pop("labels"))
                    with self.compute_loss_context_manager():
                        model(**inputs)
                    features.append(store["features"].float())
        model.train()
        losses = warm_start_corrector(
            self.corrector,
            torch.cat(features),
            torch.cat(labels),
            self.args.corrector_warm_start_steps,
            seed=self.args.seed,
        )
        logger.info(f"corrector warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if not self.warm_started:
            self.warm_start()
        model.train()
        self.corrector.train()
        inputs = self._prepare_inputs(inputs)
        true_labels = inputs.pop("true_label", None)
        noisy_labels = inputs.pop("labels")
        self.anchored.trust = self.given_label_trust()
        batch = self._meta_batch(inputs, noisy_labels)
        unwrapped = self.accelerator.unwrap_model(model)
        loss_scale = self.loss_scale()
        common = {
            "clean_in_main_loss": self.args.clean_in_main_loss,
            "reduce": self.reduce,
            "autocast": self.compute_loss_context_manager,
            "carried_clean_pass": self._take_carried_clean_pass(),
            "loss_scale": loss_scale,
        }
        if self.state.global_step % self.args.meta_update_interval == 0:
            out = meta_step(
                unwrapped,
                self.anchored,
                self.head,
                batch,
                self.optimizer,
                meta_gradient=self.args.meta_gradient,
                lookahead=self.lookahead,
                max_grad_norm=self.args.max_grad_norm,
                keep_clean_pass=self._can_reuse_clean_pass(),
                **common,
            )
            if not out.overflow:
                self._accumulate_meta_grads(out)
            if out.clean_pass is not None and not out.overflow:  # an overflowing step is skipped: w' is not next w
                self._carried = _CarriedCleanPass(out.clean_pass, self.state.global_step + 1)
            out.clean_pass = None
        else:
            out = corrected_label_step(unwrapped, self.anchored, self.head, batch, **common)
        self._overflowed |= out.overflow
        self.accumulate_main_grads(unwrapped, out.main_grads, loss_scale, overflow=out.overflow)
        if not out.overflow:  # its losses and labels may be inf / NaN
            self._record(out, noisy_labels, true_labels)
        if self.accelerator.sync_gradients:
            self._meta_optimizer_step()
        return out.main_loss.to(self.args.device) / self.current_gradient_accumulation_steps

    def _meta_batch(self, inputs: dict[str, torch.Tensor], noisy_labels: torch.Tensor) -> MetaBatch:
        """The noisy batch with its clean batch and, under `meta_split`, the separate rows of the meta objective."""
        clean_inputs, clean_labels = self.next_clean_batch()
        if self.args.meta_split == "rows":
            meta_inputs = self._prepare_inputs(next(self.meta_batches))
            meta_inputs.pop("true_label", None)
            return MetaBatch(inputs, noisy_labels, clean_inputs, clean_labels, meta_inputs, meta_inputs.pop("labels"))
        if self.args.meta_split == "batch":
            half = (len(clean_labels) + 1) // 2
            main, meta = split_batch(clean_inputs, half), split_batch(clean_inputs, half, second=True)
            return MetaBatch(inputs, noisy_labels, main, clean_labels[:half], meta, clean_labels[half:])
        return MetaBatch(inputs, noisy_labels, clean_inputs, clean_labels)

    # The given label's weight in the target at the start of `trust_given_labels_for`.
    INITIAL_TRUST = 0.9

    def given_label_trust(self) -> float:
        """The weight of the given label in this step's target (`trust_given_labels_for`; 0 when it is off)."""
        share = self.args.trust_given_labels_for
        if not share:
            return 0.0
        progress = self.state.global_step / max(1, self.state.max_steps)
        return self.INITIAL_TRUST * max(0.0, 1.0 - progress / share)

    def _can_reuse_clean_pass(self) -> bool:
        # The real step must apply exactly the virtual one: one micro-batch per optimizer step; and the meta
        # objective must be the clean batch of the main loss.
        return (
            self.args.reuse_clean_pass
            and self.args.clean_in_main_loss
            and self.args.gradient_accumulation_steps == 1
            and self.args.meta_split == "none"
        )

    def _take_carried_clean_pass(self) -> CleanPass | None:
        """The carried clean pass if its w' is the current weights (exactly one real step since), else `None`."""
        carried, self._carried = self._carried, None
        if carried is None or carried.for_step != self.state.global_step:
            return None
        if getattr(self.accelerator, "optimizer_step_was_skipped", False):
            return None
        return carried.clean_pass

    def _accumulate_meta_grads(self, out: MetaStepOutput) -> None:
        # Micro-batches of one optimizer step average their meta-gradients (and discounts), like the main net.
        scale = 1.0 / self.current_gradient_accumulation_steps
        grads = [grad * scale for grad in out.meta_grads]
        gamma = None if out.gamma is None else out.gamma * scale
        if self._pending_meta_grads is None:
            self._pending_meta_grads, self._pending_gamma = grads, gamma
        else:
            self._pending_meta_grads = [a + b for a, b in zip(self._pending_meta_grads, grads)]
            if gamma is not None:
                self._pending_gamma = self._pending_gamma + gamma

    def _meta_optimizer_step(self) -> None:
        if self._overflowed:
            # fp16 overflow in this optimizer step: the scaler skips the main net's step (its .grad holds inf), so the
            # corrector skips its own; the look-ahead window and the corrector's optimizer are left as they are.
            self._pending_meta_grads, self._pending_gamma, self._overflowed = None, None, False
            return
        if self._pending_meta_grads is None:
            return
        total = self.lookahead.accumulate(self._pending_meta_grads, self._pending_gamma)
        self._pending_meta_grads, self._pending_gamma = None, None
        self._metrics["train"]["meta_grad_norm"].append(torch.sqrt(sum(g.square().sum() for g in total)).item())
        if self.lookahead.should_step:
            self._follow_main_schedule()
            params = [param for param in self.corrector.parameters() if param.requires_grad]
            for param, grad in zip(params, total):
                param.grad = grad.to(param.dtype)
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)

    def _follow_main_schedule(self) -> None:
        # The meta-gradient scales with the main learning rate; Adam would undo that and random-walk the corrector
        # once the main schedule has decayed, so its learning rate follows the same schedule.
        if not self.args.meta_lr_follows_schedule or not self.args.learning_rate:
            return
        factor = self._get_learning_rate() / self.args.learning_rate
        for group in self.meta_optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    # -------------------------------------------------------------------------------------------- metrics
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

    def train(self, *args, **kwargs):
        self._warned.clear()
        output = super().train(*args, **kwargs)
        self._warn_if_corrector_stayed_flat()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)  # adds the means of the recorded signals to `logs`
        self._warn_on_signals(logs)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message)

    def _warn_on_signals(self, logs: dict[str, float]) -> None:
        """Warns, once each, while training, when the logged signals say the corrector is not learning or collapses."""
        step, total = self.state.global_step, max(self.state.max_steps, 1)
        entropy, clean_loss = logs.get("mean_entropy"), logs.get("clean_loss")
        agreement = logs.get("agreement_with_noisy")
        flat = math.log(self.model.config.num_labels) * self.FLAT_ENTROPY_SHARE
        if entropy is not None and entropy >= flat and step >= self.FLAT_AFTER * total:
            self._warn_once(
                "flat",
                f"step {step}: the label corrector's soft labels are still near uniform (mean entropy {entropy:.2f}); "
                f"near-uniform targets pull the main net towards uniform predictions. Raise meta_learning_rate (now "
                f"{self.args.meta_learning_rate:g}) or use skip_connection='per_example'.",
            )
        if clean_loss is not None and clean_loss < self.MEMORISED_CLEAN_LOSS:
            advice = (
                " Use meta_split='rows' (trusted rows kept for the meta objective)."
                if (self.args.meta_split != "rows")
                else " Add trusted rows, or train for fewer epochs."
            )
            self._warn_once(
                "memorised",
                f"step {step}: the clean loss at w' is {clean_loss:.3f}: the main net fits the rows of the meta "
                f"objective, so the meta-gradient carries little signal and the corrector drifts.{advice}",
            )
        if agreement is not None and agreement < self.LOW_AGREEMENT:
            self._warn_once(
                "overriding",
                f"step {step}: the corrector's label agrees with the given one on {agreement:.0%} of the noisy rows: "
                "unless more than half of your labels are wrong, it is over-correcting. Lower meta_learning_rate, use "
                "skip_connection='per_example', or select the checkpoint on trusted rows (load_best_model_at_end).",
            )

    def _warn_if_corrector_stayed_flat(self) -> None:
        entropies = [entry["mean_entropy"] for entry in self.state.log_history if "mean_entropy" in entry]
        if not entropies:
            return
        share = entropies[-1] / math.log(self.model.config.num_labels)
        if share >= self.FLAT_ENTROPY_SHARE:
            logger.warning(
                f"the label corrector's soft labels stayed near uniform (mean entropy {share:.2f} of log K at the last "
                f"log): it has barely learned in {self.state.global_step} steps at meta_learning_rate="
                f"{self.args.meta_learning_rate:g}, and near-uniform targets pull the main net towards uniform "
                "predictions. Train longer or raise meta_learning_rate (see docs/RESULTS.md)."
            )

    def _record(self, out: MetaStepOutput, noisy_labels: torch.Tensor, true_labels: torch.Tensor | None) -> None:
        # Reading values to the host here waits for the step's queued work, which the Trainer waits for anyway right
        # after training_step (its NaN/inf check of the loss, under the default logging_nan_inf_filter): on a GPU the
        # only stall this adds is the few small host-side computations below.
        metrics = self._metrics["train"]
        if not torch.isnan(out.clean_loss):
            metrics["clean_loss"].append(self.accelerator.gather_for_metrics(out.clean_loss.reshape(1)).mean().item())
        if true_labels is None:
            true_labels = torch.full_like(noisy_labels, -1)
        corrected, noisy, true = self.accelerator.gather_for_metrics((out.corrected_labels, noisy_labels, true_labels))
        stats = correction_stats(corrected.float().cpu(), noisy.cpu(), true.cpu())
        for key in ("mean_entropy", "correction_accuracy", "fixed_share", "agreement_with_noisy"):
            value = stats.get(key)
            if value is not None and not np.isnan(value):
                metrics[key].append(float(value))
        skip_weight = self.corrector.last_skip_weight if isinstance(self.corrector, LabelCorrector) else None
        if skip_weight is not None:
            # The mean weight s of the given label in s * onehot(y~) + (1 - s) * g: while s >= 0.5 the given label
            # stays the argmax of the corrected label.
            metrics["skip_weight"].append(skip_weight.float().item())

    @torch.no_grad()
    def correct_labels(self, dataset) -> dict[str, np.ndarray]:
        """
        Runs the main net (eval mode) and the corrector over `dataset` (tokenized, noisy `label`, optional
        `true_label`).

        Returns:
            `dict` with `corrected` (N x K soft labels), `noisy_labels` and `true_labels` (-1 where unknown).
        """
        self.model.eval()
        self.corrector.eval()
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for inputs in self.get_test_dataloader(dataset):
            inputs = self._prepare_inputs(inputs)
            noisy = inputs.pop("labels")
            true = inputs.pop("true_label", torch.full_like(noisy, -1))
            with self.compute_loss_context_manager(), capture_head_features(self.head) as store:
                self.model(**inputs)
            corrected = self.corrector(store["features"], noisy)
            for key, value in zip(("corrected", "noisy_labels", "true_labels"), (corrected, noisy, true)):
                parts[key].append(self.accelerator.gather_for_metrics(value).float().cpu())
        return {key: torch.cat(values).numpy() for key, values in parts.items()}

    # ----------------------------------------------------------------------------------- saving and resuming
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.corrector.save_pretrained(output_dir or self.args.output_dir)

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "meta_batches": None if self.meta_batches is None else self.meta_batches.state_dict(),
            "warm_started": self.warm_started,
            "corrector": self.corrector.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "lookahead": self.lookahead.state_dict(),
            # The clean pass the next step reuses (one gradient-sized copy): without it a resumed run would take
            # another path than an uninterrupted one.
            "carried_clean_pass": None
            if self._carried is None
            else {
                "loss": self._carried.clean_pass.loss,
                "grads": self._carried.clean_pass.grads,
                "num_rows": self._carried.clean_pass.num_rows,
                "for_step": self._carried.for_step,
            },
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if self.meta_batches is not None:
            self.meta_batches.load_state_dict(state["meta_batches"])
        self.warm_started = state.get("warm_started", True)
        self.corrector.load_state_dict(state["corrector"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.lookahead.load_state_dict(state["lookahead"])
        carried = state.get("carried_clean_pass")
        if carried is not None:
            clean_pass = CleanPass(carried["loss"], carried["grads"], carried["num_rows"])
            self._carried = _CarriedCleanPass(clean_pass, carried["for_step"])
