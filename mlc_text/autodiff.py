"""
The automatic-differentiation helpers of the hand-computed gradients: a labelled batch's loss and gradient at the
model's weights or at others (`functional_call`), the directional derivative of a batch's logits along a direction
(forward mode, or a finite difference with the same dropout masks), and fp16 loss scaling of every such gradient
([`LossScale`]). The maths of the meta step (meta_grad.py) and of L2RW's weights (l2rw.py) are built from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .virtual_step import ParamDict

__all__ = [
    "Reduce",
    "trainable_parameters",
    "soft_cross_entropy",
    "LossScale",
    "loss_and_grads",
    "unscaled_grads",
    "logits_jvp",
    "logits_finite_difference",
    "finite_difference_step",
    "install_cpu_grad_scaler",
]

# Averages a list of tensors across processes, in place (`CleanDataTrainer.all_reduce_mean`); `None` on one process.
Reduce = Callable[[list[torch.Tensor]], None]


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
    return loss.detach(), unscaled_grads(loss, leaves, loss_scale)


def unscaled_grads(loss: torch.Tensor, leaves: dict[str, torch.Tensor], loss_scale: LossScale | None) -> ParamDict:
    """
    The gradient of `loss` with respect to `leaves`, by name (zeros where unused): with `loss_scale` (fp16), from the
    scaled loss's backward, unscaled, inf / NaN recorded.
    """
    grads = _named(leaves, torch.autograd.grad(_scaled(loss, loss_scale), list(leaves.values()), allow_unused=True))
    _unscale_(grads, loss_scale)
    return grads


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


def _reduce_dict(reduce: Reduce | None, grads: ParamDict | None) -> None:
    if reduce is not None and grads is not None:
        reduce(list(grads.values()))


def _found_inf(loss_scale: LossScale | None, reduce: Reduce | None) -> bool:
    return loss_scale is not None and loss_scale.found_inf(reduce)


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
