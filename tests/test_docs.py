"""The code shown in the docs runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import default_data_collator

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
