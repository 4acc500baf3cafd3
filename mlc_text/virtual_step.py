r"""
The virtual (look-ahead) step: the main optimizer's next update applied out of place, w' = w - step(clip(grad)),
mirroring torch.optim.SGD, Adam and AdamW, and its diagonal L = dw'/dgrad (held constant by the meta-gradient).

Two implementations of the same arithmetic, op for op:

* per tensor (`_sgd_step`, `_adam_step`, `_adam_moments`): the readable reference, and the path taken when the
  gradient carries a graph (the literal double backward of the tests differentiates through it);
* multi-tensor (`torch._foreach_*`, as torch.optim's `foreach` implementations): a few launches per chunk of tensors
  instead of several per tensor. Tensors are chunked by param group, optimizer state, device and dtype, and a chunk
  holds at most as many elements as the largest tensor, so its temporaries are no larger than the per-tensor path's
  for that tensor: the peak memory stays that of the per-tensor path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ParamDict",
    "SUPPORTED_OPTIMIZERS",
    "unwrap_optimizer",
    "check_optimizer",
    "clip_coefficient",
    "VirtualRates",
    "virtual_step",
    "scaled_direction",
]

ParamDict = dict[str, torch.Tensor]
SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


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


# ------------------------------------------------------------------------------------------- per tensor
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


def _adam_step_count(state) -> float:
    return float(state["step"]) + 1 if "step" in state else 1.0


def _adam_moments(param, grad, group, state, decoupled: bool, coef: float, first: bool = True):
    # Adam's input gradient (clipped, plus L2 decay for Adam), the bias-corrected denominator of the next step and
    # (if `first`) the new first moment, as torch.optim.Adam / AdamW compute them.
    (beta1, beta2), eps, weight_decay = group["betas"], group["eps"], group["weight_decay"]
    step = _adam_step_count(state)
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


def _adam_rate(param, grad, group, state, decoupled: bool, coef: float) -> torch.Tensor:
    # L of Adam / AdamW: lr (1 - beta1) coef / (bias_correction1 * denom).
    denom, _, bias_correction1 = _adam_moments(param, grad, group, state, decoupled, coef, first=False)
    return denom.reciprocal_().mul_(float(group["lr"]) * (1 - group["betas"][0]) * coef / bias_correction1)


# ------------------------------------------------------------------------------------------- multi-tensor
@dataclass
class _Chunk:
    """Tensors that one multi-tensor call can update together: same param group, same kind of state."""

    names: list[str]
    group: dict
    states: list[dict]


def _state_kind(optimizer: torch.optim.Optimizer, state: dict) -> tuple:
    # What decides the branch each tensor takes in the per-tensor code (and, for Adam, its bias corrections).
    if isinstance(optimizer, torch.optim.SGD):
        return (state.get("momentum_buffer") is not None,)
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    return (_adam_step_count(state), *(key in state for key in keys))


def _chunks(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], groups: dict[int, dict]
) -> list[_Chunk]:
    """Splits the parameters into chunks of at most as many elements as the largest tensor holds, in order."""
    budget = max((param.numel() for param in params.values()), default=0)
    open_chunks: dict[tuple, tuple[_Chunk, int]] = {}
    chunks: list[_Chunk] = []
    for name, param in params.items():
        group, state = groups[id(param)], optimizer.state.get(param, {})
        key = (id(group), param.device, param.dtype, _state_kind(optimizer, state))
        chunk, size = open_chunks.get(key, (None, 0))
        if chunk is None or size + param.numel() > budget:
            chunk, size = _Chunk([], group, []), 0
            chunks.append(chunk)
        chunk.names.append(name)
        chunk.states.append(state)
        open_chunks[key] = (chunk, size + param.numel())
    return chunks


def _sgd_step_foreach(weights, grads, chunk: _Chunk, coef: float) -> list[torch.Tensor]:
    # `_sgd_step` on a chunk, each product folded into an in-place add where it can be, so that at most two
    # chunk-sized tensors are made (the direction and w').
    group = chunk.group
    lr, momentum, dampening = float(group["lr"]), group["momentum"], group["dampening"]
    weight_decay = group["weight_decay"]
    direction, owned = grads, False
    if coef != 1.0 or weight_decay:
        direction, owned = torch._foreach_mul(grads, coef), True
        if weight_decay:
            torch._foreach_add_(direction, weights, alpha=weight_decay)
    if momentum:
        buffers = [state.get("momentum_buffer") for state in chunk.states]
        new_buffer = direction
        if buffers[0] is not None:
            new_buffer = torch._foreach_mul(buffers, momentum)
            torch._foreach_add_(new_buffer, direction, alpha=1 - dampening)
        if group["nesterov"]:
            if not owned:
                direction, owned = torch._foreach_mul(direction, 1.0), True
            torch._foreach_add_(direction, new_buffer, alpha=momentum)
        else:
            direction = new_buffer
        del new_buffer
    return torch._foreach_add(weights, direction, alpha=-lr)


def _adam_denominators_foreach(weights, grads, chunk: _Chunk, decoupled: bool, coef: float):
    """
    `_adam_moments`' denominators on a chunk, with the clip factor folded into the scalars (one chunk-sized tensor
    made, unless Adam's L2 decay needs its input gradient). Returns `(denominators, input gradient, its factor c,
    bias_correction1)`: Adam's input gradient is `c * input gradient`.
    """
    group, states = chunk.group, chunk.states
    (beta1, beta2), eps, weight_decay = group["betas"], group["eps"], group["weight_decay"]
    step = _adam_step_count(states[0])
    grads, factor = [grad.detach() for grad in grads], coef  # L is held constant: no graph through the denominator
    if weight_decay and not decoupled:
        grads, factor = torch._foreach_mul(grads, coef), 1.0
        torch._foreach_add_(grads, weights, alpha=weight_decay)
    denom = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(denom, (1 - beta2) * factor * factor)
    if "exp_avg_sq" in states[0]:
        torch._foreach_add_(denom, [state["exp_avg_sq"] for state in states], alpha=beta2)
    if group.get("amsgrad", False) and "max_exp_avg_sq" in states[0]:
        torch._foreach_maximum_(denom, [state["max_exp_avg_sq"] for state in states])
    torch._foreach_sqrt_(denom)
    torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    return denom, grads, factor, 1 - beta1**step


def _adam_step_foreach(weights, grads, chunk: _Chunk, decoupled: bool, coef: float) -> list[torch.Tensor]:
    # `_adam_step` on a chunk, computed into w' itself: w' = (1 - lr wd) w - (lr / bc1) m' / denom with
    # m' = beta1 m + (1 - beta1) g; two chunk-sized tensors are made (the denominators and w').
    lr, weight_decay, beta1 = float(chunk.group["lr"]), chunk.group["weight_decay"], chunk.group["betas"][0]
    denom, grads, factor, bias_correction1 = _adam_denominators_foreach(weights, grads, chunk, decoupled, coef)
    updated = torch._foreach_mul(grads, (1 - beta1) * factor)
    if "exp_avg" in chunk.states[0]:
        torch._foreach_add_(updated, [state["exp_avg"] for state in chunk.states], alpha=beta1)
    torch._foreach_div_(updated, denom)
    del denom
    torch._foreach_mul_(updated, -lr / bias_correction1)
    torch._foreach_add_(updated, weights, alpha=1 - lr * weight_decay if decoupled else 1.0)
    return updated


def _detached(tensors: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    return [tensors[name].detach() for name in names]


# ------------------------------------------------------------------------------------------- the step
class VirtualRates(Mapping):
    """
    The diagonal L = dw'/dgrad of a virtual step, by parameter name: a float for SGD, a tensor for Adam / AdamW
    (its preconditioner, held constant). Computed when read, from the optimizer state and the gradient the virtual
    step used, so that no parameter-sized copy of L is held while w' is: read it before the real step, and leave
    the gradient unchanged until then. [`VirtualRates.chunks`] reads it a chunk of tensors at a time.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], grads: ParamDict, coef, groups
    ):
        self.optimizer, self.params, self.grads, self.coef, self.groups = optimizer, params, grads, coef, groups

    @property
    def _decoupled(self) -> bool:
        return isinstance(self.optimizer, torch.optim.AdamW)

    def __getitem__(self, name: str) -> torch.Tensor | float:
        param = self.params[name]
        group, state = self.groups[id(param)], self.optimizer.state.get(param, {})
        if isinstance(self.optimizer, torch.optim.SGD):
            return _sgd_rate(group, state, self.coef)
        return _adam_rate(param.detach(), self.grads[name].detach(), group, state, self._decoupled, self.coef)

    def chunks(self) -> Iterator[tuple[list[str], float, list[torch.Tensor] | None]]:
        """
        Yields L chunk by chunk as `(names, factor, denominators)`: L = factor / denominators elementwise (Adam: one
        fresh chunk-sized tensor each, at most the largest parameter's size), or `factor` alone where
        `denominators` is `None` (SGD: one rate per chunk).
        """
        for chunk in _chunks(self.optimizer, self.params, self.groups):
            if isinstance(self.optimizer, torch.optim.SGD):
                yield chunk.names, _sgd_rate(chunk.group, chunk.states[0], self.coef), None
                continue
            weights, grads = _detached(self.params, chunk.names), _detached(self.grads, chunk.names)
            denom, _, _, bias_correction1 = _adam_denominators_foreach(
                weights, grads, chunk, self._decoupled, self.coef
            )
            group = chunk.group
            yield chunk.names, float(group["lr"]) * (1 - group["betas"][0]) * self.coef / bias_correction1, denom

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def virtual_step(
    params: dict[str, torch.Tensor],
    grads: ParamDict,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None = None,
    foreach: bool | None = None,
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
        foreach: multi-tensor ops (`True`) or one tensor at a time (`False`); `None`: multi-tensor unless the
            gradient carries a graph. Both give the same numbers.

    Returns:
        `(virtual_params, virtual_lr)`: w' by name, and the diagonal L = dw'/dgrad by name ([`VirtualRates`]: a
        float for SGD, a tensor for Adam, computed when read).
    """
    inner = check_optimizer(optimizer)
    groups = _param_groups(inner)
    coef = clip_coefficient(grads, max_grad_norm)
    if foreach is None:
        foreach = not (torch.is_grad_enabled() and any(grad.requires_grad for grad in grads.values()))
    sgd, decoupled = isinstance(inner, torch.optim.SGD), isinstance(inner, torch.optim.AdamW)
    virtual_params = {}
    if foreach:
        for chunk in _chunks(inner, params, groups):
            weights, chunk_grads = _detached(params, chunk.names), [grads[name] for name in chunk.names]
            if sgd:
                updated = _sgd_step_foreach(weights, chunk_grads, chunk, coef)
            else:
                updated = _adam_step_foreach(weights, chunk_grads, chunk, decoupled, coef)
            virtual_params.update(zip(chunk.names, updated))
        virtual_params = {name: virtual_params[name] for name in params}  # in the parameters' order
    else:
        for name, param in params.items():
            group, state = groups[id(param)], inner.state.get(param, {})
            if sgd:
                virtual_params[name] = _sgd_step(param.detach(), grads[name], group, state, coef)
            else:
                virtual_params[name] = _adam_step(param.detach(), grads[name], group, state, decoupled, coef)
    return virtual_params, VirtualRates(inner, params, grads, coef, groups)


def scaled_direction(
    clean_grads_virtual: ParamDict,
    virtual_lr: VirtualRates,
    in_place: bool = True,
    clean_grads: ParamDict | None = None,
) -> tuple[ParamDict, torch.Tensor | None, torch.Tensor | None]:
    """
    The direction v = L * g' of the meta-gradient and, with `clean_grads` (g, the clean gradient at w), the terms of
    the look-ahead discount gamma: `<(1 - L) g', g>` and `|g|^2`. L is read a chunk at a time, so no whole copy of it
    is held.

    Args:
        clean_grads_virtual: g', the clean gradient at w'.
        virtual_lr: L, from [`virtual_step`] on the same weights and gradient.
        in_place: scale g' in place (it is then v; no copy). `False` leaves g' as it is.
        clean_grads: g; its tensors are dropped from the dict as they are read.

    Returns:
        `(direction, numerator, norm_sq)`; the last two are `None` without `clean_grads`.
    """
    direction, terms, squares = {}, [], []
    for names, factor, denom in virtual_lr.chunks():
        grads = [clean_grads_virtual[name] for name in names]
        if clean_grads is None:
            scaled = _scale(grads, factor, denom, in_place)  # v = g' / denominators * factor
        else:
            rates = factor
            if denom is not None:  # gamma needs L itself: form it in the denominators' place
                torch._foreach_reciprocal_(denom)
                torch._foreach_mul_(denom, factor)
                rates = denom
            chunk_terms, chunk_squares = _discount_terms_foreach(
                grads, [clean_grads.pop(name) for name in names], rates
            )
            terms, squares = terms + chunk_terms, squares + chunk_squares
            scaled = _scale(grads, rates, None, in_place)
        del denom
        direction.update(zip(names, scaled))
    direction = {name: direction[name] for name in clean_grads_virtual}
    if clean_grads is None:
        return direction, None, None
    return direction, torch.stack(terms).sum(), torch.stack(squares).sum()


def _scale(grads, factor, denom, in_place: bool) -> list[torch.Tensor]:
    # grads * factor (a float or a list), divided first by `denom` when given; in place or into new tensors.
    if denom is not None:
        scaled = grads if in_place else torch._foreach_div(grads, denom)
        if in_place:
            torch._foreach_div_(scaled, denom)
        torch._foreach_mul_(scaled, factor)
        return scaled
    if in_place:
        torch._foreach_mul_(grads, factor)
        return grads
    return torch._foreach_mul(grads, factor)


def _discount_terms_foreach(grads_virtual, grads_at_w, rates) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # Each tensor's share of gamma's numerator <(1 - L) g', g> and denominator |g|^2 (as `_discount_terms`).
    if isinstance(rates, float):
        products = torch._foreach_mul(grads_virtual, 1 - rates)
    else:
        products = torch._foreach_neg(rates)
        torch._foreach_add_(products, 1.0)
        torch._foreach_mul_(products, grads_virtual)
    torch._foreach_mul_(products, grads_at_w)
    return [product.sum() for product in products], [grad.square().sum() for grad in grads_at_w]
