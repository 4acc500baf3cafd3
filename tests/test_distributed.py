"""
Two CPU processes (gloo DDP through `accelerate launch --multi_gpu`) against one process with the union of their
batches: MLC, L2RW, MLC with gradient accumulation and MLC followed by the clean stage must end with the same main net
and corrector on both ranks, equal (to float64 rounding) to the single-process run. Both runs are float64 with dropout
0, so the only differences are summation orders.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlc_text.baselines import L2RWTrainer
from mlc_text.trainer import MLCTrainer

from .distributed_run import CLEAN_STAGE_RUNS, RUNS, build_nets, train_and_save
from .test_trainer import make_trainer

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")  # the venv's, beside its python
if not ACCELERATE.exists():
    ACCELERATE = Path(shutil.which("accelerate") or ACCELERATE)
NUM_PROCESSES = 2
BATCH, CLEAN_BATCH, STEPS = 4, 2, 4  # per process; the reference run takes NUM_PROCESSES times as many rows
# Measured: the largest absolute difference to the single-process run is about 3e-14 for the main net and 2e-13 for
# the corrector (float64, 4 steps of AdamW at lr 1e-2, corrector Adam at 1e-2); 1e-10 leaves a margin of 500.
# Relative tolerances are useless here: some biases (attention keys) have a zero gradient in exact arithmetic and stay
# at rounding-noise size.
ATOL, RTOL = 1e-10, 1e-9
# Hand all-reduces each micro-batch needs at least. MLC: the main-loss gradient, the clean gradient at w' and the
# meta-gradient (plus the clean gradient at w where the look-ahead discount reads it). L2RW: the clean gradient at w',
# the weights' normaliser and the main-loss gradient. finetune_clean_batch: the main-loss gradient.
MIN_REDUCE_CALLS = {"mlc": 3, "l2rw": 3, "finetune_clean_batch": 1}

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Runs every run of distributed_run.py once on two gloo processes; returns the folder of their files."""
    output_dir = tmp_path_factory.mktemp("distributed")
    command = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",  # with ACCELERATE_USE_CPU=1: MULTI_CPU (gloo). `--cpu --num_processes 2` runs one process.
        "--num_processes",
        str(NUM_PROCESSES),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "distributed_run.py"),
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(BATCH),
        "--clean_batch_size",
        str(CLEAN_BATCH),
        "--max_steps",
        str(STEPS),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    print(f"accelerate launch took {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return output_dir


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def assert_states_close(actual: dict, expected: dict, what: str, exact: bool = False) -> float:
    """Compares two state dicts; returns the largest absolute difference of their floating tensors."""
    assert actual.keys() == expected.keys()
    largest = 0.0
    for key, value in expected.items():
        if exact or not value.is_floating_point():
            assert torch.equal(actual[key], value), f"{what}: {key} differs across ranks"
        else:
            torch.testing.assert_close(
                actual[key], value, atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{what} {k}: {m}"
            )
            largest = max(largest, (actual[key] - value).abs().max().item())
    return largest


@pytest.mark.parametrize("run", list(RUNS))
def test_two_processes_match_one_process_with_their_union(launched, tmp_path, run):
    method, accumulation = RUNS[run]
    ranks = [load(launched / f"{run}_rank{rank}.pt") for rank in range(NUM_PROCESSES)]
    for state in ranks:  # really two DDP processes
        assert state["world_size"] == NUM_PROCESSES
        assert state["distributed_type"] == "DistributedType.MULTI_CPU"
        assert state["model_is_wrapped"]
        assert state["optimizer_steps"] == STEPS
        assert len(state["seen_input_ids"]) == STEPS * accumulation

    reference = load(
        Path(train_and_save(run, str(tmp_path), NUM_PROCESSES * BATCH, NUM_PROCESSES * CLEAN_BATCH, STEPS))
    )
    assert reference["world_size"] == 1 and reference["optimizer_steps"] == STEPS

    # The reference saw, micro-batch by micro-batch, exactly the rows of rank 0 followed by those of rank 1.
    for key in ("seen_input_ids", "seen_clean_input_ids"):
        assert len(reference[key]) == STEPS * accumulation
        for step, expected in enumerate(reference[key]):
            union = torch.cat([state[key][step] for state in ranks])
            assert torch.equal(union, expected), f"{key} of micro-batch {step}: the union of the ranks differs"
    # The clean stream of the accumulation run wraps around an epoch of the clean set (24 rows, 4 per micro-batch).

    nets = ["model", "corrector"] if method == "mlc" else ["model"]
    for net in nets:
        assert_states_close(ranks[1][net], ranks[0][net], f"{net} rank 1 vs rank 0", exact=True)
        largest = assert_states_close(ranks[0][net], reference[net], f"{net} vs one process")
        print(f"{run} {net}: largest |2 processes - 1 process| = {largest:.2e}")
    # Hand-computed gradients are averaged by hand, no tensor twice; DDP's own hooks never run (its forward is
    # never called: the trainer differentiates the unwrapped model).
    for state in ranks:
        assert state["wrapped_forward_calls"] == 0
        for calls, tensors, distinct in state["reduce_log"]:
            assert calls >= MIN_REDUCE_CALLS[method]
            assert tensors == distinct
    assert reference["reduce_log"] == [(0, 0, 0)] * (STEPS * accumulation)

    # The clean stage ran after MLC's steps: the same MLC run without it ends elsewhere.
    if run in CLEAN_STAGE_RUNS:
        without = load(launched / "mlc_rank0.pt")["model"]
        assert any(not torch.equal(without[key], ranks[0]["model"][key]) for key in without)
    # And training moved both nets (a no-op run would match trivially).
    initial = dict(zip(("model", "corrector"), (net.state_dict() for net in build_nets(method) if net is not None)))
    for net in nets:
        assert any(not torch.equal(initial[net][key], reference[net][key]) for key in reference[net]), net


@pytest.mark.parametrize("trainer_class", [MLCTrainer, L2RWTrainer])
def test_fsdp_through_accelerate_is_refused_at_start(tmp_path, monkeypatch, trainer_class):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(ValueError, match="does not support FSDP.*Supported: one process, or DDP"):
        make_trainer(tmp_path, trainer_class=trainer_class)
