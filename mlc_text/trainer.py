"""
`MLCTrainer`: Meta Label Correction as a `transformers.Trainer`. Orchestration only: the training step's protocol is
[`CleanDataTrainer`]'s (base_trainer.py), the maths of the meta step is in meta_grad.py, the rows of the meta
objective in meta_split.py, and the signals it logs about its corrector, with the warnings they call for, in
corrector_signals.py.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .autodiff import LossScale
from .base_trainer import MLC_STATE_NAME, CleanDataTrainer, MainStep, check_parallelism
from .clean_batches import MetaBatch
from .config import MLC_CLEAN_BATCH_SHARE, MLC_FINISHES_ON_CLEAN, MLCTrainingArguments
from .corrector_signals import never_corrected_warning, signal_warnings, stayed_flat_warning, step_signals
from .lookahead import LookaheadBuffer
from .meta_grad import CleanPass, MetaStepOutput, corrected_label_step, meta_step, resolve_meta_gradient, unit_norm
from .meta_net import (
    AnchoredCorrector,
    LabelCorrector,
    capture_head_features,
    correct,
    corrector_param_groups,
    feature_size_of,
    find_head_module,
    head_features,
    warm_start_corrector,
)
from .meta_split import main_loss_rows, split_meta_rows, with_meta_objective
from .methods import MethodContext, get_method

__all__ = [
    "CleanDataTrainer",
    "MLCTrainer",
    "MLC_STATE_NAME",
    "build_mlc_trainer",
    "check_parallelism",
]

logger = logging.getLogger(__name__)


class _CarriedCleanPass(NamedTuple):
    """The last meta step's clean pass at w', and the global step at which w' becomes the weights."""

    clean_pass: CleanPass
    for_step: int


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

    _tag_names = list(get_method("mlc").tags)
    finish_on_clean_by_default = MLC_FINISHES_ON_CLEAN
    clean_batch_share = MLC_CLEAN_BATCH_SHARE

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
        meta_rows, trusted_rows = None, clean_dataset
        if isinstance(args, MLCTrainingArguments) and args.meta_split == "rows" and clean_dataset is not None:
            meta_rows, clean_dataset = split_meta_rows(clean_dataset, model.config.num_labels, args)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            clean_dataset=clean_dataset,
            trusted_dataset=trusted_rows,
            **kwargs,
        )
        self.meta_batches = None if meta_rows is None else self._clean_stream(meta_rows, "meta", seed_offset=1)
        self.warm_started = False
        # "auto": fd in float32, jvp under fp16 / bf16 autocast (the arguments', or accelerate's --mixed_precision)
        precision = "fp16" if args.fp16 else "bf16" if args.bf16 else self.accelerator.mixed_precision
        self.meta_gradient = resolve_meta_gradient(args.meta_gradient, precision)
        if args.meta_gradient == "auto":
            logger.info(f"meta_gradient='auto': {self.meta_gradient!r} ({precision or 'no'} mixed precision)")
        self.corrector = (corrector or self._build_corrector(model, model.config.num_labels)).to(args.device)
        self.meta_optimizer = torch.optim.Adam(
            corrector_param_groups(self.corrector, args.meta_learning_rate, args.skip_learning_rate),
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
                teacher=self.args.corrector_teacher,
                confidence_gate=self.args.confidence_gate,
            )

    # ---------------------------------------------------------------------------------------------- the step
    def warm_start(self) -> None:
        """The corrector's supervised warm start on every trusted row (`corrector_warm_start_steps`), once per run."""
        self.warm_started = True
        if self.args.corrector_warm_start_steps:
            losses = self.supervise_corrector(self.args.corrector_warm_start_steps, seed=self.args.seed)
            logger.info(f"corrector warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")

    def supervise_corrector(self, steps: int, seed: int) -> list[float]:
        """
        Supervised Adam steps of the corrector on every trusted row's current features ([`warm_start_corrector`]),
        each row shown with its true label and with a wrong one drawn with `seed`. Returns the losses.
        """
        streams = [self.clean_batches] + ([self.meta_batches] if self.meta_batches is not None else [])
        batches = (  # the same rows on every process: the corrector stays the same everywhere
            self._prepare_inputs(batch) for stream in streams for batch in stream.in_order(self.clean_batch_size)
        )
        model = self.accelerator.unwrap_model(self.model)
        features, labels = head_features(model, self.head, batches, autocast=self.compute_loss_context_manager)
        return warm_start_corrector(self.corrector, features, labels, steps, seed=seed)

    def _supervise_corrector_on_schedule(self) -> None:
        # `corrector_supervision_interval`: after the first step, every interval steps (the warm start covers step 0).
        interval, step = self.args.corrector_supervision_interval, self.state.global_step
        if interval and step and step % interval == 0:
            losses = self.supervise_corrector(self.args.corrector_supervision_steps, seed=self.args.seed + step)
            self._metrics["train"]["corrector_supervised_loss"].append(losses[-1])

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """The shared step ([`CleanDataTrainer.training_step`]) with what the corrector needs around it."""
        if not self.warm_started:
            self.warm_start()
        if self.accelerator.sync_gradients:  # once per optimizer step
            self._supervise_corrector_on_schedule()
        self.corrector.train()
        self.anchored.trust = self.given_label_trust()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of an optimizer step: the corrector steps too
            self._meta_optimizer_step()
        return loss

    def main_step(
        self, model: nn.Module, batch: MetaBatch, loss_scale: LossScale | None, true_labels: torch.Tensor | None
    ) -> MainStep:
        """MLC's part of a step: the meta step (every `meta_update_interval` steps; else the main loss alone)."""
        common = {
            "clean_in_main_loss": self.clean_in_main_loss_now(),
            "reduce": self.reduce,
            "autocast": self.compute_loss_context_manager,
            "carried_clean_pass": self._take_carried_clean_pass(),
            "loss_scale": loss_scale,
        }
        if self.state.global_step % self.args.meta_update_interval == 0:
            out = meta_step(
                model,
                self.anchored,
                self.head,
                batch,
                self.optimizer,
                meta_gradient=self.meta_gradient,
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
            out = corrected_label_step(model, self.anchored, self.head, batch, **common)
        self._overflowed |= out.overflow
        record = functools.partial(self._record, out, batch.noisy_labels, true_labels)
        return MainStep(out.main_loss, out.main_grads, reduced=True, overflow=out.overflow, record=record)

    def _meta_batch(self, inputs: dict[str, torch.Tensor], noisy_labels: torch.Tensor) -> MetaBatch:
        """The step's batches with, under `meta_split`, the separate rows of the meta objective."""
        batch = super()._meta_batch(inputs, noisy_labels)
        meta_rows = self.next_batch_of(self.meta_batches) if self.args.meta_split == "rows" else None
        return with_meta_objective(batch, self.args.meta_split, meta_rows)

    def clean_in_main_loss_now(self) -> bool:
        """
        Whether this step's main loss holds the clean batch: `clean_in_main_loss`, within `clean_in_main_loss_epochs`
        epochs over the noisy rows and `clean_in_main_loss_passes` passes over the trusted rows ([`clean_passes`]).
        """
        epochs, passes = self.args.clean_in_main_loss_epochs, self.args.clean_in_main_loss_passes
        return (
            self.args.clean_in_main_loss
            and (epochs is None or (self.state.epoch or 0.0) < epochs)
            and (passes is None or self.clean_passes() < passes)
        )

    def clean_passes(self) -> float:
        """
        How many times the main loss has seen each trusted row of the clean batches so far, on average: steps done x
        micro-batches per step x processes x the clean batch's rows in the main loss (half of it, rounded up, under
        `meta_split="batch"`) / trusted rows (those left for it under `meta_split="rows"`).
        """
        stream = self.clean_batches
        batches = self.state.global_step * self.args.gradient_accumulation_steps * stream.num_processes
        return batches * main_loss_rows(stream.batch_size, self.args.meta_split) / len(stream.dataset)

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
            and self.clean_in_main_loss_now()
            and self.args.gradient_accumulation_steps == 1
            and self.args.meta_split == "none"
        )

    def _take_carried_clean_pass(self) -> CleanPass | None:
        """The carried clean pass if its w' is the current weights (exactly one real step since), else `None`."""
        carried, self._carried = self._carried, None
        if carried is None or carried.for_step != self.state.global_step or not self.clean_in_main_loss_now():
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
        if self.args.normalize_meta_gradient:
            total = unit_norm(total)
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
    def train(self, *args, **kwargs):
        self._warned.clear()
        output = super().train(*args, **kwargs)
        self._warn_at_end_of_run()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        slope = getattr(self.corrector, "confidence_slope", None)
        if slope is not None and "loss" in logs:  # a training log: where the confidence gate's slope stands
            logs["confidence_slope"] = round(slope.detach().item(), 4)
        super().log(logs, start_time)  # adds the means of the recorded signals to `logs`
        self._warn_on_signals(logs)

    def _warn_on_signals(self, logs: dict[str, float]) -> None:
        """Warns, once each, while training, when the logged signals say the corrector is not learning or collapses."""
        found = signal_warnings(
            logs,
            step=self.state.global_step,
            max_steps=self.state.max_steps,
            num_labels=self.model.config.num_labels,
            args=self.args,
        )
        for kind, message in found.items():
            if kind not in self._warned:
                self._warned.add(kind)
                logger.warning(message)

    def _warn_at_end_of_run(self) -> None:
        """The end-of-run warnings: a corrector that stayed near uniform, or that never replaced a given label."""
        history = self.state.log_history
        messages = (
            stayed_flat_warning(
                history, steps=self.state.global_step, num_labels=self.model.config.num_labels, args=self.args
            ),
            never_corrected_warning(history, args=self.args),
        )
        for message in filter(None, messages):
            logger.warning(message)

    def _record(
        self, out: MetaStepOutput, noisy_labels: torch.Tensor, true_labels: torch.Tensor | None
    ) -> dict[str, float]:
        skip_weight = self.corrector.last_skip_weight if isinstance(self.corrector, LabelCorrector) else None
        gather = self.accelerator.gather_for_metrics
        return step_signals(out.clean_loss, out.corrected_labels, noisy_labels, true_labels, skip_weight, gather)

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
                logits = self.model(**inputs).logits
            corrected = correct(self.corrector, store["features"], noisy, logits)
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


def build_mlc_trainer(context: MethodContext) -> MLCTrainer:
    """The registry's builder of `mlc`: an [`MLCTrainer`] on the noisy rows with the trusted rows beside them."""
    return context.clean_data_trainer(MLCTrainer)
