"""
Mixed precision: bf16 trains on CPU (autocast comes from accelerate's wrapper of the model's forward, which the trainer
keeps when it unwraps the model), the bf16 meta-gradient stays close to the float32 one, the clean-batch control trains
in bf16 too; fp16 trains with loss scaling of every hand-computed gradient, an overflowing step is skipped for both
nets and lowers the scale.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import TrainerCallback

from mlc_text.baselines import CleanBatchFinetuneTrainer, FinetuneTrainer, L2RWTrainer
from mlc_text.config import MLCTrainingArguments
from mlc_text.meta_grad import LossScale, l2rw_weights, meta_step
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


# fp16 against float32, `make_setup("adamw", float32)`, scale 2^16, seeds 0-7: the meta-gradient's relative error
# 0.0007-0.0045 (jvp and reference alike), the main gradient's at most 0.0009, L2RW's weights' at most 0.0013 (seeds
# 0-3). fp16 keeps 11 bits (2^-11 = 0.0005 per rounding). Tolerances: about ten times the worst seen.
FP16_META_GRAD_TOLERANCE = 0.05
FP16_MAIN_GRAD_TOLERANCE = 0.01
FP16_L2RW_WEIGHT_TOLERANCE = 0.02


def fp16_autocast() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.float16)


@pytest.mark.parametrize("meta_gradient", ["jvp", "reference", "fd", "fd_central"])
def test_loss_scaling_unscales_every_gradient_exactly(meta_gradient):
    # Float64, no autocast: a power-of-two scale multiplies and divides exactly, so a step with loss scaling must give
    # the very numbers of one without (main, clean-at-w' and meta-gradients, each unscaled once).
    model, corrector, optimizer, batch = make_setup("adamw", seed=0)
    head = find_head_module(model)
    plain = meta_step(model, corrector, head, batch, optimizer, meta_gradient=meta_gradient, keep_clean_pass=True)
    scaled = meta_step(
        model,
        corrector,
        head,
        batch,
        optimizer,
        meta_gradient=meta_gradient,
        keep_clean_pass=True,
        loss_scale=LossScale(2.0**20),
    )
    assert not scaled.overflow
    assert relative_error(scaled.meta_grads, plain.meta_grads) < 1e-12
    assert relative_error(list(scaled.main_grads.values()), list(plain.main_grads.values())) < 1e-12
    clean_scaled, clean_plain = scaled.clean_pass.grads, plain.clean_pass.grads
    assert relative_error(list(clean_scaled.values()), list(clean_plain.values())) < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("meta_gradient", ["jvp", "reference"])
def test_fp16_meta_gradient_close_to_float32(meta_gradient, seed):
    model, corrector, optimizer, batch = make_setup("adamw", dtype=torch.float32, seed=seed)
    head = find_head_module(model)
    full = meta_step(model, corrector, head, batch, optimizer, meta_gradient=meta_gradient)
    half = meta_step(
        model,
        corrector,
        head,
        batch,
        optimizer,
        meta_gradient=meta_gradient,
        autocast=fp16_autocast,
        loss_scale=LossScale(2.0**16),
    )
    assert not half.overflow
    error = relative_error(half.meta_grads, full.meta_grads)
    assert 1e-6 < error < FP16_META_GRAD_TOLERANCE, error  # > 0: autocast really ran in fp16
    main_error = relative_error(list(half.main_grads.values()), list(full.main_grads.values()))
    assert 1e-6 < main_error < FP16_MAIN_GRAD_TOLERANCE, main_error
    assert all(grad.dtype == torch.float32 for grad in half.meta_grads)
    torch.testing.assert_close(half.clean_loss, full.clean_loss, rtol=1e-2, atol=0)


def test_fp16_l2rw_weights_close_to_float32():
    model, _, optimizer, batch = make_setup("adamw", dtype=torch.float32, seed=0)
    full, _ = l2rw_weights(model, batch, optimizer)
    scale = LossScale(2.0**16)
    half, _ = l2rw_weights(model, batch, optimizer, autocast=fp16_autocast, loss_scale=scale)
    assert not scale.found_inf()
    error = ((half - full).norm() / full.norm()).item()
    assert error < FP16_L2RW_WEIGHT_TOLERANCE, error


def test_an_overflowing_meta_step_is_reported():
    # A scale so large that the scaled fp16 gradients overflow: the step reports it instead of returning inf.
    model, corrector, optimizer, batch = make_setup("adamw", dtype=torch.float32, seed=0)
    head = find_head_module(model)
    out = meta_step(model, corrector, head, batch, optimizer, autocast=fp16_autocast, loss_scale=LossScale(2.0**100))
    assert out.overflow


@pytest.mark.parametrize("trainer_class", [MLCTrainer, L2RWTrainer, CleanBatchFinetuneTrainer, FinetuneTrainer])
@pytest.mark.parametrize("how", ["argument", "accelerate"])
def test_fp16_gets_a_grad_scaler_on_cpu(tmp_path, monkeypatch, trainer_class, how):
    # accelerate makes no scaler (and no fp16 autocast) on CPU; the trainers give it both, as it has them on a GPU.
    if how == "argument":
        settings = {"fp16": True}
    else:  # what `accelerate launch --mixed_precision fp16` does
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        settings = {}
    if trainer_class is FinetuneTrainer:  # no clean rows
        args = MLCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **settings)
        trainer = FinetuneTrainer(model=tiny_bert(NUM_LABELS), args=args, train_dataset=datasets()[0])
    else:
        trainer = make_trainer(tmp_path, trainer_class=trainer_class, **settings)
    assert trainer.accelerator.mixed_precision == "fp16"
    assert isinstance(trainer.accelerator.scaler, torch.amp.GradScaler) and trainer.accelerator.native_amp


def fp16_trainer(tmp_path, trainer_class, **overrides):
    """A tiny trainer with fp16=True on 128 noisy and 32 clean rows, 16 steps of batch 16."""
    noisy, clean = datasets(num_noisy=128, num_clean=32, noise_rate=0.1)
    settings = {"max_steps": 16, "learning_rate": 1e-2, "per_device_train_batch_size": 16, "logging_steps": 4}
    return make_trainer(
        tmp_path,
        trainer_class=trainer_class,
        model=tiny_bert(NUM_LABELS, dropout=0.0),
        noisy=noisy,
        clean=clean,
        fp16=True,
        **{**settings, **overrides},
    )


@pytest.mark.parametrize("trainer_class", [MLCTrainer, L2RWTrainer, CleanBatchFinetuneTrainer])
def test_fp16_training_on_cpu_runs_in_fp16_and_lowers_the_loss(tmp_path, trainer_class):
    overrides = {"meta_learning_rate": 1e-2} if trainer_class is MLCTrainer else {}
    trainer = fp16_trainer(tmp_path, trainer_class, **overrides)
    dtypes, losses, clean_losses = train_recording_dtypes(trainer)
    assert set(dtypes) == {torch.float16}, set(dtypes)
    # Measured: MLC loss 1.10 -> 0.82, clean loss 1.05 -> 0.50; L2RW 1.11 -> 0.58; the clean-batch control
    # 1.07 -> 0.35 (as in bf16 and float32).
    assert losses[-1] < 0.9 * losses[0], losses
    assert clean_losses[-1] < 0.7 * clean_losses[0], clean_losses
    scales = [entry["loss_scale"] for entry in trainer.state.log_history if "loss_scale" in entry]
    assert scales and all(scale == 2.0**16 for scale in scales)  # no overflow on these rows: the scale held


class StepRecorder(TrainerCallback):
    """After each optimizer step: the main net's and the corrector's weights, the scale, the look-ahead's count."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        self.steps.append(
            {
                "model": [param.detach().clone() for param in trainer.model.parameters()],
                "corrector": [param.detach().clone() for param in trainer.corrector.parameters()],
                "scale": trainer.accelerator.scaler.get_scale(),
                "lookahead_count": trainer.lookahead.count,
                "meta_optimizer_steps": [
                    float(state["step"]) for state in trainer.meta_optimizer.state.values() if "step" in state
                ],
                "carried": trainer._carried is not None,
            }
        )


