"""Train a DeepSeek-V3-style MoE language model with DeepSpeed.

    python train.py [--config configs/tiny.yaml] [section.key=value ...]
    deepspeed --num_gpus N train.py --config C [section.key=value ...]

Build order: config (validated before any process group) -> process group -> data
(rank 0 prepares the cache, the others wait) -> model -> (fp8 swap) -> (expert
parallelism) -> deepspeed.initialize -> resume -> training loop. Each optimizer step is
followed by the aux-loss-free bias update; logging, evaluation and checkpoints happen
at the intervals of the ``train:`` section.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from configs.schema import load_config
from data import ShardedSampler, TokenShards, batch_from_rows, build_dataset_cache, read_meta
from data.corpus import source_signature
from model.compile import compile_blocks
from model.flops import count_params
from model.fp8_swap import apply_fp8
from model.transformer import DeepseekV3
from parallel import checkpoint
from parallel.balance import gamma_at, gather_counts, imbalance, update_biases
from parallel.expert_parallel import comm_bytes, create_groups, declare_to_deepspeed, shard_experts
from parallel.link import EmulatedLink
from parallel.engine import (build_engine, check_supported, cpu_threads_per_rank, deepspeed_config,
                             init_distributed, keep_freed_memory, lr_at, mtp_weight_at, set_lr)
from parallel.faults import Faults
from parallel.integrity import verify
from parallel.monitor import Monitor, machine_peak_flops
from parallel.outer import OuterSync, check_outer_resume
from parallel.placement import build_placement, describe, ep_capacities, read_expert_loads
from parallel.rank_clock import RankClock
from parallel.shares import check_capacity, initial_shares, measured_shares
from parallel.sites import (SiteMPU, build_sites, check_sites, create_site_expert_groups, deepspeed_comm_bytes,
                            site_losses)
from parallel.recompute import apply_activation_checkpointing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def prepare_data(cfg, rank: int, device) -> str:
    """Rank 0 builds (or finds) the token-shard cache; the others wait, then find it."""
    d = cfg.data
    build = lambda: build_dataset_cache(d.path, d.text_field, d.tokenizer, cfg.model.vocab_size,  # noqa: E731
                                        d.seq_len, d.cache_dir, d.val_fraction, d.max_files)
    failed = torch.zeros(1, device=device)
    shard_dir, error = None, None
    if rank == 0:
        try:
            shard_dir = build()
        except Exception as e:  # re-raised below, after telling the other ranks
            failed += 1
            error = e
    if dist.get_world_size() > 1:
        dist.all_reduce(failed)  # also the barrier: others start reading once rank 0 is done
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("rank 0 failed to prepare the data (its error is above)")
    return shard_dir if rank == 0 else build()


def check_inputs(cfg) -> None:
    """Paths every rank can check before any process group exists: a missing or empty corpus
    or tokenizer fails here, on each rank, instead of inside rank 0's data preparation."""
    d = cfg.data
    if d.path is not None:
        source_signature(d.path, d.text_field, d.max_files)   # lists the corpus files; raises naming the path
    if d.tokenizer is not None and not Path(d.tokenizer).expanduser().is_dir():
        raise FileNotFoundError(f"data.tokenizer={d.tokenizer!r}: no such tokenizer directory")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_rank_times(times: torch.Tensor, device) -> list[list[float]]:
    """(3,) this rank's seconds per step (wall, busy, wait) -> [[wall by rank], [busy..], [wait..]]."""
    parts = [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, times.to(device))
    return [[round(float(p[i]), 6) for p in parts] for i in range(3)]


def mean_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


@torch.no_grad()
def evaluate(engine, val_rows, cfg, rank: int, world: int, device) -> float:
    """Mean next-token loss over the first eval_batches global batches of the val split."""
    engine.eval()
    mbs, total = cfg.train.micro_batch_size, 0.0
    for i in range(cfg.train.eval_batches):
        start = (i * world + rank) * mbs
        x, y = batch_from_rows(val_rows, [(start + j) % len(val_rows) for j in range(mbs)])
        total += float(engine(x.to(device), y.to(device)).lm_loss)
    engine.train()
    return mean_over_ranks([total / max(1, cfg.train.eval_batches)], device)[0]


