"""A weighted mixture of token-shard sources: one row index space, and a resumable sampler over it.

``MixtureRows`` puts the rows of several sources (one ``TokenShards`` each, all prepared with the same
tokenizer and seq_len) end to end: source k's row i is row ``starts[k] + i``, so ``batch_from_rows``
reads a mixed batch unchanged.

``MixtureSampler`` draws one *global* batch of B rows per step (B = rows per rank x ranks), as
``ShardedSampler`` does, so the data a step trains on does not depend on the number of ranks:

* how many of the B rows come from each source: the deficit rule over the whole run (Megatron's
  blended datasets): every global sample goes to the source furthest below ``weight x samples so
  far``, so after any number of samples each source's count is within one row of its share;
* where in the global batch those rows sit: a permutation seeded by (seed, step);
* which rows of a source: the source's own permutation per pass over it, seeded by (seed, source,
  pass), read in order; a source that runs out starts its next pass (others are unaffected).

The whole sequence is a function of the seed, the weights, the source sizes and the global sample
number; the state is the step and the rows drawn from each source, so a resume (at any world size
with the same global batch) continues it exactly. Rank r takes its slice of each global batch: equal
slices, or unequal ones after ``set_shares`` (parallel/unequal/shares.py), as ``ShardedSampler``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .sampler import shuffled_rows

if TYPE_CHECKING:
    from .shards import TokenShards

_MIX_TAG = 0x4D4958   # "MIX": keeps these generators' streams apart from ShardedSampler's (seed, epoch) ones


class MixtureRows:
    """The rows of several sources as one index space (read-only, like ``TokenShards``)."""

    def __init__(self, names: list[str], parts: list[TokenShards], weights: list[float]):
        seq_lens = {p.seq_len for p in parts}
        if len(seq_lens) != 1:
            raise ValueError(f"sources {names} were prepared with different seq_len {sorted(seq_lens)}")
        self.names, self.parts, self.weights = list(names), list(parts), list(weights)
        self.seq_len, self.meta = parts[0].seq_len, parts[0].meta   # one tokenizer: the same EOS id in each
        self.sizes = [len(p) for p in parts]
        self.starts = np.cumsum([0] + self.sizes)   # (K + 1,): source k holds rows [starts[k], starts[k + 1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def source_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The source number of each global row index."""
        return np.searchsorted(self.starts, np.asarray(indices, dtype=np.int64), side="right") - 1

    def get_rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(B, seq_len + 1) int64 array of the given global rows."""
        src = self.source_of(indices)
        return np.stack([self.parts[k][int(i) - int(self.starts[k])] for k, i in zip(src, indices)])


@dataclass
class ValidationSets:
    """Named validation rows, each with its own loss; ``val_loss`` is their mean weighted by ``weights``."""
    names: list[str]
    rows: list[TokenShards]
    weights: list[float]


def deficit_counts(weights: Sequence[float], drawn: Sequence[int], n: int) -> list[int]:
    """Rows of each source among the next ``n`` samples, one sample at a time: each goes to the source
    whose count is furthest below ``weight x samples so far`` (ties: the lower source number).
    ``drawn``: the counts so far. A loop over the samples (about a microsecond each: B per step)."""
    s = float(sum(weights))
    w, counts, out = [x / s for x in weights], [int(c) for c in drawn], [0] * len(weights)
    total = sum(counts)
    sources = range(len(w))
    for _ in range(n):
        total += 1
        k = max(sources, key=lambda j: w[j] * total - counts[j])   # the first of equal deficits
        counts[k] += 1
        out[k] += 1
    return out


class MixtureSampler:
    """Resumable, layout-independent sampler over a ``MixtureRows`` (see the module docstring)."""

    def __init__(self, sizes: list[int], weights: list[float], batch_size_per_rank: int, rank: int,
                 world_size: int, seed: int, names: list[str] | None = None, seq_len: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size_per_rank < 1:
            raise ValueError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
        self.names = list(names) if names is not None else [str(k) for k in range(len(sizes))]
        empty = [n for n, size in zip(self.names, sizes) if size < 1]
        if empty:
            raise ValueError(f"source(s) {empty} hold no training rows")
        self.sizes, self.weights, self.seed, self.seq_len = list(sizes), list(weights), seed, seq_len
        self.starts = np.cumsum([0] + self.sizes)
        self.global_batch_size = batch_size_per_rank * world_size
        self.rank, self.offset, self.rows = rank, rank * batch_size_per_rank, batch_size_per_rank
        self.step = 0                             # global batches drawn
        self.drawn = [0] * len(sizes)             # rows drawn from each source (all ranks, all steps)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def over(cls, rows: MixtureRows, batch_size_per_rank: int, rank: int, world_size: int,
             seed: int) -> MixtureSampler:
        return cls(rows.sizes, rows.weights, batch_size_per_rank, rank, world_size, seed, rows.names, rows.seq_len)

    def set_shares(self, rows_per_rank: list[int]) -> None:
        """Unequal slices of the same global batch (as ShardedSampler.set_shares)."""
        if sum(rows_per_rank) != self.global_batch_size or min(rows_per_rank) < 1 or self.rank >= len(rows_per_rank):
            raise ValueError(f"shares {rows_per_rank}: need one entry per rank, each >= 1 row, summing to the "
                             f"global batch of {self.global_batch_size}")
        self.offset, self.rows = sum(rows_per_rank[:self.rank]), rows_per_rank[self.rank]

    def _order(self, k: int, epoch: int) -> np.ndarray:
        """Source k's row order in its pass ``epoch`` (seeded by seed, source and pass only)."""
        key = (k, epoch)
        if key not in self._orders:
            for old in [o for o in self._orders if o[0] == k and o[1] < epoch]:
                del self._orders[old]   # passes are read in order: an earlier one is never needed again
            self._orders[key] = shuffled_rows([self.seed, _MIX_TAG, k, epoch], self.sizes[k])
        return self._orders[key]

    def _rows_of(self, k: int, first: int, n: int) -> np.ndarray:
        """Source k's draws first .. first + n - 1 as global row indices."""
        size, pieces = self.sizes[k], []
        while n > 0:   # one slice of the pass each draw falls in
            epoch, at = divmod(first, size)
            take = min(n, size - at)
            pieces.append(self._order(k, epoch)[at:at + take])
            first, n = first + take, n - take
        return np.concatenate(pieces).astype(np.int64) + int(self.starts[k]) if pieces else np.zeros(0, np.int64)

    def global_batch(self) -> np.ndarray:
        """The next global batch (B global row indices), advancing the state."""
        counts = deficit_counts(self.weights, self.drawn, self.global_batch_size)
        sources = np.repeat(np.arange(len(counts)), counts)   # (B,) source of each slot, grouped
        slots = np.random.default_rng([self.seed, _MIX_TAG, self.step]).permutation(sources)
        batch = np.empty(self.global_batch_size, dtype=np.int64)
        for k, n in enumerate(counts):
            batch[slots == k] = self._rows_of(k, self.drawn[k], n)
            self.drawn[k] += n
        self.step += 1
        return batch

    def next_batch(self) -> np.ndarray:
        """This rank's row indices (int64; its slice of the global batch) for the next step."""
        return self.global_batch()[self.offset:self.offset + self.rows]

    @property
    def epoch(self) -> int:
        """Complete passes over the most-repeated source (the ``epoch`` of metrics.jsonl)."""
        return max(d // n for d, n in zip(self.drawn, self.sizes))

    def fields(self, s: Any = None) -> dict[str, dict[str, float]]:
        """Metrics fields: tokens trained on from each source (they sum to ``tokens``) and passes over it."""
        return {"tokens_by_source": {n: d * self.seq_len for n, d in zip(self.names, self.drawn)},
                "epochs_by_source": {n: round(d / size, 4) for n, d, size in zip(self.names, self.drawn, self.sizes)}}

    def describe(self) -> str:
        total = sum(self.weights)
        return "data: mixture of " + ", ".join(f"{n} (weight {w / total:.3f}, {size:,} rows)"
                                               for n, w, size in zip(self.names, self.weights, self.sizes))

    def _sources(self) -> list[dict[str, Any]]:
        return [{"name": n, "rows": size, "weight": w} for n, size, w in zip(self.names, self.sizes, self.weights)]

    def state_dict(self) -> dict[str, Any]:
        # Plain ints/floats/strings: JSON-serializable and safe inside any checkpoint format.
        return {"kind": "mixture", "step": self.step, "drawn": list(self.drawn), "seed": self.seed,
                "global_batch_size": self.global_batch_size, "sources": self._sources()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture":
            raise ValueError("the checkpoint's data order is one corpus (data.path); this run mixes data.sources: "
                             "resuming would change the data order")
        for key, now in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                         ("sources", self._sources())):
            if state.get(key) != now:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this run has {key}={now!r}; "
                                 "resuming would change the data order")
        step, drawn = int(state["step"]), [int(d) for d in state["drawn"]]
        if step < 0 or min(drawn) < 0 or sum(drawn) != step * self.global_batch_size:
            raise ValueError(f"invalid mixture sampler state step={step}, drawn={drawn}")
        self.step, self.drawn = step, drawn
