r"""
The maths of the meta step: the virtual (look-ahead) update of the main net and the meta-gradient of the clean loss
after it with respect to the label corrector's parameters.

Notation (paper, eq. 6): main weights w, corrector parameters a, noisy-batch loss against corrected labels
L'(w, a), clean loss L(w). One step of the main optimizer is w' = w - L * dL'/dw, with L diagonal (for SGD a scalar
per tensor, for Adam the current preconditioner, held constant). The meta-gradient is

    dL(w')/da = -(d/da) <dL'/dw (w, a), L * g'>,   g' = dL/dw at w' held constant.

Two ways to compute it, selected by `meta_gradient`:

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
earlier meta-gradient (identity-Hessian approximation), see [`discount_factor`] and [`LookaheadBuffer`]. The optimizer
mirror of the virtual step lives in virtual_step.py (its names are importable from here too). Under fp16 every
backward here runs on a loss-scaled loss ([`LossScale`]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .meta_net import capture_head_features
from .virtual_step import (  # the optimizer mirror lives in virtual_step.py; its names stay importable from here
    SUPPORTED_OPTIMIZERS,
    ParamDict,
    VirtualRates,
    _adam_moments,  # noqa: F401
    _adam_step,  # noqa: F401
    _param_groups,  # noqa: F401
    _sgd_rate,  # noqa: F401
    _sgd_step,  # noqa: F401
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
]

Reduce = Callable[[list[torch.Tensor]], None]
META_GRADIENTS = ("jvp", "fd", "fd_central", "reference")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the main optimizer updates, by name."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """To float32 at least (losses under bf16 / fp16 autocast), keeping float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k targets_k * log softmax(logits)_k, computed in float32 or wider."""
    logits = _upcast(logits)
    return -(targets.to(logits.dtype) * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


class LossScale:
    """
    fp16 loss scaling of hand-computed gradients, as `torch.amp.GradScaler` does it for `.backward()`: each loss is
    multiplied by `scale` before its backward, each gradient divided by it after, and every inf or NaN met while
    dividing is recorded, so that the step can be skipped ([`LossScale.found_inf`]).

    Args:
        scale: the current scale, a float or a one-element tensor (`GradScaler.scale(torch.ones(()))` gives it
            without a host sync).
        device: where the gradients live.
    """

    def __init__(self, scale: float | torch.Tensor, device: torch.device | str = "cpu"):
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(())
        self._inverse = self.scale.double().reciprocal().float()  # as GradScaler computes it
        self._found_inf = torch.zeros(1, device=device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale.to(loss.dtype)

    def unscale_(self, tensors: list[torch.Tensor]) -> None:
        """Divides `tensors` by the scale in place, recording whether any value is inf or NaN."""
        if tensors:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, self._found_inf, self._inverse)

    def found_inf(self, reduce: Reduce | None = None) -> bool:
        """Whether any unscaled value was inf or NaN, on any process (`reduce` averages the flag across them)."""
        flag = self._found_inf.clone()
        if reduce is not None:
            reduce([flag])
        return bool(flag.item() > 0)


def _scaled(loss: torch.Tensor, loss_scale: LossScale | None) -> torch.Tensor:
    return loss if loss_scale is None else loss_scale.scale_loss(loss)


def _unscale_(grads: ParamDict | list[torch.Tensor], loss_scale: LossScale | None) -> None:
    if loss_scale is not None:
        loss_scale.unscale_(list(grads.values()) if isinstance(grads, dict) else grads)


def loss_and_grads(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    weights: torch.Tensor | None = None,
    loss_scale: LossScale | None = None,
) -> tuple[torch.Tensor, ParamDict]:
    """
    Cross-entropy of `model` on a labelled batch and its gradient, at the model's own weights or at `params`: the
    mean over rows, or `sum_i weights_i * loss_i` when per-row `weights` are given. With `loss_scale` (fp16), the
    backward runs on the scaled loss and the gradient is unscaled (inf / NaN recorded in `loss_scale`).

    Returns:
        `(loss, grads)`: the detached (unscaled) loss and the detached gradient by parameter name.
    """
    if params is None:
        leaves = trainable_parameters(model)
        with autocast():
            logits = model(**inputs).logits
    else:
        leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
        with autocast():
            logits = functional_call(model, leaves, args=(), kwargs=inputs).logits
    if weights is None:
        loss = nn.functional.cross_entropy(_upcast(logits), labels)
    else:
        losses = nn.functional.cross_entropy(_upcast(logits), labels, reduction="none")
        loss = (weights.to(losses.dtype) * losses).sum()
    grads = _named(leaves, torch.autograd.grad(_scaled(loss, loss_scale), list(leaves.values()), allow_unused=True))
    _unscale_(grads, loss_scale)
    return loss.detach(), grads


def _named(leaves: dict[str, torch.Tensor], grads) -> ParamDict:
    return {
        name: torch.zeros_like(leaf) if grad is None else grad for (name, leaf), grad in zip(leaves.items(), grads)
    }


@contextlib.contextmanager
def _replay_rng(state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Runs the block with the RNG state saved in `state`, then restores the current one (same dropout masks)."""
    devices = [torch.cuda.current_device()] if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        yield


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def logits_jvp(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    tangents: ParamDict,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    return_logits: bool = False,
    overwrite_tangents: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """
    Directional derivative of the batch's logits along `tangents`: (dz/dw) v, by one forward-mode pass. With
    `return_logits`, also the logits z themselves (the same pass computes them): `(logits, directional)`. With
    `overwrite_tangents`, the tangents are rescaled in place (no copy of v; the caller must not read them after).

    Attention runs on SDPA's math backend here: the fused CPU kernels have no forward-mode derivative.
    """
    names = list(params)
    primals = tuple(params[name].detach() for name in names)
    # The product is linear in the tangent: run it at unit norm, so that tiny steps (learning rate x gradient)
    # neither underflow in half precision nor lose bits, and scale back afterwards.
    norm = _total_norm([tangents[name] for name in names])
    if norm == 0:
        norm = torch.ones_like(norm)  # zero tangent: the product is zero either way

    def logits_at(*values):
        return functional_call(model, dict(zip(names, values)), args=(), kwargs=inputs).logits

    scaled = [tangents[name] for name in names]
    if overwrite_tangents:
        torch._foreach_div_(scaled, norm.to(scaled[0].dtype))
    else:
        scaled = torch._foreach_div(scaled, norm.to(scaled[0].dtype))
    unit = tuple(tangent.to(value.dtype) for tangent, value in zip(scaled, primals))
    del scaled
    with sdpa_kernel([SDPBackend.MATH]), autocast():
        logits, tangent_out = torch.func.jvp(logits_at, primals, unit)
    del unit
    return (logits, tangent_out * norm) if return_logits else tangent_out * norm


def finite_difference_step(params: dict[str, torch.Tensor], dtype: torch.dtype, central: bool = False) -> float:
    """
    The length h of the finite-difference step along the unit direction: `eps ** (1/2)` (forward) or `eps ** (1/3)`
    (central) of the logits' dtype, times `1 + rms(w)`, the root mean square of the weights: the textbook balance of
    rounding (which grows as h shrinks) against curvature (which grows with h) for weights of that size.
    """
    eps = torch.finfo(dtype).eps
    count = sum(param.numel() for param in params.values())
    rms = (_total_norm([param.detach() for param in params.values()]) / max(count, 1) ** 0.5).item()
    return eps ** (1 / 3 if central else 1 / 2) * (1.0 + rms)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the concatenation of `tensors`, in float32 at least, by multi-tensor ops."""
    norms = torch._foreach_norm(tensors, dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    return torch.linalg.vector_norm(torch.stack(norms))


def logits_finite_difference(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    tangents: ParamDict,
    logits: torch.Tensor | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    central: bool = False,
    rng_state: dict[str, torch.Tensor] | None = None,
    overwrite_tangents: bool = False,
) -> torch.Tensor:
    """
    Directional derivative of the batch's logits along `tangents`, (dz/dw) v, by a finite difference: forward
    `(z(w + h u) - z(w)) / h * |v|` with `logits` = z(w) already computed, or central `(z(w + h u) - z(w - h u)) / 2h
    * |v|`, u = v / |v| and h from [`finite_difference_step`]. Each forward runs without a graph, with the RNG state
    `rng_state` (the one the logits at w were computed with, so that dropout draws the same masks), and writes no
    parameter: the shifted weights are a copy, read through `functional_call`. With `overwrite_tangents` (forward
    difference only), the shifted weights are formed in the tangents' place instead (no copy; the caller must not
    read them after).
    """
    if logits is None and not central:
        raise ValueError("the forward difference needs the logits at w (pass logits, or central=True)")
    names = list(params)
    weights = [params[name].detach() for name in names]
    directions = [tangents[name].to(weight.dtype) for name, weight in zip(names, weights)]
    norm = _total_norm(directions)
    logits_dtype = logits.dtype if logits is not None else weights[0].dtype
    step = finite_difference_step(params, logits_dtype, central)
    scale = step / norm.clamp_min(torch.finfo(norm.dtype).tiny)  # a zero tangent gives a zero product

    in_place = overwrite_tangents and not central and all(d is tangents[n] for d, n in zip(directions, names))

    def logits_at(sign: float) -> torch.Tensor:
        factor = (sign * scale).to(weights[0].dtype)
        shifted = directions if in_place else torch._foreach_mul(directions, factor)
        if in_place:
            torch._foreach_mul_(shifted, factor)
        torch._foreach_add_(shifted, weights)
        rng = _replay_rng(rng_state) if rng_state is not None else contextlib.nullcontext()
        with torch.no_grad(), rng, autocast():
            return _upcast(functional_call(model, dict(zip(names, shifted)), args=(), kwargs=inputs).logits)

    if central:
        return (logits_at(1.0) - logits_at(-1.0)) * (norm / (2 * step))
    return (logits_at(1.0) - _upcast(logits.detach())) * (norm / step)


def discount_factor(clean_grads: ParamDict, clean_grads_virtual: ParamDict, virtual_lr: dict) -> torch.Tensor:
    """
    The k-step look-ahead discount gamma = <(I - L H) g', g> / |g|^2 with the Hessian H taken as the identity,
    g the clean gradient at w and g' the clean gradient at w'.
    """
    numerator, norm_sq = 0.0, 0.0
    for name, grad in clean_grads.items():
        term, square = _discount_terms(grad, clean_grads_virtual[name], virtual_lr[name])
        numerator, norm_sq = numerator + term, norm_sq + square
    return _discount(numerator, norm_sq)


def _discount_terms(grad: torch.Tensor, grad_virtual: torch.Tensor, rate) -> tuple[torch.Tensor, torch.Tensor]:
    # One parameter's share of gamma's numerator <(1 - L) g', g> and denominator |g|^2.
    return ((1 - rate) * grad_virtual * grad).sum(), grad.square().sum()


def _discount(numerator: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
    return numerator / norm_sq.clamp_min(torch.finfo(norm_sq.dtype).tiny)


class LookaheadBuffer:
    """
    The paper's k-step look-ahead: meta-gradients are accumulated as `total = current + gamma * previous_total` and
    the corrector's optimizer steps every `gradient_steps` meta steps, after which the buffer is reset.
    """

    def __init__(self, gradient_steps: int = 1):
        if gradient_steps < 1:
            raise ValueError(f"gradient_steps must be >= 1, got {gradient_steps}")
        self.gradient_steps = gradient_steps
        self.previous: list[torch.Tensor] | None = None
        self.count = 0

    @property
    def needs_discount(self) -> bool:
        """Whether the next accumulation uses gamma (never with `gradient_steps == 1`: the buffer is always empty)."""
        return self.previous is not None

    def accumulate(self, meta_grads: list[torch.Tensor], gamma: torch.Tensor | float | None) -> list[torch.Tensor]:
        """Adds the discounted previous total to `meta_grads`; returns the new total and counts one meta step."""
        if self.previous is not None:
            meta_grads = [grad + gamma * prev for grad, prev in zip(meta_grads, self.previous)]
        self.count += 1
        self.previous = None if self.should_step else [grad.detach().clone() for grad in meta_grads]
        return meta_grads

    @property
    def should_step(self) -> bool:
        """True right after the k-th accumulation of a window: the corrector's optimizer should step now."""
        return self.count % self.gradient_steps == 0

    def state_dict(self) -> dict:
        return {"gradient_steps": self.gradient_steps, "count": self.count, "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.gradient_steps, self.count, self.previous = state["gradient_steps"], state["count"], state["previous"]


@dataclass
class MetaBatch:
    """
    A noisy batch (model inputs and given labels) and a clean batch (inputs and true labels). The meta objective is
    the clean batch's loss at w' unless a separate meta batch (`meta_inputs`, `meta_labels`: trusted rows kept out of
    the main loss) is given.
    """

    noisy_inputs: dict[str, torch.Tensor]
    noisy_labels: torch.Tensor
    clean_inputs: dict[str, torch.Tensor]
    clean_labels: torch.Tensor
    meta_inputs: dict[str, torch.Tensor] | None = None
    meta_labels: torch.Tensor | None = None

    @property
    def objective(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The rows of the meta objective: `(inputs, true labels)`."""
        if self.meta_inputs is None:
            return self.clean_inputs, self.clean_labels
        return self.meta_inputs, self.meta_labels


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


def _reduce_dict(reduce: Reduce | None, grads: ParamDict | None) -> None:
    if reduce is not None and grads is not None:
        reduce(list(grads.values()))


def _found_inf(loss_scale: LossScale | None, reduce: Reduce | None) -> bool:
    return loss_scale is not None and loss_scale.found_inf(reduce)


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
    model,
    corrector,
    head,
    batch: MetaBatch,
    clean_in_main_loss,
    need_clean_grads,
    create_graph,
    autocast,
    carried,
    loss_scale: LossScale | None = None,
) -> _MainPass:
    """
    Main loss at w: the noisy batch against corrected labels (+ the clean batch with its true labels), and grads.
    With a `carried` clean pass at w (and no need of this clean batch's own gradient at w), the clean term is taken
    from it instead of a forward/backward of `batch`'s clean rows.
    """
    use_carried = carried is not None and clean_in_main_loss and not need_clean_grads
    params = trainable_parameters(model)
    # Double backward needs attention on SDPA's math backend: the fused CPU kernels have no second derivative.
    attention = sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()
    with attention, autocast(), capture_head_features(head) as store:
        noisy_logits = model(**batch.noisy_inputs).logits
    corrected = corrector(store["features"], batch.noisy_labels)
    noisy_loss = soft_cross_entropy(noisy_logits, corrected if create_graph else corrected.detach())

    num_noisy = len(batch.noisy_labels)
    num_clean = carried.num_rows if use_carried else len(batch.clean_labels)
    noisy_weight = num_noisy / (num_noisy + num_clean) if clean_in_main_loss else 1.0
    grads = torch.autograd.grad(
        _scaled(noisy_weight * noisy_loss, loss_scale),
        list(params.values()),
        create_graph=create_graph,
        allow_unused=True,
    )
    noisy_grads = _named(params, grads)
    main_grads = {name: grad.detach() for name, grad in noisy_grads.items()}
    if loss_scale is not None and create_graph:  # `noisy_grads` stay scaled: the proxy's backward unscales
        main_grads = {name: grad.clone() for name, grad in main_grads.items()}
    _unscale_(main_grads, loss_scale)
    main_loss = noisy_weight * noisy_loss.detach()
    clean_grads = None
    if clean_in_main_loss or need_clean_grads:
        if use_carried:
            clean_loss_at_w, clean_grads = carried.loss, carried.grads
        else:
            clean_loss_at_w, clean_grads = loss_and_grads(
                model, batch.clean_inputs, batch.clean_labels, autocast=autocast, loss_scale=loss_scale
            )
        if clean_in_main_loss:
            main_loss = main_loss + (1 - noisy_weight) * clean_loss_at_w
            if create_graph:  # `noisy_grads` must stay as they are (they carry the graph the meta-gradient needs)
                main_grads = {name: g + (1 - noisy_weight) * clean_grads[name] for name, g in main_grads.items()}
            else:  # fresh tensors of autograd.grad, read nowhere else: add in place, no second copy of the gradient
                grads = list(main_grads.values())
                torch._foreach_add_(grads, [clean_grads[name] for name in main_grads], alpha=1 - noisy_weight)
        if not need_clean_grads:
            clean_grads = None  # only the look-ahead discount reads them: free them now
    if use_carried:
        # Consumed: its gradient is in main_grads now. Emptied so that it is not held through the rest of the step
        # by whoever still refers to the CleanPass (the trainer's call): one parameter-sized copy less at the peak.
        carried.grads = {}
    return _MainPass(
        params, noisy_grads, main_grads, main_loss, clean_grads, corrected, noisy_weight, noisy_logits.detach()
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
    `carried_clean_pass`, `loss_scale`: as in [`meta_step`].
    """
    main = _main_loss_and_grads(
        model, corrector, head, batch, clean_in_main_loss, False, False, autocast, carried_clean_pass, loss_scale
    )
    _reduce_dict(reduce, main.main_grads)
    nan = torch.tensor(float("nan"))
    overflow = _found_inf(loss_scale, reduce)
    return MetaStepOutput(main.main_grads, [], main.main_loss, nan, main.corrected.detach(), None, overflow=overflow)


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
        clean_in_main_loss,
        need_discount,
        reference,
        autocast,
        carried_clean_pass,
        loss_scale,
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


def l2rw_weights(
    model: nn.Module,
    batch: MetaBatch,
    optimizer: torch.optim.Optimizer,
    *,
    reduce: Reduce | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_scale: LossScale | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Learning to Reweight (Ren et al., 2018) with the same virtual-step machinery: per-example weights of the noisy
    batch from the gradient of the clean loss after a virtual step on the weighted noisy loss, at weights eps = 0.

    With eps = 0 the virtual step sees a zero gradient, so w' = virtual_step(w, 0) and
    -dL_clean(w')/deps_i = <dl_i/dw, L g'> = (softmax(z_i) - onehot(y_i)) . (J_i v), v = L g': one forward-mode pass.
    Weights are the positive part, normalised to sum to 1 over the global batch (all processes). With `loss_scale`
    (fp16), the clean gradient at w' comes from a scaled loss and is unscaled (inf / NaN recorded there).

    Returns:
        `(weights, clean_loss)`: detached weights of shape `(batch,)` and the clean loss at w'.
    """
    params = trainable_parameters(model)
    zeros = {name: torch.zeros_like(param) for name, param in params.items()}
    virtual_params, virtual_lr = virtual_step(params, zeros, optimizer)
    clean_loss, clean_grads_virtual = loss_and_grads(
        model, batch.clean_inputs, batch.clean_labels, params=virtual_params, autocast=autocast, loss_scale=loss_scale
    )
    del virtual_params
    _reduce_dict(reduce, clean_grads_virtual)
    direction, _, _ = scaled_direction(clean_grads_virtual, virtual_lr)
    del clean_grads_virtual, virtual_lr, zeros
    logits, directional = logits_jvp(model, params, batch.noisy_inputs, direction, autocast, return_logits=True)
    logits = _upcast(logits.detach())
    residual = torch.softmax(logits, dim=-1) - nn.functional.one_hot(batch.noisy_labels, logits.shape[-1])
    raw = (residual * directional.to(logits.dtype)).sum(-1).clamp_min(0)
    # Normalise by the mean over processes of the local sums: averaging the processes' gradients then gives
    # sum_i w_i dl_i/dw over the global batch with sum_i w_i = 1, as on one process.
    total = raw.sum().reshape(1)
    if reduce is not None:
        reduce([total])
    weights = raw / total if total.item() > 0 else torch.zeros_like(raw)
    return weights.detach(), clean_loss