def expert_placement(cfg, shares, state, n_layers: int):
    """parallel.expert_placement -> (placement or None for the even one, a line for the log).

    capacity: the configured rank capacities, or auto's measured shares (known from the resume
    after the probe; a fresh auto run starts even). load: the router counts of
    parallel.expert_load_from, else those of the checkpoint being resumed."""
    p = cfg.parallel
    mode, caps = p.expert_placement, None
    if mode == "even":
        return None, ""
    if isinstance(p.rank_capacity, list):
        caps = ep_capacities(p.rank_capacity, p.ep)
    elif p.rank_capacity == "auto" and shares.measured:
        caps = ep_capacities(shares.rows, p.ep)            # rows per step are proportional to measured speed
    elif mode == "capacity":
        return None, ("expert_placement=capacity: no capacities yet (auto measures them in this run); experts stay "
                      "even until a resume")
    loads = None
    if mode == "load":
        if p.expert_load_from:
            loads = read_expert_loads(p.expert_load_from)
        elif state and state.get("expert_load") and any(any(row) for row in state["expert_load"]):
            loads = state["expert_load"]
    placement = build_placement(mode, n_layers, cfg.model.n_routed_experts, p.ep, caps, loads)
    return placement, f"expert placement {mode}: {describe(placement)}"


class TrainingStopped(RuntimeError):
    """The run cannot usefully go on (e.g. every recent step was non-finite); a checkpoint was saved."""


