from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification, default_data_collator

import mlc_text.trainer as trainer_module
from mlc_text.baselines import L2RWTrainer
from mlc_text.config import MLCTrainingArguments
from mlc_text.corrector_signals import never_corrected_warning
from mlc_text.meta_net import CORRECTOR_WEIGHTS_NAME, LabelCorrector, capture_head_features
from mlc_text.trainer import MLC_STATE_NAME, MLCTrainer, check_parallelism

from .conftest import VOCAB_SIZE, tiny_bert

NUM_LABELS = 3
LENGTH = 8


def separable_rows(num_rows: int, noise_rate: float, seed: int) -> dict[str, list]:
    """Class c texts use tokens from a band of the vocabulary that is c's own; labels flipped uniformly at random."""
    rng = np.random.default_rng(seed)
    band = (VOCAB_SIZE - 10) // NUM_LABELS
    true = rng.integers(0, NUM_LABELS, num_rows)
    input_ids = [list(10 + c * band + rng.integers(0, band, LENGTH)) for c in true]
    flip = rng.random(num_rows) < noise_rate
    noisy = np.where(flip, rng.integers(0, NUM_LABELS, num_rows), true)
    return {
        "input_ids": input_ids,
        "attention_mask": [[1] * LENGTH] * num_rows,
        "label": noisy.tolist(),
        "true_label": true.tolist(),
    }


def datasets(num_noisy=96, num_clean=24, noise_rate=0.4, seed=0):
    noisy = Dataset.from_dict(separable_rows(num_noisy, noise_rate, seed))
    clean_rows = separable_rows(num_clean, 0.0, seed + 1)
    return noisy, Dataset.from_dict(clean_rows)


def make_trainer(tmp_path, model=None, noisy=None, clean=None, corrector=None, trainer_class=MLCTrainer, **overrides):
    if noisy is None:
        noisy, clean = datasets()
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "meta_learning_rate": 1e-3,
        # the corrector on its own (the package defaults add a per-example skip weight starting near the given label)
        "skip_connection": "none",
        "skip_init": 0.0,
        # the method's own steps (MLC's default ends with a clean stage: tests/test_clean_stage.py)
        "finish_on_clean": False,
        # a meta step at every step on the whole clean batch, the paper's (the defaults halve both: see
        # test_mlc_defaults_to_a_quarter_of_the_batch_as_clean_batch_and_a_meta_step_every_fifth_step)
        "meta_update_interval": 1,
        "clean_batch_size": overrides.get("per_device_train_batch_size", 8),
        # the clean batch in the main loss in every epoch, the paper's (the default keeps it for the first epoch only:
        # test_clean_in_main_loss_epochs_drops_the_clean_batch_from_the_main_loss_after_that_many_epochs)
        "clean_in_main_loss_epochs": None,
        "clean_in_main_loss_passes": None,
        "max_steps": 6,
        "report_to": "none",
        "use_cpu": True,
        "logging_steps": 2,
        "save_strategy": "no",
        "seed": 0,
        "meta_hidden_size": 16,
        "label_embedding_size": 8,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    args = MLCTrainingArguments(**settings)
    return trainer_class(
        model=model if model is not None else tiny_bert(NUM_LABELS, dropout=0.1),
        args=args,
        train_dataset=noisy,
        clean_dataset=clean,
        data_collator=default_data_collator,
        **({"corrector": corrector} if issubclass(trainer_class, MLCTrainer) else {}),
    )


def test_training_changes_both_nets_and_logs(tmp_path):
    trainer = make_trainer(tmp_path)
    main_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    corrector_before = {k: v.clone() for k, v in trainer.corrector.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in main_before.items())
    assert any(not torch.equal(v, trainer.corrector.state_dict()[k]) for k, v in corrector_before.items())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("clean_loss", "meta_grad_norm", "mean_entropy", "correction_accuracy", "fixed_share"):
        assert key in logged[-1], key
    assert "skip_weight" not in logged[-1]


def test_skip_weight_is_logged_and_learned(tmp_path):
    trainer = make_trainer(tmp_path, skip_connection=True, meta_learning_rate=0.1)
    trainer.train()
    weights = [entry["skip_weight"] for entry in trainer.state.log_history if "skip_weight" in entry]
    assert len(weights) == 3
    assert weights[-1] == pytest.approx(torch.sigmoid(trainer.corrector.skip_logit).item(), abs=0.05)
    assert weights[-1] != pytest.approx(0.5, abs=1e-3)  # it starts at 0.5; a large meta learning rate moves it


def test_per_example_skip_weight_is_logged_and_starts_at_its_init(tmp_path):
    trainer = make_trainer(tmp_path, skip_connection="per_example", skip_init=2.0, meta_learning_rate=0.05)
    assert trainer.corrector.skip_logit is None
    trainer.train()
    weights = [entry["skip_weight"] for entry in trainer.state.log_history if "skip_weight" in entry]
    assert len(weights) == 3
    # the mean of per-row weights that start near sigmoid(2) = 0.88 and move with the meta-gradient
    assert 0.5 < weights[0] < 1.0 and len(set(weights)) > 1


