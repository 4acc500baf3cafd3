"""The code shown in the docs runs, and every command of the README is run by a test (or by `make demo`)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch
from transformers import default_data_collator

from mlc_text import cli

from . import test_cli
from .conftest import tiny_bert
from .test_trainer import NUM_LABELS, datasets, make_trainer

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _marked_blocks(path: Path) -> list[str]:
    text = path.read_text()
    return re.findall(r"<!-- tested[^>]*-->\s*```python\n(.*?)```", text, flags=re.S)


def test_custom_corpus_subclass_example_trains(tmp_path):
    (block,) = _marked_blocks(DOCS / "custom_corpus.md")
    namespace: dict = {}
    exec(compile(block, "docs/custom_corpus.md", "exec"), namespace)
    noisy, clean = datasets()
    args = make_trainer(tmp_path).args  # the tests' tiny settings
    trainer = namespace["build_trainer"](tiny_bert(NUM_LABELS), args, noisy, clean, default_data_collator)
    assert trainer.head is trainer.model.bert.pooler.dense
    before = [p.clone() for p in trainer.corrector.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.corrector.parameters()))


# ------------------------------------------------------------------------------------------------------- README
ROOT = DOCS.parent
README = ROOT / "README.md"
RESULTS_MARKERS = ("<!-- results-table:start -->", "<!-- results-table:end -->")
MAX_WORDS = 700
# Commands (and arguments) the README names in its running text, and the test that runs each.
INLINE_COMMANDS = {
    "make install": test_cli.test_console_script_is_installed_and_lists_the_commands,
    "mlc-text train --help": test_cli.test_train_help_lists_mlc_arguments_first_with_the_defaults_that_apply,
    "--report_to tensorboard": test_cli.test_compare_on_user_files_with_real_noisy_labels,
}
COMMAND_PREFIXES = ("make ", "mlc-text ", "python ", "accelerate ", "pip ")


def is_command(span: str) -> bool:
    """A command (`make install`) or an argument with its value (`--report_to tensorboard`), not a bare name."""
    return span.startswith(COMMAND_PREFIXES) or bool(re.fullmatch(r"--\w+ \S+", span))


def code_blocks(text: str) -> list[tuple[str, str]]:
    """`(language, body)` of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped, whitespace normalised."""
    lines = body.replace("\\\n", " ").splitlines()
    return [" ".join(words) for words in (shlex.split(line, comments=True) for line in lines) if words]


def readme_prose(text: str) -> str:
    start, end = (text.index(marker) for marker in RESULTS_MARKERS)
    return re.sub(r"^```.*?^```", "", text[:start] + text[end:], flags=re.S | re.M)


def readme_commands() -> list[str]:
    bash_blocks = [body for language, body in code_blocks(README.read_text()) if language == "bash"]
    return [command for body in bash_blocks for command in shell_commands(body)]


def python_block(marker: str) -> str:
    (block,) = [body for language, body in code_blocks(README.read_text()) if language == "python" and marker in body]
    return block


def substitute(block: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert block.count(old) == 1, f"README's block no longer has {old!r} once: update this test"
        block = block.replace(old, new)
    return block


def test_readme_opens_with_the_two_commands():
    language, body = code_blocks(README.read_text())[0]
    assert language == "bash" and shell_commands(body) == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: install\n\t.*recipes/train_agnews\.py", makefile, flags=re.M)  # run by test_pipeline
    assert re.search(r"^test: install\n\t.*pytest", makefile, flags=re.M)


def test_readme_is_short_and_quotes_no_benchmark_numbers():
    text = README.read_text()
    assert [text.count(marker) for marker in RESULTS_MARKERS] == [1, 1]
    assert text.index(RESULTS_MARKERS[0]) < text.index(RESULTS_MARKERS[1])  # bench/report.py fills in between
    start, end = (text.index(marker) for marker in RESULTS_MARKERS)
    assert len((text[:start] + text[end:]).split()) <= MAX_WORDS
    numbers = re.findall(r"\d+\.\d+|\d+(?:\.\d+)? ?(?:points|pp)\b|±", readme_prose(text))
    assert not numbers, f"benchmark numbers belong in docs/RESULTS.md, the README's prose has {numbers}"


def test_every_readme_command_is_run_by_a_test_or_make_demo():
    covered = {"make demo", "make test"}  # the Makefile's targets (checked above)
    for command in readme_commands():
        assert command in covered or command.startswith("mlc-text "), f"no test runs README's command {command!r}"
    python_blocks = [body for language, body in code_blocks(README.read_text()) if language == "python"]
    assert len(python_blocks) == 2 and python_block("MLCTrainer(") and python_block('pipeline("text-classification"')
    spans = re.findall(r"`([^`\n]+)`", readme_prose(README.read_text()))
    for span in spans:
        if is_command(span):
            assert span in INLINE_COMMANDS, f"README names {span!r}: add the test that runs it to INLINE_COMMANDS"


def test_readme_python_quickstart_trains(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_TEXT_DATA_DIR", data_dir)
    monkeypatch.chdir(tmp_path)
    block = substitute(
        python_block("MLCTrainer("),
        {'"minilm-l6"': repr(tiny_model_dir), "max_train_samples=2000": "max_train_samples=48",
         "num_train_epochs=1": "max_steps=2"},
    )  # fmt: skip
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    assert (tmp_path / "outputs/quickstart/model.safetensors").is_file()
    assert (tmp_path / "outputs/quickstart/label_corrector.pt").is_file()


def test_readme_command_line_quickstart_runs_and_loads_in_a_pipeline(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Every `mlc-text` command of the README, on a small CSV shaped as it says, then its pipeline() block."""
    monkeypatch.chdir(tmp_path)
    test_cli.write_user_files(tmp_path, rows_per_class=60, known_per_class=45)  # train.csv, test.csv
    commands = [command for command in readme_commands() if command.startswith("mlc-text ")]
    assert [command.split()[1] for command in commands] == ["train", "compare"]
    for command in commands:
        assert cli.main([*shlex.split(command)[1:], *test_cli.tiny_scale(tiny_model_dir)]) == 0
    for method in ("finetune", "clean_only", "l2rw", "mlc"):
        assert (tmp_path / "outputs/my-compare" / method / "label_issues.csv").is_file()
    results = json.loads((tmp_path / "outputs/my-run/results.json").read_text())
    assert results["rows"]["validation"] == 40 and results["rows"]["clean"] == 120  # as the README says
    namespace: dict = {}
    exec(compile(python_block('pipeline("text-classification"'), "README.md", "exec"), namespace)
    assert "score" in capsys.readouterr().out
    (prediction,) = namespace["classifier"]("Stocks rallied after the central bank held rates.")
    assert prediction["label"] in test_cli.CLASS_WORDS and 0.0 <= prediction["score"] <= 1.0
