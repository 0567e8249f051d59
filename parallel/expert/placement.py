"""Expert placement: which EP rank holds which routed experts, by capacity or by measured load.

A *placement* is plain JSON: ``placement[l][r]`` is the list of global expert ids that EP rank r
holds in MoE layer l (model order, MTP's layers included), in local order (the order of the
rank's stacked weights). Every id 0..E-1 appears exactly once per layer. Ranks with the same EP
index in different expert-data-parallel replicas hold the same lists (DeepSpeed reduces their
gradients together), so a placement has ``ep`` entries per layer, not ``world``.

- ``even``:     rank r holds [r*E/ep, (r+1)*E/ep): today's layout.
- ``capacity``: expert counts proportional to the EP ranks' capacities, contiguous ids.
- ``load``:     per layer, experts packed onto ranks by measured token counts relative to the ranks'
                capacities (greedy LPT, below).

How a placement is used: ``parallel.expert.sharding.shard_experts(..., placement=...)`` keeps each
rank's experts and installs a dispatcher that routes by it; checkpoints address experts by global id
(parallel/state/ownership.py), so a resume under another placement is a reshard.

Shapes: L MoE layers, E routed experts, ep EP ranks.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

Layer = list[list[int]]            # [ep rank] -> global expert ids
Placement = list[Layer]            # [moe layer] -> Layer
MODES = ("even", "capacity", "load")


# ---------------------------------------------------------------- capacities

def check_capacities(capacities: Sequence[float], ep: int, field: str = "parallel.rank_capacity") -> list[float]:
    """ValueError naming ``field`` unless there is one finite capacity > 0 per EP rank."""
    caps = list(capacities)
    if len(caps) != ep:
        raise ValueError(f"{field}={caps!r}: {len(caps)} capacities for {ep} expert-parallel ranks")
    for i, c in enumerate(caps):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            raise ValueError(f"{field}[{i}]={c!r}: must be a finite number > 0")
    return [float(c) for c in caps]


def ep_capacities(rank_capacity: Sequence[float] | None, ep: int) -> list[float]:
    """Per-rank capacities (``parallel.rank_capacity``, one per global rank) -> one per EP index.

    DeepSpeed's layout: global rank g has EP index g % ep, and the ranks sharing an EP index
    (its expert-data-parallel replicas) hold the same experts. Each replica serves its own EP
    group's tokens, so the slowest replica bounds that index: its capacity is the minimum over
    them. None (no capacities given) -> all 1.0."""
    if rank_capacity is None:
        return [1.0] * ep
    caps = list(rank_capacity)
    if not caps or len(caps) % ep:
        raise ValueError(f"parallel.rank_capacity={caps!r}: {len(caps)} entries is not a multiple of "
                         f"parallel.ep={ep} (one capacity per rank)")
    check_capacities(caps, len(caps))
    return [float(min(caps[i::ep])) for i in range(ep)]


# ---------------------------------------------------------------- the three placements

def even_placement(n_experts: int, ep: int) -> Layer:
    """Rank r holds [r*E/ep, (r+1)*E/ep) (E divisible by ep)."""
    if ep < 1 or n_experts % ep:
        raise ValueError(f"parallel.expert_placement=even: model.n_routed_experts={n_experts} is not divisible by "
                         f"parallel.ep={ep} (use parallel.expert_placement=capacity)")
    n = n_experts // ep
    return [list(range(r * n, (r + 1) * n)) for r in range(ep)]


def capacity_counts(n_experts: int, capacities: Sequence[float], unit: int = 1) -> list[int]:
    """Experts per rank proportional to ``capacities``, by largest remainder, at least one each.

    Quotas q_r = E c_r / sum(c); each rank gets floor(q_r), the experts left over go one each to the
    largest remainders (ties: the lower rank). A rank left at 0 then takes one expert from the rank
    that holds the most above its quota (so: >= 1 per rank, which E >= ep makes possible).
    ``unit``: count in blocks of ``unit`` consecutive experts (e.g. whole router groups,
    E / model.n_group), so that no block is split between ranks; E must be divisible by it."""
    ep = len(capacities)
    caps = check_capacities(capacities, ep)
    if unit < 1 or n_experts % unit:
        raise ValueError(f"placement unit {unit}: model.n_routed_experts={n_experts} is not divisible by it")
    blocks = n_experts // unit
    if blocks < ep:
        what = "experts" if unit == 1 else f"blocks of {unit} experts"
        raise ValueError(f"parallel.expert_placement: model.n_routed_experts={n_experts} gives {blocks} {what} "
                         f"for parallel.ep={ep} ranks: every rank needs at least one (parallel.rank_capacity="
                         f"{list(capacities)!r})")
    total = sum(caps)
    quota = [blocks * c / total for c in caps]
    counts = [math.floor(q) for q in quota]
    left = blocks - sum(counts)
    for r in sorted(range(ep), key=lambda r: (-(quota[r] - counts[r]), r))[:left]:
        counts[r] += 1
    for r in range(ep):
        if counts[r] == 0:
            donor = max((d for d in range(ep) if counts[d] > 1), key=lambda d: (counts[d] - quota[d], counts[d], -d))
            counts[donor] -= 1
            counts[r] = 1
    return [c * unit for c in counts]


def capacity_placement(n_experts: int, capacities: Sequence[float], unit: int = 1) -> Layer:
    """Expert counts proportional to the EP ranks' capacities (``capacity_counts``), as contiguous
    id ranges in rank order: rank 0 holds [0, n_0), rank 1 [n_0, n_0 + n_1), ...

    Node-limited routing (model.n_group / topk_group): a token's experts lie in at most topk_group
    router groups of G = E / n_group consecutive ids. With contiguous ranges a group is split only
    where a rank boundary falls inside it, so a group spans at most 1 + (boundaries inside it) ranks,
    and at most 2 when every rank holds >= G - 1 experts; a token then reaches at most
    min(ep, sum of its groups' spans) <= 2 * topk_group ranks (``ranks_per_token_bound`` computes the
    exact bound of a placement). With equal capacities and ep | n_group no group is split: the even
    placement's topk_group. ``unit=G`` keeps every group whole (the same guarantee as even) at the
    price of counts rounded to whole groups."""
    counts = capacity_counts(n_experts, capacities, unit)
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def load_placement(loads: torch.Tensor | Sequence[Sequence[float]], capacities: Sequence[float],
                   counts: Sequence[int] | str | None = None) -> Placement:
    """Per layer, pack experts onto EP ranks by measured token load relative to capacity.

    loads (L, E): tokens routed to each expert (any non-negative scale). A rank's expert-GEMM time
    is modelled as (its experts' tokens) / (its capacity); the packing minimises the largest.

    Algorithm: greedy LPT (longest processing time first) on machines of unequal speed, the
    classic 4/3-approximation for makespan and the same rule as EPLB's ``balanced_packing``
    (which assumes equal GPUs and equal expert counts): experts in decreasing load, each to the
    rank that would finish it earliest ((load_r + l_e) / c_r; ties: more free slots, lower rank);
    then pairwise swaps (and, with free counts, moves) between the most loaded rank and the others
    while they lower that rank's time without another rank exceeding it. No expert is replicated
    (EPLB replicates hot experts; here one expert hotter than a rank's whole share stays a bound).

    ``counts``: experts per rank. None (the default): the capacity placement's counts
    (``capacity_counts``), so per-rank memory (weights, gradients, optimizer state) is what
    ``capacity`` gives and loads decide only which experts go where: at training batch sizes the
    GEMM time follows the tokens, and a free packing could pile many light experts on one rank and
    run it out of memory. A list: those counts. "free": any counts, at least one expert per rank.
    Ids are sorted within each rank (runs of consecutive ids keep checkpoint slices few)."""
    loads_t = torch.as_tensor(loads, dtype=torch.float64)
    if loads_t.dim() != 2 or loads_t.shape[1] == 0:
        raise ValueError(f"parallel.expert_load_from: expert loads must be (MoE layers, experts), got shape "
                         f"{tuple(loads_t.shape)}")
    if not bool(torch.isfinite(loads_t).all()) or bool((loads_t < 0).any()):
        raise ValueError("parallel.expert_load_from: expert loads must be finite and >= 0")
    E, ep = loads_t.shape[1], len(capacities)
    caps = check_capacities(capacities, ep)
    if counts is None:
        want: list[int] | None = capacity_counts(E, caps)
    elif counts == "free":
        want = None
        if E < ep:
            raise ValueError(f"parallel.expert_placement=load: {E} experts for parallel.ep={ep} ranks: every rank "
                             "needs at least one")
    else:
        want = [int(c) for c in counts]
        if len(want) != ep or sum(want) != E or min(want) < 1:
            raise ValueError(f"load_placement counts={list(counts)!r}: need {ep} counts >= 1 summing to {E}")
    return [_pack([float(x) for x in row], caps, want) for row in loads_t]


def _pack(load: list[float], caps: list[float], counts: list[int] | None) -> Layer:
    E, ep = len(load), len(caps)
    slots = list(counts) if counts is not None else [E] * ep
    owned: list[list[int]] = [[] for _ in range(ep)]
    total = [0.0] * ep
    for k, e in enumerate(sorted(range(E), key=lambda e: (-load[e], e))):
        remaining = E - k
        empty = [r for r in range(ep) if not owned[r]]
        cand = [r for r in range(ep) if slots[r] > 0]
        if counts is None and len(empty) >= remaining:
            cand = empty                                      # the last experts go to ranks still empty
        r = min(cand, key=lambda r: ((total[r] + load[e]) / caps[r], -slots[r], r))
        owned[r].append(e)
        total[r] += load[e]
        slots[r] -= 1
    _refine(load, caps, owned, total, free=counts is None)
    return [sorted(ids) for ids in owned]


def _refine(load: list[float], caps: list[float], owned: list[list[int]], total: list[float], free: bool,
            max_rounds: int = 1000) -> None:
    """Swaps (and moves, when counts are free) out of the most loaded rank while they lower its time
    and leave the other rank below the old maximum. Deterministic (ties: lowest ids)."""
    ep = len(caps)
    for _ in range(max_rounds):
        times = [total[r] / caps[r] for r in range(ep)]
        a = max(range(ep), key=lambda r: (times[r], -r))
        best = None                                           # (new pair max, b, e, f or None)
        for b in range(ep):
            if b == a:
                continue
            for e in owned[a]:
                moves = [(f, load[f]) for f in owned[b]] + ([(None, 0.0)] if free and len(owned[a]) > 1 else [])
                for f, lf in moves:
                    d = load[e] - lf
                    if d <= 0:
                        continue
                    ta, tb = (total[a] - d) / caps[a], (total[b] + d) / caps[b]
                    new = max(ta, tb)
                    if new < times[a] - 1e-12 * max(1.0, times[a]) and (best is None or new < best[0]):
                        best = (new, b, e, f)
        if best is None:
            return
        _, b, e, f = best
        owned[a].remove(e)
        owned[b].append(e)
        total[a] -= load[e]
        total[b] += load[e]
        if f is not None:
            owned[b].remove(f)
            owned[a].append(f)
            total[b] -= load[f]
            total[a] += load[f]


# ---------------------------------------------------------------- measured loads

LOAD_KEY = "expert_load"


def _as_loads(value: Any, where: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"parallel.expert_load_from={where}: {LOAD_KEY!r} is not a list of per-expert counts per "
                         f"MoE layer: {e}") from e
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"parallel.expert_load_from={where}: {LOAD_KEY!r} has shape {tuple(t.shape)}, expected "
                         "(MoE layers, experts)")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"parallel.expert_load_from={where}: {LOAD_KEY!r} holds negative or non-finite counts")
    return t


def read_expert_loads(path: str | Path) -> torch.Tensor:
    """Measured expert loads (L, E) float64 from ``path``:

    - a checkpoint directory: its trainer_state.json key "expert_load" (per MoE layer, per expert
      token counts, cumulative);
    - a ``metrics.jsonl`` file, or a run directory holding one: the sum of the "expert_load" field
      over its records (each (L, E));
    ValueError naming the path when it holds no loads, or loads of inconsistent shapes."""
    p = Path(path).expanduser()
    where = repr(str(path))
    if p.is_dir():
        state = p / "trainer_state.json"
        if state.is_file():
            try:
                data = json.loads(state.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"parallel.expert_load_from={where}: cannot read {state}: {e}") from e
            if not isinstance(data, dict) or data.get(LOAD_KEY) is None:
                raise ValueError(f"parallel.expert_load_from={where}: {state} has no {LOAD_KEY!r} (a checkpoint "
                                 "saved before router counts were recorded)")
            return _as_loads(data[LOAD_KEY], where)
        if (p / "metrics.jsonl").is_file():
            p = p / "metrics.jsonl"
        else:
            raise ValueError(f"parallel.expert_load_from={where}: a directory with neither trainer_state.json (a "
                             "checkpoint) nor metrics.jsonl (a run)")
    if not p.is_file():
        raise ValueError(f"parallel.expert_load_from={where}: no such file or directory")
    total = None
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"parallel.expert_load_from={where}: {p} line {n} is not JSON: {e}") from e
            if not isinstance(rec, dict) or rec.get(LOAD_KEY) is None:
                continue
            t = _as_loads(rec[LOAD_KEY], f"{where} (line {n})")
            if total is not None and t.shape != total.shape:
                raise ValueError(f"parallel.expert_load_from={where}: line {n} has {LOAD_KEY!r} of shape "
                                 f"{tuple(t.shape)}, earlier lines {tuple(total.shape)}")
            total = t if total is None else total + t
    if total is None:
        raise ValueError(f"parallel.expert_load_from={where}: {p} has no record with {LOAD_KEY!r}")
    return total


# ---------------------------------------------------------------- checks and the config entry point

def check_layer(layer: Any, n_experts: int, ep: int, where: str = "parallel.expert_placement") -> Layer:
    """ValueError naming ``where`` unless ``layer`` gives each of ep ranks >= 1 expert and covers
    0..E-1 exactly once. Returns it as lists of ints."""
    if not isinstance(layer, (list, tuple)) or len(layer) != ep:
        raise ValueError(f"{where}: expected {ep} lists of expert ids (one per EP rank), got {layer!r}")
    out = []
    for r, ids in enumerate(layer):
        if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"{where}: EP rank {r} has {ids!r}, expected a list of expert ids")
        if not ids:
            raise ValueError(f"{where}: EP rank {r} holds no experts (every rank needs at least one)")
        out.append([int(i) for i in ids])
    flat = sorted(i for ids in out for i in ids)
    if flat != list(range(n_experts)):
        seen = set()
        dup = next((i for ids in out for i in ids if i in seen or seen.add(i)), None)
        bad = [i for i in flat if not 0 <= i < n_experts]
        why = (f"expert {dup} is on two ranks" if dup is not None else f"ids {bad[:5]} out of range" if bad
               else f"experts {sorted(set(range(n_experts)) - set(flat))[:5]} are on no rank")
        raise ValueError(f"{where}: not a placement of {n_experts} experts: {why}")
    return out


def check_placement(placement: Any, n_layers: int, n_experts: int, ep: int,
                    where: str = "parallel.expert_placement") -> Placement:
    """A full placement (or one layer's, applied to every layer) checked -> per-layer lists."""
    if (isinstance(placement, (list, tuple)) and placement and isinstance(placement[0], (list, tuple))
            and placement[0] and isinstance(placement[0][0], int)):
        placement = [placement] * n_layers                    # one layer's placement for every layer
    if not isinstance(placement, (list, tuple)) or len(placement) != n_layers:
        got = len(placement) if isinstance(placement, (list, tuple)) else placement
        raise ValueError(f"{where}: a placement for {got} MoE layers, the model has {n_layers}")
    return [check_layer(layer, n_experts, ep, f"{where} (MoE layer {i})") for i, layer in enumerate(placement)]


def is_even(layer: Layer, n_experts: int) -> bool:
    ep = len(layer)
    return n_experts % ep == 0 and [list(ids) for ids in layer] == even_placement(n_experts, ep)


def build_placement(mode: str, n_layers: int, n_experts: int, ep: int, capacities: Sequence[float] | None = None,
                    loads: torch.Tensor | Sequence[Sequence[float]] | None = None) -> Placement:
    """The placement of ``parallel.expert_placement=mode`` for a model with n_layers MoE layers.

    capacities: one per EP index (``ep_capacities(parallel.rank_capacity, ep)``; None: equal);
    loads: (L, E) for ``load`` (``read_expert_loads(parallel.expert_load_from)``)."""
    if mode not in MODES:
        raise ValueError(f"parallel.expert_placement={mode!r}: must be one of {', '.join(MODES)}")
    caps = check_capacities(capacities, ep) if capacities is not None else [1.0] * ep
    if mode == "even":
        return [even_placement(n_experts, ep) for _ in range(n_layers)]
    if mode == "capacity":
        return [capacity_placement(n_experts, caps) for _ in range(n_layers)]
    if loads is None:
        raise ValueError("parallel.expert_placement=load needs measured loads: set parallel.expert_load_from to a "
                         "metrics.jsonl or a checkpoint directory")
    t = torch.as_tensor(loads, dtype=torch.float64)
    if tuple(t.shape) != (n_layers, n_experts):
        raise ValueError(f"parallel.expert_load_from: loads of shape {tuple(t.shape)}, the model has {n_layers} MoE "
                         f"layers x {n_experts} experts (model.n_routed_experts)")
    return load_placement(t, caps)


# ---------------------------------------------------------------- what a placement gives

def rank_loads(layer: Layer, load: Sequence[float]) -> list[float]:
    """Tokens each rank's experts receive, for one layer's loads (E,)."""
    return [float(sum(load[e] for e in ids)) for ids in layer]


def ranks_per_token_bound(layer: Layer, n_group: int, topk_group: int) -> int:
    """Most EP ranks one token can reach under node-limited routing: its experts lie in topk_group
    router groups (E / n_group consecutive ids each); the worst case takes the topk_group groups
    spread over the most ranks (capped at ep)."""
    E = sum(len(ids) for ids in layer)
    owner = [0] * E
    for r, ids in enumerate(layer):
        for e in ids:
            owner[e] = r
    G = E // n_group
    spans = sorted((len({owner[e] for e in range(g * G, (g + 1) * G)}) for g in range(n_group)), reverse=True)
    return min(len(layer), sum(spans[:topk_group]))


def describe(placement: Placement) -> str:
    """One line for the log: experts per EP rank (per layer when they differ)."""
    counts = [[len(ids) for ids in layer] for layer in placement]
    if all(c == counts[0] for c in counts):
        return "experts per EP rank " + "/".join(map(str, counts[0]))
    return "experts per EP rank by layer " + ", ".join("/".join(map(str, c)) for c in counts)
