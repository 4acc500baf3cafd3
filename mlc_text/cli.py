"""
The `mlc-text` command, in the style of `trl sft` and `accelerate launch`:

    mlc-text train --corpus ag_news --method mlc                        # one method (= python recipes/train.py)
    mlc-text compare --methods finetune,mlc --train_file my/train.csv   # several on one split (= recipes/compare.py)
    mlc-text train --help                                               # every argument, MLC's own first

Both commands take the recipes' arguments (the four dataclasses of `mlc_text/config.py`) on the command line or
from one `.json` / `.yaml` file, and run [`~mlc_text.pipeline.main`] / [`~mlc_text.pipeline.compare`] with the
recipes' defaults ([`~mlc_text.pipeline.RECIPE_DEFAULTS`] and [`~mlc_text.pipeline.EVALUATION_DEFAULTS`]).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, get_type_hints

from transformers import HfArgumentParser, TrainingArguments

from . import __version__
from .config import DataArguments, MLCTrainingArguments, ModelArguments, NoiseArguments

__all__ = ["COMMANDS", "DEFAULT_METHODS", "MLCArgumentParser", "build_parser", "main", "run_command", "split_methods"]

COMMANDS = {
    "train": "train one method on a named corpus or your own files (what recipes/train.py runs)",
    "compare": "train several methods on one noisy split and print them side by side (recipes/compare.py)",
}
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


def split_methods(argv: Sequence[str], default: str = DEFAULT_METHODS) -> tuple[list[str], list[str]]:
    """
    Takes `--methods a,b` (or `--methods=a,b`) out of `argv`.

    Returns:
        `tuple[list[str], list[str]]`: The methods (`default` when not given) and the other arguments.
    """
    methods, rest = default, []
    iterator = iter(argv)
    for token in iterator:
        if token == "--methods":
            methods = next(iterator, "")
        elif token.startswith("--methods="):
            methods = token.split("=", 1)[1]
        else:
            rest.append(token)
    return [method.strip() for method in methods.split(",") if method.strip()], rest


def run_command(command: str, argv: Sequence[str], defaults: dict[str, Any] | None = None) -> Any:
    """
    Runs `mlc-text <command>` with `argv` (the arguments after the command); `defaults` are the caller's own.

    Returns:
        What [`~mlc_text.pipeline.main`] (`train`) or [`~mlc_text.pipeline.compare`] (`compare`) returns. With
        `--help` it prints the help (the defaults shown are the ones that apply) and raises `SystemExit(0)`.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    from .pipeline import EVALUATION_DEFAULTS, RECIPE_DEFAULTS, compare, parse_args
    from .pipeline import main as train

    argv, defaults = list(argv), {**EVALUATION_DEFAULTS, **(defaults or {})}
    if "-h" in argv or "--help" in argv:  # argparse prints the help with the defaults that apply, and exits
        parser = build_parser(prog=f"mlc-text {command}", with_methods=command == "compare")
        parse_args(["--help"], {**RECIPE_DEFAULTS, **defaults}, parser=parser)
    if command == "train":
        return train(defaults, argv)
    methods, rest = split_methods(argv)
    return compare(methods, rest, defaults=defaults)


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlc-text",
        usage="mlc-text <command> [<args>]",
        description="Train text classifiers on noisily labelled data with Meta Label Correction (MLC).",
        epilog="`mlc-text <command> --help` lists every argument, MLC's own first. Guides: README.md and docs/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", metavar="<command>")
    for name, help_text in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    parser.add_argument("--version", action="version", version=f"mlc-text {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `mlc-text` console script (`python -m mlc_text.cli` is the same)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_level_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv[:1])  # --help, --version, or an error that lists the commands; each exits
    run_command(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
