"""The clean stage (`finish_on_clean`): continuous fine-tuning on every trusted row after a method's own training."""

from __future__ import annotations

import math

import pytest
import torch

import mlc_text.base_trainer as base_trainer
from mlc_text import MLCTrainingArguments
from mlc_text.baselines import CleanBatchFinetuneTrainer, L2RWTrainer
from mlc_text.clean_stage import clean_stage_arguments
from mlc_text.trainer import MLCTrainer

from .test_trainer import datasets, make_trainer


@pytest.fixture
def recorded_stage(monkeypatch):
    """Wraps the clean stage: records its rows and the model's weights just before and after it."""
    record = {}
    real = base_trainer.train_on_clean_rows

    def recording(trainer, rows):
        record["rows"] = rows
        record["before"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        metrics = real(trainer, rows)
        record["after"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return metrics

    monkeypatch.setattr(base_trainer, "train_on_clean_rows", recording)
    return record


@pytest.mark.parametrize("trainer_class", [MLCTrainer, L2RWTrainer, CleanBatchFinetuneTrainer])
def test_finish_on_clean_fine_tunes_the_trained_model_on_the_trusted_rows(tmp_path, recorded_stage, trainer_class):
    noisy, clean = datasets(num_noisy=48, num_clean=20)
    trainer = make_trainer(
        tmp_path, noisy=noisy, clean=clean, trainer_class=trainer_class, finish_on_clean=True, clean_stage_epochs=2
    )
    output = trainer.train()
    assert len(recorded_stage["rows"]) == 20
    before, after = recorded_stage["before"], recorded_stage["after"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the stage trained the trainer's model
    assert output.metrics["clean_stage_epoch"] == 2.0
    assert trainer.state.global_step == 6  # the method's own steps; the stage has its own trainer


def test_without_finish_on_clean_there_is_no_stage(tmp_path, recorded_stage):
    output = make_trainer(tmp_path).train()
    assert recorded_stage == {}
    assert not any(name.startswith("clean_stage") for name in output.metrics)


def test_the_clean_stage_also_trains_on_the_rows_kept_for_the_meta_objective(tmp_path, recorded_stage):
    noisy, clean = datasets(num_noisy=48, num_clean=30)
    trainer = make_trainer(
        tmp_path, noisy=noisy, clean=clean, meta_split="rows", finish_on_clean=True, clean_stage_epochs=1
    )
    assert len(trainer.clean_batches.dataset) < 30  # the clean batches hold the main share only
    trainer.train()
    assert len(recorded_stage["rows"]) == 30


def test_clean_stage_arguments_start_a_fresh_budget(tmp_path):
    args = MLCTrainingArguments(
        output_dir=str(tmp_path), max_steps=7, clean_stage_epochs=3, eval_strategy="steps", eval_steps=2
    )
    stage = clean_stage_arguments(args, str(tmp_path / "stage"))
    assert (stage.num_train_epochs, stage.max_steps) == (3, -1)
    assert stage.eval_strategy == "no" and stage.save_strategy == "no" and stage.report_to == []
    assert stage.output_dir == str(tmp_path / "stage")
    own = clean_stage_arguments(args)  # finetune_then_clean's second stage is the run's own trainer
    assert own.output_dir == str(tmp_path) and own.eval_strategy == "steps"
    assert math.isclose(own.num_train_epochs, 3)


@pytest.mark.parametrize("method", ["finetune", "clean_only", "oracle", "glc", "finetune_then_clean"])
def test_finish_on_clean_is_refused_where_the_method_has_no_stage(tmp_path, method):
    with pytest.raises(
        ValueError, match=f"accepted with method mlc, l2rw, finetune_clean_batch, got method '{method}'"
    ):
        MLCTrainingArguments(output_dir=str(tmp_path), method=method, finish_on_clean=True)


@pytest.mark.parametrize("trainer_class, expected", [(MLCTrainer, True), (L2RWTrainer, False)])
def test_by_default_mlc_ends_with_the_clean_stage_and_the_baselines_do_not(
    tmp_path, recorded_stage, trainer_class, expected
):
    trainer = make_trainer(tmp_path, trainer_class=trainer_class, finish_on_clean=None, clean_stage_epochs=1)
    assert trainer.finishes_on_clean is expected
    trainer.train()
    assert ("rows" in recorded_stage) is expected


def test_the_stage_arguments_run_without_the_evaluations_of_the_method(tmp_path):
    args = MLCTrainingArguments(
        output_dir=str(tmp_path),
        eval_strategy="epoch",
        eval_on_start=True,
        lr_scheduler_type="reduce_lr_on_plateau",
        warmup_steps=50,
    )
    stage = clean_stage_arguments(args, str(tmp_path / "stage"))  # refused by TrainingArguments if kept as they are
    assert stage.eval_on_start is False and str(stage.lr_scheduler_type.value) == "linear"
    assert stage.warmup_steps == 0.1  # 50 steps would be the whole stage: a share of it instead
    assert clean_stage_arguments(MLCTrainingArguments(output_dir=str(tmp_path), warmup_steps=0.2)).warmup_steps == 0.2
