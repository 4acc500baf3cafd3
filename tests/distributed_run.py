"""
Trains tiny MLC, L2RW and finetune_clean_batch runs and saves what each process ends with; `tests/test_distributed.py`
launches it on two CPU processes and calls [`train_and_save`] in-process for the single-process reference.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 29517 tests/distributed_run.py --output_dir /tmp/out \
        --per_device_train_batch_size 4 --clean_batch_size 2

Each process writes `{run}_rank{r}.pt` (runs: `mlc`, `l2rw`, `finetune_clean_batch`, `mlc_accum2` with
gradient_accumulation_steps=2, and `mlc_then_clean`, MLC followed by one epoch of the clean stage) with the state dicts of the main net (and of the corrector for MLC), the noisy and
clean `input_ids` it trained on, micro-batch by micro-batch, what it all-reduced by hand, and how the run was
distributed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests` as a package

from mlc_text.baselines import CleanBatchFinetuneTrainer, L2RWTrainer  # noqa: E402
from mlc_text.meta_net import LabelCorrector  # noqa: E402
from mlc_text.pipeline import end_process_group  # noqa: E402
from mlc_text.trainer import MLCTrainer  # noqa: E402
from tests.conftest import tiny_bert  # noqa: E402
from tests.test_trainer import NUM_LABELS, datasets, make_trainer  # noqa: E402

__all__ = ["RUNS", "TRAINER_CLASSES", "build_nets", "recording", "train_and_save"]

TRAINER_CLASSES = {"mlc": MLCTrainer, "l2rw": L2RWTrainer, "finetune_clean_batch": CleanBatchFinetuneTrainer}
# Run name -> (method, gradient_accumulation_steps).
RUNS = {
    "mlc": ("mlc", 1),
    "l2rw": ("l2rw", 1),
    "finetune_clean_batch": ("finetune_clean_batch", 1),
    "mlc_accum2": ("mlc", 2),
    "mlc_then_clean": ("mlc", 1),
}
# Runs that end with the clean stage (`finish_on_clean`, one epoch): plain fine-tuning under DDP after MLC's steps.
CLEAN_STAGE_RUNS = ("mlc_then_clean",)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def recording(trainer_class: type) -> type:
    """
    A subclass of `trainer_class` that keeps, for each training step (micro-batch): the noisy and clean `input_ids`,
    the tensors handed to `all_reduce_mean` (as counts) and whether the DDP wrapper's own forward ran.
    """

    class Recording(trainer_class):
        seen_input_ids: list
        seen_clean_input_ids: list
        reduce_log: list  # per step: (calls of all_reduce_mean, tensors reduced, distinct tensor objects among them)
        wrapped_forward_calls: int

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not hasattr(self, "seen_input_ids"):
                self.seen_input_ids, self.seen_clean_input_ids, self.reduce_log = [], [], []
                self.wrapped_forward_calls = 0
                if model is not self.accelerator.unwrap_model(model):  # DDP: count calls of the wrapper's forward
                    model.register_forward_pre_hook(
                        lambda *_: setattr(self, "wrapped_forward_calls", self.wrapped_forward_calls + 1)
                    )
            self.seen_input_ids.append(inputs["input_ids"].detach().cpu().clone())
            self._reduced_now, self._reduce_calls = [], 0
            loss = super().training_step(model, inputs, num_items_in_batch)
            distinct = len({id(tensor) for tensor in self._reduced_now})  # the list keeps them alive: ids are unique
            self.reduce_log.append((self._reduce_calls, len(self._reduced_now), distinct))
            self._reduced_now = []
            return loss

        def next_clean_batch(self):
            clean_inputs, clean_labels = super().next_clean_batch()
            self.seen_clean_input_ids.append(clean_inputs["input_ids"].detach().cpu().clone())
            return clean_inputs, clean_labels

        def all_reduce_mean(self, tensors):
            self._reduce_calls += 1
            self._reduced_now.extend(tensors)
            super().all_reduce_mean(tensors)

    return Recording


def build_nets(method: str, dtype: str = "float64") -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The main net and (for MLC) the corrector every process and the reference run start from, seeded."""
    model = tiny_bert(NUM_LABELS, dropout=0.0).to(DTYPES[dtype])
    if method != "mlc":
        return model, None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        corrector = LabelCorrector(NUM_LABELS, 32, hidden_size=16, label_embedding_size=8)
    return model, corrector.to(DTYPES[dtype])


def train_and_save(
    run: str,
    output_dir: str,
    per_device_train_batch_size: int,
    clean_batch_size: int,
    max_steps: int = 4,
    dtype: str = "float64",
) -> str:
    """
    Trains run `run` (a key of `RUNS`: the method and its gradient accumulation) for `max_steps` optimizer steps
    (seed 0, dropout 0, a fixed data seed so that every process and the single-process run draw the same noisy
    permutation) in `dtype` and saves this process's final state.

    Returns:
        The path of the saved file.
    """
    method, accumulation = RUNS[run]
    noisy, clean = datasets()
    model, corrector = build_nets(method, dtype)
    # MLC on its exact path: a forward difference divides rounding that depends on the batch's shape by its step
    # (~1e-8 in float64), so one process and two agree only to about 1e-6 after a few steps, not to 1e-10.
    extra = {} if corrector is None else {"corrector": corrector, "meta_gradient": "jvp"}
    trainer = make_trainer(
        os.path.join(output_dir, run),
        model=model,
        noisy=noisy,
        clean=clean,
        trainer_class=recording(TRAINER_CLASSES[method]),
        per_device_train_batch_size=per_device_train_batch_size,
        clean_batch_size=clean_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        data_seed=0,
        learning_rate=1e-2,
        meta_learning_rate=1e-2,
        finish_on_clean=run in CLEAN_STAGE_RUNS,
        clean_stage_epochs=1,
        **extra,
    )
    trainer.train()
    state = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "model_is_wrapped": trainer.model_wrapped is not trainer.model,
        "wrapped_forward_calls": trainer.wrapped_forward_calls,
        "reduce_log": trainer.reduce_log,
        "model": {key: value.detach().cpu() for key, value in trainer.model.state_dict().items()},
        "seen_input_ids": trainer.seen_input_ids,
        "seen_clean_input_ids": trainer.seen_clean_input_ids,
        "optimizer_steps": trainer.state.global_step,
    }
    if method == "mlc":
        state["corrector"] = {key: value.detach().cpu() for key, value in trainer.corrector.state_dict().items()}
    path = os.path.join(output_dir, f"{run}_rank{trainer.args.process_index}.pt")
    torch.save(state, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--clean_batch_size", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--dtype", default="float64", choices=list(DTYPES))
    args = parser.parse_args()
    for run in args.runs:
        train_and_save(
            run, args.output_dir, args.per_device_train_batch_size, args.clean_batch_size, args.max_steps, args.dtype
        )
    end_process_group()


if __name__ == "__main__":
    main()
