"""The training arguments: `MLCTrainingArguments` (transformers' `TrainingArguments` plus the method and MLC's settings)
and MLC's protocol defaults. The recipes' model / data / noise arguments are in data_config.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .meta_grad import META_GRADIENT_CHOICES
from .meta_net import CORRECTOR_TEACHERS, SKIP_CONNECTIONS, normalise_skip_connection
from .methods import METHODS, REGISTRY, get_method

__all__ = [
    "MLC_FINISHES_ON_CLEAN",
    "MLC_CLEAN_BATCH_SHARE",
    "default_clean_batch_size",
    "MLCTrainingArguments",
    "METHODS",
    "META_GRADIENT_CHOICES",
    "META_SPLITS",
]

META_SPLITS = ("none", "batch", "rows")


# MLC's default for `finish_on_clean`: its noisy-row stage ends with the clean stage (docs/RESULTS.md).
MLC_FINISHES_ON_CLEAN = True
# MLC's default clean batch (`clean_batch_size=None`): this share of the noisy batch (docs/PERFORMANCE.md).
MLC_CLEAN_BATCH_SHARE = 0.25


def default_clean_batch_size(batch_size: int, share: float = MLC_CLEAN_BATCH_SHARE) -> int:
    """MLC's clean batch when `clean_batch_size` is `None`: `share` of `batch_size` (the noisy batch), rounded up."""
    return max(1, math.ceil(batch_size * share))