class StopOnSignal:
    """SIGTERM (a scheduler's pre-emption, the launcher passing on a kill) asks the run to stop:
    the ranks agree on it at the end of the step, save, and exit 0. Repeats are ignored, so a
    second SIGTERM cannot interrupt the save; SIGKILL still ends the process."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            print(f"rank {os.environ.get('RANK', '0')}: SIGTERM received; saving at the end of this step",
                  file=sys.stderr, flush=True)
        self.requested = True


def agree_on_step(stop_requested: bool, skipped: bool, device, site_group=None) -> tuple[bool, bool, bool]:
    """One all-reduce per step: stop if any rank was asked to; and check that every rank made the
    same skip decision (DeepSpeed all-reduces the overflow flag, so a mismatch is a bug). With
    sites, a skip is a site's own decision (its ZeRO group reduced the flag), while the stop and
    whether any site skipped (which logs the step, a collective) are the world's.
    -> (stop, this rank skipped, some rank skipped)"""
    flags = torch.tensor([float(stop_requested), float(skipped), -float(skipped)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=site_group)
    stop, any_skipped, not_all = bool(flags[0]), bool(flags[1]), bool(flags[2] == 0)
    if any_skipped and not_all:
        raise RuntimeError("ranks disagree on whether the optimizer step was skipped")
    if site_group is None:
        return stop, any_skipped, any_skipped
    dist.all_reduce(flags[:2], op=dist.ReduceOp.MAX)   # every site saves, stops and logs at the same step
    return bool(flags[0]), any_skipped, bool(flags[1])


def main(argv=None) -> int:
    # ---- config: parsed and validated before any process group exists ----
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_supported(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    check_sites(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    check_capacity(cfg, int(os.environ.get("WORLD_SIZE", 1)))   # shares of unequal ranks (parallel/shares.py)
    deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", 1)) // cfg.parallel.sites)  # conflicts fail here, early
    check_inputs(cfg)
    t = cfg.train

    # ---- processes ----
    stop_signal = StopOnSignal()
    rank, world, local_rank = init_distributed(cfg.parallel.collective_timeout_s)
    # sites: EP, ZeRO and router counts inside each; only the outer step crosses (parallel/sites.py)
    sites = build_sites(cfg.parallel.sites) if cfg.parallel.sites > 1 else None
    site_group, site_size = (sites.group, sites.size) if sites else (None, world)
    faults = Faults(rank)   # tests only: MOE_FAULTS in the environment (parallel/faults.py)
    cpu_threads_per_rank()
    from deepspeed.accelerator import get_accelerator
    device = torch.device(get_accelerator().device_name(local_rank))
    if device.type == "cpu":
        keep_freed_memory()   # no page faults on every large activation, every step
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    # ---- data ----
    shard_dir = prepare_data(cfg, rank, device)
    fingerprint = read_meta(shard_dir)["tokenizer_fingerprint"]
    train_rows = TokenShards(shard_dir, "train", expected_vocab_size=cfg.model.vocab_size,
                             expected_fingerprint=fingerprint)
    val_rows = (TokenShards(shard_dir, "val", expected_vocab_size=cfg.model.vocab_size)
                if t.eval_batches > 0 and cfg.data.val_fraction > 0 else None)
    rows_per_step = t.micro_batch_size * t.grad_accum      # per rank (equal shares); grad_accum micro-batches
    sampler = ShardedSampler(len(train_rows), rows_per_step, rank, world, t.seed)

    # ---- resume target: checked for compatibility before anything heavy is built ----
    ckpt = checkpoint.resolve_resume(t.resume, t.out_dir)
    state = None
    if ckpt is not None:
        verify(ckpt)   # every rank: a truncated or altered file is named before anything is loaded
        state = checkpoint.read_state(ckpt)
        checkpoint.check_compatible(state, ckpt, cfg.model.to_dict(), fingerprint)
        check_outer_resume(state, cfg, ckpt)   # a changed parallel.sites fails here, naming it
    # this rank's slice of the global batch: equal, configured by capacity, or auto's measured one
    shares = initial_shares(cfg, world, (state or {}).get("shares"))
    sampler.set_shares(shares.rows)

    # ---- model ----
    seed_everything(t.seed)
    model = DeepseekV3(cfg.model)
    fp8_report = apply_fp8(model, cfg.fp8) if cfg.fp8.enabled else None   # a module swap, after the build
    dispatchers, placement, placement_note = [], None, ""
    if cfg.parallel.ep > 1:                                  # keep n_routed_experts / ep experts per rank
        p = cfg.parallel
        ep_group, _ = create_site_expert_groups(p.ep, sites) if sites else create_groups(p.ep)
        link = EmulatedLink(p.link_bandwidth_gbps, p.link_latency_us)
        placement, placement_note = expert_placement(cfg, shares, state, len(model.moe_layers()))
        dispatchers = shard_experts(model, ep_group, p.ep, overlap=p.overlap, chunks=p.chunks, link=link,
                                    fp8_dispatch=p.fp8_dispatch, placement=placement)
        declare_to_deepspeed(model, p.ep)
    if t.init_from and ckpt is None:                         # a resume takes precedence over the init
        checkpoint.load_init_weights(model, t.init_from)     # every rank, its own expert slice
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    compiled = compile_blocks(model) if t.compile else 0     # after EP sharding swapped the dispatchers
    engine = build_engine(model.to(device), cfg, site_size, mpu=SiteMPU(sites) if sites else None)
    moes = model.moe_layers()
    outer = OuterSync(engine, sites, cfg.parallel, moes) if sites else None   # the shared start point
    saver = checkpoint.Checkpointer(async_save=t.async_save)   # its own gloo group: created on every rank
    slowdown = (cfg.parallel.emulate_slowdown or {}).get(rank, 1.0)
    clock = RankClock(engine, dispatchers, slowdown, device)            # compute vs waiting, per rank
    if slowdown > 1.0:
        print(f"rank {rank}: EMULATED SLOWDOWN x{slowdown} (parallel.emulate_slowdown): this rank sleeps "
              f"{slowdown - 1:.2f} x its compute time every micro-step", file=sys.stderr, flush=True)

    step = 0
    if ckpt is not None:
        checkpoint.load(engine, ckpt, state, outer=outer)
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"])
    start_step = step
    expert_load = (torch.tensor(state["expert_load"], dtype=torch.float64) if state and state.get("expert_load")
                   else torch.zeros(len(moes), cfg.model.n_routed_experts, dtype=torch.float64))

    # ---- logging ----
    seq_len = cfg.data.seq_len
    tokens_per_step = rows_per_step * world * seq_len
    flops_per_token = count_params(cfg.model, seq_len).flops_per_token_train_with_mtp
    peak = machine_peak_flops(device, torch.bfloat16 if t.dtype == "bf16" else torch.float32)
    stop = min(t.max_steps, t.stop_at or t.max_steps)
    monitor = Monitor(cfg, rank, step, {
        "world_size": world, "device": str(device), "peak_flops": peak, "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token, "params": sum(p.numel() for p in model.parameters()),
        "shard_dir": shard_dir, "train_rows": len(train_rows), "resumed_from": str(ckpt) if ckpt else None})
    if fp8_report is not None:
        monitor.write(f"fp8: backend {fp8_report['backend']} ({fp8_report['kernel']}: {fp8_report['reason']}), "
                      f"{len(fp8_report['converted'])} modules converted")
    monitor.write(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters (this rank), ep "
                  f"{cfg.parallel.ep}, {world} rank(s) on "
                  f"{device}, {tokens_per_step} tokens/step, peak {peak / 1e9:.1f} GFLOP/s"
                  + (f", torch.compile on {compiled} blocks (the first step compiles them)" if compiled else "")
                  + (f", resuming from {ckpt} at step {step}" if ckpt else ""))
    if step >= stop:
        monitor.write(f"nothing to do: step {step} >= {stop}")
    if cfg.parallel.rank_capacity is not None or world > 1 and len(set(shares.rows)) > 1:
        monitor.write(f"rows per step by rank: {shares.rows} (micro-batches of {[n // t.grad_accum for n in shares.rows]}"
                      f"{', measured' if shares.measured else ''})"
                      + ("; auto: measuring compute time over the first "
                         f"{cfg.parallel.capacity_probe_steps} steps" if cfg.parallel.rank_capacity == "auto"
                         and not shares.measured else ""))
    if placement_note:
        monitor.write(placement_note)
    if cfg.parallel.emulate_slowdown:
        monitor.write(f"WARNING: emulated slowdown on rank(s) {cfg.parallel.emulate_slowdown} (tests/benchmarks only)")

    # ---- training loop ----
    engine.train()
    interval_tokens, interval_time = 0, 0.0
    rank_times, interval_load = torch.zeros(3, dtype=torch.float64), torch.zeros_like(expert_load)  # step/busy/wait s
    probe_busy, times_from = [], step                       # auto's probe: compute s of each step
    comm_seen, comm_step = {}, step
    skipped_in_a_row = 0
    while step < stop:
        faults.before_step(step + 1)
        t0 = time.perf_counter()
        lr = lr_at(step, t)
        set_lr(engine, lr)
        model.mtp_loss_weight = mtp_weight = mtp_weight_at(step, t, cfg.model.mtp_loss_weight)
        rows = sampler.next_batch()                              # (this rank's share,) = grad_accum x mbs_r
        mbs, weight = shares.micro(rank), shares.weight(rank)    # weight: the update is the equal split's
        parts = torch.zeros(4, dtype=torch.float64)              # loss, lm, aux, mtp summed over micro-steps
        for micro in range(t.grad_accum):
            clock.micro_start()
            x, y = batch_from_rows(train_rows, rows[micro * mbs:(micro + 1) * mbs])
            out = engine(x.to(device), y.to(device))
            loss = out.loss * faults.loss_scale(step + 1)        # tests may poison it (MOE_FAULTS)
            engine.backward(loss * weight if weight != 1.0 else loss)
            clock.micro_end()
            engine.step()                                        # optimizer step at the last micro-step
            parts += torch.stack([loss, out.lm_loss, out.aux_loss, out.mtp_loss]).detach().double().cpu()
        counts = gather_counts(moes, site_group)                 # (L, E) summed over the site's ranks and micro-steps
        if counts.numel():
            expert_load += counts.double().cpu()
            interval_load += counts.double().cpu()
        # a NaN/inf gradient on any rank: DeepSpeed (or FiniteAdamW) left parameters and optimizer
        # untouched on every rank; the biases stay too, and the step (and its data) is passed over
        stop_now, skipped, skip_seen = agree_on_step(stop_signal.requested, not engine.was_step_applied(), device,
                                                     site_group)
        gamma = gamma_at(step, t)
        if not skipped:
            update_biases(moes, counts, gamma)
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        grad_norm = engine.get_global_grad_norm()
        step += 1
        if outer is not None:                                    # every outer_every steps: across sites
            outer.after_inner_step(step)
        dt = time.perf_counter() - t0
        busy, wait = clock.step_end(dt)
        rank_times += torch.tensor([dt, busy, wait], dtype=torch.float64)
        if cfg.parallel.rank_capacity == "auto" and not shares.measured:
            # probe: compute seconds of this launch's steps 2..capacity_probe_steps (step 1 warms up);
            # their median, so one step still warming up (the second after a resume often is) or a
            # hiccup does not move the shares
            if step - start_step > 1:
                probe_busy.append(busy)
            if step - start_step == cfg.parallel.capacity_probe_steps:
                shares, caps = measured_shares(shares.rows[rank], statistics.median(probe_busy), shares, device)
                sampler.set_shares(shares.rows)
                monitor.write(f"auto capacity after step {step}: relative speeds {[round(c, 3) for c in caps]} "
                              f"-> rows per step by rank {shares.rows}")
        interval_tokens, interval_time = interval_tokens + tokens_per_step, interval_time + dt
        parts /= t.grad_accum
        monitor.step(float(parts[0]), tokens_per_step / dt, tokens_per_step / dt * flops_per_token / peak)

        do_eval = val_rows is not None and (step % t.eval_every == 0 or step == t.max_steps)
        if step == 1 or step % t.log_every == 0 or step == stop or do_eval or skip_seen or stop_now:
            # a rank's mean over its share, weighted by that share: the global batch's mean
            loss, lm, aux, mtp = mean_over_ranks((parts * weight).tolist(), device)
            tok_s = interval_tokens / interval_time
            record = {"step": step, "loss": loss, "lm_loss": lm, "aux_loss": aux, "mtp_loss": mtp,
                      "lr": lr, "mtp_weight": mtp_weight, "grad_norm": None if grad_norm is None else float(grad_norm),
                      "tokens_per_s": tok_s, "mfu": tok_s * flops_per_token / peak,
                      "expert_load_imbalance": imbalance(counts), "bias_gamma": gamma,
                      "epoch": sampler.epoch, "tokens": step * tokens_per_step,
                      "skipped": skipped, "skipped_steps": int(engine.skipped_steps)}
            if dispatchers:  # all-to-all bytes this rank sent per step since the last record
                sent = comm_bytes(dispatchers)
                record.update({k: (v - comm_seen.get(k, 0)) / max(1, step - comm_step) for k, v in sent.items()})
                comm_seen, comm_step = sent, step
            ds_sent = deepspeed_comm_bytes()   # DeepSpeed's own collectives (deepspeed.comms_logger.enabled)
            if ds_sent:
                record["ds_comm_bytes"] = ds_sent
            if device.type == "cuda":   # the allocator's high-water mark on this rank (rank 0 logs)
                record["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if world > 1:   # which rank holds the job back: per-rank seconds per step, and token shares
                per_rank = gather_rank_times(rank_times / max(1, step - times_from), device)
                record.update(rank_step_s=per_rank[0], rank_busy_s=per_rank[1], rank_wait_s=per_rank[2],
                              rank_share=[round(f, 6) for f in shares.fractions()])
            rank_times.zero_()
            times_from = step
            record["expert_load"] = interval_load.round().long().tolist()   # (L, E) routed tokens since the last record
            interval_load.zero_()
            if cfg.parallel.emulate_slowdown:
                record["emulated_slowdown"] = {str(k): v for k, v in cfg.parallel.emulate_slowdown.items()}
            if outer is not None:   # cross-site bytes (all ranks) and seconds blocked (mean) per inner step
                record.update(outer.metrics(step, device), site_loss=site_losses(float(parts[0]), sites, device))
            if do_eval:
                record["val_loss"] = evaluate(engine, val_rows, cfg, rank, world, device)
            monitor.log(record)
            monitor.write(f"step {step}/{t.max_steps} loss {loss:.4f} (lm {lm:.4f} aux {aux:.2e} mtp {mtp:.4f})"
                          f" lr {lr:.2e} {tok_s:,.0f} tok/s mfu {record['mfu']:.2%}"
                          + (f" val {record['val_loss']:.4f}" if do_eval else "")
                          + (f" SKIPPED (non-finite loss/gradient; {skipped_in_a_row} in a row)" if skipped else ""))
            interval_tokens, interval_time = 0, 0.0

        give_up = skipped_in_a_row >= t.max_consecutive_skips
        if sites and skip_seen:   # one site's run of skips stops every site (the save is collective)
            give_up = mean_over_ranks([float(give_up)], device)[0] > 0
        if step % t.save_every == 0 or step == stop or stop_now or give_up:
            path = saver.save(engine, t.out_dir, step, {
                "sampler": sampler.state_dict(), "config": cfg.to_dict(), "tokenizer_fingerprint": fingerprint,
                "world_size": world, "shard_dir": shard_dir, "shares": shares.state_dict(),
                "expert_load": expert_load.round().long().tolist()},
                t.keep_last, faults, outer=outer)
            monitor.write(f"{'saving' if t.async_save else 'saved'} {path} (training held up "
                          f"{saver.last_stall_s:.2f} s)")
        if give_up:
            saver.wait()
            monitor.close()
            raise TrainingStopped(
                f"{skipped_in_a_row} optimizer steps in a row (train.max_consecutive_skips="
                f"{t.max_consecutive_skips}) had a non-finite loss or gradient and were skipped; stopped at step "
                f"{step}. {path} holds the last good weights and optimizer state (the data position is past "
                "the bad batches); lower train.lr or check the data before resuming")
        if stop_now:
            monitor.write(f"stopped by SIGTERM at step {step}; resume with train.resume=auto")
            break

    saver.wait()   # an async save in flight completes before the run ends
    monitor.close()
    dist.barrier()
    # every group (the checkpoints' own gloo group too) closed together, not torn down at interpreter
    # exit while a peer is already gone
    dist.destroy_process_group()
    return 0


def cli() -> int:
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(cli())