def test_skip_learning_rate_moves_the_skip_weight_alone(tmp_path):
    # At the corrector's learning rate the skip weight barely leaves 0.5 in a few steps; its own larger rate moves it.
    runs = {}
    for skip_lr in (None, 0.5):
        trainer = make_trainer(tmp_path, skip_connection=True, meta_learning_rate=1e-4, skip_learning_rate=skip_lr)
        trainer.train()
        runs[skip_lr] = trainer
    assert len(runs[None].meta_optimizer.param_groups) == 1
    slow, fast = (torch.sigmoid(runs[lr].corrector.skip_logit).item() for lr in (None, 0.5))
    assert abs(slow - 0.5) < 1e-3 < abs(fast - 0.5)
    skip_group = runs[0.5].meta_optimizer.param_groups[1]
    assert skip_group["params"] == [runs[0.5].corrector.skip_logit] and skip_group["base_lr"] == 0.5
    # both groups follow the main schedule (linear decay to 0 at the last step), each from its own rate
    assert [group["lr"] for group in runs[0.5].meta_optimizer.param_groups] == pytest.approx([1e-4 / 6, 0.5 / 6])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"skip_learning_rate": 0.1}, "needs skip_connection='global' or confidence_gate=True"),
        ({"skip_learning_rate": 0.1, "skip_connection": "per_example"}, "needs skip_connection='global' or confid"),
        ({"confidence_gate": True, "skip_connection": "global"}, "confidence_gate=True needs skip_connection='per_ex"),
        (
            {"confidence_gate": True, "corrector_supervision_interval": 5},
            "confidence_gate=True is not accepted with corrector_warm_start_steps=0 or corrector_supervision_interval=5",
        ),
        ({"skip_connection": "sometimes"}, "skip_connection must be one of none, global, per_example"),
        ({"meta_split": "folds"}, "meta_split must be one of none, batch, rows, got 'folds'"),
        ({"meta_split": "rows", "meta_split_fraction": 1.0}, "meta_split_fraction must be in"),
        ({"meta_split": "batch", "gradient_steps": 2}, "gradient_steps=2 needs meta_split='none'"),
        ({"skip_learning_rate": 0.0, "skip_connection": True}, "skip_learning_rate must be > 0"),
        ({"corrector_teacher": "self"}, "corrector_teacher must be one of none, main_net, got 'self'"),
        (
            {"corrector_teacher": "main_net", "corrector_warm_start_steps": 10},
            "corrector_teacher='main_net' is not accepted with corrector_warm_start_steps=10",
        ),
    ],
)
def test_skip_learning_rate_is_checked(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        MLCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **settings)


def test_clean_in_main_loss_epochs_drops_the_clean_batch_from_the_main_loss_after_that_many_epochs(
    tmp_path, monkeypatch
):
    # 104 noisy rows, batch 8: 13 steps an epoch. With the limit at 1 epoch, the steps of the first epoch (meta steps
    # and the steps between) train on the clean batch and those of the second do not; without it, all of them do.
    # A clean pass carried from the step before (the first epoch's last step is a meta step) is handed over only to a
    # step that trains on the clean batch.
    seen, carried = [], []
    for name in ("meta_step", "corrected_label_step"):
        original = getattr(trainer_module, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs["clean_in_main_loss"])
            carried.append(kwargs["carried_clean_pass"] is not None)
            return _original(*args, **kwargs)

        monkeypatch.setattr(trainer_module, name, spy)
    noisy, clean = datasets(num_noisy=104)
    for limit, expected in ((1.0, [True] * 13 + [False] * 13), (None, [True] * 26), (float("inf"), [True] * 26)):
        seen.clear(), carried.clear()
        trainer = make_trainer(
            tmp_path,
            noisy=noisy,
            clean=clean,
            max_steps=-1,
            num_train_epochs=2,
            meta_update_interval=2,
            clean_in_main_loss_epochs=limit,
        )
        trainer.train()
        assert seen == expected
        assert any(carried) and not any(took and not clean for took, clean in zip(carried, seen))


