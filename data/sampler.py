"""Resumable, layout-independent batch sampler over packed rows.

Every step draws one *global* batch of `batch_size_per_rank * world_size` row indices
from a per-epoch permutation seeded only by (seed, epoch); rank r takes the r-th
contiguous slice. The global sequence therefore depends only on the global batch size,
so 1 rank x 8 rows and 2 ranks x 4 rows train on exactly the same data, and a run can be
resumed on a different number of ranks. Ranks of unequal speed may take unequal slices
(``set_shares``, parallel/unequal/shares.py): the global batch, hence the data order and the once-per-epoch
visit of every row, stays the same. Partial global batches at an epoch's end are
dropped (every rank needs a full slice); the next epoch's permutation differs, so no row
is systematically skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .shards import TokenShards


def _row_dtype(n: int) -> type:
    """The narrowest index type for n rows: int32 below 2^31."""
    return np.int32 if n < 2 ** 31 else np.int64


def shuffled_rows(seed: list[int], n: int) -> np.ndarray:
    """A permutation of range(n) drawn from ``np.random.default_rng(seed)``: the same order as
    ``rng.permutation(n)``, in int32 while n fits (half the memory: a pass over 250M packed rows, 1T tokens
    at 4,096, is 1 GB a process instead of 2)."""
    return np.random.default_rng(seed).permutation(np.arange(n, dtype=_row_dtype(n)))


class ShardedSampler:
    def __init__(self, num_rows: int, batch_size_per_rank: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size_per_rank < 1:
            raise ValueError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
        self.num_rows, self.rank, self.seed, self.shuffle = num_rows, rank, seed, shuffle
        self.batch_size_per_rank = batch_size_per_rank
        self.global_batch_size = batch_size_per_rank * world_size
        if num_rows < self.global_batch_size:
            raise ValueError(f"num_rows={num_rows} is smaller than one global batch "
                             f"({batch_size_per_rank} x {world_size} ranks = {self.global_batch_size})")
        self.steps_per_epoch = num_rows // self.global_batch_size
        self.epoch = 0
        self.position = 0  # rows of the current epoch's order already consumed (all ranks)
        self.offset, self.rows = rank * batch_size_per_rank, batch_size_per_rank   # this rank's slice
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def set_shares(self, rows_per_rank: list[int]) -> None:
        """Unequal slices of the same global batch: rank r takes rows_per_rank[r] rows, after the
        rows of ranks 0..r-1. Takes effect from the next batch on."""
        if sum(rows_per_rank) != self.global_batch_size or min(rows_per_rank) < 1 or self.rank >= len(rows_per_rank):
            raise ValueError(f"shares {rows_per_rank}: need one entry per rank, each >= 1 row, summing to the "
                             f"global batch of {self.global_batch_size}")
        self.offset, self.rows = sum(rows_per_rank[:self.rank]), rows_per_rank[self.rank]

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                # Seeded by (seed, epoch) only: independent of rank, world size and history.
                self._order = shuffled_rows([self.seed, self.epoch], self.num_rows)
            else:
                self._order = np.arange(self.num_rows, dtype=_row_dtype(self.num_rows))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> np.ndarray:
        """This rank's row indices (int64; batch_size_per_rank of them, or its share) for the next step."""
        if self.position + self.global_batch_size > self.steps_per_epoch * self.global_batch_size:
            self.epoch += 1
            self.position = 0
        start = self.position + self.offset
        batch = self._epoch_order()[start:start + self.rows].astype(np.int64)
        self.position += self.global_batch_size
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        # Plain ints/bools: JSON-serializable and safe inside any checkpoint format.
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": self.num_rows, "global_batch_size": self.global_batch_size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # world_size may change between runs; the global batch (hence the data order) may not.
        if state.get("kind", "single") != "single":
            raise ValueError("the checkpoint's data order mixes data.sources; this run reads one corpus (data.path): "
                             "resuming would change the data order")
        for key in ("seed", "num_rows", "global_batch_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; resuming would change the data order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0 or position % self.global_batch_size:
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position


def batch_from_rows(shards: TokenShards, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both int64 (B, seq_len): labels are inputs shifted left by one."""
    rows = torch.from_numpy(shards.get_rows(indices))  # (B, seq_len + 1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
