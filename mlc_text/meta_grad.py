r"""
The maths of the meta step: the virtual (look-ahead) update of the main net and the meta-gradient of the clean loss
after it with respect to the label corrector's parameters.

Notation (paper, eq. 6): main weights w, corrector parameters a, noisy-batch loss against corrected labels
L'(w, a), clean loss L(w). One step of the main optimizer is w' = w - L * dL'/dw, with L diagonal (for SGD a scalar
per tensor, for Adam the current preconditioner, held constant). The meta-gradient is

    dL(w')/da = -(d/da) <dL'/dw (w, a), L * g'>,   g' = dL/dw at w' held constant.

Three ways to compute it, selected by `meta_gradient`:

* `"reference"`: the paper's kernel, literally: the first backward keeps its graph (`create_graph=True`) and the
  proxy `-<dL'/dw, L g'>` is differentiated a second time. The oracle of the tests.
* `"jvp"` (default): with soft-target cross-entropy and corrected labels t(a) that sum to 1,
  dL'/dw = (1/n) sum_i J_i^T (softmax(z_i) - t_i), where J_i = dz_i/dw is the Jacobian of row i's logits. Only t
  depends on a, so the meta-gradient is the vector-Jacobian product of t(a) with upstream (1/n) J_i v, v = L * g':
  one forward-mode pass (`torch.func.jvp`) of the noisy batch along v. No graph of the first backward is kept.
* `"fd"` / `"fd_central"`: the same J v by a finite difference of the noisy batch's logits along v, from one plain
  forward at w + h v (the logits at w are the main pass's) or two at w +- h v, with the main pass's dropout masks
  ([`logits_finite_difference`]). Not exact: its error is tested against `"jvp"`.

`"jvp"` and `"reference"` are exact; they differ only in cost. The k-step look-ahead of the paper adds a discounted
earlier meta-gradient (identity-Hessian approximation), see lookahead.py. Under fp16 every backward here runs on a
loss-scaled loss ([`LossScale`]).

This file holds MLC's step: its main loss, [`meta_step`] and [`corrected_label_step`]. What they are built from lives
in files of its own, and every name stays importable from here: the optimizer mirror of the virtual step
(virtual_step.py), the autodiff helpers (autodiff.py), the look-ahead (lookahead.py), the step's batches
(clean_batches.py) and the main loss's weights (main_loss.py); L2RW's weights, computed with the same virtual step,
are in l2rw.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Each concept the meta step is built from lives in its own file; every name stays importable from here.
from .autodiff import (  # noqa: F401
    LossScale,
    Reduce,
    _found_inf,
    _named,
    _reduce_dict,
    _replay_rng,
    _rng_state,
    _scaled,
    _unscale_,
    _upcast,
    finite_difference_step,
    logits_finite_difference,
    logits_jvp,
    loss_and_grads,
    soft_cross_entropy,
    trainable_parameters,
    unscaled_grads,
)
from .clean_batches import MetaBatch, join_inputs
from .l2rw import l2rw_weights
from .lookahead import LookaheadBuffer, _discount, discount_factor
from .main_loss import MainLossWeights
from .meta_net import capture_head_features, correct
from .virtual_step import (  # noqa: F401
    SUPPORTED_OPTIMIZERS,
    ParamDict,
    VirtualRates,
    check_optimizer,
    clip_coefficient,
    scaled_direction,
    unwrap_optimizer,
    virtual_step,
)

__all__ = [
    "ParamDict",
    "SUPPORTED_OPTIMIZERS",
    "trainable_parameters",
    "soft_cross_entropy",
    "unwrap_optimizer",
    "check_optimizer",
    "clip_coefficient",
    "VirtualRates",
    "virtual_step",
    "scaled_direction",
    "LossScale",
    "loss_and_grads",
    "logits_jvp",
    "logits_finite_difference",
    "finite_difference_step",
    "discount_factor",
    "LookaheadBuffer",
    "MetaBatch",
    "CleanPass",
    "MetaStepOutput",
    "meta_step",
    "corrected_label_step",
    "l2rw_weights",
    "META_GRADIENTS",
    "META_GRADIENT_CHOICES",
    "resolve_meta_gradient",
    "unit_norm",
]

META_GRADIENTS = ("jvp", "fd", "fd_central", "reference")
# What `MLCTrainingArguments.meta_gradient` accepts: a path above, or "auto" (see `resolve_meta_gradient`).
META_GRADIENT_CHOICES = ("auto", *META_GRADIENTS)


def unit_norm(grads: list[torch.Tensor], eps: float = 1e-12) -> list[torch.Tensor]:
    """`grads` divided by their joint 2-norm (all zeros stay zeros): the direction of the meta-gradient."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad.float()) for grad in grads]))
    return [grad / (norm + eps).to(grad.dtype) for grad in grads]


