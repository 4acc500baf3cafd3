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

Both are exact; they differ only in cost. The k-step look-ahead of the paper adds a discounted earlier
meta-gradient (identity-Hessian approximation), see [`discount_factor`] and [`LookaheadBuffer`].
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

__all__ = [
    "ParamDict",
    "SUPPORTED_OPTIMIZERS",
    "trainable_parameters",
    "soft_cross_entropy",
    "unwrap_optimizer",
    "check_optimizer",
    "virtual_step",
    "loss_and_grads",
    "logits_jvp",
    "discount_factor",
    "LookaheadBuffer",
    "MetaBatch",
    "MetaStepOutput",
    "meta_step",
    "corrected_label_step",
    "l2rw_weights",
]

ParamDict = dict[str, torch.Tensor]
Reduce = Callable[[list[torch.Tensor]], None]
SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


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


def _sgd_step(param, grad, group, state) -> tuple[torch.Tensor, float]:
    # Mirrors torch.optim.SGD (whose first step copies the gradient into the momentum buffer, undampened).
    lr, momentum, dampening = float(group["lr"]), group["momentum"], group["dampening"]
    direction = grad + group["weight_decay"] * param if group["weight_decay"] else grad
    scale = 1.0
    if momentum:
        buffer = state.get("momentum_buffer")
        if buffer is None:
            new_buffer = direction
        else:
            new_buffer = momentum * buffer + (1 - dampening) * direction
            scale = 1.0 - dampening
        if group["nesterov"]:
            direction, scale = direction + momentum * new_buffer, 1.0 + momentum * scale
        else:
            direction = new_buffer
    return param - lr * direction, lr * scale


def _adam_step(param, grad, group, state, decoupled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Mirrors torch.optim.Adam / AdamW; the second moment (the preconditioner) is treated as a constant of `a`.
    lr, (beta1, beta2), eps, weight_decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
    step = float(state["step"]) + 1 if "step" in state else 1.0
    if weight_decay and not decoupled:
        grad = grad + weight_decay * param
    exp_avg = state.get("exp_avg", torch.zeros_like(param))
    exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(param))
    new_exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    new_exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad.detach().square()
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        new_exp_avg_sq = torch.maximum(state["max_exp_avg_sq"], new_exp_avg_sq)
    bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
    denom = new_exp_avg_sq.sqrt() / bias_correction2**0.5 + eps
    base = param * (1 - lr * weight_decay) if decoupled else param
    virtual_lr = lr * (1 - beta1) / (bias_correction1 * denom)
    return base - (lr / bias_correction1) * new_exp_avg / denom, virtual_lr


def virtual_step(
    params: dict[str, torch.Tensor], grads: ParamDict, optimizer: torch.optim.Optimizer
) -> tuple[ParamDict, dict[str, torch.Tensor | float]]:
    """
    The main optimizer's next update applied out of place: w' = w - step(grad), with its current state, param-group
    hyper-parameters and learning rate (so schedules apply to the virtual step too).

    Args:
        params: the trainable parameters by name (as registered in `optimizer`).
        grads: the gradient for each parameter (may carry a graph; w' then does too).
        optimizer: a torch SGD, Adam or AdamW (or an accelerate wrapper of one).

    Returns:
        `(virtual_params, virtual_lr)`: w' by name, and the diagonal L = dw'/dgrad by name (a float for SGD, a tensor
        for Adam).
    """
    inner = check_optimizer(optimizer)
    groups = _param_groups(inner)
    virtual_params, virtual_lr = {}, {}
    for name, param in params.items():
        group, state = groups[id(param)], inner.state.get(param, {})
        weight = param.detach()
        if isinstance(inner, torch.optim.SGD):
            virtual_params[name], virtual_lr[name] = _sgd_step(weight, grads[name], group, state)
        else:
            decoupled = isinstance(inner, torch.optim.AdamW)
            virtual_params[name], virtual_lr[name] = _adam_step(weight, grads[name], group, state, decoupled)
    return virtual_params, virtual_lr


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