def test_clean_in_main_loss_passes_drops_the_clean_batch_after_that_many_passes_over_the_trusted_rows(
    tmp_path, monkeypatch
):
    seen = []
    for name in ("meta_step", "corrected_label_step"):
        original = getattr(trainer_module, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs["clean_in_main_loss"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(trainer_module, name, spy)
    noisy, clean = datasets(num_noisy=104)  # 13 steps an epoch
    for passes, epochs, expected in ((5, None, 5), (5, 0.2, 3), (40, 1.0, 13), (None, None, 26)):
        seen.clear()
        trainer = make_trainer(
            tmp_path, noisy=noisy, clean=clean, max_steps=-1, num_train_epochs=2, clean_in_main_loss_epochs=epochs
        )
        stream = trainer.clean_batches
        rows_per_step = stream.batch_size * stream.num_processes
        assert stream.num_processes == 1 and len(stream.dataset) == len(clean)
        # `passes` steps' worth of clean rows, in passes over the trusted rows: the first `passes` steps keep the batch
        trainer.args.clean_in_main_loss_passes = None if passes is None else passes * rows_per_step / len(clean)
        trainer.train()
        assert seen == [True] * expected + [False] * (26 - expected), (passes, epochs)
        assert trainer.clean_passes() == pytest.approx(26 * rows_per_step / len(clean))
        # the benchmark's count of the same run, from what its row records (bench/rows.py)
        row = {
            "method": "mlc", "epochs": 2.0, "clean_batch_size": stream.batch_size,
            "clean_in_main_loss_epochs": 2.0 if epochs is None else epochs, "rows": {"train": 104, "clean": len(clean)},
        }  # fmt: skip
        counted = bench_rows().clean_passes_in_main_loss(row, trainer.args.clean_in_main_loss_passes, batch_size=8)
        assert counted == pytest.approx(expected * rows_per_step / len(clean)), (passes, epochs)


def bench_rows():
    """bench/rows.py, which counts a benchmark row's passes the trainer's way."""
    spec = importlib.util.spec_from_file_location("bench_rows", Path(__file__).resolve().parents[1] / "bench/rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clean_passes_counts_the_trusted_rows_the_main_loss_saw(tmp_path):
    noisy, clean = datasets(num_noisy=104)
    plain = make_trainer(tmp_path / "plain", noisy=noisy, clean=clean, clean_batch_size=4)
    accumulated = make_trainer(
        tmp_path / "ga", noisy=noisy, clean=clean, clean_batch_size=4, gradient_accumulation_steps=2
    )
    halved = make_trainer(tmp_path / "batch", noisy=noisy, clean=clean, clean_batch_size=5, meta_split="batch")
    apart = make_trainer(tmp_path / "rows", noisy=noisy, clean=clean, clean_batch_size=4, meta_split="rows")
    for trainer in (plain, accumulated, halved, apart):
        trainer.state.global_step = 3
    assert plain.clean_passes() == pytest.approx(3 * 4 / len(clean))
    assert accumulated.clean_passes() == pytest.approx(3 * 2 * 4 / len(clean))  # a clean batch per micro-batch
    assert halved.clean_passes() == pytest.approx(3 * 3 / len(clean))  # 3 of the 5 rows train the main net
    assert len(apart.clean_batches.dataset) < len(clean)  # the meta objective's rows are not the main loss's
    assert apart.clean_passes() == pytest.approx(3 * 4 / len(apart.clean_batches.dataset))


def test_l2rw_keeps_the_clean_batch_in_every_epoch(tmp_path, monkeypatch):
    # clean_in_main_loss_epochs is MLC's protocol; L2RW's rows in the benchmark ran with the clean batch throughout.
    seen = []
    original = L2RWTrainer._given_label_step

    def spy(self, model, batch, loss_scale, weights=None, clean_term=True):
        seen.append(clean_term)
        return original(self, model, batch, loss_scale, weights, clean_term)

    monkeypatch.setattr(L2RWTrainer, "_given_label_step", spy)
    trainer = make_trainer(
        tmp_path, trainer_class=L2RWTrainer, max_steps=-1, num_train_epochs=2, clean_in_main_loss_epochs=1.0
    )
    trainer.train()
    assert seen == [True] * 24


@pytest.mark.parametrize("value, expected", [("inf", float("inf")), ("2", 2.0), (None, None)])
def test_clean_in_main_loss_epochs_reads_text_from_a_file_of_arguments(tmp_path, value, expected):
    args = MLCTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", clean_in_main_loss_epochs=value
    )
    assert args.clean_in_main_loss_epochs == expected
    with pytest.raises(ValueError, match="clean_in_main_loss_epochs must be a number > 0, inf or None .*got 'soon'"):
        MLCTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", clean_in_main_loss_epochs="soon"
        )


def test_clean_in_main_loss_epochs_changes_nothing_within_its_epochs(tmp_path):
    runs = {}
    for limit in (None, 1.0):
        trainer = make_trainer(
            tmp_path / str(limit), max_steps=-1, num_train_epochs=1, clean_in_main_loss_epochs=limit
        )
        trainer.train()
        runs[limit] = trainer
    for (name, before), after in zip(runs[None].model.named_parameters(), runs[1.0].model.parameters()):
        torch.testing.assert_close(after, before, msg=name)
    from mlc_text.arguments import parse_args

    *_, parsed = parse_args(["--output_dir", str(tmp_path), "--clean_in_main_loss_epochs", "inf", "--use_cpu", "true"])
    assert parsed.clean_in_main_loss_epochs == float("inf")  # the command line's "throughout"
    for name in ("clean_in_main_loss_epochs", "clean_in_main_loss_passes"):
        for bad in (0, -1.0, "nan", [1]):
            with pytest.raises(
                ValueError, match=rf"{name} must be a number > 0, inf or None .*got {re.escape(repr(bad))}"
            ):
                MLCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{name: bad})
    assert (
        MLCTrainingArguments(output_dir=str(tmp_path), clean_in_main_loss_passes="25").clean_in_main_loss_passes == 25
    )


