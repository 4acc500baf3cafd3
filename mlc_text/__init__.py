"""mlc-text: Meta Label Correction (Zheng et al., AAAI 2021) for Hugging Face text classifiers."""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from .config import MLCTrainingArguments
from .data_config import DataArguments, ModelArguments, NoiseArguments
from .meta_net import LabelCorrector
from .trainer import MLCTrainer

__all__ = [
    "__version__",
    "DataArguments",
    "LabelCorrector",
    "MLCTrainer",
    "MLCTrainingArguments",
    "ModelArguments",
    "NoiseArguments",
]
