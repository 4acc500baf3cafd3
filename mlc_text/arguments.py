"""
The recipes' arguments, shared by `recipes/*.py` and the `mlc-text` command: one [`~transformers.HfArgumentParser`]
over the four dataclasses of config.py and data_config.py, whose `--help` shows MLC's own fields first ([`build_parser`]); parsing from
the command line or one `.json` / `.yaml` file over a recipe's defaults ([`parse_args`]); and the defaults the recipes
share ([`RECIPE_DEFAULTS`], [`EVALUATION_DEFAULTS`]).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_type_hints

import torch
from transformers import HfArgumentParser, TrainingArguments

from .config import MLCTrainingArguments
from .data_config import DataArguments, ModelArguments, NoiseArguments

__all__ = [
    "ARGUMENT_CLASSES",
    "DEFAULT_METHODS",
    "EVALUATION_DEFAULTS",
    "RECIPE_DEFAULTS",
    "MLCArgumentParser",
    "build_parser",
    "parse_args",
]

DEFAULT_METHODS = "mlc,finetune,clean_only"
ARGUMENT_CLASSES = (ModelArguments, DataArguments, NoiseArguments, MLCTrainingArguments)
# --help lists the groups in this order; the dataclasses are still parsed (and returned) in ARGUMENT_CLASSES' order.
GROUPS = {
    "mlc": "method and Meta Label Correction (MLCTrainingArguments' own fields)",
    "data": "data: a named corpus or your own files, the clean / noisy split (DataArguments)",
    "noise": "simulated label noise (NoiseArguments)",
    "model": "model (ModelArguments)",
    "training": "training loop (transformers.TrainingArguments)",
}
_GROUP_OF_CLASS = {ModelArguments: "model", DataArguments: "data", NoiseArguments: "noise"}
_TRAINER_FIELDS = {field.name for field in dataclasses.fields(TrainingArguments)}
ArgumentTuple = tuple[ModelArguments, DataArguments, NoiseArguments, MLCTrainingArguments]


class MLCArgumentParser(HfArgumentParser):
    """
    An [`~transformers.HfArgumentParser`] over `ModelArguments`, `DataArguments`, `NoiseArguments` and
    `MLCTrainingArguments` whose `--help` shows the fields in groups, MLC's own (method, meta-learning settings)
    first and the ~100 inherited `TrainingArguments` fields last. Parsing is the same as a plain `HfArgumentParser`.

    Args:
        with_methods (`bool`, *optional*, defaults to `False`): Also list `compare`'s `--methods` (first), for help.
        **kwargs: What `argparse.ArgumentParser` takes (`prog`, `description`, ...).
    """

    def __init__(self, with_methods: bool = False, **kwargs):
        super().__init__(None, **kwargs)
        if with_methods:
            self.add_argument_group("comparison").add_argument(
                "--methods",
                default=DEFAULT_METHODS,
                help="Comma-separated methods to run on the same split, e.g. finetune,clean_only,mlc,l2rw.",
            )
        self._groups = {name: self.add_argument_group(title) for name, title in GROUPS.items()}
        self.dataclass_types = list(ARGUMENT_CLASSES)
        for dtype in self.dataclass_types:
            self._add_dataclass_arguments(dtype)

    def _add_dataclass_arguments(self, dtype) -> None:
        # HfArgumentParser puts every field of a dataclass in one place; this puts each in its group.
        type_hints = get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            field.type = type_hints[field.name]
            self._parse_dataclass_field(self._groups[self._group_of(dtype, field.name)], field)

    @staticmethod
    def _group_of(dtype, name: str) -> str:
        if dtype in _GROUP_OF_CLASS:
            return _GROUP_OF_CLASS[dtype]
        return "training" if name in _TRAINER_FIELDS else "mlc"


def build_parser(prog: str | None = None, with_methods: bool = False) -> MLCArgumentParser:
    """The parser of the recipes and of `mlc-text train` / `compare` (see [`MLCArgumentParser`])."""
    methods = " --methods a,b,..." if with_methods else ""
    return MLCArgumentParser(
        with_methods=with_methods,
        prog=prog,
        usage=f"%(prog)s{methods} [--argument value ...]\n       %(prog)s{methods} args.json (or args.yaml)",
        description="Every argument below, on the command line or from one .json / .yaml file.",
    )


def parse_args(
    argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None, parser: HfArgumentParser | None = None
) -> ArgumentTuple:
    """
    Parses the four argument dataclasses from the command line, or from one `.json` / `.yaml` file given as the only
    argument. `defaults` are the recipe's own defaults; the command line overrides them. `parser` defaults to
    [`build_parser`]'s.

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