def test_confidence_gate_slope_learns_at_the_skip_learning_rate_and_is_logged(tmp_path):
    trainer = make_trainer(
        tmp_path, skip_connection="per_example", skip_init=2.0, confidence_gate=True, skip_learning_rate=0.05
    )
    assert trainer.corrector.confidence_slope.item() == 0.0
    trainer.train()
    groups = trainer.meta_optimizer.param_groups
    assert groups[1]["params"] == [trainer.corrector.confidence_slope] and groups[1]["base_lr"] == 0.05
    slopes = [entry["confidence_slope"] for entry in trainer.state.log_history if "confidence_slope" in entry]
    assert len(slopes) == 3 and slopes[-1] == pytest.approx(trainer.corrector.confidence_slope.item(), abs=1e-4)
    # Adam moves a scalar about one learning rate per step: six meta steps at 0.05 (decaying) leave it well off 0
    assert 0.01 < abs(slopes[-1]) < 0.3


def test_main_net_teacher_trains_and_starts_from_the_main_nets_prediction(tmp_path):
    noisy, clean = datasets()
    trainer = make_trainer(tmp_path, noisy=noisy, clean=clean, corrector_teacher="main_net")
    assert trainer.corrector.reads_main_logits
    # before training the corrector's labels are the main net's own predictions (no skip weight here)
    before = trainer.correct_labels(noisy)
    predictions = trainer.predict(noisy.remove_columns("true_label")).predictions
    np.testing.assert_allclose(before["corrected"], torch.softmax(torch.tensor(predictions), -1).numpy(), atol=1e-5)
    corrector_before = {k: v.clone() for k, v in trainer.corrector.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, trainer.corrector.state_dict()[k]) for k, v in corrector_before.items())
    after = trainer.correct_labels(noisy)["corrected"]
    np.testing.assert_allclose(after.sum(-1), 1.0, atol=1e-5)
    assert np.abs(after - before["corrected"]).max() > 1e-3


def test_loss_falls_and_correction_beats_noisy_labels(tmp_path):
    noisy, clean = datasets(num_noisy=320, num_clean=60, noise_rate=0.4)
    trainer = make_trainer(
        tmp_path,
        noisy=noisy,
        clean=clean,
        max_steps=-1,
        num_train_epochs=3,
        learning_rate=2e-3,
        meta_learning_rate=1e-2,
        per_device_train_batch_size=16,
        logging_steps=10,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0], losses
    result = trainer.correct_labels(noisy)
    corrected = result["corrected"].argmax(-1)
    noisy_accuracy = (result["noisy_labels"] == result["true_labels"]).mean()
    correction_accuracy = (corrected == result["true_labels"]).mean()
    assert noisy_accuracy < 0.75
    assert correction_accuracy > noisy_accuracy + 0.05, (correction_accuracy, noisy_accuracy)


class RecordingTrainer(MLCTrainer):
    """Keeps a copy of each meta-gradient the trainer hands to the look-ahead buffer."""

    def _meta_optimizer_step(self):
        if self._pending_meta_grads is not None:
            self.recorded = getattr(self, "recorded", []) + [[g.clone() for g in self._pending_meta_grads]]
        super()._meta_optimizer_step()


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
@pytest.mark.parametrize("gradient_steps", [1, 3])
def test_trainer_meta_gradient_matches_reference(tmp_path, optim, gradient_steps):
    recorded = {}
    for path in ("reference", "jvp"):
        model = tiny_bert(NUM_LABELS, dropout=0.0).double()
        corrector = LabelCorrector(NUM_LABELS, 32, hidden_size=16, label_embedding_size=8).double()
        trainer = make_trainer(
            tmp_path / path,
            model=model,
            corrector=corrector,
            trainer_class=RecordingTrainer,
            optim=optim,
            meta_gradient=path,
            gradient_steps=gradient_steps,
            max_steps=3,
            learning_rate=0.05,
        )
        trainer.train()
        recorded[path] = trainer.recorded
    assert len(recorded["jvp"]) == 3
    for step_ref, step_jvp in zip(recorded["reference"], recorded["jvp"]):
        ref = torch.cat([g.flatten() for g in step_ref])
        jvp = torch.cat([g.flatten() for g in step_jvp])
        assert ((jvp - ref).norm() / ref.norm()).item() < 1e-5


