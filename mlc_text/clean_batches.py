"""
The clean (trusted) batch drawn beside each noisy batch: an endless, seeded, epoch-shuffled stream of clean batches,
sharded across processes, with a resumable position ([`CleanBatchIterator`]), the pair of batches one training
step works on ([`MetaBatch`]), and the two as one batch ([`join_inputs`]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CleanBatchIterator", "MetaBatch", "join_inputs"]


class CleanBatchIterator:
    """
    Yields clean batches forever. Each pass over the clean set is a fresh permutation drawn from `(seed, epoch)`;
    on `num_processes` processes, each global batch of `batch_size * num_processes` rows is split so that rank `r`
    gets the `r`-th slice: no row is seen twice in one global batch, and the union over ranks is the batch that a
    single process with `batch_size * num_processes` would see.

    Args:
        dataset: a sized, indexable dataset of feature dicts (a tokenized `datasets.Dataset`).
        collate_fn: turns a list of rows into a batch (e.g. `DataCollatorWithPadding`).
        batch_size: rows per batch on this process.
        seed: seed of the permutations.
        process_index / num_processes: this process's rank and the world size.
    """

    def __init__(
        self,
        dataset: Sequence[dict[str, Any]],
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        global_batch = batch_size * num_processes
        if len(dataset) == 0:
            raise ValueError("the clean dataset is empty: MLC needs trusted rows (num_clean_per_class >= 1)")
        if global_batch > len(dataset):
            raise ValueError(
                f"clean_batch_size x processes = {global_batch} exceeds the {len(dataset)} clean rows; "
                f"use clean_batch_size <= {len(dataset) // num_processes}"
            )
        self.dataset, self.collate_fn = dataset, collate_fn
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def __iter__(self) -> CleanBatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        global_batch = self.batch_size * self.num_processes
        if self.position + global_batch > len(self._order):  # drop the ragged tail; start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position + self.process_index * self.batch_size
        rows = [self.dataset[index] for index in self._order[start : start + self.batch_size]]
        self.position += global_batch
        return self.collate_fn(rows)

    def in_order(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """
        Every row once, in the dataset's order, `batch_size` rows per collated batch: the same rows on every process.
        The stream's position is left as it is.
        """
        for start in range(0, len(self.dataset), batch_size):
            stop = min(start + batch_size, len(self.dataset))
            yield self.collate_fn([self.dataset[index] for index in range(start, stop)])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


@dataclass
class MetaBatch:
    """
    A noisy batch (model inputs and given labels) and a clean batch (inputs and true labels). The meta objective is
    the clean batch's loss at w' unless a separate meta batch (`meta_inputs`, `meta_labels`: trusted rows kept out of
    the main loss) is given.
    """

    noisy_inputs: dict[str, torch.Tensor]
    noisy_labels: torch.Tensor
    clean_inputs: dict[str, torch.Tensor]
    clean_labels: torch.Tensor
    meta_inputs: dict[str, torch.Tensor] | None = None
    meta_labels: torch.Tensor | None = None

    @property
    def objective(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The rows of the meta objective: `(inputs, true labels)`."""
        if self.meta_inputs is None:
            return self.clean_inputs, self.clean_labels
        return self.meta_inputs, self.meta_labels


def join_inputs(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], pad_token_id: int | None = None
) -> dict[str, torch.Tensor]:
    """
    Two collated batches as one, `first`'s rows first: each `(rows, length)` tensor is right-padded to the longer
    length (`input_ids` with `pad_token_id`, 0 when it is `None`; every other input, the attention mask among them,
    with 0), so that an encoder that masks padding gives every row the outputs it gets in its own batch.

    Raises:
        `ValueError`: if the batches hold different inputs.
    """
    if first.keys() != second.keys():
        raise ValueError(f"cannot join batches with different inputs: {sorted(first)} and {sorted(second)}")
    joined = {}
    for name, a in first.items():
        b = second[name]
        if a.dim() == 2 and a.shape[1] != b.shape[1]:
            value = (pad_token_id or 0) if name == "input_ids" else 0
            length = max(a.shape[1], b.shape[1])
            a, b = (torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value) for t in (a, b))
        joined[name] = torch.cat([a, b])
    return joined