def resolve_meta_gradient(meta_gradient: str, mixed_precision: str | None) -> str:
    """
    The path a run takes for `meta_gradient`: "auto" is `"fd"` in float32 (the cheapest: one plain forward; its
    error in float32 is far below a stochastic meta-gradient's noise) and `"jvp"` under fp16 / bf16 autocast, where a
    forward difference of half-precision logits loses too many digits. Any other accepted name is taken as it is.

    Args:
        meta_gradient (`str`): one of `META_GRADIENT_CHOICES`.
        mixed_precision (`str` or `None`): the run's autocast, as accelerate names it (`"no"`, `"fp16"`, `"bf16"`).
    """
    if meta_gradient not in META_GRADIENT_CHOICES:
        raise ValueError(f"meta_gradient must be one of {', '.join(META_GRADIENT_CHOICES)}, got {meta_gradient!r}")
    if meta_gradient != "auto":
        return meta_gradient
    return "jvp" if mixed_precision in ("fp16", "bf16") else "fd"


@dataclass
class CleanPass:
    """
    A clean batch's loss and gradient at given weights (detached, reduced across processes), with its number of rows.

    A meta step computes one at w' (the meta objective). When the real step then applies exactly the virtual step's
    update, w' *is* the next step's w, so the next step's main loss can take its clean term from it instead of
    running the clean batch at w again (`carried_clean_pass`): the same gradient, one forward/backward fewer.
    """

    loss: torch.Tensor
    grads: ParamDict
    num_rows: int


@dataclass
class MetaStepOutput:
    """
    What one meta step computed. All tensors are detached.

    Attributes:
        main_grads: gradient of the main loss at w, by parameter name (for the real step), reduced across processes.
        meta_grads: d(clean loss at w')/d(corrector parameters), before the look-ahead discount, reduced.
        main_loss: the main loss at w (noisy batch against corrected labels, plus the clean batch if asked).
        clean_loss: the clean loss at w' (the meta objective).
        corrected_labels: the corrector's soft labels for the noisy batch.
        gamma: the look-ahead discount, or `None` when it was not needed.
        clean_pass: the clean batch's loss and gradient g' at w' (unscaled), when `keep_clean_pass` was asked.
        overflow: under fp16 loss scaling, whether any gradient of the step held an inf or NaN (on any process): the
            step must then be skipped for both nets. Always `False` without `loss_scale`.
    """

    main_grads: ParamDict
    meta_grads: list[torch.Tensor]
    main_loss: torch.Tensor
    clean_loss: torch.Tensor
    corrected_labels: torch.Tensor
    gamma: torch.Tensor | None = None
    clean_pass: CleanPass | None = None
    overflow: bool = False


@dataclass
class _MainPass:
    params: dict[str, nn.Parameter]
    noisy_grads: ParamDict  # the noisy part's gradient with its graph (create_graph; loss-scaled); else main_grads
    main_grads: ParamDict
    main_loss: torch.Tensor
    clean_grads: ParamDict | None
    corrected: torch.Tensor
    noisy_weight: float
    noisy_logits: torch.Tensor  # detached


