"""Train a DeepSeek-V3-style MoE language model with DeepSpeed.

    python train.py [--config configs/tiny.yaml] [section.key=value ...]
    deepspeed --num_gpus N train.py --config C [section.key=value ...]

Read top to bottom: the config is validated before any process group exists; then the processes,
the data (rank 0 prepares the token cache, the others wait), the checkpoint to resume (checked
before anything heavy is built), the model and engine (parallel/build.py: one ordered build), the
run state each component registers for checkpoints, the metrics; then the loop:

    step -> maybe log (and evaluate) -> maybe save -> maybe stop

Each optimizer step (``Trainer.train_step``) is followed by the aux-loss-free bias update.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from configs.schema import load_config
from data import ShardedSampler, TokenShards, batch_from_rows, build_dataset_cache, echo_log, run_tokenizer_fingerprint
from data.corpus import source_signature
from data.handoff import next_key, publish, wait_for
from data.mixture import MixtureRows, MixtureSampler
from data.prepared import check_prepared, prepared_tokenizer
from data.sources import check_sources, load_sources
from data.stop import PreparationStopped, stop_on_sigterm
from model.flops import count_params
from model.hf.manifest import verify
from model.memory_plan import moe_layer_count
from model.schedules import gamma_at, lr_at, mtp_weight_at
from parallel.balance import ExpertLoad, gather_counts, imbalance, update_biases
from parallel.build import build_training
from parallel.collectives import agree_on_step, mean_over_ranks
from parallel.device import allocator_env, apply_tf32, batch_to_device
from parallel.engine import (
    check_supported,
    cpu_threads_per_rank,
    deepspeed_config,
    init_distributed,
    keep_freed_memory,
    set_lr,
)
from parallel.faults import Faults
from parallel.layout import run_placement
from parallel.metrics.evaluation import Evaluation
from parallel.metrics.monitor import Monitor
from parallel.metrics.peak import PeakFlops
from parallel.metrics.record import Metrics, StepStats
from parallel.metrics.traffic import TrafficFields
from parallel.multisite.groups import build_sites, check_sites, site_losses
from parallel.multisite.outer import OuterSync, check_outer_resume
from parallel.pipeline.evaluate import evaluation_for
from parallel.pipeline.plan import check_pipeline, data_position
from parallel.state import checkpoint
from parallel.state.registry import RunState
from parallel.state.run_owner import run_id_for
from parallel.unequal.clock import RankClock, RankTimes
from parallel.unequal.shares import CapacityProbe, check_capacity, initial_shares

if TYPE_CHECKING:
    from collections.abc import Callable

    from configs.schema import Config
    from parallel.build import Built
    from parallel.multisite.groups import Sites
    from parallel.unequal.shares import Shares


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def check_config(cfg: Config, world_size: int) -> None:
    """Every check that needs only the config and the world size, before any process group: a
    conflicting DeepSpeed key, a layout the world cannot hold, a missing corpus or tokenizer, a
    train.out_dir holding another run's checkpoints fails here, on each rank, with one line naming the field."""
    check_supported(cfg, world_size)
    check_sites(cfg, world_size)
    check_capacity(cfg, world_size)                       # shares of unequal ranks
    check_pipeline(cfg, world_size)                       # parallel.pp: stages, schedule, what it runs with
    deepspeed_config(cfg, world_size // cfg.parallel.sites // cfg.parallel.pp)
    checkpoint.claim_out_dir(cfg.train.out_dir, cfg.train.resume, cfg.train.overwrite, int(os.environ.get("RANK", 0)))
    d = cfg.data
    if d.prepared is not None:   # read as it is: no corpus needed on this node
        check_prepared(d.prepared, d.seq_len, cfg.model.vocab_size, d.tokenizer)
    elif d.path is not None:
        source_signature(d.path, d.text_field, d.max_files)   # lists the corpus files; raises naming the path
    check_sources(d)   # data.sources, data.val_sources: each one exists and holds a document
    if d.tokenizer is not None and not Path(d.tokenizer).expanduser().is_dir():
        raise FileNotFoundError(f"data.tokenizer={d.tokenizer!r}: no such tokenizer directory")


def prepare_data(cfg: Config, rank: int, device: torch.device, build: Callable[[], Any] | None = None) -> Any:
    """The data prepared once per node: the node's first rank (LOCAL_RANK 0) runs ``build`` (default: data.path's
    token-shard cache; data/sources.py passes its own), its log lines on stdout, and hands the result (JSON: a
    directory) to the node's other ranks through the process group's store; they poll for it, logging every
    30 s, bounded by data.prepare_wait_s and not by a collective's timeout (data/handoff.py). Two preparers
    never share a cache directory (data/lock.py). SIGTERM meanwhile stops every rank within seconds; finished
    shards are kept and a rerun resumes (data/stop.py)."""
    d = cfg.data
    build = build or (lambda: build_dataset_cache(
        d.path, d.text_field, d.tokenizer, cfg.model.vocab_size, d.seq_len, d.cache_dir, d.val_fraction, d.max_files,
        num_proc=d.num_proc, tokenizer_sample_bytes=d.tokenizer_sample_bytes, max_skipped_files=d.max_skipped_files,
        wait_s=d.prepare_wait_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    preparer = rank - local_rank   # ranks of a node are consecutive (DeepSpeed's and torchrun's launchers)
    store = dist.distributed_c10d._get_default_store() if dist.get_world_size() > 1 else None
    key = next_key(preparer)
    say = lambda line: print(f"rank {rank}: {line}", flush=True)  # noqa: E731
    try:
        with stop_on_sigterm():
            if local_rank != 0:
                return wait_for(store, key, f"rank {preparer} (this node's preparer)", d.prepare_wait_s, say)
            try:
                with echo_log():   # "data: prepared ...; special-token strings kept as text: ..."
                    result = build()
            except Exception as e:   # the waiting ranks fail with its message; this rank re-raises it
                publish(store, key, error=e)
                raise
            publish(store, key, result)
            return result
    except PreparationStopped:
        print(f"rank {rank}: SIGTERM during data preparation: stopped (finished shards are kept in data.cache_dir; "
              "the next run resumes the preparation)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None


class TrainingStopped(RuntimeError):
    """The run cannot usefully go on (e.g. every recent step was non-finite); a checkpoint was saved."""


class StoppedBeforeFirstStep(BaseException):   # like KeyboardInterrupt: no "except Exception" swallows it
    """SIGTERM while the run was being built or its checkpoint loaded: nothing trained yet, nothing to save."""


class StopOnSignal:
    """SIGTERM (a scheduler's pre-emption, the launcher passing on a kill) asks the run to stop:
    the ranks agree on it at the end of the step, save, and exit 0. Repeats are ignored, so a
    second SIGTERM cannot interrupt the save; SIGKILL still ends the process. Before the first step
    (building the model and engine, loading the resumed checkpoint: minutes for a large model) there is
    nothing new to save, so it stops the rank at once (StoppedBeforeFirstStep; exit 143); data
    preparation has its own handler (data/stop.py)."""

    def __init__(self):
        self.requested = False
        self.at_once = True            # until steps_begin(): nothing to save yet
        signal.signal(signal.SIGTERM, self._handle)

    def steps_begin(self) -> None:
        self.at_once = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.at_once and not self.requested:
            self.requested = True
            raise StoppedBeforeFirstStep("SIGTERM before the first step")
        if not self.requested:
            print(f"rank {os.environ.get('RANK', '0')}: SIGTERM received; saving at the end of this step",
                  file=sys.stderr, flush=True)
        self.requested = True


class Trainer:
    """The pieces one optimizer step touches, and the step itself."""

    def __init__(self, cfg: Config, built: Built, sampler: ShardedSampler, train_rows: TokenShards, shares: Shares,
                 rank: int, device: torch.device, sites: Sites | None, faults: Faults, stop_signal: StopOnSignal):
        self.cfg, self.t, self.engine, self.model = cfg, cfg.train, built.engine, built.model
        self.moes = built.model.moe_layers()
        self.sampler, self.train_rows, self.shares = sampler, train_rows, shares
        self.rank, self.device, self.sites, self.faults, self.stop_signal = rank, device, sites, faults, stop_signal
        self.site_group = sites.group if sites else None
        self.outer = OuterSync(self.engine, sites, cfg.parallel, self.moes) if sites else None   # the shared start
        slowdown = (cfg.parallel.emulate_slowdown or {}).get(rank, 1.0)
        self.clock = RankClock(self.engine, built.dispatchers, slowdown, device)    # compute vs waiting, per rank
        self.expert_load = ExpertLoad(len(self.moes), cfg.model.n_routed_experts)
        self.skipped_in_a_row = 0
        self.pipeline = built.pipeline                  # parallel.pp > 1: the step runs in parallel/pipeline/step.py
        if self.pipeline is not None:                   # counts of every stage's MoE layers
            self.expert_load = ExpertLoad(self.pipeline.total_moe, cfg.model.n_routed_experts)

    def begin(self, step: int) -> None:
        """At the first step of this launch (after a resume): auto's capacity probe and the per-rank
        times start here; the clock synchronises the device only while something measures with it."""
        self.probe = CapacityProbe(self.cfg, self.shares, self.sampler, self.rank, step, self.device)
        self.rank_times = RankTimes(self.shares, self.device, step)
        self.clock.measuring = lambda: self.probe.active or self.clock.slowdown > 1.0

    def after_step(self, s: StepStats) -> str | None:
        """Book the step's times; -> a line for the log when auto's probe fixed the shares."""
        self.rank_times.add(s.seconds, s.busy_s, s.wait_s)
        return self.probe.after_step(s.step, s.busy_s)

    def train_step(self, step: int) -> StepStats:
        """Optimizer step ``step`` (1-based): grad_accum micro-steps over this rank's share of the global
        batch, the optimizer step, the router bias update, the outer (multi-site) step if one is due."""
        if self.pipeline is not None:
            return self.pipeline.train_step(self, step)
        t, engine = self.t, self.engine
        self.faults.before_step(step)
        t0 = time.perf_counter()
        lr = lr_at(step - 1, t)
        set_lr(engine, lr)
        self.model.mtp_loss_weight = mtp_weight = mtp_weight_at(step - 1, t, self.cfg.model.mtp_loss_weight)
        rows = self.sampler.next_batch()                          # (this rank's share,) = grad_accum x mbs_r
        mbs, weight = self.shares.micro(self.rank), self.shares.weight(self.rank)   # weight: the equal split's update
        # loss, lm, aux, mtp summed over micro-steps, on the device: read at logging steps only
        parts = torch.zeros(4, dtype=torch.float64, device=self.device)
        for micro in range(t.grad_accum):
            self.clock.micro_start()
            x, y = batch_from_rows(self.train_rows, rows[micro * mbs:(micro + 1) * mbs])
            out = engine(batch_to_device(x, self.device), batch_to_device(y, self.device))
            loss = out.loss * self.faults.loss_scale(step)      # tests may poison it (MOE_FAULTS)
            engine.backward(loss * weight if weight != 1.0 else loss)
            self.clock.micro_end()
            engine.step()                                        # optimizer step at the last micro-step
            parts += torch.stack([loss, out.lm_loss, out.aux_loss, out.mtp_loss]).detach().double()
        counts = gather_counts(self.moes, self.site_group)       # (L, E) summed over the site's ranks and micro-steps
        self.expert_load.add(counts)
        # a NaN/inf gradient on any rank: DeepSpeed (or FiniteAdamW) left parameters and optimizer
        # untouched on every rank; the biases stay too, and the step (and its data) is passed over
        stop, skipped, skip_seen = agree_on_step(self.stop_signal.requested, not engine.was_step_applied(),
                                                 self.device, self.site_group)
        gamma = gamma_at(step - 1, t)
        if not skipped:
            update_biases(self.moes, counts, gamma)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        grad_norm = engine.get_global_grad_norm()                # a device tensor under ZeRO: read when logged
        if self.outer is not None:                               # every outer_every steps: across sites
            self.outer.after_inner_step(step)
        seconds = time.perf_counter() - t0
        busy, wait = self.clock.step_end(seconds)
        return StepStats(step=step, parts=parts / t.grad_accum, weight=weight, lr=lr, mtp_weight=mtp_weight,
                         grad_norm=grad_norm, counts=counts, gamma=gamma,
                         skipped=skipped, skipped_in_a_row=self.skipped_in_a_row, skip_seen=skip_seen, stop=stop,
                         seconds=seconds, busy_s=busy, wait_s=wait)

    def register_state(self, run_state: RunState) -> None:
        run_state.register("shares", self.shares)
        run_state.register("expert_load", self.expert_load)
        if self.outer is not None:
            run_state.register("outer", self.outer)

    def give_up(self, s: StepStats) -> bool:
        """Too many non-finite steps in a row; one site's run of skips stops every site (saves are collective)."""
        give_up = s.skipped_in_a_row >= self.t.max_consecutive_skips
        if self.sites and s.skip_seen:
            give_up = mean_over_ranks([float(give_up)], self.device)[0] > 0
        return give_up


def start_processes(cfg: Config) -> tuple[int, int, torch.device, Sites | None]:
    """-> (rank, world, device, sites): the process group, and the sites split of it (parallel.sites > 1)."""
    allocator_env()   # expandable segments unless the user configured the allocator; before CUDA starts
    rank, world, local_rank = init_distributed(cfg.parallel.collective_timeout_s)
    # sites: EP, ZeRO and router counts inside each; only the outer step crosses (parallel/multisite/)
    sites = build_sites(cfg.parallel.sites) if cfg.parallel.sites > 1 else None
    cpu_threads_per_rank()
    from deepspeed.accelerator import get_accelerator
    device = torch.device(get_accelerator().device_name(local_rank))
    if device.type == "cpu":
        keep_freed_memory()   # no page faults on every large activation, every step
    apply_tf32(cfg.train.tf32, device)   # CUDA only
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return rank, world, device, sites


def load_data(cfg: Config, rank: int, device: torch.device) -> tuple[str, str, TokenShards, TokenShards | None]:
    """-> (shard dir, tokenizer fingerprint, train rows, val rows or None). The fingerprint is the run's own
    tokenizer's (data.tokenizer, else the BPE in data.cache_dir/tokenizer: the one checkpoints copy), computed
    from its files; shards whose meta.json names another are refused. With data.prepared=DIR nothing is
    prepared: DIR is checked against the config (data/prepared.py) and read by every rank; its tokenizer copy
    becomes data.tokenizer when none is set (the run's recorded config names it; checkpoints copy it)."""
    d = cfg.data
    if d.sources or d.val_sources:   # a weighted mixture, separate validation sets: data/sources.py
        return load_sources(cfg, lambda build: prepare_data(cfg, rank, device, build))
    if d.prepared is not None:
        _, fingerprint = check_prepared(d.prepared, d.seq_len, cfg.model.vocab_size, d.tokenizer)
        d.tokenizer = str(prepared_tokenizer(d.prepared, d.tokenizer))
        shard_dir = str(Path(d.prepared).expanduser())
    else:
        shard_dir = prepare_data(cfg, rank, device)
        fingerprint = run_tokenizer_fingerprint(d.tokenizer, d.cache_dir)
    train_rows = TokenShards(shard_dir, "train", expected_vocab_size=cfg.model.vocab_size,
                             expected_fingerprint=fingerprint)
    val_rows = (TokenShards(shard_dir, "val", expected_vocab_size=cfg.model.vocab_size,
                            expected_fingerprint=fingerprint)
                if cfg.train.eval_batches > 0 and d.val_fraction > 0 else None)
    return shard_dir, fingerprint, train_rows, val_rows


def find_resume(cfg: Config, fingerprint: str) -> tuple[Path | None, dict[str, Any]]:
    """-> (checkpoint dir or None, its trainer_state or {}), checked against this config first."""
    ckpt = checkpoint.resolve_resume(cfg.train.resume, cfg.train.out_dir)
    if ckpt is None:
        return None, {}
    verify(ckpt)   # every rank: a truncated or altered file is named before anything is loaded
    state = checkpoint.read_state(ckpt)
    checkpoint.check_compatible(state, ckpt, cfg.model.to_dict(), fingerprint)
    check_outer_resume(state, cfg, ckpt)   # a changed parallel.sites fails here, naming it
    return ckpt, state


def start_metrics(cfg: Config, trainer: Trainer, built: Built, sampler: ShardedSampler, val_rows: TokenShards | None,
                  rank: int, world: int, step: int,
                  run_info: dict) -> tuple[Monitor, Metrics, Evaluation]:
    """The metrics object, its rank-0 writer and the fields of every feature, in a fixed order (some
    of them are collectives). -> (monitor, metrics, evaluation)"""
    t, device = cfg.train, trainer.device
    tokens_per_step = t.micro_batch_size * t.grad_accum * world // cfg.parallel.pp * cfg.data.seq_len
    flops_per_token = count_params(cfg.model, cfg.data.seq_len).flops_per_token_train_with_mtp
    peak = PeakFlops(device, torch.bfloat16 if t.dtype == "bf16" else torch.float32, t.peak_tflops)
    monitor = Monitor(cfg, rank, step, {
        "world_size": world, "device": str(device), "peak_flops": peak.value, "peak_source": peak.source,
        "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token,
        "params": sum(p.numel() for p in built.model.parameters()), **run_info})
    metrics = Metrics(monitor, peak, tokens_per_step, flops_per_token, t.max_steps, device)
    evaluation = evaluation_for(trainer.pipeline, trainer.engine, val_rows, cfg, rank, world, device)
    load, engine = trainer.expert_load, trainer.engine
    metrics.add_fields(lambda s: {"expert_load_imbalance": imbalance(s.counts), "bias_gamma": s.gamma,
                                  "epoch": sampler.epoch, "skipped_steps": int(engine.skipped_steps)})
    if isinstance(sampler, MixtureSampler):   # tokens and passes per source (data/mixture.py)
        monitor.write(sampler.describe())
        metrics.add_fields(sampler.fields)
    metrics.add_fields(TrafficFields(built.dispatchers, step).fields)
    if device.type == "cuda":   # the allocator's high-water mark on this rank (rank 0 logs)
        metrics.add_fields(lambda s: {"gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30})
    metrics.add_fields(trainer.rank_times.fields)   # which rank holds the job back
    if built.pipeline is not None:                   # per rank: pipeline idle share, bytes to other stages
        metrics.add_fields(built.pipeline.fields)
    metrics.add_fields(lambda s: {"expert_load": load.take_interval()})   # (L, E) routed tokens since the last record
    if cfg.parallel.emulate_slowdown:
        slow = {str(k): v for k, v in cfg.parallel.emulate_slowdown.items()}
        metrics.add_fields(lambda s: {"emulated_slowdown": slow})
    if trainer.outer is not None:   # cross-site bytes (all ranks) and seconds blocked (mean) per inner step
        metrics.add_fields(lambda s: {**trainer.outer.metrics(s.step, device),
                                      "site_loss": site_losses(float(s.parts[0]), trainer.sites, device)})
    metrics.add_fields(evaluation.fields)
    return monitor, metrics, evaluation


def main(argv: list[str] | None = None) -> int:
    # ---- config: parsed and validated before any process group exists ----
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    t = cfg.train

    # ---- processes and data ----
    stop_signal = StopOnSignal()
    rank, world, device, sites = start_processes(cfg)
    faults = Faults(rank)   # tests only: MOE_FAULTS in the environment (parallel/faults.py)
    shard_dir, fingerprint, train_rows, val_rows = load_data(cfg, rank, device)
    data_rank, data_world = data_position(cfg, rank, world)   # the ranks of one pipeline read the same rows
    sampler = (MixtureSampler.over(train_rows, t.micro_batch_size * t.grad_accum, data_rank, data_world, t.seed)
               if isinstance(train_rows, MixtureRows) else
               ShardedSampler(len(train_rows), t.micro_batch_size * t.grad_accum, data_rank, data_world, t.seed))

    # ---- resume target, then the model and engine (parallel/build.py) ----
    ckpt, state = find_resume(cfg, fingerprint)
    shares = initial_shares(cfg, data_world, state.get("shares"))   # equal, by capacity, or auto's measured ones
    sampler.set_shares(shares.rows)
    placement, placement_note = (run_placement(cfg, shares, state.get("expert_load"), moe_layer_count(cfg.model))
                                 if cfg.parallel.ep > 1 else (None, ""))
    built = build_training(cfg, device, sites.size if sites else world, sites=sites, placement=placement,
                           init_from=t.init_from if ckpt is None else None)   # a resume wins over init_from
    if cfg.data.document_mask:   # packed documents kept apart (model/documents.py)
        built.model.document_eos_id = int(train_rows.meta["eos_token_id"])
    trainer = Trainer(cfg, built, sampler, train_rows, shares, rank, device, sites, faults, stop_signal)

    # ---- run state: each component registers what a resume needs (parallel/state/registry.py) ----
    run_state = RunState()
    run_state.register("sampler", sampler)
    for key, value in (("config", cfg.to_dict()), ("tokenizer_fingerprint", fingerprint), ("world_size", world),
                       ("shard_dir", shard_dir)):
        run_state.register_value(key, value)
    trainer.register_state(run_state)
    prefix = trainer.outer.key_prefix if trainer.outer is not None else ""   # sites diverge in a round
    saver = checkpoint.Checkpointer(async_save=t.async_save, state_prefix=prefix,   # its own gloo group
                                    run_id=run_id_for(state))   # the resumed run's id, or a new one
    step = 0
    if ckpt is not None:
        checkpoint.load(trainer.engine, ckpt, state, run_state, state_prefix=prefix)
        step = int(state["step"])
    stop = min(t.max_steps, t.stop_at or t.max_steps)

    # ---- metrics: one object owns the record; each feature adds its fields ----
    run_info = {"shard_dir": shard_dir, "train_rows": len(train_rows), "resumed_from": str(ckpt) if ckpt else None,
                "cuda_alloc_conf": allocator_env()}   # the allocator setting this run started with
    trainer.begin(step)
    monitor, metrics, evaluation = start_metrics(cfg, trainer, built, sampler, val_rows, rank, world,
                                                             step, run_info)
    describe_run(monitor, cfg, built, rank, world, device, metrics, ckpt, step, stop, shares, placement_note)

    # ---- the loop: step -> maybe log (and evaluate) -> maybe save -> maybe stop ----
    trainer.engine.train()
    stop_signal.steps_begin()   # from here SIGTERM stops at the end of a step, with a save
    while step < stop:
        s = trainer.train_step(step + 1)
        step = s.step
        if note := trainer.after_step(s):
            monitor.write(note)
        metrics.after_step(s)
        if step == 1 or step % t.log_every == 0 or step == stop or evaluation.due(step) or s.skip_seen or s.stop:
            metrics.record(s)
        saver.check_background(device)   # an async save that failed on any rank stops the run at the next step
        give_up = trainer.give_up(s)
        if step % t.save_every == 0 or step == stop or s.stop or give_up:
            path = saver.save(trainer.engine, t.out_dir, step, run_state, t.keep_last, faults)
            monitor.write(f"{'saving' if t.async_save else 'saved'} {path} (training held up "
                          f"{saver.last_stall_s:.2f} s)")
            # SIGTERM while saving: this step's state is in that checkpoint, so stop now (not one step and save later)
            s.stop = s.stop or (not give_up and mean_over_ranks([float(stop_signal.requested)], device)[0] > 0)
        if give_up:
            saver.wait()
            monitor.close()
            raise TrainingStopped(
                f"{s.skipped_in_a_row} optimizer steps in a row (train.max_consecutive_skips="
                f"{t.max_consecutive_skips}) had a non-finite loss or gradient and were skipped; stopped at step "
                f"{step}. {path} holds the last good weights and optimizer state (the data position is past "
                "the bad batches); lower train.lr or check the data before resuming")
        if s.stop:
            monitor.write(f"stopped by SIGTERM at step {step}; resume with train.resume=auto")
            break

    saver.wait()   # an async save in flight completes before the run ends
    monitor.close()
    dist.barrier()
    dist.destroy_process_group()   # every group (the checkpoints' too) closed together, not at exit
    return 0


def describe_run(monitor: Monitor, cfg: Config, built: Built, rank: int, world: int, device: torch.device,
                 metrics: Metrics, ckpt: Path | None, step: int, stop: int, shares: Shares,
                 placement_note: str) -> None:
    """The run's opening lines in the log."""
    t, p = cfg.train, cfg.parallel
    rep = built.fp8_report
    if rep is not None:
        monitor.write(f"fp8: backend {rep['backend']} ({rep['kernel']}: {rep['reason']}), "
                      f"{len(rep['converted'])} modules converted")
    monitor.write(f"{sum(q.numel() for q in built.model.parameters()) / 1e6:.2f}M parameters (this rank), ep "
                  f"{p.ep}, {world} rank(s) on {device}, {metrics.tokens_per_step} tokens/step, peak "
                  f"{metrics.peak.value / 1e9:.1f} GFLOP/s ({metrics.peak.source})"
                  + (f", torch.compile on {built.compiled} blocks (the first step compiles them)"
                     if built.compiled else "")
                  + (f", resuming from {ckpt} at step {step}" if ckpt else ""))
    if step >= stop:
        monitor.write(f"nothing to do: step {step} >= {stop}")
    if p.rank_capacity is not None or world > 1 and len(set(shares.rows)) > 1:
        probing = p.rank_capacity == "auto" and not shares.measured
        monitor.write(f"rows per step by rank: {shares.rows} (micro-batches of "
                      f"{[n // t.grad_accum for n in shares.rows]}{', measured' if shares.measured else ''})"
                      + (f"; auto: measuring compute time over the first {p.capacity_probe_steps} steps"
                         if probing else ""))
    if built.pipeline is not None:
        monitor.write(built.pipeline.describe())
    if placement_note:
        monitor.write(placement_note)
    slowdown = (p.emulate_slowdown or {}).get(rank, 1.0)
    if slowdown > 1.0:
        print(f"rank {rank}: EMULATED SLOWDOWN x{slowdown} (parallel.emulate_slowdown): this rank "
              f"sleeps {slowdown - 1:.2f} x its compute time every micro-step", file=sys.stderr, flush=True)
    if p.emulate_slowdown:
        monitor.write(f"WARNING: emulated slowdown on rank(s) {p.emulate_slowdown} (tests/benchmarks only)")


def cli() -> int:
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (TrainingStopped, checkpoint.SaveFailed) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except StoppedBeforeFirstStep:
        print(f"rank {os.environ.get('RANK', '0')}: SIGTERM before the first step: stopped (nothing trained yet, "
              "so nothing to save; a resumed checkpoint is unchanged)", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(cli())
