"""Expert-parallel dispatcher: dropless all-to-all dispatch and combine with uneven splits,
differentiable, chunked so that communication overlaps computation in forward and backward.

Shapes: T tokens on this rank, D model dim, E global experts, n_r experts on EP rank r (El on this
rank), C token chunks, N rows (token copies) sent or received.

Placement (parallel/expert/placement.py): rank r owns the experts ``placement[r]`` (global ids, in its
local order; by default the even [r*E/ep, (r+1)*E/ep)). Each global id maps to a *slot*, its
position in the concatenation placement[0] + placement[1] + ...; copies are sorted by slot, so
they are grouped by destination rank (rank r's slots are one contiguous range of n_r) and, within
it, by the destination's local expert. One ``all_to_all_single`` with split sizes moves them.
The router, its bias and the token counts stay indexed by global id; under the even placement
slot = global id and nothing is remapped. Received rows arrive grouped by (source rank, local
expert); we regroup them to (local expert, source) for the grouped GEMM and back again before
the combine.

Overlap: every collective is split into a Start and a Wait autograd node. Forward order:
start all chunks' dispatches -> shared experts -> for each chunk (wait dispatch, experts, start
combine) -> wait combines. Autograd replays the graph in reverse creation order, so in the
backward the gradient all-to-all of chunk c is in flight while the expert backward of chunk
c+1 runs: the same pipeline, mirrored. On CPU the collectives run on gloo's own thread.
"""
from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from model.fp8 import ACT_TILE, FP8_DTYPE, QTensor, quantize_act
from model.moe import permute, unpermute
from parallel.link import EmulatedLink

if TYPE_CHECKING:
    from torch import nn

    from model.moe import RoutedExperts
    from parallel.expert.placement import Layer
    from parallel.exposure import ExposedWait


def _blocked(owner: AllToAllDispatcher | None, kind: str) -> AbstractContextManager:
    """The owner's exposure meter around a wait of ``kind`` (collective | link), if it has one."""
    return owner.meter.blocked(kind) if owner is not None and owner.meter is not None else nullcontext()


class _Transfer:
    """One all-to-all and its backward twin: split sizes, async handles, emulated completion."""

    def __init__(self, group: dist.ProcessGroup, send_splits: list[int], recv_splits: list[int], link: EmulatedLink,
                 rank: int, stats: dict, kind: str, fp8: bool = False, owner: AllToAllDispatcher | None = None):
        self.group, self.send, self.recv, self.link = group, send_splits, recv_splits, link
        self.rank, self.stats, self.kind, self.fp8 = rank, stats, kind, fp8
        self.owner = owner                      # the dispatcher: its wait_s counts the time blocked here
        self.handle = self.done_at = self.grad_out = None

    def launch(self, x: torch.Tensor, send: list[int], recv: list[int], key: str) -> torch.Tensor:
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        remote = (sum(send) - send[self.rank]) * row_bytes             # bytes that leave this rank
        self.stats[key] = self.stats.get(key, 0) + remote
        self.handle = dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.group, async_op=True)
        self.done_at = self.link.schedule(remote)
        return out

    def wait(self) -> None:
        if self.owner is not None and self.owner.on_sync is not None:
            self.owner.on_sync()                # parallel/unequal/clock.py: this rank's compute up to here
        t0 = time.perf_counter()
        with _blocked(self.owner, "collective"):
            self.handle.wait()
        with _blocked(self.owner, "link"):
            self.link.wait_until(self.done_at)
        self.handle = None
        if self.owner is not None:
            self.owner.wait_s += time.perf_counter() - t0


