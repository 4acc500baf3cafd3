"""
Mixed precision: bf16 trains on CPU (autocast comes from accelerate's wrapper of the model's forward, which the trainer
keeps when it unwraps the model), the bf16 meta-gradient stays close to the float32 one, the clean-batch control trains
in bf16 too, and fp16 is refused by every trainer that computes its gradients by hand.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mlc_text.baselines import CleanBatchFinetuneTrainer, L2RWTrainer
from mlc_text.meta_grad import l2rw_weights, meta_step
from mlc_text.meta_net import find_head_module
from mlc_text.trainer import MLCTrainer

from .conftest import tiny_bert
from .test_meta_grad import make_setup, relative_error
from .test_trainer import NUM_LABELS, datasets, make_trainer

# Relative error |bf16 - fp32| / |fp32| of the whole meta-gradient, measured with `make_setup("adamw", float32)`:
# seeds 0-3 give 0.002-0.010 (both paths), seeds 0-7 at most 0.043. bf16 keeps 8 bits of mantissa (2^-8 = 0.004 per
# rounding), and the meta-gradient is a difference of products of such quantities. Tolerance 0.1: twice the worst
# seed seen, ten times the tested seeds.
META_GRAD_TOLERANCE = 0.1
# The main-net gradient: measured at most 0.0081 (seeds 0-7, SGD and AdamW); tolerance 0.03.
MAIN_GRAD_TOLERANCE = 0.03
# L2RW's example weights: measured at most 0.005 (seeds 0-7); tolerance 0.05.
L2RW_WEIGHT_TOLERANCE = 0.05


def bf16_autocast() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("meta_gradient", ["jvp", "reference"])
def test_bf16_meta_gradient_close_to_float32(meta_gradient, seed):
    model, corrector, optimizer, batch = make_setup("adamw", dtype=torch.float32, seed=seed)
    head = find_head_module(model)
    full = meta_step(model, corrector, head, batch, optimizer, meta_gradient=meta_gradient)
    half = meta_step(model, corrector, head, batch, optimizer, meta_gradient=meta_gradient, autocast=bf16_autocast)
    error = relative_error(half.meta_grads, full.meta_grads)
    assert 1e-5 < error < META_GRAD_TOLERANCE, error  # > 0: autocast really ran in bf16
    main_error = relative_error(list(half.main_grads.values()), list(full.main_grads.values()))
    assert 1e-5 < main_error < MAIN_GRAD_TOLERANCE, main_error
    assert all(grad.dtype == torch.float32 for grad in half.meta_grads)  # gradients keep the parameters' dtype
    torch.testing.assert_close(half.clean_loss, full.clean_loss, rtol=1e-2, atol=0)
    assert half.clean_loss.dtype == torch.float32  # losses are upcast


def test_bf16_l2rw_weights_close_to_float32():
    model, _, optimizer, batch = make_setup("adamw", dtype=torch.float32, seed=0)
    full, _ = l2rw_weights(model, batch, optimizer)
    half, _ = l2rw_weights(model, batch, optimizer, autocast=bf16_autocast)
    error = ((half - full).norm() / full.norm()).item()
    assert error < L2RW_WEIGHT_TOLERANCE, error
    torch.testing.assert_close(half.sum(), full.sum())  # both normalised to 1


def bf16_trainer(tmp_path, trainer_class, **overrides):
    """A tiny trainer with bf16=True on 128 noisy and 32 clean rows, 16 steps of batch 16."""
    noisy, clean = datasets(num_noisy=128, num_clean=32, noise_rate=0.1)
    settings = {"max_steps": 16, "learning_rate": 1e-2, "per_device_train_batch_size": 16, "logging_steps": 4}
    trainer = make_trainer(
        tmp_path,
        trainer_class=trainer_class,
        model=tiny_bert(NUM_LABELS, dropout=0.0),
        noisy=noisy,
        clean=clean,
        bf16=True,
        **{**settings, **overrides},
    )
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    return trainer


def train_recording_dtypes(trainer) -> tuple[list[torch.dtype], list[float], list[float]]:
    """
    Trains, recording the output dtype of every pass through the first encoder layer's intermediate projection.
    Checks that the master weights stayed float32 and that the logged losses are finite; returns `(dtypes, logged
    losses, logged clean losses)`.
    """
    dtypes = []
    layer = trainer.model.bert.encoder.layer[0].intermediate.dense
    layer.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    trainer.train()
    assert all(param.dtype == torch.float32 for param in trainer.model.parameters())  # master weights stay fp32
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses, clean_losses = [entry["loss"] for entry in logged], [entry["clean_loss"] for entry in logged]
    assert all(torch.isfinite(torch.tensor(losses + clean_losses)))
    return dtypes, losses, clean_losses


def test_bf16_training_on_cpu_runs_in_bf16_and_lowers_the_loss(tmp_path):
    trainer = bf16_trainer(tmp_path, MLCTrainer, meta_learning_rate=1e-2)
    corrector_before = [param.detach().clone() for param in trainer.corrector.parameters()]
    dtypes, losses, clean_losses = train_recording_dtypes(trainer)
    # Every pass of the meta step ran under autocast: noisy at w, clean at w (first step only; later steps reuse the
    # clean pass at w' of the step before), clean at w', the forward-mode pass.
    assert len(dtypes) == 4 + 3 * 15 and set(dtypes) == {torch.bfloat16}, (len(dtypes), set(dtypes))
    # Measured: loss 1.10 -> 0.86 (the corrector's soft labels keep it near their entropy), clean loss 1.06 -> 0.54.
    assert losses[-1] < 0.9 * losses[0], losses
    assert clean_losses[-1] < 0.7 * clean_losses[0], clean_losses
    assert any(not torch.equal(a, b) for a, b in zip(corrector_before, trainer.corrector.parameters()))


def test_bf16_clean_batch_finetune_runs_in_bf16_and_lowers_the_loss(tmp_path):
    dtypes, losses, clean_losses = train_recording_dtypes(bf16_trainer(tmp_path, CleanBatchFinetuneTrainer))
    # Two passes a step, both under autocast: the noisy batch and the clean batch.
    assert len(dtypes) == 2 * 16 and set(dtypes) == {torch.bfloat16}, (len(dtypes), set(dtypes))
    # Measured: loss 1.07 -> 0.35, clean loss 1.07 -> 0.30 (float32: the same to the second decimal).
    assert losses[-1] < 0.7 * losses[0], losses
    assert clean_losses[-1] < 0.7 * clean_losses[0], clean_losses


@pytest.mark.parametrize("trainer_class", [MLCTrainer, L2RWTrainer, CleanBatchFinetuneTrainer])
@pytest.mark.parametrize("how", ["argument", "accelerate"])
def test_fp16_is_refused_with_a_clear_error(tmp_path, monkeypatch, trainer_class, how):
    if how == "argument":
        settings = {"fp16": True}
    else:  # what `accelerate launch --mixed_precision fp16` does
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        settings = {}
    with pytest.raises(ValueError, match="does not support fp16.*loss scaling.*Use bf16=True"):
        make_trainer(tmp_path, trainer_class=trainer_class, **settings)
