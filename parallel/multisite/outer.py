"""The outer (DiLoCo-style) step across sites: streamed fragments, compressed deltas, overlap.

Every ``parallel.outer_every`` = H inner steps each parameter fragment f of the P
``outer_fragments`` (contiguous runs of parameters in model order, about equal in size; fragment
f syncs at inner steps t with t % H == (f+1)*H/P % H, so the P syncs of a round are staggered):

    units       this rank's share of f: its owned slices of f's parameters (parallel.state.ownership:
                ZeRO partition, its experts), and where ZeRO-0 replicates a parameter over a site
                (dense: the whole site; experts: the site's expert-data-parallel ranks) only its
                1/r chunk of it, so the cross-site traffic spreads over every rank of a site
    send (t)    delta = anchor - master  (N,) fp32 over the units, encoded (fp32 | bf16 | int8 |
                fp8 with one fp32 scale per 256 values) and exchanged with the counterparts in the
                other sites (rank i of every site: identical layouts, so identical addresses):
                an all-reduce (fp32) or an all-gather of the encoded payloads, started async
    finish      at t + tau (``outer_overlap``; the inner steps in between run meanwhile):
    (t + tau)   avg = sum over sites of decoded deltas / S, summed in site order in fp32 so every
                site gets the same bits;  outer Nesterov SGD on the anchor:
                    b = mu b + avg;  anchor -= lr (avg + mu b)
                master = anchor + (master now - master at send)   (the tau local steps are kept)
                then replicated chunks are re-assembled inside the site and the module weights
                refreshed (ZeRO all-gathers inside the site)

Warm-up (``outer_start_step`` = K > 0, ``outer_start_every`` = E): after inner steps t <= K with
t % E == 0 every fragment is exchanged as above (no overlap) and the anchor set to the sites' mean,
anchor -= avg, the outer momentum left at zero: the sites stay (nearly) together while the weights
move fastest, as DiLoCo starts from a synchronously trained model (E = 1: a mean after every step).
The rounds above run after step K (sends at t > K only); the warm-up's bytes are counted like any
exchange's, and ``outer_steps`` counts its exchanges.

Router correction biases travel with the round's last fragment (the one that syncs at t % H == 0)
and are plainly averaged, never put through the outer optimizer: see the README (multi-site).

Why not torchft's ``LocalSGD`` / ``DiLoCo``: they keep the shared start point and outer
optimizer over ``nn.Module`` parameters (``model_fragment.named_parameters()``) and set ``p.grad``
for a torch outer optimizer, which under DeepSpeed's ZeRO are the bf16/all-gathered working copies,
not the fp32 masters in the optimizer's flat partitions that must be updated (and our experts sit
one slice per rank); their averaging goes through a ``torchft.Manager`` that needs a lighthouse
server and its own replica-group process groups, beside DeepSpeed's, and their step hooks fire on
the inner optimizer, which DeepSpeed calls once per accumulated step or not at all on a skipped
one. So the exchange here runs on plain ``torch.distributed`` groups (parallel/multisite/groups.py) over the
slices DeepSpeed's optimizer owns (parallel/state/ownership.py); the schedule of fragments and the
delayed sync follow Streaming DiLoCo (arXiv 2501.18512).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from parallel.link import WanLink
from parallel.state.ownership import (
    expert_layouts,
    optimizer_step,
    owned_slices,
    set_optimizer_step,
    trainable,
    update_module_weights,
)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from configs.schema import Config, ParallelConfig
    from model.moe import MoE
    from parallel.multisite.groups import Sites

BLOCK = 256                                  # values per scale in the int8 / fp8 encodings
_QMAX = {"int8": 127.0, "fp8": 448.0}        # largest code: int8, float8 e4m3


@dataclass
class Unit:
    """Elements [lo, lo + n) of one owned slice, exchanged by this rank."""
    frag: object                             # parallel.state.ownership.OwnedSlice
    lo: int
    n: int
    replicas: object = None                  # ZeRO-0: the group holding the same fragment (None: owned alone)

    @property
    def master(self) -> torch.Tensor:
        return self.frag.master.narrow(0, self.lo, self.n)


@dataclass
class Pending:
    """One fragment's exchange, sent at ``sent_step``, applied at ``finish_step``."""
    fragment: int
    finish_step: int
    sent: torch.Tensor                       # (N,) master at send
    done_at: float = 0.0                     # emulated completion time on the link
    wait: object = None                      # blocks until the real collective is done
    result: object = None                    # -> (N,) averaged delta, once waited
    avg: torch.Tensor | None = None
    bias_sent: torch.Tensor | None = None    # (L, E) biases at send (last fragment of a round only)
    bias_sum: torch.Tensor | None = None


