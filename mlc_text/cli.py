"""
The `mlc-text` command, in the style of `trl sft` and `accelerate launch`:

    mlc-text train --corpus ag_news --method mlc                        # one method (= python recipes/train.py)
    mlc-text compare --methods finetune,mlc --train_file my/train.csv   # several on one split (= recipes/compare.py)
    mlc-text train --help                                               # every argument, MLC's own first

Both commands take the recipes' arguments (the four dataclasses of `mlc_text/config.py` and
`mlc_text/data_config.py`) on the command line or
from one `.json` / `.yaml` file, and run [`~mlc_text.pipeline.main`] / [`~mlc_text.pipeline.compare`] with the
recipes' defaults ([`~mlc_text.arguments.RECIPE_DEFAULTS`] and [`~mlc_text.arguments.EVALUATION_DEFAULTS`]).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .arguments import (  # noqa: F401  (MLCArgumentParser: importable from here)
    DEFAULT_METHODS,
    EVALUATION_DEFAULTS,
    RECIPE_DEFAULTS,
    MLCArgumentParser,
    build_parser,
    parse_args,
)

__all__ = ["COMMANDS", "DEFAULT_METHODS", "MLCArgumentParser", "build_parser", "main", "run_command", "split_methods"]

COMMANDS = {
    "train": "train one method on a named corpus or your own files (what recipes/train.py runs)",
    "compare": "train several methods on one noisy split and print them side by side (recipes/compare.py)",
}


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
    from .pipeline import compare
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