def test_normalize_meta_gradient_hands_the_corrector_the_unit_direction(tmp_path):
    seen = {}
    for flag in (False, True):
        trainer = make_trainer(tmp_path / str(flag), normalize_meta_gradient=flag, max_steps=1)
        step, grads = trainer.meta_optimizer.step, []

        def recording_step(*args, _step=step, _grads=grads, _trainer=trainer, **kwargs):
            _grads.append(torch.cat([p.grad.flatten() for p in _trainer.corrector.parameters() if p.grad is not None]))
            return _step(*args, **kwargs)

        trainer.meta_optimizer.step = recording_step
        trainer.train()
        (seen[flag],) = grads
    assert torch.linalg.vector_norm(seen[True]).item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(seen[True], seen[False] / torch.linalg.vector_norm(seen[False]))


def test_auto_meta_gradient_takes_the_forward_difference_in_float32_and_jvp_under_bf16(tmp_path):
    trained = {}
    for path in ("auto", "fd"):
        trainer = make_trainer(tmp_path / path, trainer_class=RecordingTrainer, meta_gradient=path, max_steps=2)
        trainer.train()
        trained[path] = trainer
    assert trained["auto"].meta_gradient == "fd" and trained["auto"].args.meta_gradient == "auto"
    for auto, fd in zip(trained["auto"].recorded, trained["fd"].recorded):  # the same path, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(auto, fd))
    assert make_trainer(tmp_path / "bf16", meta_gradient="auto", bf16=True).meta_gradient == "jvp"
    assert make_trainer(tmp_path / "named", meta_gradient="reference", bf16=True).meta_gradient == "reference"


@pytest.mark.parametrize(
    "settings",
    [{}, {"meta_split": "rows"}, {"meta_split": "batch", "meta_gradient": "fd", "corrector_warm_start_steps": 5}],
)
def test_resume_reaches_the_same_parameters(tmp_path, settings):
    full = make_trainer(tmp_path / "full", max_steps=12, **settings)
    full.train()
    first = make_trainer(tmp_path / "resumed", max_steps=12, save_strategy="steps", save_steps=6, **settings)
    first.train()  # writes checkpoint-6 and checkpoint-12
    checkpoint = tmp_path / "resumed" / "checkpoint-6"
    assert (checkpoint / MLC_STATE_NAME).is_file() and (checkpoint / CORRECTOR_WEIGHTS_NAME).is_file()
    resumed = make_trainer(tmp_path / "resumed", max_steps=12, save_strategy="steps", save_steps=6, **settings)
    with torch.no_grad():  # scramble both nets: only the checkpoint may bring them back
        for param in list(resumed.model.parameters()) + list(resumed.corrector.parameters()):
            param.add_(1.0)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, expected), actual in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    for (name, expected), actual in zip(full.corrector.state_dict().items(), resumed.corrector.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)


def test_saved_model_loads_without_mlc_text(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / CORRECTOR_WEIGHTS_NAME).is_file()
    script = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'final')!r})\n"
        "assert 'mlc_text' not in sys.modules\n"
        "print(type(model).__name__, model.config.num_labels)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["BertForSequenceClassification", str(NUM_LABELS)]
    reloaded = LabelCorrector.from_pretrained(str(tmp_path / "final"))
    for key, value in trainer.corrector.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value.cpu())


def test_unsupported_optimizer_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="adafactor"):
        make_trainer(tmp_path, optim="adafactor")


def test_model_without_known_head_fails_at_start(tmp_path):
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=1, n_head=2, num_labels=NUM_LABELS, pad_token_id=0)
    with pytest.raises(ValueError, match="cannot find the classification head of GPT2ForSequenceClassification"):
        make_trainer(tmp_path, model=GPT2ForSequenceClassification(config))


def test_clean_set_missing_a_class_warns(tmp_path, caplog):
    noisy, clean = datasets()
    clean = clean.filter(lambda row: row["label"] != 2)
    with caplog.at_level(logging.WARNING, logger="mlc_text.trainer"):
        make_trainer(tmp_path, noisy=noisy, clean=clean)
    assert "no row of class 2" in caplog.text


def test_a_corrector_that_never_replaced_a_given_label_is_reported(tmp_path, caplog):
    # skip weight near 1 (logit 8): the given label is the argmax of every corrected label, whatever the corrector
    trainer = make_trainer(tmp_path, skip_connection="per_example", skip_init=8.0, logging_steps=1, max_steps=3)
    with caplog.at_level("WARNING", logger="mlc_text.trainer"):
        trainer.train()
    assert [entry["agreement_with_noisy"] for entry in trainer.state.log_history if "agreement_with_noisy" in entry]
    assert "never replaced a given label over 3 logs" in caplog.text
    assert "trusts every given label (skip weight 1.00 at the last log)" in caplog.text
    assert "start the skip weight lower, e.g. skip_init=2.0 (now 8.0)" in caplog.text
    trainer.state.log_history.append({"agreement_with_noisy": 0.97})  # one log with a replaced label: no warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="mlc_text.trainer"):
        trainer._warn_at_end_of_run()
    assert "never replaced" not in caplog.text


