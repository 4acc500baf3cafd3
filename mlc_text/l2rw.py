"""
Learning to Reweight (Ren et al., 2018): per-example weights of the noisy batch from the meta-gradient of the clean
loss, computed with MLC's virtual step (virtual_step.py) and forward-mode directional derivative (autodiff.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .autodiff import LossScale, Reduce, _reduce_dict, _upcast, logits_jvp, loss_and_grads, trainable_parameters
from .clean_batches import MetaBatch
from .virtual_step import scaled_direction, virtual_step

__all__ = ["l2rw_weights"]


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
