"""
How the main loss weighs a step's noisy batch against the clean batch drawn beside it, for every method that trains
on both (MLC, L2RW, `finetune_clean_batch`). Written once: the clean-batch control measures what the clean batch alone
gives MLC and L2RW only while the three weigh the two batches alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .virtual_step import ParamDict

__all__ = ["MainLossWeights"]


@dataclass(frozen=True)
class MainLossWeights:
    """
    The weights of the main loss `noisy * (noisy batch's loss) + clean * (clean batch's loss)`: every row counts once,
    so `noisy = noisy rows / (noisy + clean rows)` and `clean = 1 - noisy`; without the clean term, `noisy = 1` and
    `clean = 0`.

    Args:
        noisy (`float`): the noisy batch's weight.
        clean (`float`): the clean batch's weight.
    """

    noisy: float
    clean: float

    @classmethod
    def for_rows(cls, num_noisy: int, num_clean: int, clean_in_main_loss: bool = True) -> MainLossWeights:
        """The weights of a step with `num_noisy` noisy and `num_clean` clean rows (`clean_in_main_loss=False`: 1, 0)."""
        if not clean_in_main_loss:
            return cls(1.0, 0.0)
        noisy = num_noisy / (num_noisy + num_clean)
        return cls(noisy, 1 - noisy)

    def weigh_noisy_(self, loss: torch.Tensor, grads: ParamDict) -> torch.Tensor:
        """
        Weighs the noisy batch's loss and gradient (fresh tensors, read nowhere else: scaled in place, no copy) by
        `noisy`; returns the weighted loss.
        """
        torch._foreach_mul_(list(grads.values()), self.noisy)
        return self.noisy * loss

    def add_clean(
        self,
        loss: torch.Tensor,
        grads: ParamDict,
        clean_loss: torch.Tensor,
        clean_grads: ParamDict,
        *,
        in_place: bool = True,
    ) -> tuple[torch.Tensor, ParamDict]:
        """
        Completes the main loss from its noisy term (`loss` and `grads`, already weighted by `noisy`) with the clean
        batch's loss and gradient, weighted by `clean`.

        Args:
            in_place: add into `grads` (fresh tensors: no second copy of the gradient). `False` leaves them as they
                are (they may carry a graph that is read later) and returns new tensors.

        Returns:
            `(main loss, main gradient by parameter name)`.
        """
        if in_place:
            torch._foreach_add_(list(grads.values()), [clean_grads[name] for name in grads], alpha=self.clean)
        else:
            grads = {name: grad + self.clean * clean_grads[name] for name, grad in grads.items()}
        return loss + self.clean * clean_loss, grads
