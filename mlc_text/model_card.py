"""
The Hub model card a run writes beside its model (`README.md`): YAML metadata with a `model-index`, the noise, the
method (its description from the registry of methods.py), the metrics, how to load the model and, for a method
with a label corrector, the corrector.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .meta_net import CORRECTOR_WEIGHTS_NAME
from .methods import REGISTRY
from .results import _check_noise, _is_number, format_results_table, to_json_safe

__all__ = ["MODEL_CARD_NAME", "METHOD_DESCRIPTIONS", "write_model_card"]

MODEL_CARD_NAME = "README.md"
# Every card's tags; the method's own (its trainer's, from the registry) follow them.
CARD_TAGS = ["text-classification", "noisy-labels"]
# Hyper-parameters worth a line in the model card, when the training arguments have them.
CARD_HYPERPARAMETERS = (
    "learning_rate",
    "meta_learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "clean_batch_size",
    "gradient_accumulation_steps",
    "gradient_steps",
    "meta_update_interval",
    "skip_connection",
    "seed",
)
# The model card's "Method" section, by method.
METHOD_DESCRIPTIONS = {name: method.description for name, method in REGISTRY.items()}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    corpus: str,
    label_names: Sequence[str] | None,
    noise: Mapping[str, Any],
    method: str,
    metrics: Mapping[str, Any],
    correction_accuracy: float | None = None,
    training_args: Any = None,
) -> Path:
    """
    Writes a Hub model card, `<output_dir>/README.md`: YAML metadata (with a `model-index` of the test metrics),
    then the noise settings, the method, the metrics, how to load the model and, for a method that corrects labels (MLC), its label corrector.

    Args:
        output_dir (`str` or `os.PathLike`): the saved model's folder (created if missing).
        base_model (`str`): the model fine-tuned (a Hub id goes into the metadata; a local path only into the text).
        corpus (`str`): the corpus name or Hub id.
        label_names (`Sequence[str]`, *optional*): class names, by id.
        noise (`Mapping`): `type`, `rate` and `realised_rate`.
        method (`str`): the method, e.g. `"mlc"`.
        metrics (`Mapping`): test metrics, e.g. `{"test_accuracy": 0.9, "test_macro_f1": 0.89}`.
        correction_accuracy (`float`, *optional*): share of noisy rows whose corrected label is right.
        training_args (`TrainingArguments` or `Mapping`, *optional*): hyper-parameters to list; `hub_model_id` names
            the model in the loading example.

    Returns:
        `Path`: the written card.
    """
    noise = _check_noise(noise)
    model_id = _get(training_args, "hub_model_id") or Path(output_dir).resolve().name
    metadata = _card_metadata(model_id, base_model, corpus, metrics, method)
    sections = [
        _card_intro(model_id, base_model, corpus, method),
        _card_noise(noise),
        f"## Method\n\n{METHOD_DESCRIPTIONS.get(method, f'Method `{method}`.')}",
        _card_metrics(metrics, correction_accuracy),
        _card_labels(label_names),
        _card_usage(model_id),
        _card_corrector(model_id) if method in REGISTRY and REGISTRY[method].corrects_labels else "",
        _card_hyperparameters(training_args),
    ]
    front_matter = yaml.safe_dump(to_json_safe(metadata), sort_keys=False, allow_unicode=True)
    path = Path(output_dir) / MODEL_CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\n{front_matter}---\n\n" + "\n\n".join(s for s in sections if s) + "\n")
    return path


def _card_metadata(
    model_id: str, base_model: str, corpus: str, metrics: Mapping[str, Any], method: str
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"library_name": "transformers"}
    if _is_hub_id(base_model):
        metadata["base_model"] = base_model
    if _is_hub_id(corpus):
        metadata["datasets"] = [corpus]
    own = REGISTRY[method].tags if method in REGISTRY else ()
    tags = list(dict.fromkeys([*CARD_TAGS, *own]))
    metadata.update(tags=tags, pipeline_tag="text-classification", metrics=["accuracy", "f1"])
    results = [
        {"type": kind, "value": _metric(metrics, key), "name": name, **({"args": args} if args else {})}
        for key, kind, name, args in (
            ("accuracy", "accuracy", "Test accuracy", None),
            ("macro_f1", "f1", "Test macro F1", {"average": "macro"}),
        )
        if _is_number(_metric(metrics, key))
    ]
    if results:
        task = {"type": "text-classification", "name": "Text Classification"}
        dataset = {"name": corpus, "type": corpus, "split": "test"}
        metadata["model-index"] = [
            {"name": model_id, "results": [{"task": task, "dataset": dataset, "metrics": results}]}
        ]
    return metadata


def _card_intro(model_id: str, base_model: str, corpus: str, method: str) -> str:
    base = f"[{base_model}](https://huggingface.co/{base_model})" if _is_hub_id(base_model) else f"`{base_model}`"
    return (
        f"# {model_id}\n\n"
        f"A text classifier fine-tuned from {base} on `{corpus}`, trained on **noisy labels** with the method "
        f"`{method}`, with mlc-text (Meta Label Correction for Hugging Face transformers). "
        "The noisy training rows carry labels corrupted on purpose (see the noise settings); a small clean set of "
        "rows with true labels is trusted."
    )


def _card_noise(noise: Mapping[str, Any]) -> str:
    rate = noise["rate"]
    rows = [
        {"setting": "type", "value": noise["type"]},
        {"setting": "rate", "value": f"{rate:g}" if _is_number(rate) else rate},
        {"setting": "realised rate", "value": noise["realised_rate"]},
    ]
    return (
        "## Noise settings\n\n"
        f"{format_results_table(rows, ['setting', 'value'])}\n\n"
        "The realised rate is the share of noisy training rows whose label was actually changed."
    )


def _card_metrics(metrics: Mapping[str, Any], correction_accuracy: float | None) -> str:
    # Timings and throughput say little about the model; the card keeps quality metrics only.
    skipped = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    rows = [
        {"metric": name, "value": value}
        for name, value in metrics.items()
        if _is_number(value) and not name.endswith(skipped)
    ]
    if correction_accuracy is not None:
        rows.append({"metric": "correction_accuracy (noisy training rows)", "value": correction_accuracy})
    if not rows:
        return "## Metrics\n\nNo test metrics were recorded."
    return f"## Metrics\n\n{format_results_table(rows, ['metric', 'value'])}"


def _card_labels(label_names: Sequence[str] | None) -> str:
    if not label_names:
        return ""
    rows = [{"id": index, "label": name} for index, name in enumerate(label_names)]
    return f"## Labels\n\n{format_results_table(rows, ['id', 'label'])}"


def _card_usage(model_id: str) -> str:
    return (
        "## How to use\n\n"
        "A plain `transformers` model: loading and using it does not need `mlc_text`.\n\n"
        "```python\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        f'model = AutoModelForSequenceClassification.from_pretrained("{model_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")\n'
        'inputs = tokenizer(["An example sentence."], return_tensors="pt")\n'
        "predicted = model(**inputs).logits.argmax(-1).item()\n"
        "print(model.config.id2label[predicted])\n"
        "```"
    )


def _card_corrector(model_id: str) -> str:
    return (
        "## Label corrector\n\n"
        f"The MLC label corrector (the meta-network that maps features and noisy label to a corrected soft label) is "
        f"saved beside the model as `{CORRECTOR_WEIGHTS_NAME}`. The classifier does not need it; to inspect or reuse "
        "it, download this folder and call `mlc_text.LabelCorrector.from_pretrained(folder)`:\n\n"
        "```python\n"
        "from huggingface_hub import snapshot_download\n"
        "from mlc_text import LabelCorrector\n\n"
        f'corrector = LabelCorrector.from_pretrained(snapshot_download("{model_id}"))\n'
        "```"
    )


def _card_hyperparameters(training_args: Any) -> str:
    lines = [
        f"- {name}: {to_json_safe(value)}"
        for name in CARD_HYPERPARAMETERS
        if (value := _get(training_args, name)) is not None and not (name == "max_steps" and value <= 0)
    ]
    return "## Training hyper-parameters\n\n" + "\n".join(lines) if lines else ""


def _get(source: Any, name: str) -> Any:
    """A field of training arguments given as a dataclass, any object, a mapping or None."""
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _metric(metrics: Mapping[str, Any], name: str) -> Any:
    return metrics.get(f"test_{name}", metrics.get(name))


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not os.path.exists(name)