def _main_loss_and_grads(
    model: nn.Module,
    corrector: nn.Module,
    head: nn.Module,
    batch: MetaBatch,
    *,
    clean_in_main_loss: bool = True,
    need_clean_grads: bool = False,
    create_graph: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    carried: CleanPass | None = None,
    loss_scale: LossScale | None = None,
) -> _MainPass:
    """
    Main loss at w: the noisy batch against corrected labels (+ the clean batch with its true labels, weighted by
    [`MainLossWeights`]), and its gradient. `need_clean_grads`: also return the clean batch's own gradient at w (the
    look-ahead discount reads it). `create_graph`: keep the graph of the noisy part's gradient (the reference
    meta-gradient differentiates it again). With a `carried` clean pass at w (and no need of this clean batch's own
    gradient at w), the clean term is taken from it instead of a forward/backward of `batch`'s clean rows.
    """
    use_carried = carried is not None and clean_in_main_loss and not need_clean_grads
    params = trainable_parameters(model)
    # Double backward needs attention on SDPA's math backend: the fused CPU kernels have no second derivative.
    attention = sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()
    with attention, autocast(), capture_head_features(head) as store:
        noisy_logits = model(**batch.noisy_inputs).logits
    corrected = correct(corrector, store["features"], batch.noisy_labels, noisy_logits)
    noisy_loss = soft_cross_entropy(noisy_logits, corrected if create_graph else corrected.detach())

    num_clean = carried.num_rows if use_carried else len(batch.clean_labels)
    weights = MainLossWeights.for_rows(len(batch.noisy_labels), num_clean, clean_in_main_loss)
    # The noisy term is weighted before its backward: the reference meta-gradient differentiates this gradient.
    grads = torch.autograd.grad(
        _scaled(weights.noisy * noisy_loss, loss_scale),
        list(params.values()),
        create_graph=create_graph,
        allow_unused=True,
    )
    noisy_grads = _named(params, grads)
    main_grads = {name: grad.detach() for name, grad in noisy_grads.items()}
    if loss_scale is not None and create_graph:  # `noisy_grads` stay scaled: the proxy's backward unscales
        main_grads = {name: grad.clone() for name, grad in main_grads.items()}
    _unscale_(main_grads, loss_scale)
    main_loss = weights.noisy * noisy_loss.detach()
    clean_grads = None
    if clean_in_main_loss or need_clean_grads:
        if use_carried:
            clean_loss_at_w, clean_grads = carried.loss, carried.grads
        else:
            clean_loss_at_w, clean_grads = loss_and_grads(
                model, batch.clean_inputs, batch.clean_labels, autocast=autocast, loss_scale=loss_scale
            )
        if clean_in_main_loss:
            # With a graph, `noisy_grads` must stay as they are (they carry what the meta-gradient needs); else the
            # fresh tensors of autograd.grad, read nowhere else, take the clean term in place.
            main_loss, main_grads = weights.add_clean(
                main_loss, main_grads, clean_loss_at_w, clean_grads, in_place=not create_graph
            )
        if not need_clean_grads:
            clean_grads = None  # only the look-ahead discount reads them: free them now
    if use_carried:
        # Consumed: its gradient is in main_grads now. Emptied so that it is not held through the rest of the step
        # by whoever still refers to the CleanPass (the trainer's call): one parameter-sized copy less at the peak.
        carried.grads = {}
    return _MainPass(
        params, noisy_grads, main_grads, main_loss, clean_grads, corrected, weights.noisy, noisy_logits.detach()
    )


def corrected_label_step(
    model: nn.Module,
    corrector: nn.Module,
    head: nn.Module,
    batch: MetaBatch,
    *,
    clean_in_main_loss: bool = True,
    reduce: Reduce | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    carried_clean_pass: CleanPass | None = None,
    loss_scale: LossScale | None = None,
) -> MetaStepOutput:
    """
    The main-net half of a step without the meta step (between meta updates, `meta_update_interval > 1`): the
    gradient of the main loss against the current corrector's labels. `meta_grads` is empty, `clean_loss` is NaN.
    `carried_clean_pass`, `loss_scale`: as in [`meta_step`]. With the clean term and no carried pass, the noisy and
    clean rows go through the model as one batch ([`_joined_main_loss_and_grads`]): one forward and backward, not two.
    """
    if clean_in_main_loss and carried_clean_pass is None:
        main_grads, main_loss, corrected = _joined_main_loss_and_grads(
            model, corrector, head, batch, autocast=autocast, loss_scale=loss_scale
        )
    else:
        main = _main_loss_and_grads(
            model,
            corrector,
            head,
            batch,
            clean_in_main_loss=clean_in_main_loss,
            autocast=autocast,
            carried=carried_clean_pass,
            loss_scale=loss_scale,
        )
        main_grads, main_loss, corrected = main.main_grads, main.main_loss, main.corrected
    _reduce_dict(reduce, main_grads)
    nan = torch.tensor(float("nan"))
    overflow = _found_inf(loss_scale, reduce)
    return MetaStepOutput(main_grads, [], main_loss, nan, corrected.detach(), None, overflow=overflow)