def pack_fp8(x: torch.Tensor) -> torch.Tensor:
    """(N, D) float -> (N, P) float32 *view* of bytes [D fp8 E4M3 | ceil(D/128) fp32 scales | pad].

    1x128 tiles as the FP8 GEMMs use them, so the receiver could feed them straight in. The
    float32 view only exists so autograd lets a gradient flow past this node; its values are bytes.
    """
    N, D = x.shape
    width = D + 4 * -(-D // 128)
    if N == 0:
        return x.new_zeros(0, -(-width // 4), dtype=torch.float32)
    q = quantize_act(x.detach())
    body = torch.cat([q.data.view(torch.uint8), q.scale.view(torch.uint8).view(N, -1)], dim=1)   # (N, D + 4S)
    pad = -body.shape[1] % 4
    if pad:
        body = torch.nn.functional.pad(body, (0, pad))
    return body.contiguous().view(torch.float32)


def unpack_fp8(buf: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of pack_fp8: (N, P) -> dequantized (N, D) in ``dtype``."""
    raw = buf.view(torch.uint8)                                              # (N, 4P)
    S = -(-D // 128)
    data = raw[:, :D].contiguous().view(FP8_DTYPE)
    scale = raw[:, D:D + 4 * S].contiguous().view(torch.float32)             # (N, S)
    return QTensor(data, scale, ACT_TILE, (buf.shape[0], D)).dequantize().to(dtype)


class _A2AStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tr: _Transfer) -> torch.Tensor:
        ctx.tr = tr
        tr.width, tr.dtype = x.shape[1], x.dtype
        payload = pack_fp8(x) if tr.fp8 else x
        return tr.launch(payload, tr.send, tr.recv, f"{tr.kind}_bytes")

    @staticmethod
    def backward(ctx: Any, _unused: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        tr = ctx.tr
        tr.wait()                         # the gradient launched by _A2AWait.backward has landed
        grad, tr.grad_out = tr.grad_out, None
        return grad, None


class _A2AWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, buf: torch.Tensor, tr: _Transfer) -> torch.Tensor:
        ctx.tr, ctx.buf_shape, ctx.buf_dtype = tr, buf.shape, buf.dtype
        tr.wait()
        return unpack_fp8(buf, tr.width, tr.dtype) if tr.fp8 else buf.view_as(buf)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # send the gradient back the way the rows came; _A2AStart.backward collects it later,
        # so whatever autograd runs in between overlaps this transfer. The buffer itself has no
        # gradient of its own: hand autograd a placeholder of its shape.
        tr = ctx.tr                       # gradients travel in the activation dtype, never FP8
        tr.grad_out = tr.launch(grad, tr.recv, tr.send, f"{tr.kind}_grad_bytes")
        return torch.zeros((), dtype=ctx.buf_dtype, device=grad.device).expand(ctx.buf_shape), None


def _regroup_index(recv_counts: torch.Tensor, rows: int) -> torch.Tensor:
    """recv_counts (ep, El): rows arrive as (source, expert) blocks; return the row order that
    lists them as (expert, source) blocks, i.e. contiguous per local expert. ``rows``: their total,
    known on the host from the split sizes (without it repeat_interleave reads the counts back)."""
    ep, El = recv_counts.shape
    expert_of_row = torch.arange(El, device=recv_counts.device).repeat(ep).repeat_interleave(
        recv_counts.flatten(), output_size=rows)                                      # (rows,)
    return torch.argsort(expert_of_row, stable=True)      # stable: source order kept within an expert


class AllToAllDispatcher:
    """Drop-in for ``model.moe.LocalDispatcher`` when the experts are spread over ``ep`` ranks.

    ``placement``: one layer's placement (parallel/expert/placement.py), ``placement[r]`` the global ids of
    EP rank r's experts in its local order; None: the even placement."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int, overlap: bool = True, chunks: int = 2,
                 link: EmulatedLink | None = None, fp8_dispatch: bool = False, placement: Layer | None = None):
        from parallel.expert.placement import check_layer, even_placement

        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if placement is None:
            if n_experts % self.ep:
                raise ValueError(f"n_routed_experts={n_experts} is not divisible by ep={self.ep}")
            placement = even_placement(n_experts, self.ep)
        self.placement = check_layer(placement, n_experts, self.ep)
        self.n_per_rank = [len(ids) for ids in self.placement]                 # n_r
        self.first_slot = [sum(self.n_per_rank[:r]) for r in range(self.ep)]
        self.n_experts, self.n_local = n_experts, self.n_per_rank[self.rank]
        order = [e for ids in self.placement for e in ids]                     # slot -> global id
        slot_of = torch.empty(n_experts, dtype=torch.long)
        slot_of[torch.tensor(order)] = torch.arange(n_experts)
        rank_of = torch.tensor([r for r, ids in enumerate(self.placement) for _ in ids])[slot_of]
        self._maps = {"slot_of": slot_of, "rank_of": rank_of}                  # by global id; moved lazily
        self.remapped = order != list(range(n_experts))
        self.overlap, self.chunks = overlap, max(1, chunks)
        self.link = link or EmulatedLink()
        self.fp8_dispatch = fp8_dispatch   # dispatch as E4M3 + 1x128 scales; combine stays full width
        self.stats: dict[str, int] = {}
        self.wait_s = 0.0              # seconds blocked in this layer's all-to-alls (parallel/unequal/clock.py)
        self.on_sync = None            # called before each blocking exchange (parallel/unequal/clock.py)
        self.meter: ExposedWait | None = None   # parallel/exposure.py: waits no other chunk hides (pipeline)
        self._ranks_per_token = None   # node-limited routing check: most distinct ranks one token reached

    @property
    def ranks_per_token_max(self) -> int:
        return 0 if self._ranks_per_token is None else int(self._ranks_per_token)

    def _map(self, name: str, device: torch.device) -> torch.Tensor:
        t = self._maps[name]
        if t.device != device:
            t = self._maps[name] = t.to(device)
        return t

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: RoutedExperts,
                 shared: nn.Module | None) -> torch.Tensor:
        T = x.shape[0]
        C = self.chunks if self.overlap else 1
        bounds = [T * c // C for c in range(C + 1)]                          # contiguous token chunks
        slots = self._map("slot_of", x.device)[topk_idx] if self.remapped else topk_idx   # (T, K)
        perms = [permute(slots[bounds[c]:bounds[c + 1]], self.n_experts) for c in range(C)]
        with torch.no_grad():
            dest = self._map("rank_of", x.device)[topk_idx]                  # (T, K) owning rank
            per_tok = torch.zeros(T, self.ep, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
            if T:   # kept on the device (no host sync in the forward); read through ranks_per_token_max
                most = per_tok.sum(1).max()
                prev = self._ranks_per_token
                self._ranks_per_token = most if prev is None else torch.maximum(prev, most)
            # one small exchange of every chunk's per-slot counts: rank r gets its (C, n_r) block,
            # this rank receives (ep_src, C, El)
            counts = torch.stack([p.counts for p in perms])                  # (C, E) by slot
            blocks = [counts[:, s:s + n] for s, n in zip(self.first_slot, self.n_per_rank)]
            per_rank = torch.stack([b.sum(1) for b in blocks], dim=1)        # (C, ep) rows to each rank
            send_counts = torch.cat([b.reshape(-1) for b in blocks])
            recv_counts = send_counts.new_empty(self.ep * C * self.n_local)
            if self.on_sync is not None:
                self.on_sync()
            t0 = time.perf_counter()                                         # blocking: a slow peer shows here
            with _blocked(self, "collective"):
                dist.all_to_all_single(recv_counts, send_counts, [C * self.n_local] * self.ep,
                                       [C * n for n in self.n_per_rank], group=self.group)
            self.wait_s += time.perf_counter() - t0
            recv_counts = recv_counts.view(self.ep, C, self.n_local)
            # the layer's one host sync: every chunk's split sizes, sent (C, ep) and received (C, ep)
            send_splits, recv_splits = torch.stack([per_rank, recv_counts.sum(2).t()]).tolist()
        transfers, bufs = [], []
        for c, p in enumerate(perms):
            tr = _Transfer(self.group, send_splits[c], recv_splits[c],
                           self.link, self.rank, self.stats, "dispatch", fp8=self.fp8_dispatch, owner=self)
            buf = _A2AStart.apply(x[bounds[c]:bounds[c + 1]].index_select(0, p.token_of), tr)
            if not self.overlap:
                buf = _A2AWait.apply(buf, tr)
            transfers.append(tr)
            bufs.append(buf)
        shared_out = shared(x) if shared is not None and self.overlap else None   # while dispatch flies
        back = []
        for c in range(C):
            recv = _A2AWait.apply(bufs[c], transfers[c]) if self.overlap else bufs[c]
            order = _regroup_index(recv_counts[:, c], sum(recv_splits[c]))   # (N_recv,)
            y = experts(recv.index_select(0, order), recv_counts[:, c].sum(0))             # (N_recv, D) expert-major
            y_src = torch.empty_like(y).index_copy(0, order, y) if y.shape[0] else y   # back to (src, e)
            tr = _Transfer(self.group, transfers[c].recv, transfers[c].send, self.link, self.rank,
                           self.stats, "combine", owner=self)
            out = _A2AStart.apply(y_src, tr)
            back.append((_A2AWait.apply(out, tr) if not self.overlap else out, tr))
        outs = []
        for c, (buf, tr) in enumerate(back):
            y_sorted = _A2AWait.apply(buf, tr) if self.overlap else buf
            outs.append(unpermute(y_sorted, perms[c], topk_weight[bounds[c]:bounds[c + 1]],
                                  bounds[c + 1] - bounds[c]))
        y = torch.cat(outs)
        if shared is not None:
            y = y + (shared_out if shared_out is not None else shared(x))
        return y
