"""
Gradient accumulation semantics of `MLCTrainer` (single process, float64, dropout 0).

What holds (and is tested here):
* every micro-batch of an optimizer step runs its own meta step at the same main weights w and corrector a (neither
  steps inside the window); each virtual step uses that micro-batch's own noisy and clean rows;
* the corrector's optimizer steps once per optimizer step, on the sync micro-batch, before the main optimizer, with the
  mean of the micro-batches' meta-gradients; with `gradient_steps=k` once per k optimizer steps;
* the main net's update of a step equals the update of one batch of all the micro-batches' rows (batch 2b, clean
  batch 2c, no accumulation), to rounding.

What does not hold: the corrector's update is not the one of the batch-2b run (the mean of per-micro-batch
meta-gradients is not the meta-gradient of the union: each virtual step sees only its micro-batch), so from the second
step on the two runs drift apart.
"""

from __future__ import annotations

import pytest
import torch

from mlc_text.meta_grad import unwrap_optimizer
from mlc_text.trainer import MLCTrainer

from .distributed_run import build_nets
from .test_trainer import datasets, make_trainer

ACCUMULATION = 2


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().flatten().clone() for param in module.parameters()])


class EventTrainer(MLCTrainer):
    """Records, per micro-batch, the nets it started from and whether the corrector moved; and the order of steps."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not hasattr(self, "events"):
            self.events, self.micro, self.micro_meta_grads, self.stepped_meta_grads = [], [], [], []
            self.meta_optimizer.register_step_post_hook(lambda *_: self.events.append("meta"))
            unwrap_optimizer(self.optimizer).register_step_post_hook(lambda *_: self.events.append("main"))
        self.events.append("micro")
        main_before, corrector_before = flat(self.model), flat(self.corrector)
        input_ids = inputs["input_ids"].clone()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro.append(
            {
                "sync": self.accelerator.sync_gradients,
                "input_ids": input_ids,
                "clean_input_ids": self.last_clean_input_ids,
                "main": main_before,
                "corrector": corrector_before,
                "corrector_moved": not torch.equal(corrector_before, flat(self.corrector)),
            }
        )
        return loss

    def next_clean_batch(self):
        clean_inputs, clean_labels = super().next_clean_batch()
        self.last_clean_input_ids = clean_inputs["input_ids"].clone()
        return clean_inputs, clean_labels

    def _accumulate_meta_grads(self, out):
        self.micro_meta_grads.append([grad.clone() for grad in out.meta_grads])
        super()._accumulate_meta_grads(out)

    def _meta_optimizer_step(self):
        if self._pending_meta_grads is not None:
            self.stepped_meta_grads.append([grad.clone() for grad in self._pending_meta_grads])
        super()._meta_optimizer_step()


def accumulation_trainer(tmp_path, accumulation: int, batch: int, clean_batch: int, max_steps: int, **overrides):
    model, corrector = build_nets("mlc")  # float64, dropout 0, seeded
    noisy, clean = datasets()
    return make_trainer(
        tmp_path,
        model=model,
        corrector=corrector,
        noisy=noisy,
        clean=clean,
        trainer_class=EventTrainer,
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=batch,
        clean_batch_size=clean_batch,
        max_steps=max_steps,
        learning_rate=1e-2,
        meta_learning_rate=1e-2,
        **overrides,
    )


@pytest.mark.parametrize("gradient_steps", [1, 2])
def test_meta_step_per_micro_batch_and_corrector_steps_at_sync(tmp_path, gradient_steps):
    steps = 4
    trainer = accumulation_trainer(tmp_path, ACCUMULATION, 4, 2, steps, gradient_steps=gradient_steps)
    trainer.train()
    assert trainer.state.global_step == steps

    # Order: both micro-batches, then (every gradient_steps optimizer steps) the corrector, then the main net.
    expected = []
    for step in range(1, steps + 1):
        expected += ["micro"] * ACCUMULATION + (["meta"] if step % gradient_steps == 0 else []) + ["main"]
    assert trainer.events == expected
    assert trainer.events.count("meta") == steps // gradient_steps
    assert trainer.events.count("main") == steps

    micro = trainer.micro
    assert [entry["sync"] for entry in micro] == [False, True] * steps
    for index, entry in enumerate(micro):
        step = index // ACCUMULATION + 1
        moves = entry["sync"] and step % gradient_steps == 0
        assert entry["corrector_moved"] == moves, index
    # Within a window, every micro-batch's meta step starts from the same w and a.
    for first, second in zip(micro[::ACCUMULATION], micro[1::ACCUMULATION]):
        assert torch.equal(first["main"], second["main"]) and torch.equal(first["corrector"], second["corrector"])
    assert not torch.equal(micro[0]["main"], micro[ACCUMULATION]["main"])  # and the main net steps between windows

    # What reaches the look-ahead buffer once per optimizer step is the mean of the micro-batches' meta-gradients.
    assert len(trainer.micro_meta_grads) == ACCUMULATION * steps and len(trainer.stepped_meta_grads) == steps
    for step, stepped in enumerate(trainer.stepped_meta_grads):
        parts = trainer.micro_meta_grads[ACCUMULATION * step : ACCUMULATION * (step + 1)]
        for index, grad in enumerate(stepped):
            mean = sum(part[index] for part in parts) / ACCUMULATION
            torch.testing.assert_close(grad, mean, rtol=1e-12, atol=1e-15)


def test_main_update_equals_one_big_batch_but_corrector_update_does_not(tmp_path):
    accumulated = accumulation_trainer(tmp_path / "accumulated", ACCUMULATION, 4, 2, max_steps=1)
    accumulated.train()
    big = accumulation_trainer(tmp_path / "big", 1, 4 * ACCUMULATION, 2 * ACCUMULATION, max_steps=1)
    big.train()
    # Same rows: the two micro-batches are the big batch's two halves (noisy and clean).
    (big_step,) = big.micro
    assert len(accumulated.micro) == ACCUMULATION
    for key in ("input_ids", "clean_input_ids"):
        assert torch.equal(torch.cat([entry[key] for entry in accumulated.micro]), big_step[key])
    # Main net after one step: the same update, to float64 rounding (measured largest difference 2e-15).
    torch.testing.assert_close(flat(accumulated.model), flat(big.model), rtol=0, atol=1e-12)
    assert not torch.equal(flat(big.model), big_step["main"])  # it did move
    # The corrector's update differs (measured: relative difference of the meta-gradients 1.03;
    # after the corrector's first Adam step its parameters differ by up to 0.02, twice its learning rate).
    (accumulated_grads,), (big_grads,) = accumulated.stepped_meta_grads, big.stepped_meta_grads
    accumulated_flat = torch.cat([grad.flatten() for grad in accumulated_grads])
    big_flat = torch.cat([grad.flatten() for grad in big_grads])
    relative = ((accumulated_flat - big_flat).norm() / big_flat.norm()).item()
    print(f"meta-gradient, accumulation vs one batch: relative difference {relative:.3f}")
    assert relative > 1e-3, relative
