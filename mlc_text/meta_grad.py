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

`"jvp"` and `"reference"` are exact; they differ only in cost. The k-step look-ahead of the paper adds a discounted earlier
meta-gradient (identity-Hessian approximation), see [`discount_factor`] and [`LookaheadBuffer`].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .meta_net import capture_head_features

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

ParamDict = dict[str, torch.Tensor]
Reduce = Callable[[list[torch.Tensor]], None]
SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
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


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside an accelerate `AcceleratedOptimizer` (or the optimizer itself)."""
    while type(optimizer) not in SUPPORTED_OPTIMIZERS and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """
    Checks that the virtual step can reproduce `optimizer`'s update.

    Raises:
        ValueError: for optimizers other than SGD, Adam and AdamW, and for `maximize=True`.
    """
    inner = unwrap_optimizer(optimizer)
    if type(inner) not in SUPPORTED_OPTIMIZERS:
        raise ValueError(
            f"MLC's virtual step supports the main optimizers torch.optim.SGD, Adam and AdamW "
            f"(optim='sgd', 'adamw_torch' or 'adamw_torch_fused'), got {type(inner).__name__}"
        )
    for group in inner.param_groups:
        if group.get("maximize", False):
            raise ValueError("MLC's virtual step does not support maximize=True in the main optimizer")
    return inner


def _param_groups(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(param): group for group in optimizer.param_groups for param in group["params"]}


def clip_coefficient(grads: ParamDict, max_grad_norm: float | None) -> float:
    """
    The factor `torch.nn.utils.clip_grad_norm_` (the `Trainer`'s `max_grad_norm`) scales the gradient by:
    `min(1, max_grad_norm / (total 2-norm + 1e-6))`, or 1 when `max_grad_norm` is `None` or <= 0. A plain float: the
    virtual step holds it constant, as it holds L constant.
    """
    if max_grad_norm is None or max_grad_norm <= 0:
        return 1.0
    total = torch.nn.utils.get_total_norm([grad.detach() for grad in grads.values()]).item()
    return min(1.0, max_grad_norm / (total + 1e-6))


def _sgd_rate(group, state, coef: float) -> float:
    # d(update)/d(raw gradient) of torch.optim.SGD on the clipped gradient coef * grad: lr x (coef, x (1 - dampening)
    # once a momentum buffer exists, + momentum x that for Nesterov).
    scale = coef
    if group["momentum"] and state.get("momentum_buffer") is not None:
        scale = coef * (1.0 - group["dampening"])
    if group["momentum"] and group["nesterov"]:
        scale = coef + group["momentum"] * scale
    return float(group["lr"]) * scale


def _sgd_step(param, grad, group, state, coef: float = 1.0) -> torch.Tensor:
    # Mirrors torch.optim.SGD (whose first step copies the gradient into the momentum buffer, undampened), on the
    # clipped gradient coef * grad.
    lr, momentum, dampening = float(group["lr"]), group["momentum"], group["dampening"]
    if coef != 1.0:
        grad = coef * grad
    direction = grad + group["weight_decay"] * param if group["weight_decay"] else grad
    if momentum:
        buffer = state.get("momentum_buffer")
        new_buffer = direction if buffer is None else momentum * buffer + (1 - dampening) * direction
        direction = direction + momentum * new_buffer if group["nesterov"] else new_buffer
    return param - lr * direction


def _adam_moments(param, grad, group, state, decoupled: bool, coef: float, first: bool = True):
    # Adam's input gradient (clipped, plus L2 decay for Adam), the bias-corrected denominator of the next step and
    # (if `first`) the new first moment, as torch.optim.Adam / AdamW compute them.
    (beta1, beta2), eps, weight_decay = group["betas"], group["eps"], group["weight_decay"]
    step = float(state["step"]) + 1 if "step" in state else 1.0
    if coef != 1.0:
        grad = coef * grad
    if weight_decay and not decoupled:
        grad = grad + weight_decay * param
    exp_avg_sq = state.get("exp_avg_sq")
    square = grad.detach().square()
    new_exp_avg_sq = (1 - beta2) * square if exp_avg_sq is None else beta2 * exp_avg_sq + (1 - beta2) * square
    del square
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        new_exp_avg_sq = torch.maximum(state["max_exp_avg_sq"], new_exp_avg_sq)
    denom = new_exp_avg_sq.sqrt_().div_((1 - beta2**step) ** 0.5).add_(eps)
    new_exp_avg = None
    if first:
        exp_avg = state.get("exp_avg")
        new_exp_avg = (1 - beta1) * grad if exp_avg is None else beta1 * exp_avg + (1 - beta1) * grad
    return denom, new_exp_avg, 1 - beta1**step


def _adam_step(param, grad, group, state, decoupled: bool, coef: float = 1.0) -> torch.Tensor:
    # Mirrors torch.optim.Adam / AdamW on the clipped gradient coef * grad.
    lr, weight_decay = float(group["lr"]), group["weight_decay"]
    denom, new_exp_avg, bias_correction1 = _adam_moments(param, grad, group, state, decoupled, coef)
    base = param * (1 - lr * weight_decay) if decoupled else param
    return base - (lr / bias_correction1) * new_exp_avg / denom


class VirtualRates(Mapping):
    """
    The diagonal L = dw'/dgrad of a virtual step, by parameter name: a float for SGD, a tensor for Adam / AdamW
    (its preconditioner, held constant). Computed when read, from the optimizer state and the gradient the virtual
    step used, so that no parameter-sized copy of L is held while w' is: read it before the real step, and leave
    the gradient unchanged until then.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], grads: ParamDict, coef, groups
    ):
        self.optimizer, self.params, self.grads, self.coef, self.groups = optimizer, params, grads, coef, groups

    def __getitem__(self, name: str) -> torch.Tensor | float:
        param = self.params[name]
        group, state = self.groups[id(param)], self.optimizer.state.get(param, {})
        if isinstance(self.optimizer, torch.optim.SGD):
            return _sgd_rate(group, state, self.coef)
        decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        beta1 = group["betas"][0]
        denom, _, bias_correction1 = _adam_moments(
            param.detach(), self.grads[name].detach(), group, state, decoupled, self.coef, first=False
        )
        return denom.reciprocal_().mul_(float(group["lr"]) * (1 - beta1) * self.coef / bias_correction1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def virtual_step(
    params: dict[str, torch.Tensor],
    grads: ParamDict,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None = None,
) -> tuple[ParamDict, VirtualRates]:
    """
    The main optimizer's next update applied out of place: w' = w - step(clip(grad)), with its current state,
    param-group hyper-parameters and learning rate (so schedules apply to the virtual step too), and the gradient
    clipped by its global norm as the `Trainer` clips it before the real step (`max_grad_norm`). w' is then the very
    weights the real step reaches with the same gradient.

    Args:
        params: the trainable parameters by name (as registered in `optimizer`).
        grads: the gradient for each parameter (may carry a graph; w' then does too).
        optimizer: a torch SGD, Adam or AdamW (or an accelerate wrapper of one).
        max_grad_norm: the clipping threshold of the real step (`None` or <= 0: no clipping). The clip factor is held
            constant (it enters L).

    Returns:
        `(virtual_params, virtual_lr)`: w' by name, and the diagonal L = dw'/dgrad by name ([`VirtualRates`]: a
        float for SGD, a tensor for Adam, computed when read).
    """
    inner = check_optimizer(optimizer)
    groups = _param_groups(inner)
    coef = clip_coefficient(grads, max_grad_norm)
    virtual_params = {}
    for name, param in params.items():
        group, state = groups[id(param)], inner.state.get(param, {})
        weight = param.detach()
        if isinstance(inner, torch.optim.SGD):
            virtual_params[name] = _sgd_step(weight, grads[name], group, state, coef)
        else:
            decoupled = isinstance(inner, torch.optim.AdamW)
            virtual_params[name] = _adam_step(weight, grads[name], group, state, decoupled, coef)
    return virtual_params, VirtualRates(inner, params, grads, coef, groups)


def loss_and_grads(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ParamDict]:
    """
    Cross-entropy of `model` on a labelled batch and its gradient, at the model's own weights or at `params`: the
    mean over rows, or `sum_i weights_i * loss_i` when per-row `weights` are given.

    Returns:
        `(loss, grads)`: the detached mean loss and the detached gradient by parameter name.
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
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), _named(leaves, grads)


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
    norm = torch.sqrt(sum(tangents[name].float().square().sum() for name in names))
    if norm == 0:
        norm = torch.ones_like(norm)  # zero tangent: the product is zero either way

    def logits_at(*values):
        return functional_call(model, dict(zip(names, values)), args=(), kwargs=inputs).logits

    if overwrite_tangents:
        unit = tuple(tangents[name].div_(norm).to(value.dtype) for name, value in zip(names, primals))
    else:
        unit = tuple((tangents[name] / norm).to(value.dtype) for name, value in zip(names, primals))
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
    total = sum(param.detach().float().square().sum() for param in params.values())
    count = sum(param.numel() for param in params.values())
    rms = torch.sqrt(total / max(count, 1)).item()
    return eps ** (1 / 3 if central else 1 / 2) * (1.0 + rms)


def logits_finite_difference(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    tangents: ParamDict,
    logits: torch.Tensor | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    central: bool = False,
    rng_state: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """
    Directional derivative of the batch's logits along `tangents`, (dz/dw) v, by a finite difference: forward
    `(z(w + h u) - z(w)) / h * |v|` with `logits` = z(w) already computed, or central `(z(w + h u) - z(w - h u)) / 2h
    * |v|`, u = v / |v| and h from [`finite_difference_step`]. Each forward runs without a graph, with the RNG state
    `rng_state` (the one the logits at w were computed with, so that dropout draws the same masks), and writes no
    parameter: the shifted weights are a copy, read through `functional_call`.
    """
    names = list(params)
    norm = torch.sqrt(sum(tangents[name].float().square().sum() for name in names))
    if logits is None and not central:
        raise ValueError("the forward difference needs the logits at w (pass logits, or central=True)")
    logits_dtype = logits.dtype if logits is not None else next(iter(params.values())).dtype
    step = finite_difference_step(params, logits_dtype, central)
    scale = step / norm.clamp_min(torch.finfo(norm.dtype).tiny)  # a zero tangent gives a zero product

    def logits_at(sign: float) -> torch.Tensor:
        shifted = {
            name: params[name].detach() + (sign * scale) * tangents[name].to(params[name].dtype) for name in names
        }
        rng = _replay_rng(rng_state) if rng_state is not None else contextlib.nullcontext()
        with torch.no_grad(), rng, autocast():
            return _upcast(functional_call(model, shifted, args=(), kwargs=inputs).logits)

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
    """

    main_grads: ParamDict
    meta_grads: list[torch.Tensor]
    main_loss: torch.Tensor
    clean_loss: torch.Tensor
    corrected_labels: torch.Tensor
    gamma: torch.Tensor | None = None
    clean_pass: CleanPass | None = None


def _reduce_dict(reduce: Reduce | None, grads: ParamDict | None) -> None:
    if reduce is not None and grads is not None:
        reduce(list(grads.values()))


@dataclass
class _MainPass:
    params: dict[str, nn.Parameter]
    noisy_grads: ParamDict  # the noisy part's gradient with its graph (create_graph); else it aliases main_grads
    main_grads: ParamDict
    main_loss: torch.Tensor
    clean_grads: ParamDict | None
    corrected: torch.Tensor
    noisy_weight: float
    noisy_logits: torch.Tensor  # detached


def _main_loss_and_grads(
    model, corrector, head, batch: MetaBatch, clean_in_main_loss, need_clean_grads, create_graph, autocast, carried
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
        noisy_weight * noisy_loss, list(params.values()), create_graph=create_graph, allow_unused=True
    )
    noisy_grads = _named(params, grads)
    main_grads = {name: grad.detach() for name, grad in noisy_grads.items()}
    main_loss = noisy_weight * noisy_loss.detach()
    clean_grads = None
    if clean_in_main_loss or need_clean_grads:
        if use_carried:
            clean_loss_at_w, clean_grads = carried.loss, carried.grads
        else:
            clean_loss_at_w, clean_grads = loss_and_grads(
                model, batch.clean_inputs, batch.clean_labels, autocast=autocast
            )
        if clean_in_main_loss:
            main_loss = main_loss + (1 - noisy_weight) * clean_loss_at_w
            if create_graph:  # `noisy_grads` must stay as they are (they carry the graph the meta-gradient needs)
                main_grads = {name: g + (1 - noisy_weight) * clean_grads[name] for name, g in main_grads.items()}
            else:  # fresh tensors of autograd.grad, read nowhere else: add in place, no second copy of the gradient
                for name, grad in main_grads.items():
                    grad.add_(clean_grads[name], alpha=1 - noisy_weight)
        if not need_clean_grads:
            clean_grads = None  # only the look-ahead discount reads them: free them now
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
) -> MetaStepOutput:
    """
    The main-net half of a step without the meta step (between meta updates, `meta_update_interval > 1`): the
    gradient of the main loss against the current corrector's labels. `meta_grads` is empty, `clean_loss` is NaN.
    `carried_clean_pass`: as in [`meta_step`].
    """
    main = _main_loss_and_grads(
        model, corrector, head, batch, clean_in_main_loss, False, False, autocast, carried_clean_pass
    )
    _reduce_dict(reduce, main.main_grads)
    nan = torch.tensor(float("nan"))
    return MetaStepOutput(main.main_grads, [], main.main_loss, nan, main.corrected.detach(), None)


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
            the look-ahead discount needs this batch's own clean gradient at w.
        keep_clean_pass: return the clean loss and gradient at w' as `clean_pass` (costs one parameter-sized copy,
            kept until the caller drops it).
    """
    if meta_gradient not in META_GRADIENTS:
        raise ValueError(f"meta_gradient must be one of {', '.join(META_GRADIENTS)}, got {meta_gradient!r}")
    if keep_clean_pass and batch.meta_inputs is not None:
        raise ValueError("keep_clean_pass needs the meta objective on the clean batch itself (no separate meta batch)")
    reference = meta_gradient == "reference"
    need_discount = lookahead is not None and lookahead.needs_discount
    rng_before_noisy = _rng_state(batch.noisy_labels.device)
    main = _main_loss_and_grads(
        model, corrector, head, batch, clean_in_main_loss, need_discount, reference, autocast, carried_clean_pass
    )
    carried_clean_pass = None  # its gradient is in main_grads now; do not hold it longer
    params, main_grads, clean_grads, corrected = main.params, main.main_grads, main.clean_grads, main.corrected
    _reduce_dict(reduce, main_grads)
    _reduce_dict(reduce, clean_grads)

    virtual_params, virtual_lr = virtual_step(params, main_grads, optimizer, max_grad_norm)
    meta_inputs, meta_labels = batch.objective
    clean_loss, clean_grads_virtual = loss_and_grads(
        model, meta_inputs, meta_labels, params=virtual_params, autocast=autocast
    )
    del virtual_params  # w' is needed for the clean pass only; free it before the meta-gradient's pass
    _reduce_dict(reduce, clean_grads_virtual)
    clean_pass = CleanPass(clean_loss, clean_grads_virtual, len(meta_labels)) if keep_clean_pass else None
    # v = L * g' and, with the look-ahead, gamma's terms, reading each parameter's L once (for Adam it is computed
    # when read). Unless the clean pass is kept, g' is read nowhere else: scale it in place instead of copying it.
    direction, numerator, norm_sq = {}, 0.0, 0.0
    for name, grad in clean_grads_virtual.items():
        rate = virtual_lr[name]
        if need_discount:
            term, square = _discount_terms(clean_grads.pop(name), grad, rate)  # free g as it is read
            numerator, norm_sq = numerator + term, norm_sq + square
        direction[name] = rate * grad if keep_clean_pass else grad.mul_(rate)
    gamma = _discount(numerator, norm_sq) if need_discount else None
    del clean_grads_virtual, virtual_lr
    clean_grads = main.clean_grads = None

    meta_params = [param for param in corrector.parameters() if param.requires_grad]
    if reference:
        proxy = -sum((main.noisy_grads[name] * direction[name]).sum() for name in params)
        meta_grads = torch.autograd.grad(proxy, meta_params, allow_unused=True)
    else:
        if meta_gradient == "jvp":
            with _replay_rng(rng_before_noisy):
                directional = logits_jvp(
                    model, params, batch.noisy_inputs, direction, autocast=autocast, overwrite_tangents=True
                )
        else:
            directional = logits_finite_difference(
                model,
                params,
                batch.noisy_inputs,
                direction,
                main.noisy_logits,
                autocast=autocast,
                central=meta_gradient == "fd_central",
                rng_state=rng_before_noisy,
            )
        del direction
        upstream = (main.noisy_weight / len(batch.noisy_labels)) * directional.to(corrected.dtype)
        meta_grads = torch.autograd.grad(corrected, meta_params, grad_outputs=upstream, allow_unused=True)
    meta_grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(meta_params, meta_grads)]
    if reduce is not None:
        reduce(meta_grads)
    return MetaStepOutput(main_grads, meta_grads, main.main_loss, clean_loss, corrected.detach(), gamma, clean_pass)


def l2rw_weights(
    model: nn.Module,
    batch: MetaBatch,
    optimizer: torch.optim.Optimizer,
    *,
    reduce: Reduce | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Learning to Reweight (Ren et al., 2018) with the same virtual-step machinery: per-example weights of the noisy
    batch from the gradient of the clean loss after a virtual step on the weighted noisy loss, at weights eps = 0.

    With eps = 0 the virtual step sees a zero gradient, so w' = virtual_step(w, 0) and
    -dL_clean(w')/deps_i = <dl_i/dw, L g'> = (softmax(z_i) - onehot(y_i)) . (J_i v), v = L g': one forward-mode pass.
    Weights are the positive part, normalised to sum to 1 over the global batch (all processes).

    Returns:
        `(weights, clean_loss)`: detached weights of shape `(batch,)` and the clean loss at w'.
    """
    params = trainable_parameters(model)
    zeros = {name: torch.zeros_like(param) for name, param in params.items()}
    virtual_params, virtual_lr = virtual_step(params, zeros, optimizer)
    clean_loss, clean_grads_virtual = loss_and_grads(
        model, batch.clean_inputs, batch.clean_labels, params=virtual_params, autocast=autocast
    )
    _reduce_dict(reduce, clean_grads_virtual)
    direction = {name: virtual_lr[name] * grad for name, grad in clean_grads_virtual.items()}
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