def _joined_main_loss_and_grads(
    model: nn.Module,
    corrector: nn.Module,
    head: nn.Module,
    batch: MetaBatch,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_scale: LossScale | None = None,
) -> tuple[ParamDict, torch.Tensor, torch.Tensor]:
    """
    The main loss at w with its clean term ([`MainLossWeights`]: every row counts once) and its gradient, from one
    forward and backward over the noisy and clean rows joined into one batch ([`join_inputs`]); the corrector reads
    the noisy rows' features. The same loss and gradient as [`_main_loss_and_grads`] up to rounding (and dropout's
    draws); a step that needs the noisy part's gradient alone (the meta step) cannot use it.

    Returns:
        `(main_grads, main_loss, corrected)`: the detached gradient by name, the loss and the corrected labels.
    """
    params = trainable_parameters(model)
    num_noisy = len(batch.noisy_labels)
    inputs = join_inputs(batch.noisy_inputs, batch.clean_inputs, getattr(model.config, "pad_token_id", None))
    with autocast(), capture_head_features(head) as store:
        logits = model(**inputs).logits
    corrected = correct(corrector, store["features"][:num_noisy], batch.noisy_labels, logits[:num_noisy])
    weights = MainLossWeights.for_rows(num_noisy, len(batch.clean_labels))
    noisy_loss = soft_cross_entropy(logits[:num_noisy], corrected.detach())
    clean_loss = nn.functional.cross_entropy(_upcast(logits[num_noisy:]), batch.clean_labels)
    loss = weights.noisy * noisy_loss + weights.clean * clean_loss
    return unscaled_grads(loss, params, loss_scale), loss.detach(), corrected