def encode(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """(N,) fp32 -> flat uint8 payload: bf16 bits, or per-block fp32 scales then int8 / e4m3 codes."""
    if dtype == "bf16":
        return x.to(torch.bfloat16).view(torch.uint8)
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK)).view(-1, BLOCK)    # (B, BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / _QMAX[dtype]  # (B, 1)
    q = blocks / scale
    codes = (q.round().clamp(-127, 127).to(torch.int8) if dtype == "int8" else q.to(torch.float8_e4m3fn))
    return torch.cat([scale.view(-1).view(torch.uint8), codes.view(-1).view(torch.uint8)])


def decode(payload: torch.Tensor, dtype: str, n: int) -> torch.Tensor:
    """Inverse of ``encode`` -> (n,) fp32."""
    if dtype == "bf16":
        return payload.view(torch.bfloat16).float()
    nb = -(-n // BLOCK)
    scale = payload[:4 * nb].view(torch.float32).view(nb, 1)
    codes = payload[4 * nb:].view(torch.int8 if dtype == "int8" else torch.float8_e4m3fn).view(nb, BLOCK)
    return (codes.float() * scale).view(-1)[:n]


class OuterSync:
    """The outer state and step of one rank. ``after_inner_step(t)`` after every optimizer step
    (t = inner steps done); collective over the world's counterpart groups."""

    def __init__(self, engine: DeepSpeedEngine, sites: Sites, p: ParallelConfig, moes: Iterable[MoE] = ()):
        self.engine, self.sites, self.moes = engine, sites, list(moes)
        self.H, self.P, self.tau = p.outer_every, p.outer_fragments, p.outer_overlap
        self.lr, self.mu, self.dtype = p.outer_lr, p.outer_momentum, p.outer_dtype
        self.start, self.start_every = p.outer_start_step, p.outer_start_every   # warm-up: plain averages
        self.link = WanLink(p.wan_bandwidth_gbps, p.wan_latency_ms, share=sites.size)
        self.outer_steps = 0                          # fragment exchanges applied
        self.units = self._build_units()              # [fragment] -> [Unit]
        with torch.no_grad():
            self.anchor = [torch.cat([u.master for u in us]) if us else torch.zeros(0) for us in self.units]
        self.momentum = [torch.zeros_like(a) for a in self.anchor]
        self.pending: dict[int, Pending] = {}
        # with overlap, an exchange may be in flight at a save: its averaged delta and the master at
        # send are state too. Kept in fixed buffers, so a load can fill them before knowing which
        # fragments were in flight
        self.inflight_avg = [torch.zeros_like(a) for a in self.anchor] if self.tau else []
        self.inflight_sent = [torch.zeros_like(a) for a in self.anchor] if self.tau else []
        if self.tau and self.moes:
            L, E = len(self.moes), self.moes[0].gate.e_score_correction_bias.numel()
            dev = self.moes[0].gate.e_score_correction_bias.device
            self.inflight_bias = (torch.zeros(L, E, device=dev), torch.zeros(L, E, device=dev))   # sum, sent
        self.key_prefix = f"site{sites.index}/"      # per-site state in checkpoints (sites diverge in a round)
        self._seen = (0.0, 0.0, 0)                   # (bytes, blocked s, step) at the last metrics()

    # ---- layout ----
    def _fragment_of(self) -> dict[str, int]:
        """Parameter name -> outer fragment: contiguous in model order, ~equal full sizes (the same
        on every rank: computed from full shapes, not from what this rank owns)."""
        layouts = expert_layouts(self.engine.module)
        sizes = []
        for name, q in trainable(self.engine.module):
            lay = layouts.get(name)
            sizes.append((name, q.numel() if lay is None else lay.num_experts * q[0].numel()))
        total, seen, out = sum(s for _, s in sizes), 0, {}
        for name, s in sizes:
            out[name] = min(self.P - 1, seen * self.P // max(1, total))
            seen += s
        return out

    def _build_units(self) -> list[list[Unit]]:
        from deepspeed.utils import groups as ds_groups

        of = self._fragment_of()
        units: list[list[Unit]] = [[] for _ in range(self.P)]
        keys = set()
        for fr in owned_slices(self.engine, with_states=False):
            if (fr.name, fr.shape) in keys:
                raise NotImplementedError(f"{fr.name}: this rank owns two separate pieces of it (experts "
                                          "not consecutive); the outer state keeps one per parameter")
            keys.add((fr.name, fr.shape))
            replicas = None
            if not hasattr(fr.param, "_hp_mapping"):      # ZeRO-0: replicated inside the site
                expert = getattr(fr.param, "allreduce", True) is False
                replicas = (ds_groups._get_expert_data_parallel_group(fr.param.group_name) if expert
                            else self.sites.group)
            r = 1 if replicas is None else dist.get_world_size(replicas)
            j = 0 if replicas is None else dist.get_rank(replicas)
            lo, hi = fr.numel * j // r, fr.numel * (j + 1) // r
            units[of[fr.name]].append(Unit(fr, lo, hi - lo, replicas if r > 1 else None))
        return units

    def _send_offset(self, f: int) -> int:
        return (f + 1) * self.H // self.P % self.H

    # ---- the step ----
    def after_inner_step(self, t: int) -> bool:
        """Finish the exchanges due at inner step t, start those scheduled at t. True if the
        weights changed (an exchange was applied)."""
        if t <= self.start:                         # warm-up: every fragment at once, a plain mean
            if t % self.start_every:
                return False
            for f in range(self.P):
                self._finish(self._send(f, t, now=True), plain=True)
            update_module_weights(self.engine)
            return True
        changed = False
        for f in sorted(self.pending):
            if self.pending[f].finish_step == t:
                self._finish(self.pending.pop(f))
                changed = True
        for f in range(self.P):
            if t % self.H == self._send_offset(f):
                pend = self._send(f, t)
                if self.tau == 0:
                    self._finish(pend)
                    changed = True
                else:
                    self.pending[f] = pend
        if changed:
            update_module_weights(self.engine)
        return changed

    def _biases(self) -> torch.Tensor:
        return torch.stack([m.gate.e_score_correction_bias.detach().float() for m in self.moes])   # (L, E)

    @torch.no_grad()
    def _send(self, f: int, t: int, now: bool = False) -> Pending:
        """Start fragment f's exchange; ``now``: finished at once (no in-flight buffers)."""
        S, cross = self.sites.count, self.sites.cross
        tau = 0 if now else self.tau
        master = torch.cat([u.master for u in self.units[f]]) if self.units[f] else torch.zeros(0)
        delta = self.anchor[f] - master.to(self.anchor[f].device)
        pend = Pending(f, t + tau, self.inflight_sent[f].copy_(master) if tau else master)
        if self.dtype == "fp32":
            buf = delta.clone()
            work = dist.all_reduce(buf, group=cross, async_op=True)
            nbytes = 2 * (S - 1) * buf.numel() * 4 // S          # a ring all-reduce's share per rank
            pend.result = lambda: buf
        else:
            payload = encode(delta, self.dtype)
            parts = [torch.empty_like(payload) for _ in range(S)]
            work = dist.all_gather(parts, payload, group=cross, async_op=True)
            nbytes = (S - 1) * payload.numel()
            n = delta.numel()
            pend.result = lambda: torch.stack([decode(q, self.dtype, n) for q in parts]).sum(0)
        works = [work]
        if self.moes and self._send_offset(f) == 0:               # the round's last fragment: biases too
            pend.bias_sent = self._biases()
            if tau:
                pend.bias_sum, pend.bias_sent = self.inflight_bias[0], self.inflight_bias[1].copy_(pend.bias_sent)
                pend.bias_sum.copy_(pend.bias_sent)
            else:
                pend.bias_sum = pend.bias_sent.clone()
            works.append(dist.all_reduce(pend.bias_sum, group=cross, async_op=True))
            nbytes += 2 * (S - 1) * pend.bias_sum.numel() * 4 // S
        pend.done_at = self.link.send(nbytes)
        pend.wait = lambda: [w.wait() for w in works]
        return pend

    def _collect(self, pend: Pending) -> None:
        """Wait for the exchange (real and emulated) and decode its average."""
        if pend.avg is None:
            self.link.block_until(pend.done_at, pend.wait)
            pend.avg = pend.result() / self.sites.count
            if self.tau:
                pend.avg = self.inflight_avg[pend.fragment].copy_(pend.avg)
            pend.wait = pend.result = None

    @torch.no_grad()
    def _finish(self, pend: Pending, plain: bool = False) -> None:
        """Apply an exchange: the outer Nesterov step, or (``plain``, warm-up) the anchor set to
        the sites' mean, the outer momentum left alone."""
        f = pend.fragment
        self._collect(pend)
        a, b = self.anchor[f], self.momentum[f]
        if plain:
            a.sub_(pend.avg)
        else:
            b.mul_(self.mu).add_(pend.avg)                       # Nesterov, as torch.optim.SGD does it
            a.sub_(pend.avg + self.mu * b, alpha=self.lr)
        new = a
        if self.tau and not plain:                               # keep the local steps taken meanwhile
            now = torch.cat([u.master for u in self.units[f]]) if self.units[f] else torch.zeros(0)
            new = a + (now - pend.sent)
        self._write_masters(f, new)
        if pend.bias_sum is not None:
            avg = pend.bias_sum / self.sites.count
            now = self._biases()
            for m, v in zip(self.moes, avg + (now - pend.bias_sent)):
                bias = m.gate.e_score_correction_bias
                bias.copy_(v.to(device=bias.device, dtype=bias.dtype))
        self.outer_steps += 1

    def _write_masters(self, f: int, values: torch.Tensor) -> None:
        """Write this rank's units, then re-assemble replicated fragments inside each replica
        group: a sum of zero-filled full-size buffers (adding zeros is exact)."""
        off, by_group = 0, {}
        for u in self.units[f]:
            u.master.copy_(values[off:off + u.n])
            off += u.n
            if u.replicas is not None:
                by_group.setdefault(id(u.replicas), (u.replicas, []))[1].append(u)
        for group, us in by_group.values():
            flat = torch.zeros(sum(u.frag.numel for u in us), device=us[0].frag.master.device)
            pos = 0
            for u in us:
                flat[pos + u.lo:pos + u.lo + u.n] = u.master
                pos += u.frag.numel
            dist.all_reduce(flat, group=group)
            pos = 0
            for u in us:
                u.frag.master.copy_(flat[pos:pos + u.frag.numel])
                pos += u.frag.numel

    # ---- metrics and state ----
    def metrics(self, step: int, device: torch.device) -> dict[str, float]:
        """Since the last call, per inner step: bytes all ranks sent across sites and seconds a rank
        was blocked on that link (mean over ranks); and the totals. Collective over the world."""
        t = torch.tensor([self.link.sent_bytes, self.link.blocked_s], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        sent, blocked = float(t[0]), float(t[1]) / dist.get_world_size()
        b0, s0, t0 = self._seen
        self._seen = (sent, blocked, step)
        n = max(1, step - t0)
        return {"wan_bytes_per_step": (sent - b0) / n, "wan_blocked_s_per_step": (blocked - s0) / n,
                "wan_bytes_total": sent, "wan_blocked_s_total": blocked, "outer_steps": self.outer_steps}

    def tensor_state(self) -> dict[str, tuple[tuple[int, ...], int, torch.Tensor]]:
        """key -> (full shape, offset into the flattened full tensor, this rank's 1-D fp32 tensor):
        the shared start point and outer momentum of every unit (the same in every site: one copy),
        and with overlap the in-flight buffers (the averaged delta, the same everywhere; the master
        and biases at send, per site). Read to save; filled in place to load."""
        for pend in self.pending.values():
            self._collect(pend)                  # the average is fixed at send: waiting early is exact
        self._site_counters = self._gather_site_counters()
        out = {}
        for f, us in enumerate(self.units):
            tensors = {"outer_anchor/": self.anchor[f], "outer_momentum/": self.momentum[f]}
            if self.tau:
                tensors.update({"outer_inflight_avg/": self.inflight_avg[f],
                                f"{self.key_prefix}outer_inflight_sent/": self.inflight_sent[f]})
            off = 0
            for u in us:
                for kind, flat in tensors.items():
                    out[kind + u.frag.name] = (u.frag.shape, u.frag.offset + u.lo, flat.narrow(0, off, u.n))
                off += u.n
        if self.tau and self.moes:
            total, sent = self.inflight_bias
            # every rank of a site holds the same biases: each names the whole (L, E) at offset 0
            out["outer_inflight_bias_sum"] = (tuple(total.shape), 0, total.view(-1))
            out[f"{self.key_prefix}outer_inflight_bias_sent"] = (tuple(sent.shape), 0, sent.view(-1))
        return out

    def _gather_site_counters(self) -> list[list[int]]:
        """[site] -> [optimizer steps applied, steps skipped]: a site skips a non-finite step on its
        own, so AdamW's step count (its bias correction) differs between sites. Collective."""
        t = torch.zeros(self.sites.count, 2, dtype=torch.float64)
        t[self.sites.index] = torch.tensor([optimizer_step(self.engine), int(self.engine.skipped_steps)],
                                           dtype=torch.float64) / self.sites.size
        dev = self.anchor[0].device if self.anchor else "cpu"
        t = t.to(dev)
        dist.all_reduce(t)
        return [[round(float(x)) for x in row] for row in t.cpu()]

    def state_dict(self) -> dict:
        """Scalars (call after ``tensor_state``, which gathers the per-site counters)."""
        return {"sites": self.sites.count, "outer_every": self.H, "outer_fragments": self.P,
                "outer_overlap": self.tau, "outer_steps": self.outer_steps,
                "pending": {str(f): p.finish_step for f, p in self.pending.items()},
                "site_counters": getattr(self, "_site_counters", None)}

    def load_state_dict(self, meta: dict) -> None:
        """Scalars of a saved outer state (after the tensors were filled): the exchanges that were
        in flight become pending again, with their loaded results."""
        check_layout(meta, self.sites.count, self.H, self.P, self.tau)
        self.outer_steps = int(meta["outer_steps"])
        counters = meta.get("site_counters")
        if counters:                                 # this site's own AdamW step count and skips
            set_optimizer_step(self.engine, counters[self.sites.index][0])
            self.engine.skipped_steps = counters[self.sites.index][1]
        self.pending = {}
        for f, finish in meta.get("pending", {}).items():
            f = int(f)
            pend = Pending(f, int(finish), self.inflight_sent[f], avg=self.inflight_avg[f])
            if self.moes and self._send_offset(f) == 0:
                pend.bias_sum, pend.bias_sent = self.inflight_bias
            self.pending[f] = pend


def check_layout(meta: dict, sites: int, H: int, P: int, tau: int, where: str = "the checkpoint") -> None:
    """The rounds' layout must not change across a resume: the outer state is per site layout."""
    now = {"sites": sites, "outer_every": H, "outer_fragments": P, "outer_overlap": tau}
    saved = {k: meta.get(k, 1 if k == "sites" else None) for k in now}
    if saved["sites"] == 1 and sites == 1:
        return
    for key in now:
        if saved[key] != now[key]:
            raise ValueError(f"parallel.{key}={now[key]}: {where} was saved with parallel.{key}={saved[key]}; "
                             "the outer state (shared start point, momentum, per-site weights) belongs to that "
                             f"layout, so resume with parallel.{key}={saved[key]}")


def check_outer_resume(state: dict, cfg: Config, path: str | os.PathLike) -> None:
    """Before anything is built: a resume with another parallel.sites (or round layout) fails."""
    p = cfg.parallel
    check_layout(state.get("outer", {}), p.sites, p.outer_every, p.outer_fragments, p.outer_overlap,
                 where=f"checkpoint {path}")
