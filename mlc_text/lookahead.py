r"""
The paper's k-step look-ahead: the meta-gradient of a step adds the previous one, discounted by
gamma = <(I - L H) g', g> / |g|^2 with the Hessian H taken as the identity ([`discount_factor`]), and the corrector's
optimizer steps once per window of `gradient_steps` meta steps ([`LookaheadBuffer`]). The meta step computes gamma's
terms a chunk at a time (`virtual_step.scaled_direction`); [`discount_factor`] is the per-tensor reference.
"""

from __future__ import annotations

import torch

from .virtual_step import ParamDict

__all__ = ["discount_factor", "LookaheadBuffer"]


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
