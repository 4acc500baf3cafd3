"""
Which trusted rows the meta objective (the clean loss at w') is computed on, `meta_split`: the clean batch that also
enters the main loss (`"none"`), the second half of each clean batch (`"batch"`), or a class-stratified share of the
trusted rows kept out of the main loss for the whole run (`"rows"`).
"""

from __future__ import annotations

import torch

from .clean_batches import MetaBatch

__all__ = ["main_loss_rows", "split_batch", "split_meta_rows", "with_meta_objective"]


def split_batch(inputs: dict[str, torch.Tensor], rows: int, second: bool = False) -> dict[str, torch.Tensor]:
    """The first `rows` rows of a collated batch, or (`second`) the rest."""
    return {key: value[rows:] if second else value[:rows] for key, value in inputs.items()}


def split_meta_rows(clean_dataset, num_labels: int, args):
    """
    `(meta rows, main rows)`: a class-stratified share `args.meta_split_fraction` of the trusted rows (at least one
    per class), seeded by `args.seed`, kept for the meta objective; the rest train the main net.
    """
    from .data import split_clean_noisy  # the package's one stratified split

    column = "label" if "label" in clean_dataset.column_names else "labels"
    meta, main = split_clean_noisy(
        clean_dataset, num_labels, clean_fraction=args.meta_split_fraction, seed=args.seed, label_column=column
    )
    if len(main) == 0:
        raise ValueError(
            f"meta_split='rows' with meta_split_fraction={args.meta_split_fraction} leaves no trusted row for the main "
            f"loss ({len(clean_dataset)} trusted rows): lower meta_split_fraction or use meta_split='batch'"
        )
    return meta, main


def main_loss_rows(clean_rows: int, meta_split: str) -> int:
    """How many rows of a clean batch of `clean_rows` train the main net: the first half, rounded up, under `"batch"`."""
    return (clean_rows + 1) // 2 if meta_split == "batch" else clean_rows


def with_meta_objective(
    batch: MetaBatch, meta_split: str, meta_rows: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None
) -> MetaBatch:
    """
    A step's batches with the rows of its meta objective for `meta_split`: `"none"` leaves `batch` as it is,
    `"batch"` keeps the first half of the clean batch (rounded up) for the main loss and gives the rest to the meta
    objective, `"rows"` adds `meta_rows` (`(inputs, true labels)`, a batch of the rows [`split_meta_rows`] kept apart).
    """
    if meta_split == "rows":
        return MetaBatch(batch.noisy_inputs, batch.noisy_labels, batch.clean_inputs, batch.clean_labels, *meta_rows)
    if meta_split == "batch":
        clean_inputs, clean_labels = batch.clean_inputs, batch.clean_labels
        half = main_loss_rows(len(clean_labels), meta_split)
        main, meta = split_batch(clean_inputs, half), split_batch(clean_inputs, half, second=True)
        return MetaBatch(batch.noisy_inputs, batch.noisy_labels, main, clean_labels[:half], meta, clean_labels[half:])
    return batch