def meta_step(
    model: nn.Module,
    corrector: nn.Module,
    head: nn.Module,
    batch: MetaBatch,
    optimizer: torch.optim.Optimizer,
    *,
    meta_gradient: str = "jvp",
    clean_in_main_loss: bool = True,
    lookahead: LookaheadBuffer | None = None,
    reduce: Reduce | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_grad_norm: float | None = None,
    carried_clean_pass: CleanPass | None = None,
    keep_clean_pass: bool = False,
    loss_scale: LossScale | None = None,
) -> MetaStepOutput:
    """
    One MLC meta step: main loss at w, virtual step, clean loss at w', meta-gradient. Neither net is updated here.

    Args:
        model: the (unwrapped) main net, a sequence classifier returning `.logits`.
        corrector: the label corrector, called as `corrector(features, noisy_labels)`.
        head: the module whose input holds the features the corrector reads.
        batch: the noisy and clean batches.
        optimizer: the main optimizer, whose update the virtual step reproduces.
        meta_gradient: `"jvp"` (forward mode, exact), `"fd"` / `"fd_central"` (finite differences of the noisy
            logits) or `"reference"` (double backward, the paper's kernel).
        clean_in_main_loss: whether the clean batch also enters the main loss with its true labels.
        lookahead: the k-step buffer; when it holds an earlier meta-gradient the discount gamma is computed.
        reduce: averages a list of tensors across processes in place (DDP); `None` on one process.
        autocast: a context manager factory for mixed precision.
        max_grad_norm: the real step's gradient clipping (`TrainingArguments.max_grad_norm`), which the virtual step
            reproduces.
        carried_clean_pass: the clean term of the main loss, already computed at this step's w (the previous meta
            step's `clean_pass`, valid only if the real step applied exactly that step's virtual update). Unused when
            the look-ahead discount needs this batch's own clean gradient at w. Consumed when used: its `grads` are
            emptied once added into the main gradient, so that the caller's reference holds no copy through the step.
        keep_clean_pass: return the clean loss and gradient at w' as `clean_pass` (costs one parameter-sized copy,
            kept until the caller drops it).
        loss_scale: fp16 loss scaling ([`LossScale`]): every backward (main loss, clean loss at w', the
            meta-gradient's) runs on a scaled loss and its gradient is unscaled; every gradient returned is unscaled,
            and `overflow` tells whether any held an inf or NaN.
    """
    if meta_gradient not in META_GRADIENTS:
        raise ValueError(f"meta_gradient must be one of {', '.join(META_GRADIENTS)}, got {meta_gradient!r}")
    if keep_clean_pass and batch.meta_inputs is not None:
        raise ValueError("keep_clean_pass needs the meta objective on the clean batch itself (no separate meta batch)")
    reference = meta_gradient == "reference"
    need_discount = lookahead is not None and lookahead.needs_discount
    rng_before_noisy = _rng_state(batch.noisy_labels.device)
    main = _main_loss_and_grads(
        model,
        corrector,
        head,
        batch,
        clean_in_main_loss=clean_in_main_loss,
        need_clean_grads=need_discount,
        create_graph=reference,
        autocast=autocast,
        carried=carried_clean_pass,
        loss_scale=loss_scale,
    )
    carried_clean_pass = None  # its gradient is in main_grads now; do not hold it longer
    params, main_grads, corrected = main.params, main.main_grads, main.corrected
    _reduce_dict(reduce, main_grads)
    _reduce_dict(reduce, main.clean_grads)

    virtual_params, virtual_lr = virtual_step(params, main_grads, optimizer, max_grad_norm)
    meta_inputs, meta_labels = batch.objective
    clean_loss, clean_grads_virtual = loss_and_grads(
        model, meta_inputs, meta_labels, params=virtual_params, autocast=autocast, loss_scale=loss_scale
    )
    del virtual_params  # w' is needed for the clean pass only; free it before the meta-gradient's pass
    _reduce_dict(reduce, clean_grads_virtual)
    clean_pass = CleanPass(clean_loss, clean_grads_virtual, len(meta_labels)) if keep_clean_pass else None
    # v = L * g' and, with the look-ahead, gamma's terms, reading L a chunk at a time (for Adam it is computed when
    # read). Unless the clean pass is kept, g' is read nowhere else: scale it in place instead of copying it.
    direction, numerator, norm_sq = scaled_direction(
        clean_grads_virtual, virtual_lr, in_place=not keep_clean_pass, clean_grads=main.clean_grads
    )
    gamma = _discount(numerator, norm_sq) if need_discount else None
    del clean_grads_virtual, virtual_lr
    main.clean_grads = None

    meta_params = [param for param in corrector.parameters() if param.requires_grad]
    if reference:
        proxy = -sum((main.noisy_grads[name] * direction[name]).sum() for name in params)
        meta_grads = torch.autograd.grad(proxy, meta_params, allow_unused=True)
    else:
        directional = _directional_derivative(
            model, params, batch, direction, main.noisy_logits, meta_gradient, autocast, rng_before_noisy
        )
        del direction
        upstream = (main.noisy_weight / len(batch.noisy_labels)) * directional.to(corrected.dtype)
        upstream = _scaled(upstream, loss_scale)
        meta_grads = torch.autograd.grad(corrected, meta_params, grad_outputs=upstream, allow_unused=True)
    meta_grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(meta_params, meta_grads)]
    _unscale_(meta_grads, loss_scale)
    if reduce is not None:
        reduce(meta_grads)
    overflow = _found_inf(loss_scale, reduce)
    return MetaStepOutput(
        main_grads, meta_grads, main.main_loss, clean_loss, corrected.detach(), gamma, clean_pass, overflow
    )


def _directional_derivative(model, params, batch, direction, noisy_logits, meta_gradient, autocast, rng_state):
    """J v of the noisy batch's logits along `direction` (consumed), by forward mode or finite differences."""
    if meta_gradient == "jvp":
        with _replay_rng(rng_state):
            return logits_jvp(model, params, batch.noisy_inputs, direction, autocast=autocast, overwrite_tangents=True)
    return logits_finite_difference(
        model,
        params,
        batch.noisy_inputs,
        direction,
        noisy_logits,
        autocast=autocast,
        central=meta_gradient == "fd_central",
        rng_state=rng_state,
        overwrite_tangents=True,
    )