def test_the_never_corrected_warning_says_whether_the_labels_were_softened_or_trusted_as_they_are():
    args = MLCTrainingArguments(output_dir="unused", meta_update_interval=5)
    logs = [{"agreement_with_noisy": 1.0, "skip_weight": 0.89}, {"agreement_with_noisy": 1.0, "skip_weight": 0.9}]
    assert "the given labels, softened" in never_corrected_warning(logs, args=args)
    assert "expected where each given label is right more often than wrong" in never_corrected_warning(logs, args=args)
    logs[-1]["skip_weight"] = 0.996  # the meta-gradient drove s to 1 (as at meta_learning_rate 1e-2)
    message = never_corrected_warning(logs, args=args)
    assert "trusts every given label (skip weight 1.00" in message and "softened" not in message
    assert "lower meta_learning_rate (now 0.0003): the meta-gradient drove the skip weight to 1" in message
    args.skip_learning_rate = 0.1
    assert "lower skip_learning_rate (now 0.1)" in never_corrected_warning(logs, args=args)
    args.skip_learning_rate = None
    assert "meta_update_interval=1 (now 5)" in never_corrected_warning(logs[:1], args=args)  # softened: more steps
    logs[0]["skip_weight"] = 0.995  # at 1 by the first log, from skip_init 2: the learning rate, not the start
    assert "lower meta_learning_rate" in never_corrected_warning(logs, args=args)
    assert never_corrected_warning([{"skip_weight": 1.0}], args=args) is None  # no agreement logged: nothing to say


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"meta_gradient": "hessian"},
            "meta_gradient must be one of auto, jvp, fd, fd_central, reference, got 'hessian'",
        ),
        ({"gradient_steps": 0}, "gradient_steps must be an integer >= 1, got 0"),
        ({"meta_update_interval": 0}, "meta_update_interval must be an integer >= 1, got 0"),
        ({"method": "coteaching"}, "method must be one of"),
        ({"meta_learning_rate": 0.0}, "meta_learning_rate must be > 0, got 0.0"),
    ],
)
def test_bad_settings_fail_early(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **setting)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"fp16": True}, None),  # accepted since issue 26: the hand-computed gradients are loss-scaled
        ({"mixed_precision": "fp16"}, None),
        ({"fsdp": "full_shard"}, "does not support FSDP"),
        ({"deepspeed": "ds.json"}, "does not support DeepSpeed"),
    ],
)
def test_unsupported_parallelism_is_refused(setting, message):
    args = SimpleNamespace(**{"fp16": False, "fsdp": "", "deepspeed": None, **setting})
    if message is None:
        check_parallelism(args)
        return
    with pytest.raises(ValueError, match=message):
        check_parallelism(args)


class CountingTrainer(MLCTrainer):
    """Counts the clean batch's forward/backward passes at w (the main loss's clean term) of each step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        from mlc_text import meta_grad

        original, calls = meta_grad.loss_and_grads, []

        def counting(model, inputs, labels, params=None, **kwargs):
            calls.append(params is None)  # params=None: at the model's own weights w
            return original(model, inputs, labels, params=params, **kwargs)

        meta_grad.loss_and_grads = counting
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            meta_grad.loss_and_grads = original
        self.clean_passes_at_w = getattr(self, "clean_passes_at_w", []) + [sum(calls)]
        return loss


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({}, [1, 0, 0, 0, 0, 0]),  # the first step has nothing to reuse
        ({"reuse_clean_pass": False}, [1] * 6),
        ({"gradient_accumulation_steps": 2, "max_steps": 3}, [1] * 6),  # real step != one micro-batch's virtual step
        ({"meta_update_interval": 2}, [1, 0, 1, 0, 1, 0]),  # a corrected step leaves no clean pass at w'
        ({"meta_split": "batch"}, [1] * 6),  # the meta half at w' is not the next step's clean term
        ({"meta_split": "rows"}, [1] * 6),
    ],
)
def test_clean_pass_is_reused_only_when_exact(tmp_path, overrides, expected):
    trainer = make_trainer(tmp_path, trainer_class=CountingTrainer, **overrides)
    trainer.train()
    assert trainer.clean_passes_at_w == expected


class RowRecordingTrainer(MLCTrainer):
    """Records the rows of each step's clean term and meta objective (their first token ids)."""

    def _meta_batch(self, inputs, noisy_labels):
        batch = super()._meta_batch(inputs, noisy_labels)
        meta_inputs, meta_labels = batch.objective
        self.recorded = getattr(self, "recorded", []) + [
            (batch.clean_inputs["input_ids"].tolist(), meta_inputs["input_ids"].tolist(), meta_labels.tolist())
        ]
        return batch