@dataclass
class MLCTrainingArguments(TrainingArguments):
    r"""
    Arguments for [`MLCTrainer`]: everything [`~transformers.TrainingArguments`] takes, plus the meta-learning
    settings of Meta Label Correction (Zheng et al., AAAI 2021).

    Parameters:
        method (`str`, *optional*, defaults to `"mlc"`):
            Which method the recipes run: a name of the registry of [`~mlc_text.methods`] (`METHODS`: `mlc` and the
            baselines of baselines.py).
        clean_stage_epochs (`float`, *optional*, defaults to `10.0`):
            Epochs over the clean rows in the clean stage (a fresh optimizer and schedule at `learning_rate`) of
            `finetune_then_clean`, or of `finish_on_clean`, after the stage on the noisy rows.
        finish_on_clean (`bool` or `None`, *optional*, defaults to `None`):
            After training, fine-tune on all the trusted rows alone for `clean_stage_epochs` epochs: continuous
            fine-tuning (Zhu et al., ACL 2023) on top of the method (clean_stage.py). `None`: the trainer's default,
            on for MLC ([`MLC_FINISHES_ON_CLEAN`]), off for `l2rw` and `finetune_clean_batch`, which follow their
            papers unless asked. With `meta_split="rows"` the stage also trains on the rows held out for the meta
            objective; with `load_best_model_at_end` it starts from the best checkpoint of the method's own steps.
            In our benchmark (flip 0.4, 20 trusted rows per class, three seeds) it lifted MLC on IMDB from 64.3 to
            67.4 and on Yelp polarity from 71.9 to 73.2, and left AG News level (86.0 against 85.4).
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let the recipes write into an `output_dir` that holds a previous run (else they refuse before training).
        meta_learning_rate (`float`, *optional*, defaults to `3e-4`):
            Learning rate of the label corrector's optimizer (Adam with amsgrad, as in the paper's code). The paper's
            3e-5 leaves the corrector near its start in a run of a few hundred steps (docs/RESULTS.md).
        meta_weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay of the label corrector's optimizer.
        meta_hidden_size (`int`, *optional*, defaults to `128`):
            Hidden width of the label corrector's MLP.
        label_embedding_size (`int`, *optional*, defaults to `128`):
            Size of the noisy-label embedding fed to the corrector (the paper's `cls_dim`).
        gradient_steps (`int`, *optional*, defaults to `1`):
            The paper's k-step look-ahead: the meta-gradient is accumulated with a discount factor over this many
            main-net steps before the corrector's optimizer steps.
        skip_connection (`str`, *optional*, defaults to `"per_example"`):
            Corrected label = (1 - s) * g + s * onehot(noisy label), with the mixing weight s learned: `"none"`,
            `"global"` (one s for every row) or `"per_example"` (s from an extra output unit of the corrector, per
            row). `true` / `false` mean `"global"` / `"none"`.
        skip_init (`float`, *optional*, defaults to `2.0`):
            Starting logit of s (0: s = 0.5; the default 2.0: s = 0.88, so the run starts near the given labels and
            the corrector moves a row away from its label only as the meta-gradient asks).
        corrector_teacher (`str`, *optional*, defaults to `"none"`):
            What the corrector's class distribution g starts from: `"none"`, its MLP alone (the paper's); `"main_net"`,
            the main net's own detached prediction for the row, g = softmax(main logits + MLP output), the MLP's class
            outputs starting at zero (Enhanced MLC's teacher distribution with the main net as its teacher). With the
            skip weight s the target is then s * onehot(given) + (1 - s) * that prediction, and the meta-gradient
            learns s per row and the MLP's correction of the prediction.
        confidence_gate (`bool`, *optional*, defaults to `False`):
            The per-row skip weight also reads the main net's confidence in the given label (its log-probability,
            standardised over the batch) through one learned slope starting at 0; needs
            `skip_connection="per_example"`. The confidence sums to zero over the batch, so a push of the same size
            on every row's gate does not move the slope; what moves it is which rows to trust more than the others.
            Give the slope a learning rate with `skip_learning_rate`. Standardised per batch, a row's corrected label
            depends on the rows beside it (`correct_labels` too, per evaluation batch).
        skip_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the gate's own scalars alone (the global skip weight's logit, or the confidence gate's
            slope); `None` uses `meta_learning_rate`. Adam moves a scalar by about one learning rate per step whatever
            the gradient's size, so at the learning rates that suit the corrector it barely leaves its start in a
            short run. Needs `skip_connection="global"` or `confidence_gate`.
        meta_split (`str`, *optional*, defaults to `"none"`):
            Which trusted rows the meta objective (the clean loss at w') is computed on. `"none"`: the clean batch that
            also enters the main loss (so the main net has trained on those rows). `"batch"`: each clean batch is cut
            in half, one half in the main loss and the other for the meta objective (the authors' `hmlc_K_mix`).
            `"rows"`: a fixed, class-stratified share `meta_split_fraction` of the trusted rows is kept for the meta
            objective alone and never trained on, so the clean loss at w' measures how the step generalises.
        trust_given_labels_for (`float`, *optional*, defaults to `0.0`):
            Share of the training steps over which the main loss's target is blended with the given label, its weight
            falling linearly from 0.9 at the start to 0 ([`~meta_net.AnchoredCorrector`]): the corrector starts near
            uniform and learns while the main net trains, so its early labels are the worst. 0: off.
        corrector_warm_start_steps (`int`, *optional*, defaults to `0`):
            Before training, this many full-batch Adam steps (learning rate 1e-3) of the corrector on the trusted rows'
            features, each row shown with its true label and with a wrong one, the target being the true label
            ([`~meta_net.warm_start_corrector`]), so that it does not start from near-uniform labels. 0: off.
        corrector_supervision_interval (`int`, *optional*, defaults to `0`):
            Every this many steps, the same supervised training of the corrector on the trusted rows' current features
            (`corrector_supervision_steps` Adam steps) beside its meta-gradient, as Enhanced MLC (Taraday and Baskin,
            2023) adds a cross-entropy on the clean rows to the teacher's meta loss. 0: off.
        corrector_supervision_steps (`int`, *optional*, defaults to `10`):
            Adam steps of each such supervised update.
        meta_split_fraction (`float`, *optional*, defaults to `0.5`):
            With `meta_split="rows"`: the share of each class's trusted rows kept for the meta objective.
        clean_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Rows per clean (trusted) batch on each process; `None`: the trainer's default, for MLC a quarter of
            `per_device_train_batch_size` rounded up ([`default_clean_batch_size`]; every MLC step runs its clean
            batch forward and backward, and with a quarter an epoch costs 1.33x a fine-tuning epoch at
            `meta_update_interval=5`, against 1.60x with half, with higher accuracy in our benchmark,
            docs/RESULTS.md and docs/PERFORMANCE.md), for the other methods `per_device_train_batch_size`.
        clean_in_main_loss (`bool`, *optional*, defaults to `True`):
            Whether the clean batch also trains the main net with its true labels, as in the paper's kernel.
        clean_in_main_loss_epochs (`float` or `None`, *optional*, defaults to `1.0`):
            With `clean_in_main_loss`, the clean batch enters the main loss only while fewer than this many epochs
            over the noisy rows are done; after that it is the meta objective's alone. `None` (`inf` on the command
            line): in every epoch, up to `clean_in_main_loss_passes` (set both to `None` for the paper's step).
            Repeated in every step, the few trusted rows are fitted by the main net during the noisy stage, so that
            over several epochs the meta objective and the clean stage have little left to correct (docs/method.md).
            A run of one epoch is the same with or without the limit. MLC's alone: `l2rw` and `finetune_clean_batch`
            keep the clean batch in every epoch.
        clean_in_main_loss_passes (`float` or `None`, *optional*, defaults to `25.0`):
            With `clean_in_main_loss`, the clean batch enters the main loss only while it has shown each trusted row
            fewer than this many times on average ([`MLCTrainer.clean_passes`]; whichever of this
            and `clean_in_main_loss_epochs` ends first). A limit in epochs over the noisy rows repeats a few trusted
            rows far more often on a large noisy corpus (AG News, 20,000 noisy rows, 40 trusted: 125 times in one
            epoch; 4,000 noisy rows, 80 trusted: 12.5); this one repeats them as often on any corpus. 25 leaves our
            4,000-row cells as they were and raised MLC by 1.5 points over five seeds of two AG News cells with
            20,000 noisy rows (flip 0.4: 87.4 against 85.4; instance 0.4: 84.9 against 84.1; docs/RESULTS.md).
            `None` (`inf` on the command line): no limit.
        reuse_clean_pass (`bool`, *optional*, defaults to `True`):
            With `clean_in_main_loss`, take the clean term of a step's main loss from the previous meta step's clean
            pass at w' instead of a new forward/backward: the virtual step reproduces the real one (clipping
            included), so w' is this step's w and the gradient is the same; the main loss then uses the previous
            step's clean batch, and each clean batch still enters the main loss once and the meta objective once.
            Saves one forward/backward per step; only used when the previous step's real update was exactly its
            virtual one (no gradient accumulation, optimizer step not skipped).
        meta_update_interval (`int`, *optional*, defaults to `5`):
            Run the meta step every this many optimizer steps; steps in between train on corrected labels (and the
            clean batch) only. 5 (with a quarter of the batch as clean batch) costs 1.33x a fine-tuning epoch against
            2.4x for 1 with the whole clean batch (the paper's) on a CPU (docs/PERFORMANCE.md).
        normalize_meta_gradient (`bool`, *optional*, defaults to `False`):
            Give the corrector's optimizer the meta-gradient scaled to unit norm (its direction only). The
            meta-gradient is proportional to the clean gradient at w', which all but vanishes once the main net has
            fitted the trusted rows (a few dozen steps with 20 rows per class), and amsgrad's Adam never takes larger
            steps again after the large early gradients: the corrector stops learning. Following the direction alone
            did not pay in our benchmark (bf16, seed 0, flip 0.4, 20 trusted rows per class: AG News 87.0 against
            86.2, IMDB 56.3 against 64.9, its corrector flipping right labels with the wrong ones), hence off.
        meta_lr_follows_schedule (`bool`, *optional*, defaults to `True`):
            Scale the corrector's learning rate by the main learning-rate schedule (warm-up, decay). The
            meta-gradient shrinks with the main learning rate, and Adam would otherwise undo that.
        meta_gradient (`str`, *optional*, defaults to `"auto"`):
            How the meta-gradient is computed: `"jvp"` (one forward-mode pass, no double backward; exact), `"fd"` (the
            same directional derivative by a forward difference: one more plain forward of the noisy batch),
            `"fd_central"` (central difference: two forwards), `"reference"` (the paper's double backward through
            the virtual step; the test oracle), or `"auto"`: `"fd"` in float32 (the cheapest; the same test accuracy
            as `"jvp"` in our benchmark) and `"jvp"` under fp16 / bf16, where a forward difference loses precision.
    """

    method: str = field(
        default="mlc",
        metadata={"help": f"Training method, one of {', '.join(METHODS)}."},
    )
    clean_stage_epochs: float = field(
        default=10.0,
        metadata={"help": "Epochs over the clean rows in the clean stage (finetune_then_clean, finish_on_clean)."},
    )
    finish_on_clean: bool | None = field(
        default=None,
        metadata={
            "help": "After training, fine-tune on the trusted rows alone for clean_stage_epochs epochs "
            "(None: on for mlc, off for l2rw and finetune_clean_batch)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that holds a previous run."}
    )
    meta_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the label corrector (Adam)."})
    meta_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the label corrector."})
    meta_hidden_size: int = field(default=128, metadata={"help": "Hidden width of the label corrector's MLP."})
    label_embedding_size: int = field(
        default=128, metadata={"help": "Size of the noisy-label embedding in the corrector (the paper's cls_dim)."}
    )
    gradient_steps: int = field(
        default=1, metadata={"help": "k-step look-ahead: main-net steps per corrector step, with discounting."}
    )
    skip_connection: str = field(
        default="per_example",
        metadata={
            "help": f"Anchor the corrected label to the given one by a learned weight: {', '.join(SKIP_CONNECTIONS)}."
        },
    )
    skip_init: float = field(default=2.0, metadata={"help": "Starting logit of the skip weight (0: 0.5, 2: 0.88)."})
    corrector_teacher: str = field(
        default="none",
        metadata={"help": f"What the corrector's class distribution starts from: {', '.join(CORRECTOR_TEACHERS)}."},
    )
    confidence_gate: bool = field(
        default=False,
        metadata={"help": "The per-row skip weight also reads the main net's confidence in the given label."},
    )
    skip_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the gate's scalars alone (None: meta_learning_rate)."},
    )
    meta_split: str = field(
        default="none",
        metadata={"help": f"Trusted rows of the meta objective, one of {', '.join(META_SPLITS)}."},
    )
    trust_given_labels_for: float = field(
        default=0.0,
        metadata={"help": "Share of the run over which the given label's weight in the target falls from 0.9 to 0."},
    )
    corrector_warm_start_steps: int = field(
        default=0, metadata={"help": "Steps of supervised warm start of the corrector on the trusted rows (0: off)."}
    )
    corrector_supervision_interval: int = field(
        default=0,
        metadata={"help": "Every this many steps, supervised steps of the corrector on the trusted rows (0: off)."},
    )
    corrector_supervision_steps: int = field(
        default=10, metadata={"help": "Adam steps of each supervised update of the corrector."}
    )
    meta_split_fraction: float = field(
        default=0.5,
        metadata={"help": "With meta_split=rows: share of each class's trusted rows for the meta objective."},
    )
    clean_batch_size: int | None = field(
        default=None,
        metadata={"help": "Clean rows per batch and process; MLC's default is a quarter of the training batch."},
    )
    clean_in_main_loss: bool = field(
        default=True, metadata={"help": "Also train the main net on the clean batch with its true labels."}
    )
    clean_in_main_loss_epochs: float | None = field(
        default=1.0,
        metadata={
            "help": "Epochs over the noisy rows with the clean batch in the main loss (inf: every epoch, up to the "
            "passes limit)."
        },
    )
    clean_in_main_loss_passes: float | None = field(
        default=25.0,
        metadata={"help": "Passes over the trusted rows with the clean batch in the main loss (inf: no limit)."},
    )
    reuse_clean_pass: bool = field(
        default=True,
        metadata={
            "help": "Reuse the previous meta step's clean pass at w' (= this step's w) as the main loss's clean term."
        },
    )
    meta_update_interval: int = field(
        default=5, metadata={"help": "Run the meta step every N optimizer steps (1 = every step, the paper's)."}
    )
    normalize_meta_gradient: bool = field(
        default=False, metadata={"help": "Scale the meta-gradient to unit norm before the corrector's Adam step."}
    )
    meta_lr_follows_schedule: bool = field(
        default=True, metadata={"help": "Scale the corrector's learning rate by the main learning-rate schedule."}
    )
    meta_gradient: str = field(
        default="auto",
        metadata={"help": f"Meta-gradient computation, one of {', '.join(META_GRADIENT_CHOICES)}."},
    )

    def __post_init__(self):
        super().__post_init__()
        method = get_method(self.method)  # an unknown name is refused with the registry's names
        if self.finish_on_clean and not method.accepts_clean_stage:
            accepted = ", ".join(name for name, entry in REGISTRY.items() if entry.accepts_clean_stage)
            raise ValueError(
                f"finish_on_clean=True is accepted with method {accepted}, got method {self.method!r}"
                + (" (which ends on the clean rows already)" if self.method == "finetune_then_clean" else "")
            )
        if self.meta_gradient not in META_GRADIENT_CHOICES:
            raise ValueError(
                f"meta_gradient must be one of {', '.join(META_GRADIENT_CHOICES)}, got {self.meta_gradient!r}"
            )
        if not self.clean_stage_epochs > 0:
            raise ValueError(f"clean_stage_epochs must be > 0, got {self.clean_stage_epochs}")
        if not self.meta_learning_rate > 0:
            raise ValueError(f"meta_learning_rate must be > 0, got {self.meta_learning_rate}")
        self.skip_connection = normalise_skip_connection(self.skip_connection)
        if self.corrector_teacher not in CORRECTOR_TEACHERS:
            raise ValueError(
                f"corrector_teacher must be one of {', '.join(CORRECTOR_TEACHERS)}, got {self.corrector_teacher!r}"
            )
        if self.confidence_gate and self.skip_connection != "per_example":
            raise ValueError(f"confidence_gate=True needs skip_connection='per_example', got {self.skip_connection!r}")
        reads_logits = self.corrector_teacher != "none" or self.confidence_gate
        if reads_logits and (self.corrector_warm_start_steps or self.corrector_supervision_interval):
            what = "confidence_gate=True" if self.confidence_gate else f"corrector_teacher={self.corrector_teacher!r}"
            raise ValueError(
                f"{what} is not accepted with corrector_warm_start_steps="
                f"{self.corrector_warm_start_steps} or corrector_supervision_interval="
                f"{self.corrector_supervision_interval} (the supervised corrector reads no main-net logits); set "
                "those to 0"
            )
        if self.meta_split not in META_SPLITS:
            raise ValueError(f"meta_split must be one of {', '.join(META_SPLITS)}, got {self.meta_split!r}")
        if not 0.0 < self.meta_split_fraction < 1.0:
            raise ValueError(f"meta_split_fraction must be in (0, 1), got {self.meta_split_fraction}")
        if self.meta_split != "none" and self.gradient_steps > 1:
            raise ValueError(
                f"gradient_steps={self.gradient_steps} needs meta_split='none' (the look-ahead discount reads the "
                f"meta batch's gradient at w, which meta_split={self.meta_split!r} does not compute)"
            )
        if self.skip_learning_rate is not None:
            if self.skip_connection != "global" and not self.confidence_gate:
                raise ValueError(
                    f"skip_learning_rate={self.skip_learning_rate} needs skip_connection='global' or "
                    f"confidence_gate=True, got skip_connection={self.skip_connection!r} (only the gate's scalars "
                    "have a learning rate of their own)"
                )
            if not self.skip_learning_rate > 0:
                raise ValueError(f"skip_learning_rate must be > 0 or None, got {self.skip_learning_rate}")
        for name in ("clean_in_main_loss_epochs", "clean_in_main_loss_passes"):
            value = getattr(self, name)
            try:  # "inf" from a JSON or YAML file of arguments, as from the command line
                limit = None if value is None else float(value)
            except (TypeError, ValueError):
                limit = math.nan
            if limit is not None and not limit > 0:  # nan (not a number) fails the comparison too
                raise ValueError(f"{name} must be a number > 0, inf or None (no limit), got {value!r}")
            setattr(self, name, limit)
        if self.meta_weight_decay < 0:
            raise ValueError(f"meta_weight_decay must be >= 0, got {self.meta_weight_decay}")
        for name in ("meta_hidden_size", "label_embedding_size", "gradient_steps", "meta_update_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.trust_given_labels_for <= 1.0:
            raise ValueError(f"trust_given_labels_for must be in [0, 1], got {self.trust_given_labels_for}")
        for name in ("corrector_warm_start_steps", "corrector_supervision_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.corrector_supervision_steps, int) or self.corrector_supervision_steps < 1:
            raise ValueError(
                f"corrector_supervision_steps must be an integer >= 1, got {self.corrector_supervision_steps!r}"
            )
        if self.clean_batch_size is not None and self.clean_batch_size < 1:
            raise ValueError(f"clean_batch_size must be >= 1 or None, got {self.clean_batch_size}")
