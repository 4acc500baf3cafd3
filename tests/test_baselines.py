from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

from mlc_text.baselines import (
    CleanBatchFinetuneTrainer,
    FinetuneTrainer,
    GLCTrainer,
    L2RWTrainer,
    estimate_transition_matrix,
    forward_corrected_loss,
)

from .conftest import tiny_bert
from .test_trainer import NUM_LABELS, datasets, make_trainer


def plain_args(tmp_path, **overrides):
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**settings, **overrides})


def test_l2rw_trains_and_logs_weights(tmp_path):
    trainer = make_trainer(tmp_path, trainer_class=L2RWTrainer, method="l2rw", max_steps=4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    for key in ("clean_loss", "zero_weight_share", "weight_on_corrupted"):
        assert key in logged


class RecordingCleanBatchTrainer(CleanBatchFinetuneTrainer):
    """Keeps each step's noisy and clean batches and the gradient its `training_step` left in `.grad`."""

    def next_clean_batch(self):
        self.last_clean = super().next_clean_batch()
        return self.last_clean

    def training_step(self, model, inputs, num_items_in_batch=None):
        prepared = {key: value.clone() for key, value in self._prepare_inputs(inputs).items() if key != "true_label"}
        assert all(param.grad is None or not param.grad.any() for param in model.parameters())
        loss = super().training_step(model, inputs, num_items_in_batch)
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        self.steps = [*getattr(self, "steps", []), (prepared, self.last_clean, grads, loss.detach())]
        return loss


def test_finetune_clean_batch_step_is_the_weighted_mean_of_noisy_and_clean_losses(tmp_path):
    # Clean batch size 4 beside 8 noisy rows: share 8/12 on the noisy loss, 4/12 on the clean loss.
    trainer = make_trainer(
        tmp_path,
        model=tiny_bert(NUM_LABELS, dropout=0.0),
        trainer_class=RecordingCleanBatchTrainer,
        method="finetune_clean_batch",
        clean_batch_size=4,
        max_steps=2,
        max_grad_norm=0.0,
    )
    initial = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    trainer.train()
    noisy_inputs, (clean_inputs, clean_labels), grads, loss = trainer.steps[0]
    assert len(noisy_inputs["labels"]) == 8 and len(clean_labels) == 4

    reference = tiny_bert(NUM_LABELS, dropout=0.0)
    reference.load_state_dict(initial)
    noisy_labels = noisy_inputs.pop("labels")
    noisy_loss = torch.nn.functional.cross_entropy(reference(**noisy_inputs).logits, noisy_labels)
    clean_loss = torch.nn.functional.cross_entropy(reference(**clean_inputs).logits, clean_labels)
    expected_loss = 8 / 12 * noisy_loss + 4 / 12 * clean_loss
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss.detach())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and "clean_loss" in logged[-1]


def test_finetune_clean_batch_refuses_to_drop_the_clean_batch(tmp_path):
    with pytest.raises(ValueError, match="clean_in_main_loss=False is not accepted"):
        make_trainer(
            tmp_path, trainer_class=CleanBatchFinetuneTrainer, method="finetune_clean_batch", clean_in_main_loss=False
        )


def test_forward_corrected_loss_with_identity_is_cross_entropy():
    logits = torch.randn(5, NUM_LABELS)
    labels = torch.tensor([0, 1, 2, 1, 0])
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(forward_corrected_loss(logits, labels, torch.eye(NUM_LABELS)), expected)


def test_forward_corrected_loss_uses_the_transition_matrix():
    # A model certain of class 0, and noise that always turns 0 into 1: the noisy label 1 is then fully explained.
    logits = torch.tensor([[20.0, 0.0, 0.0]])
    matrix = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert forward_corrected_loss(logits, torch.tensor([1]), matrix).item() < 1e-6


def test_glc_estimates_a_stochastic_matrix_and_trains(tmp_path):
    noisy, clean = datasets()
    stage_one = FinetuneTrainer(
        model=tiny_bert(NUM_LABELS),
        args=plain_args(tmp_path / "one"),
        train_dataset=noisy,
        data_collator=default_data_collator,
    )
    stage_one.train()
    matrix = estimate_transition_matrix(stage_one, clean, NUM_LABELS)
    assert matrix.shape == (NUM_LABELS, NUM_LABELS)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    rows = {key: list(noisy[key]) + list(clean[key]) for key in ("input_ids", "attention_mask", "label")}
    rows["is_clean"] = [0] * len(noisy) + [1] * len(clean)
    stage_two = GLCTrainer(
        model=tiny_bert(NUM_LABELS, seed=1),
        args=plain_args(tmp_path / "two"),
        train_dataset=Dataset.from_dict(rows),
        data_collator=default_data_collator,
        transition_matrix=matrix,
    )
    before = [p.clone() for p in stage_two.model.parameters()]
    stage_two.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, stage_two.model.parameters()))
    assert np.isfinite(stage_two.evaluate(clean)["eval_loss"])


def test_glc_needs_every_class_in_the_clean_set(tmp_path):
    noisy, clean = datasets()
    trainer = FinetuneTrainer(
        model=tiny_bert(NUM_LABELS),
        args=plain_args(tmp_path),
        train_dataset=noisy,
        data_collator=default_data_collator,
    )
    with pytest.raises(ValueError, match="class 2 has none"):
        estimate_transition_matrix(trainer, clean.filter(lambda row: row["label"] != 2), NUM_LABELS)