def overflow_at(model, step_of: callable, where: str):
    """
    Makes the classifier's fp16 output overflow (x 1e6 > 65504) in one step: in the noisy pass at w (`where="main"`)
    or only in the passes at other weights than the parameters (`"meta"`: the clean pass at w' and the
    meta-gradient's), so that the main gradient stays finite.
    """

    def hook(module, args, output):
        if step_of() != 2:
            return output
        at_parameters = isinstance(module.weight, torch.nn.Parameter)
        if (where == "main") == at_parameters:
            return output * 1e6
        return output

    model.classifier.register_forward_hook(hook)


def same(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(
    "where,optim", [("main", "adamw_torch_fused"), ("meta", "adamw_torch_fused"), ("meta", "adamw_torch")]
)
def test_an_fp16_overflow_skips_both_updates_and_lowers_the_scale(tmp_path, where, optim):
    trainer = fp16_trainer(tmp_path, MLCTrainer, max_steps=4, meta_learning_rate=1e-2, gradient_steps=2, optim=optim)
    overflow_at(trainer.model, lambda: trainer.state.global_step, where)
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    # (Not `accelerator.optimizer_step_was_skipped`: with the fused AdamW, the default optim, the optimizer skips
    # the update itself and accelerate does not see it.)
    before, overflowed, after = recorder.steps[1], recorder.steps[2], recorder.steps[3]
    assert overflowed["scale"] == before["scale"] / 2 and after["scale"] == overflowed["scale"]  # backed off once
    assert same(before["model"], overflowed["model"]), "the main net stepped on an overflow"
    assert same(before["corrector"], overflowed["corrector"]), "the corrector stepped on an overflow"
    assert overflowed["meta_optimizer_steps"] == before["meta_optimizer_steps"]
    assert overflowed["lookahead_count"] == before["lookahead_count"]  # the look-ahead window is left as it was
    assert before["carried"] and not overflowed["carried"]  # w' of a skipped step is not the next w: not carried
    # The next step trains both nets again (the corrector steps every gradient_steps = 2 meta steps).
    assert not same(overflowed["model"], after["model"])
    assert after["lookahead_count"] == overflowed["lookahead_count"] + 1


@pytest.mark.parametrize("trainer_class", [L2RWTrainer, CleanBatchFinetuneTrainer])
def test_an_fp16_overflow_skips_the_baselines_step(tmp_path, trainer_class):
    trainer = fp16_trainer(tmp_path, trainer_class, max_steps=4)
    overflow_at(trainer.model, lambda: trainer.state.global_step, "main")
    scales, weights = [], []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            scales.append(trainer.accelerator.scaler.get_scale())
            weights.append([param.detach().clone() for param in trainer.model.parameters()])

    trainer.add_callback(Recorder())
    trainer.train()
    assert scales[2] == scales[1] / 2 and same(weights[1], weights[2]) and not same(weights[2], weights[3])
