from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

from mlc_text.baselines import (
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