def test_meta_split_rows_keeps_the_meta_rows_out_of_the_main_loss(tmp_path):
    noisy, clean = datasets(num_noisy=96, num_clean=30)
    trainer = make_trainer(
        tmp_path, noisy=noisy, clean=clean, trainer_class=RowRecordingTrainer, meta_split="rows", max_steps=8
    )
    trainer.train()
    main_rows = {tuple(row) for step in trainer.recorded for row in step[0]}
    meta_rows = {tuple(row) for step in trainer.recorded for row in step[1]}
    assert main_rows and meta_rows and not main_rows & meta_rows
    assert len(main_rows | meta_rows) <= 30
    labels = [label for step in trainer.recorded for label in step[2]]
    assert set(labels) == set(range(NUM_LABELS))  # stratified: every class is in the meta rows
    assert "clean_loss" in trainer.state.log_history[-2]


def test_meta_split_batch_halves_each_clean_batch(tmp_path):
    trainer = make_trainer(tmp_path, trainer_class=RowRecordingTrainer, meta_split="batch", max_steps=2)
    trainer.train()
    for main, meta, _ in trainer.recorded:
        assert len(main) == len(meta) == 4  # the clean batch of 8, cut in two
        assert not {tuple(row) for row in main} & {tuple(row) for row in meta}


def test_a_corrector_that_stays_flat_is_reported(tmp_path, caplog):
    corrector = LabelCorrector(NUM_LABELS, 32, hidden_size=16, label_embedding_size=8)
    with torch.no_grad():  # zero output layer: exactly uniform labels, and a tiny meta lr keeps them so
        corrector.mlp[-1].weight.zero_()
    trainer = make_trainer(tmp_path, corrector=corrector, meta_learning_rate=1e-9, logging_steps=1)
    with caplog.at_level("WARNING", logger="mlc_text.trainer"):
        trainer.train()
    assert "stayed near uniform" in caplog.text and "meta_learning_rate=1e-09" in caplog.text

    trainer.state.log_history.append({"mean_entropy": 0.1})  # the last log decides: a sharp corrector, no warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="mlc_text.trainer"):
        trainer._warn_at_end_of_run()
    assert "stayed near uniform" not in caplog.text


@pytest.mark.parametrize(
    "logs, step, expected",
    [
        ({"mean_entropy": 1.08}, 5, "still near uniform"),  # log 3 = 1.10: flat, after a quarter of the run
        ({"mean_entropy": 1.08}, 1, None),  # too early to tell: the corrector starts near uniform
        ({"mean_entropy": 0.5}, 5, None),
        ({"clean_loss": 0.01}, 2, "fits the rows of the meta objective"),
        ({"clean_loss": 0.4}, 2, None),
        ({"agreement_with_noisy": 0.3}, 2, "over-correcting"),
        ({"agreement_with_noisy": 0.8}, 2, None),
    ],
)
def test_signals_of_a_corrector_that_does_not_learn_are_warned_once(tmp_path, caplog, logs, step, expected):
    trainer = make_trainer(tmp_path)
    trainer.state.global_step, trainer.state.max_steps = step, 6
    with caplog.at_level("WARNING", logger="mlc_text.trainer"):
        trainer._warn_on_signals(dict(logs))
        trainer._warn_on_signals(dict(logs))
    messages = [record.message for record in caplog.records]
    if expected is None:
        assert messages == []
    else:
        assert len(messages) == 1 and expected in messages[0]


def test_memorised_meta_objective_advice_depends_on_the_split(tmp_path, caplog):
    for split, advice in (("none", "method='l2rw' (its weights do not fade"), ("rows", "Add trusted rows, or train")):
        trainer = make_trainer(tmp_path / split, meta_split=split)
        caplog.clear()
        with caplog.at_level("WARNING", logger="mlc_text.trainer"):
            trainer._warn_on_signals({"clean_loss": 0.01})
        assert advice in caplog.text


def test_warm_start_trains_the_corrector_on_the_trusted_rows_once(tmp_path, caplog):
    trainer = make_trainer(tmp_path, corrector_warm_start_steps=30, max_steps=2, skip_connection="per_example")
    before = {k: v.clone() for k, v in trainer.corrector.state_dict().items()}
    with caplog.at_level("INFO", logger="mlc_text.trainer"):
        trainer.warm_start()
    assert "corrector warm start: loss" in caplog.text and trainer.warm_started
    after = {k: v.clone() for k, v in trainer.corrector.state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.train()  # the first step must not warm-start again: only the meta-gradient moves the corrector then
    assert trainer.warm_started


def test_mlc_defaults_to_a_quarter_of_the_batch_as_clean_batch_and_a_meta_step_every_fifth_step(tmp_path):
    args = MLCTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=7)
    assert args.clean_batch_size is None and args.meta_update_interval == 5
    trainer = make_trainer(
        tmp_path, per_device_train_batch_size=7, clean_batch_size=None, meta_update_interval=5, max_steps=11
    )
    assert trainer.clean_batch_size == 2  # a quarter of 7, rounded up
    assert len(next(trainer.clean_batches)["labels"]) == 2
    calls = []
    original = trainer_module.meta_step

    def spy(*args, **kwargs):
        calls.append(trainer.state.global_step)
        return original(*args, **kwargs)

    trainer_module.meta_step = spy
    try:
        trainer.train()
    finally:
        trainer_module.meta_step = original
    assert calls == [0, 5, 10]
    l2rw = make_trainer(
        tmp_path / "l2rw",
        trainer_class=L2RWTrainer,
        method="l2rw",
        per_device_train_batch_size=7,
        clean_batch_size=None,
    )
    assert l2rw.clean_batch_size == 7  # the other methods keep the whole batch (their papers')
    assert make_trainer(tmp_path / "set", clean_batch_size=3).clean_batch_size == 3