def discount_factor(clean_grads: ParamDict, clean_grads_virtual: ParamDict, virtual_lr: dict) -> torch.Tensor:
    """
    The k-step look-ahead discount gamma = <(I - L H) g', g> / |g|^2 with the Hessian H taken as the identity,
    g the clean gradient at w and g' the clean gradient at w'.
    """
    numerator, norm_sq = 0.0, 0.0
    for name, grad in clean_grads.items():
        numerator = numerator + ((1 - virtual_lr[name]) * clean_grads_virtual[name] * grad).sum()
        norm_sq = norm_sq + grad.square().sum()
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
    """A noisy batch (model inputs and given labels) and a clean batch (inputs and true labels)."""

    noisy_inputs: dict[str, torch.Tensor]
    noisy_labels: torch.Tensor
    clean_inputs: dict[str, torch.Tensor]
    clean_labels: torch.Tensor


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
    """

    main_grads: ParamDict
    meta_grads: list[torch.Tensor]
    main_loss: torch.Tensor
    clean_loss: torch.Tensor
    corrected_labels: torch.Tensor
    gamma: torch.Tensor | None = None


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


def _main_loss_and_grads(
    model, corrector, head, batch: MetaBatch, clean_in_main_loss, need_clean_grads, create_graph, autocast
) -> _MainPass:
    """Main loss at w: the noisy batch against corrected labels (+ the clean batch with its true labels), and grads."""
    params = trainable_parameters(model)
    # Double backward needs attention on SDPA's math backend: the fused CPU kernels have no second derivative.
    attention = sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()
    with attention, autocast(), capture_head_features(head) as store:
        noisy_logits = model(**batch.noisy_inputs).logits
    corrected = corrector(store["features"], batch.noisy_labels)
    noisy_loss = soft_cross_entropy(noisy_logits, corrected if create_graph else corrected.detach())

    num_noisy, num_clean = len(batch.noisy_labels), len(batch.clean_labels)
    noisy_weight = num_noisy / (num_noisy + num_clean) if clean_in_main_loss else 1.0
    grads = torch.autograd.grad(
        noisy_weight * noisy_loss, list(params.values()), create_graph=create_graph, allow_unused=True
    )
    noisy_grads = _named(params, grads)
    main_grads = {name: grad.detach() for name, grad in noisy_grads.items()}
    main_loss = noisy_weight * noisy_loss.detach()
    clean_grads = None
    if clean_in_main_loss or need_clean_grads:
        clean_loss_at_w, clean_grads = loss_and_grads(model, batch.clean_inputs, batch.clean_labels, autocast=autocast)
        if clean_in_main_loss:
            main_loss = main_loss + (1 - noisy_weight) * clean_loss_at_w
            if create_graph:  # `noisy_grads` must stay as they are (they carry the graph the meta-gradient needs)
                main_grads = {name: g + (1 - noisy_weight) * clean_grads[name] for name, g in main_grads.items()}
            else:  # fresh tensors of autograd.grad, read nowhere else: add in place, no second copy of the gradient
                for name, grad in main_grads.items():
                    grad.add_(clean_grads[name], alpha=1 - noisy_weight)
        if not need_clean_grads:
            clean_grads = None  # only the look-ahead discount reads them: free them now
    return _MainPass(params, noisy_grads, main_grads, main_loss, clean_grads, corrected, noisy_weight)


def corrected_label_step(
    model: nn.Module,
    corrector: nn.Module,
    head: nn.Module,
    batch: MetaBatch,
    *,
    clean_in_main_loss: bool = True,
    reduce: Reduce | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> MetaStepOutput:
    """
    The main-net half of a step without the meta step (between meta updates, `meta_update_interval > 1`): the
    gradient of the main loss against the current corrector's labels. `meta_grads` is empty, `clean_loss` is NaN.
    """
    main = _main_loss_and_grads(
        model, corrector, head, batch, clean_in_main_loss, False, create_graph=False, autocast=autocast
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
) -> MetaStepOutput:
    """
    One MLC meta step: main loss at w, virtual step, clean loss at w', meta-gradient. Neither net is updated here.

    Args:
        model: the (unwrapped) main net, a sequence classifier returning `.logits`.
        corrector: the label corrector, called as `corrector(features, noisy_labels)`.
        head: the module whose input holds the features the corrector reads.
        batch: the noisy and clean batches.
        optimizer: the main optimizer, whose update the virtual step reproduces.
        meta_gradient: `"jvp"` (fast, exact) or `"reference"` (double backward, the paper's kernel).
        clean_in_main_loss: whether the clean batch also enters the main loss with its true labels.
        lookahead: the k-step buffer; when it holds an earlier meta-gradient the discount gamma is computed.
        reduce: averages a list of tensors across processes in place (DDP); `None` on one process.
        autocast: a context manager factory for mixed precision.
    """
    if meta_gradient not in ("jvp", "reference"):
        raise ValueError(f"meta_gradient must be 'jvp' or 'reference', got {meta_gradient!r}")
    reference = meta_gradient == "reference"
    need_discount = lookahead is not None and lookahead.needs_discount
    rng_before_noisy = _rng_state(batch.noisy_labels.device)
    main = _main_loss_and_grads(
        model, corrector, head, batch, clean_in_main_loss, need_discount, create_graph=reference, autocast=autocast
    )
    params, main_grads, clean_grads, corrected = main.params, main.main_grads, main.clean_grads, main.corrected
    _reduce_dict(reduce, main_grads)
    _reduce_dict(reduce, clean_grads)

    virtual_params, virtual_lr = virtual_step(params, main_grads, optimizer)
    clean_loss, clean_grads_virtual = loss_and_grads(
        model, batch.clean_inputs, batch.clean_labels, params=virtual_params, autocast=autocast
    )
    del virtual_params  # w' is needed for the clean pass only; free it before the meta-gradient's pass
    _reduce_dict(reduce, clean_grads_virtual)
    gamma = discount_factor(clean_grads, clean_grads_virtual, virtual_lr) if need_discount else None
    clean_grads = main.clean_grads = None
    # v = L * g'. g' is read nowhere else once gamma is known: scale it in place instead of allocating a copy.
    direction = {name: grad.mul_(virtual_lr[name]) for name, grad in clean_grads_virtual.items()}
    del clean_grads_virtual, virtual_lr

    meta_params = [param for param in corrector.parameters() if param.requires_grad]
    if reference:
        proxy = -sum((main.noisy_grads[name] * direction[name]).sum() for name in params)
        meta_grads = torch.autograd.grad(proxy, meta_params, allow_unused=True)
    else:
        with _replay_rng(rng_before_noisy):
            directional = logits_jvp(
                model, params, batch.noisy_inputs, direction, autocast=autocast, overwrite_tangents=True
            )
        upstream = (main.noisy_weight / len(batch.noisy_labels)) * directional.to(corrected.dtype)
        meta_grads = torch.autograd.grad(corrected, meta_params, grad_outputs=upstream, allow_unused=True)
    meta_grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(meta_params, meta_grads)]
    if reduce is not None:
        reduce(meta_grads)
    return MetaStepOutput(main_grads, meta_grads, main.main_loss, clean_loss, corrected.detach(), gamma)


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
