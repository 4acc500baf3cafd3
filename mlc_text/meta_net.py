"""The label corrector g(h, y~; a) and the hook that reads the main net's features at its head."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = [
    "AnchoredCorrector",
    "LabelCorrector",
    "HEAD_MODULE_NAMES",
    "find_head_module",
    "feature_size_of",
    "capture_head_features",
    "corrector_param_groups",
    "head_features",
    "CORRECTOR_WEIGHTS_NAME",
    "SKIP_CONNECTIONS",
    "CORRECTOR_TEACHERS",
    "correct",
    "given_label_confidence",
    "normalise_skip_connection",
    "warm_start_corrector",
]

CORRECTOR_WEIGHTS_NAME = "label_corrector.pt"

# Attribute names of the classification head, in the order they are tried. DistilBERT's head starts at
# `pre_classifier`; BERT, MiniLM, ELECTRA, RoBERTa and DeBERTa name it `classifier`.
HEAD_MODULE_NAMES = ("pre_classifier", "classifier")

# How the corrected label is anchored to the given one: not at all, by one learned weight for every row, or by a
# weight per row (one extra output unit, as the authors' `--skip`).
SKIP_CONNECTIONS = ("none", "global", "per_example")

# What the corrector's class distribution starts from: nothing (its MLP alone, the paper's), or the main net's own
# detached prediction for the row, to which the MLP adds (Enhanced MLC's teacher distribution, the main net its own
# teacher instead of a second network).
CORRECTOR_TEACHERS = ("none", "main_net")


def normalise_skip_connection(value: str | bool) -> str:
    """`skip_connection` as one of [`SKIP_CONNECTIONS`]; `True` / `False` (and their text) mean `global` / `none`."""
    aliases = {True: "global", False: "none", "true": "global", "false": "none"}
    key = value.lower() if isinstance(value, str) else value
    value = aliases.get(key, key)
    if value not in SKIP_CONNECTIONS:
        raise ValueError(
            f"skip_connection must be one of {', '.join(SKIP_CONNECTIONS)} (or true / false), got {value!r}"
        )
    return value


class LabelCorrector(nn.Module):
    """
    Meta net of MLC: maps (detached pooled features, noisy label) to a soft corrected label.

    Args:
        num_labels (`int`): Number of classes K.
        feature_size (`int`): Size of the main net's features at its head's input.
        hidden_size (`int`, defaults to 128): Width of the two hidden layers.
        label_embedding_size (`int`, defaults to 128): Size of the noisy-label embedding (the paper's `cls_dim`).
        skip_connection (`str`, defaults to `"none"`): Mix the output with the one-hot noisy label,
            `(1 - s) * g + s * onehot(y~)`: `"global"`, one learned `s = sigmoid(skip_logit)` for every row;
            `"per_example"`, `s` = the sigmoid of an extra output unit of the MLP, so that the corrector can trust
            the given label of one row and replace that of another. `True` / `False` mean `"global"` / `"none"`.
        skip_init (`float`, defaults to 0.0): Starting logit of `s` (the extra unit's bias for `"per_example"`);
            0 trusts the given label half-way, 2 about 0.88.
        teacher (`str`, defaults to `"none"`): `"main_net"`: `g = softmax(main logits + MLP output)`, the main net's
            detached logits for the row (passed as `main_logits`) plus the MLP's; the MLP's class outputs start at
            zero, so that g starts as the main net's own prediction (Enhanced MLC's teacher, without a second
            network). `"none"`: `g = softmax(MLP output)`.
        confidence_gate (`bool`, defaults to `False`): With `skip_connection="per_example"`, the row's skip logit
            also reads the main net's confidence in the given label: `+ slope * z`, z = the main net's detached
            log-probability of the given label standardised over the batch, `slope` a learned scalar starting at 0
            (so the corrector starts as without it). Since z sums to zero over the batch, a push of the same size on
            every row's gate leaves the slope alone; what moves it is which rows to trust more than the others.
    """

    def __init__(
        self,
        num_labels: int,
        feature_size: int,
        hidden_size: int = 128,
        label_embedding_size: int = 128,
        skip_connection: str | bool = "none",
        skip_init: float = 0.0,
        teacher: str = "none",
        confidence_gate: bool = False,
    ):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        if teacher not in CORRECTOR_TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(CORRECTOR_TEACHERS)}, got {teacher!r}")
        skip_connection = normalise_skip_connection(skip_connection)
        if confidence_gate and skip_connection != "per_example":
            raise ValueError(f"confidence_gate needs skip_connection='per_example', got {skip_connection!r}")
        self.config = {
            "num_labels": num_labels,
            "feature_size": feature_size,
            "hidden_size": hidden_size,
            "label_embedding_size": label_embedding_size,
            "skip_connection": skip_connection,
            "skip_init": float(skip_init),
            "teacher": teacher,
            "confidence_gate": bool(confidence_gate),
        }
        self.reads_main_logits = teacher == "main_net" or bool(confidence_gate)
        self.skip_connection = self.config["skip_connection"]
        self.num_labels = num_labels
        self.label_embedding = nn.Embedding(num_labels, label_embedding_size)
        self.mlp = nn.Sequential(
            nn.Linear(feature_size + label_embedding_size, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, num_labels + (self.skip_connection == "per_example")),
        )
        global_skip = self.skip_connection == "global"
        self.skip_logit = nn.Parameter(torch.full((), float(skip_init))) if global_skip else None
        self.confidence_slope = nn.Parameter(torch.zeros(())) if confidence_gate else None
        self._init_weights()
        if self.skip_connection == "per_example":
            nn.init.constant_(self.mlp[-1].bias[-1], float(skip_init))
        if teacher == "main_net":  # start from the main net's prediction: no class output of the MLP's own
            with torch.no_grad():
                self.mlp[-1].weight[:num_labels].zero_()
        self.last_skip_weight: torch.Tensor | None = None  # mean s of the last call, for logging

    def _init_weights(self) -> None:
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.label_embedding.weight)

    def forward(
        self, features: torch.Tensor, noisy_labels: torch.Tensor, main_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            features (`torch.Tensor` of shape `(batch, feature_size)`): The main net's features; detached here so
                that the meta-gradient never flows into the main net.
            noisy_labels (`torch.LongTensor` of shape `(batch,)`): The given (possibly wrong) labels.
            main_logits (`torch.Tensor` of shape `(batch, num_labels)`, *optional*): The main net's logits for the
                rows (detached here); needed, and only read, with `teacher="main_net"` or `confidence_gate`.

        Returns:
            `torch.Tensor` of shape `(batch, num_labels)`: corrected labels, rows summing to 1.
        """
        features = features.detach().to(self.label_embedding.weight.dtype)
        hidden = torch.cat([features, self.label_embedding(noisy_labels)], dim=-1)
        # Softmax in float32 at least (bf16 / fp16 autocast), in float64 when the corrector is float64.
        logits = self.mlp(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        class_logits = logits[:, : self.num_labels]
        if self.reads_main_logits and main_logits is None:
            what = "teacher='main_net'" if self.config["teacher"] == "main_net" else "confidence_gate"
            raise ValueError(f"a corrector with {what} needs the main net's logits (main_logits)")
        if self.config["teacher"] == "main_net":
            class_logits = class_logits + main_logits.detach().to(class_logits.dtype)
        corrected = torch.softmax(class_logits, dim=-1)
        if self.skip_connection == "none":
            return corrected
        if self.skip_connection == "global":
            mix = torch.sigmoid(self.skip_logit.to(corrected.dtype))
        else:
            gate_logits = logits[:, self.num_labels :]
            if self.confidence_slope is not None:
                confidence = given_label_confidence(main_logits.detach().to(gate_logits.dtype), noisy_labels)
                gate_logits = gate_logits + self.confidence_slope.to(gate_logits.dtype) * confidence[:, None]
            mix = torch.sigmoid(gate_logits)
        self.last_skip_weight = mix.detach().mean()
        onehot = nn.functional.one_hot(noisy_labels, self.num_labels).to(corrected.dtype)
        return (1 - mix) * corrected + mix * onehot

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Saves config and weights as one file, `label_corrector.pt`, in `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CORRECTOR_WEIGHTS_NAME)
        torch.save({"config": json.dumps(self.config), "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LabelCorrector:
        """Loads a corrector saved by [`~LabelCorrector.save_pretrained`]."""
        path = os.path.join(directory, CORRECTOR_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CORRECTOR_WEIGHTS_NAME} in {directory!r}")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        corrector = cls(**json.loads(payload["config"]))
        corrector.load_state_dict(payload["state_dict"])
        return corrector


def given_label_confidence(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """
    Log-probability of each row's given label under `logits`, standardised over the rows (mean 0, standard deviation
    1; all zeros for a single row or rows whose log-probabilities are equal, up to `eps`).
    """
    log_prob = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]
    if log_prob.numel() < 2:
        return torch.zeros_like(log_prob)
    centred = log_prob - log_prob.mean()
    return centred / (centred.std() + eps)


class AnchoredCorrector(nn.Module):
    """
    A corrector whose labels are blended with the given ones by a weight the trainer sets, not learned:
    `trust * onehot(y~) + (1 - trust) * corrector(h, y~)`. While the corrector is still poor (early in training) a
    high `trust` keeps the main net on the given labels; the meta-gradient still reaches the corrector, scaled by
    `1 - trust` (which Adam largely undoes).

    Args:
        corrector: the label corrector it wraps (its parameters are this module's).
        trust (`float`, defaults to 0.0): the given label's weight, in [0, 1].
    """

    def __init__(self, corrector: nn.Module, trust: float = 0.0):
        super().__init__()
        self.corrector, self.trust = corrector, trust
        self.num_labels = corrector.num_labels

    @property
    def last_skip_weight(self) -> torch.Tensor | None:
        return getattr(self.corrector, "last_skip_weight", None)

    @property
    def reads_main_logits(self) -> bool:
        return getattr(self.corrector, "reads_main_logits", False)

    def forward(self, features: torch.Tensor, noisy_labels: torch.Tensor, **kwargs) -> torch.Tensor:
        corrected = self.corrector(features, noisy_labels, **kwargs)
        if not self.trust:
            return corrected
        onehot = nn.functional.one_hot(noisy_labels, corrected.shape[-1]).to(corrected.dtype)
        return self.trust * onehot + (1 - self.trust) * corrected


def correct(
    corrector: nn.Module, features: torch.Tensor, noisy_labels: torch.Tensor, main_logits: torch.Tensor
) -> torch.Tensor:
    """
    The corrector's labels for rows with these features, given labels and main-net logits; the logits are passed
    (detached) only to a corrector that reads them (`reads_main_logits`), so that a corrector of one's own can keep
    the two-argument call `corrector(features, noisy_labels)`.
    """
    if getattr(corrector, "reads_main_logits", False):
        return corrector(features, noisy_labels, main_logits=main_logits.detach())
    return corrector(features, noisy_labels)


def find_head_module(model: nn.Module) -> nn.Module:
    """
    Returns the module whose input is the pooled feature vector the classifier reads.

    Raises:
        ValueError: if the model has none of the known head attributes.
    """
    for name in HEAD_MODULE_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"cannot find the classification head of {type(model).__name__}: expected an attribute named one of "
        f"{', '.join(HEAD_MODULE_NAMES)} (BERT, MiniLM, DistilBERT, RoBERTa, ELECTRA, DeBERTa sequence "
        "classifiers). Override `MLCTrainer.head_module` to point at your model's head."
    )


def feature_size_of(model: nn.Module) -> int:
    """Size of the features at the head's input, read from the model's config."""
    config = getattr(model, "config", None)
    for attribute in ("hidden_size", "dim", "d_model"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the feature size of {type(model).__name__} from its config (hidden_size or dim)")


@contextlib.contextmanager
def capture_head_features(head: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """
    Records the (detached) input of `head` during the forward passes run inside the context.

    Sequence-level heads (RoBERTa, ELECTRA) receive `(batch, length, hidden)`: the first token is taken, as those
    heads do themselves.

    Yields:
        `dict` whose `"features"` entry holds the last captured `(batch, hidden)` tensor.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(module, args):
        features = args[0]
        if features.dim() == 3:
            features = features[:, 0]
        store["features"] = features.detach()

    handle = head.register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def corrector_param_groups(
    corrector: nn.Module, learning_rate: float, skip_learning_rate: float | None = None
) -> list[dict]:
    """
    The corrector's parameters for its optimizer: one group, or two with `skip_learning_rate` (the gate's own scalars,
    a global skip weight or the confidence gate's slope, alone in the second). `base_lr` is the learning rate that
    `meta_lr_follows_schedule` scales.
    """
    gate = [
        param for name in ("skip_logit", "confidence_slope") if (param := getattr(corrector, name, None)) is not None
    ]
    if not gate or skip_learning_rate is None:
        return [{"params": list(corrector.parameters()), "base_lr": learning_rate}]
    others = [param for param in corrector.parameters() if all(param is not g for g in gate)]
    return [
        {"params": others, "base_lr": learning_rate},
        {"params": gate, "lr": skip_learning_rate, "base_lr": skip_learning_rate},
    ]


@torch.no_grad()
def head_features(
    model: nn.Module,
    head: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The features the corrector reads (the input of `head`, as float32) and the labels of labelled batches, from
    forward passes of `model` in eval mode (no dropout); the model's mode is restored after.

    Args:
        model: the main net.
        head: its head module ([`find_head_module`]).
        batches: model inputs with their `labels` (a `true_label` column is dropped), on the model's device.
        autocast: a context manager factory for mixed precision.

    Returns:
        `(features, labels)`, the batches' rows concatenated.
    """
    training = model.training
    model.eval()
    features, labels = [], []
    with capture_head_features(head) as store:
        for inputs in batches:
            inputs.pop("true_label", None)
            labels.append(inputs.pop("labels"))
            with autocast():
                model(**inputs)
            features.append(store["features"].float())
    model.train(training)
    return torch.cat(features), torch.cat(labels)


def warm_start_corrector(
    corrector: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """
    Trains the corrector, before MLC starts, on trusted rows whose label is shown twice: as given (true) and replaced
    by a uniformly drawn wrong class, the target being the true label both times. It then starts by trusting a given
    label that the features agree with and by replacing one they contradict, instead of from near-uniform labels.

    Args:
        corrector: the label corrector, called as `corrector(features, noisy_labels)`; updated in place.
        features (`torch.Tensor` of shape `(rows, feature_size)`): the main net's features of the trusted rows.
        labels (`torch.LongTensor` of shape `(rows,)`): their true labels.
        steps (`int`): full-batch Adam steps.
        learning_rate (`float`): Adam's learning rate.
        seed (`int`): seed of the wrong labels.

    Returns:
        `list[float]`: the loss (mean negative log-probability of the true label) before each step.
    """
    num_labels = corrector.num_labels
    generator = torch.Generator(device="cpu").manual_seed(seed)
    offsets = torch.randint(1, num_labels, (len(labels),), generator=generator).to(labels.device)
    wrong = (labels + offsets) % num_labels  # never the true label
    inputs = torch.cat([features, features]).detach()
    given, targets = torch.cat([labels, wrong]), torch.cat([labels, labels])
    optimizer = torch.optim.Adam([param for param in corrector.parameters() if param.requires_grad], lr=learning_rate)
    losses = []
    for _ in range(steps):
        corrected = corrector(inputs, given)
        loss = -torch.log(corrected.gather(1, targets[:, None]).clamp_min(1e-12)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