def test_corrector_supervision_runs_every_interval_after_the_first_step(tmp_path):
    trainer = make_trainer(tmp_path, corrector_supervision_interval=2, corrector_supervision_steps=3, max_steps=6)
    calls = []
    supervise = trainer.supervise_corrector

    def spy(steps, seed):
        calls.append((trainer.state.global_step, steps, seed))
        return supervise(steps, seed)

    trainer.supervise_corrector = spy
    trainer.train()
    assert calls == [(2, 3, 2), (4, 3, 4)]  # not at step 0 (the warm start's place); seeds differ per update
    logged = [entry for entry in trainer.state.log_history if "corrector_supervised_loss" in entry]
    assert logged and all(entry["corrector_supervised_loss"] > 0 for entry in logged)


def test_supervising_the_corrector_teaches_it_the_trusted_rows_true_labels(tmp_path):
    trainer = make_trainer(tmp_path)
    losses = trainer.supervise_corrector(200, seed=0)
    assert losses[-1] < 0.5 * losses[0]  # the loss of the true label falls, whichever label the row is shown with


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"corrector_supervision_interval": -1}, "corrector_supervision_interval must be an integer >= 0, got -1"),
        ({"corrector_supervision_steps": 0}, "corrector_supervision_steps must be an integer >= 1, got 0"),
    ],
)
def test_corrector_supervision_settings_are_checked(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        MLCTrainingArguments(output_dir=str(tmp_path), **setting)


def test_without_warm_start_the_first_step_leaves_the_corrector_to_the_meta_gradient(tmp_path):
    trainer = make_trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.corrector.state_dict().items()}
    trainer.warm_start()
    assert all(torch.equal(before[k], v) for k, v in trainer.corrector.state_dict().items())


def test_given_label_trust_falls_from_its_start_to_zero_over_its_share_of_the_run(tmp_path):
    trainer = make_trainer(tmp_path, trust_given_labels_for=0.5, max_steps=8)
    trainer.state.max_steps = 8
    trust = []
    for step in range(8):
        trainer.state.global_step = step
        trust.append(trainer.given_label_trust())
    assert trust == pytest.approx([0.9, 0.675, 0.45, 0.225, 0.0, 0.0, 0.0, 0.0])
    assert make_trainer(tmp_path / "off").given_label_trust() == 0.0


class TrustRecordingTrainer(MLCTrainer):
    """Records the given label's weight in the labels each step trains on."""

    def _meta_batch(self, inputs, noisy_labels):
        batch = super()._meta_batch(inputs, noisy_labels)
        onehot = torch.nn.functional.one_hot(noisy_labels, NUM_LABELS).float()
        with torch.no_grad(), capture_head_features(self.head) as store:
            self.model(**inputs)
            plain, used = (
                self.corrector(store["features"], noisy_labels),
                self.anchored(store["features"], noisy_labels),
            )
        # used = trust * onehot + (1 - trust) * plain: solve for trust on the given label's column
        picked = onehot.bool()
        trust = ((used[picked] - plain[picked]) / (1 - plain[picked])).mean().item()
        self.trusts = getattr(self, "trusts", []) + [round(trust, 4)]
        return batch


def test_the_steps_train_on_labels_blended_with_the_given_ones(tmp_path):
    trainer = make_trainer(tmp_path, trainer_class=TrustRecordingTrainer, trust_given_labels_for=0.5, max_steps=4)
    trainer.train()
    assert trainer.trusts == pytest.approx([0.9, 0.45, 0.0, 0.0], abs=1e-3)


def test_a_clean_set_smaller_than_the_clean_batch_gives_smaller_batches_and_a_warning(tmp_path, caplog):
    noisy, clean = datasets(num_noisy=48, num_clean=6)
    with caplog.at_level("WARNING", logger="mlc_text.base_trainer"):
        trainer = make_trainer(tmp_path, noisy=noisy, clean=clean, clean_batch_size=8, max_steps=2)
    assert trainer.clean_batches.batch_size == 6
    assert "clean batches of 6 rows instead of clean_batch_size=8: there are 6 clean rows" in caplog.text
    trainer.train()
    assert trainer.state.global_step == 2
