"""Measure the per-rank memory of a real engine beside model.memory_plan's figures.

    python benchmarks/measure_memory.py --plan world=1,ep=1,zero=0,dtype=fp32 [--config C] [--json F] [overrides]
    deepspeed --num_gpus 2 benchmarks/measure_memory.py --plan world=2,ep=2,zero=2,dtype=fp32,offload=cpu ...

Every rank builds the model and the engine with train.py's own functions (DeepseekV3, shard_experts,
build_engine; activation checkpointing and FP8 are the trainer's module swaps), trains two steps on
random tokens, then measures:

- state: the bytes of every distinct tensor storage reachable from the parameters and their
  gradients, DeepSpeed's optimizer wrapper (fp32 partitions, gradient partitions, reduce buckets,
  offload buffers) and AdamW's state, sorted into the plan's categories. Counted twice in a step,
  when backward has produced every gradient (before DeepSpeed reduces them) and inside the
  optimizer step; each category keeps the larger count (the plan's "peak").
- activations: the heap bytes in use (glibc mallinfo2) after the forward minus before it, i.e.
  what autograd keeps for backward, for the plain model, with activation checkpointing, with FP8
  and with both (the swaps are undone between variants). With checkpointing also the heap's high-water
  mark over a forward and backward (``checkpointed_peak``, rows "peak ..."), the plan's figure for it: a
  backward peaks inside a block it recomputes. Use ZeRO-0 for that row (ZeRO-1/2 reduce inside it).

Under parallel.pp (``--plan ...,pp=P,schedule=S,accum=M``) ``measure_pipeline`` measures each rank over a
whole pipelined step instead: the heap's high-water mark (at every chunk boundary and every 0.2 ms) plus
torch's receive buffers, beside model/pipeline_plan.py's plan of that rank.

Rank 0 prints plan vs measured for every rank; results go to benchmarks/results/memory.md (pipelines:
benchmarks/results/pipeline.md).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from configs.schema import load_config  # noqa: E402
from model.memory_plan import GiB, activation_plan, plan  # noqa: E402
from parallel.layout import configured_placement, parse_plan  # noqa: E402

STATE = ("weights", "grads", "master", "moments", "buffers", "grads_host", "master_host", "moments_host",
         "buffers_host")


def layout_overrides(lay) -> list[str]:
    """The config overrides that make train.py run layout ``lay``."""
    out = [f"parallel.ep={lay.ep}", f"deepspeed.zero_optimization.stage={lay.zero}", f"train.dtype={lay.dtype}",
           f"train.micro_batch_size={lay.mbs}", f"data.seq_len={lay.seq}"]
    if lay.offload:
        out.append("deepspeed.zero_optimization.offload_optimizer.device=cpu")
    if lay.pp > 1:
        out += [f"parallel.pp={lay.pp}", f"parallel.pp_schedule={lay.pp_schedule}",
                f"train.grad_accum={lay.micro_batches}", "train.eval_batches=0"]
    return out


# ----------------------------------------------------------------------------- tensor census

def _storages(obj, grads: bool = True, depth: int = 0, seen: set | None = None):
    """Every tensor reachable from obj (DeepSpeed objects, lists, dicts), with its .grad if ``grads``."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield obj
        if grads and obj.grad is not None:
            yield obj.grad
        return
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return
    for v in items:
        yield from _storages(v, grads, depth + 1, seen)


def state_census(engine) -> dict[str, int]:
    """Bytes per plan category; a storage counts once, in the first category that reaches it."""
    opt, basic, model = engine.optimizer, engine.basic_optimizer, engine.module
    host = "_host" if getattr(opt, "cpu_offload", False) else ""
    params = [p for p in model.parameters() if p.requires_grad]
    masters = list(_storages([getattr(opt, a, []) for a in ("single_partition_of_fp32_groups", "fp32_groups_flat",
                                                             "fp32_groups")], grads=False))
    # buffers before gradients: gradients waiting in a reduce bucket are views into it
    roots = [
        ("weights", params),
        ("moments" + host, [st.get(k) for st in basic.state.values() for k in ("exp_avg", "exp_avg_sq")]),
        ("master" + host, masters),
        ("buffers", [b.buffer for b in getattr(opt, "ipg_buckets", {}).values()]
         + [getattr(opt, "temp_grad_buffer_for_gpu_offload", None)]),
        ("buffers_host", [getattr(opt, "param_buffer_of_bit16_for_cpu_offload_groups", None),
                          getattr(opt, "temp_grad_buffer_for_cpu_offload", None)]),
        ("grads", [p.grad for p in params] + [getattr(p, "grad_accum", None) for p in params]
         + [getattr(opt, "averaged_gradients", {})]),
        ("grads" + host, [m.grad for m in masters]),                 # the fp32 partition's gradient
        ("other", [opt]),
    ]
    out, seen = {}, set()
    for cat, objs in roots:
        for t in _storages(objs, grads=cat.startswith(("grads", "other"))):
            s = t.untyped_storage()
            key = (s.data_ptr(), s.device)
            if s.data_ptr() and key not in seen:
                seen.add(key)
                out[cat] = out.get(cat, 0) + s.nbytes()
    return out


def peak_state(engine, step) -> dict[str, int]:
    """Run ``step()`` with a census at the end of backward and one inside the optimizer step. ZeRO-0's
    all-reduce buckets live only inside the reduction: their size is taken from DeepSpeed's flatten."""
    counts, flat = [], [0]
    orig_reduce, orig_step, orig_flatten = engine.allreduce_gradients, engine.basic_optimizer.step, engine.flatten

    def flatten(tensors):
        out = orig_flatten(tensors)
        flat[0] = max(flat[0], out.untyped_storage().nbytes())
        return out

    def before(fn):
        def wrapped(*a, **k):
            counts.append(state_census(engine))
            return fn(*a, **k)
        return wrapped

    engine.allreduce_gradients = before(orig_reduce)
    engine.basic_optimizer.step = before(orig_step)
    engine.flatten = flatten
    try:
        step()
    finally:
        engine.allreduce_gradients, engine.basic_optimizer.step = orig_reduce, orig_step
        engine.flatten = orig_flatten
    out = {k: max(c.get(k, 0) for c in counts) for k in set().union(*counts)}
    if engine.zero_optimization_stage() == 0:
        out["buffers"] = out.get("buffers", 0) + flat[0]
    return out


# ----------------------------------------------------------------------------- heap and RSS

class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes malloc has handed out and not yet had back (every arena, mmapped blocks included)."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


# ----------------------------------------------------------------------------- variants

@contextlib.contextmanager
def variant(model, checkpointed: bool, fp8: bool):
    """Activation checkpointing and/or FP8 swapped into ``model`` inside the with-block, out after it."""
    from model.fp8_swap import apply_fp8
    from model.recompute import apply_activation_checkpointing

    classes = {m: type(m) for m in model.modules()}
    if fp8:
        from configs.schema import FP8Config
        apply_fp8(model, FP8Config(enabled=True, backend="emulated"))
    blocks = list(model.layers) + [m.block for m in model.mtp]
    if checkpointed:
        apply_activation_checkpointing(model)
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)            # the instance wrapper; the class method remains
        for m, cls in classes.items():
            m.__class__ = cls


VARIANTS = {"plain": (False, False), "checkpointed": (True, False), "fp8": (False, True),
            "fp8+checkpointed": (True, True)}


def measure(cfg, lay, device, variants=tuple(VARIANTS)) -> dict:
    """This rank's {"state": bytes per plan category, "activations": bytes per variant} (module docstring)."""
    from parallel.build import build_training

    # the trainer's own ordered build; the module transforms (fp8, recompute) are swapped in per variant
    placement = configured_placement(cfg, lay.ep)[0] if lay.ep > 1 else None   # capacity | load: as planned
    built = build_training(cfg, device, lay.world, placement=placement, module_transforms=False)
    engine, model = built.engine, built.model
    gen = torch.Generator().manual_seed(1000 + int(os.environ.get("RANK", 0)))
    x = torch.randint(0, cfg.model.vocab_size, (lay.mbs, lay.seq), generator=gen).to(device)

    def step():
        out = engine(x, x)
        engine.backward(out.loss)
        engine.step()

    for _ in range(2):                                 # optimizer state and DeepSpeed's lazy buffers exist
        step()
    result = {"state": peak_state(engine, step), "activations": {}, "peaks": {}}
    for name in variants:
        with variant(model, *VARIANTS[name]):
            step()                                     # warm: FP8 backend probe, recompute wrappers
            # oneDNN's bf16 GEMMs on CPU grow weight-reorder caches in the same heap during a forward
            # (+6 to +16 MB on the tiny model, varying): not autograd's, and no GPU has them
            with torch.backends.mkldnn.flags(enabled=False):
                before = heap_in_use()
                out = engine(x, x)
                result["activations"][name] = heap_in_use() - before
            engine.backward(out.loss)
            engine.step()
            del out
            if VARIANTS[name][0]:
                result["peaks"][name] = checkpointed_peak(engine, x)
    return result


def checkpointed_peak(engine, x: torch.Tensor, every_s: float = 2e-4) -> int:
    """The heap's high-water mark over one forward and backward with checkpointed blocks (the plan's
    "checkpointed" figure: a backward peaks inside a block it recomputes), above the heap before the forward;
    sampled from a thread every ``every_s``. Gradients are allocated beforehand (accumulated in place), and
    sampling stops when DeepSpeed starts reducing them (ZeRO-0: its flattened buckets are state; ZeRO-1/2
    reduce inside the backward: measure ZeRO-0)."""
    import gc
    import threading
    import time

    for prm in engine.module.parameters():
        prm.grad = torch.zeros_like(prm)
    gc.collect()
    done, peak, orig_reduce = threading.Event(), [0], engine.allreduce_gradients

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], heap_in_use())
            time.sleep(every_s)

    engine.allreduce_gradients = lambda *a, **k: (done.set(), orig_reduce(*a, **k))[1]
    worker = threading.Thread(target=poll, name="heap-poll", daemon=True)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            before = peak[0] = heap_in_use()
            worker.start()
            engine.backward(engine(x, x).loss)
            done.set()
            worker.join()
    finally:
        engine.allreduce_gradients = orig_reduce
    engine.step()
    return peak[0] - before


def _stage_objects(sched) -> list:
    return list(getattr(sched, "_stages", None) or [sched._stage])


def _receive_infos(stages: list) -> tuple[list, list]:
    """(the receive infos torch fills from another rank, those a stage of this rank hands over directly)."""
    here = {st.stage_index for st in stages}
    remote, local = [], []
    for st in stages:
        for infos, neighbour in ((st.args_recv_info, st.stage_index - 1), (st.grad_recv_info, st.stage_index + 1)):
            for info in (i for t in infos.values() for i in t if not i.is_root_arg):
                (local if neighbour in here else remote).append(info)
    return remote, local


def _storage_bytes(tensors: list) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(seen.values())


class PeakWatch:
    """The heap in use at every moment a pipeline step can peak: after each forward chunk, after each loss, at the
    start of each backward (full, input or weight half); with the chunks each stage holds then (torch's own
    books: forwards waiting for their backward, input halves waiting for their weight half)."""

    def __init__(self, sched, stages: list):
        self.stages, self.moments, self.chunks = stages, [], {}
        for st in stages:
            st.forward_one_chunk = self._after(st.forward_one_chunk, f"F{st.stage_index}")
            st.backward_one_chunk = self._before(st.backward_one_chunk, f"B{st.stage_index}")
            st.backward_weight_one_chunk = self._before(st.backward_weight_one_chunk, f"W{st.stage_index}")
        sched._maybe_compute_loss = self._after(sched._maybe_compute_loss, "loss")

    @contextlib.contextmanager
    def polling(self, every_s: float = 2e-4):
        """Also sample from a thread every ``every_s`` (labelled "poll", with the chunks of the last boundary
        sample): a backward peaks inside itself (the loss's scaled dW, a checkpointed block's recompute)."""
        import threading
        import time

        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                self.moments.append((heap_in_use(), "poll", self.chunks))
                time.sleep(every_s)

        worker = threading.Thread(target=poll, name="heap-poll", daemon=True)
        worker.start()
        try:
            yield
        finally:
            done.set()
            worker.join()

    def sample(self, label: str, mb: object) -> None:
        self.chunks = {st.stage_index: len(st.fwd_cache) + len(st.backward_state) for st in self.stages}
        self.moments.append((heap_in_use(), f"{label}:{mb}", self.chunks))

    def _after(self, fn, label: str):
        def run(*a, **k):
            out = fn(*a, **k)
            self.sample(label, a[3] if label == "loss" else a[0])
            return out
        return run

    def _before(self, fn, label: str):
        def run(*a, **k):
            self.sample(label, a[0])
            return fn(*a, **k)
        return run


def measure_pipeline(cfg, lay, device) -> dict:
    """Under parallel.pp: this rank's state (as ``measure``) and its activations: the heap's high-water mark over
    one step (sampled at every chunk boundary and every 0.2 ms, ``PeakWatch``) above the heap before the step,
    plus torch's receive buffers (allocated in the first step, kept: M per boundary that crosses ranks).
    Before the measured step, the tensors the previous step left in the same-rank hand-overs of a V schedule
    are dropped (torch replaces them before their next use; counted apart as ``left_over``), and the gradients
    are allocated. Run DualPipeV's pairs as the run does (parallel.pp_overlap: two threads) and, if it
    overlaps, once more in torch's order (``plain, pairs in turn``); other schedules also with activation
    checkpointing (the trainer refuses it under DualPipeV). Use ZeRO-0: ZeRO-1/2 allocate their reduce bucket
    during the first backward of a step, inside the measured window."""
    from torch.distributed.pipelining.schedules import OVERLAP_F_B

    from parallel.build import build_training

    built = build_training(cfg, device, lay.world, module_transforms=False)
    engine, pipe = built.engine, built.pipeline
    gen = torch.Generator().manual_seed(1000 + int(os.environ.get("RANK", 0)) % (lay.world // lay.pp))
    x = torch.randint(0, cfg.model.vocab_size, (lay.mbs * lay.micro_batches, lay.seq), generator=gen).to(device)

    def step():
        pipe.run_micro_batches(x, x)
        engine.step()

    for _ in range(2):
        step()
    result = {"state": peak_state(engine, step), "activations": {}, "pipeline": {}}
    sched, model = pipe.schedule, built.model
    stages = _stage_objects(sched)
    watch = PeakWatch(sched, stages)
    remote, local = _receive_infos(stages)
    pair = getattr(sched, "_comp_type_to_function_map", {}).get(OVERLAP_F_B)
    runs = ["plain"] + (["plain, pairs in turn"] if pair else [])
    runs += ["checkpointed"] if lay.pp_schedule != "dualpipev" else []
    for name in runs:
        if name == "plain, pairs in turn":
            del sched._comp_type_to_function_map[OVERLAP_F_B]     # torch runs the pair's actions in turn
        with variant(model, name == "checkpointed", False):
            if name == "checkpointed":
                step()                                            # warm: the recompute wrappers
            result["activations"][name], result["pipeline"][name] = _measured_step(engine, step, watch, remote,
                                                                                    local)
    if pair:
        sched._comp_type_to_function_map[OVERLAP_F_B] = pair
    return result


def _measured_step(engine, step, watch: PeakWatch, remote: list, local: list) -> tuple[int, dict]:
    """One pipelined step from a clean start -> (activations: peak above the start + receive buffers, details)."""
    import gc

    for prm in engine.module.parameters():   # accumulated in place: the heap grows by activations only
        prm.grad = torch.zeros_like(prm)
    gc.collect()
    with torch.backends.mkldnn.flags(enabled=False):
        left = heap_in_use()
        for info in local:                     # last step's hand-overs (replaced before they are read)
            info.buffer = None
        gc.collect()
        before = heap_in_use()
        watch.moments.clear()
        with watch.polling():
            step()
    peak, at, chunks = max(watch.moments, key=lambda m: m[0])
    buffers = _storage_bytes([i.buffer for i in remote])
    return peak - before + buffers, {"in_flight": peak - before, "buffers": buffers, "left_over": left - before,
                                     "peak_at": at, "chunks": chunks,
                                     "moments": [(h - before, label, c) for h, label, c in watch.moments]}


def pipeline_table(pl, measured: list[dict], lay, model_cfg) -> str:
    """Per rank: its pipeline rank's planned state and activations beside the measurement (MiB), the receive
    buffers (part of the activations) and the chunks each stage held at the measured peak against the plan's;
    DualPipeV's pairs as configured and, when they overlap, in turn (planned with pp_overlap off)."""
    from dataclasses import replace

    from model.pipeline_plan import pipeline_ranks

    in_turn = pipeline_ranks(model_cfg, replace(lay, pp_overlap=False))
    n = lay.world // lay.pp
    rows = [f"{'rank':>4s} {'pp rank':>7s} {'state plan':>10s} {'measured':>9s} {'m/p':>6s} "
            f"{'act plan':>9s} {'measured':>9s} {'m/p':>6s} {'buffers p/m':>13s}  chunks plan / at the peak"]
    for r, m in enumerate(measured):
        state = sum(v for k, v in m["state"].items() if k in STATE and not k.endswith("_host"))
        for name, act in m["activations"].items():
            info, rp = m["pipeline"][name], (in_turn if name == "plain, pairs in turn" else pl.pipeline)[r // n]
            want = rp.activations["checkpointed" if name == "checkpointed" else "plain"]
            rows.append(f"{r:4d} {r // n:7d} {rp.state.device / 2**20:10.2f} {state / 2**20:9.2f} "
                        f"{state / rp.state.device:6.3f} {want / 2**20:9.2f} {act / 2**20:9.2f} "
                        f"{act / want:6.3f} "
                        f"{rp.buffers / 2**20:6.2f}/{info['buffers'] / 2**20:<6.2f}"
                        f"  {rp.in_flight} / {info['chunks']} at {info['peak_at']}"
                        + (f"; {name}" if name != "plain" else "")
                        + (f"; left over from the last step {info['left_over'] / 2**20:.2f}" if info["left_over"]
                           else ""))
    return "\n".join(rows)


def table(pl, measured: list[dict], lay, cfg) -> str:
    """Plan vs every rank's measurement in MiB, with measured/plan (column m/p)."""
    ap = activation_plan(cfg.model, lay), activation_plan(cfg.model, lay, fp8=True)
    planned = {k: getattr(pl.state, k) for k in STATE}
    planned.update({"act plain": ap[0].saved, "act checkpointed": ap[0].saved_checkpointed,
                    "act fp8": ap[1].saved, "act fp8+checkpointed": ap[1].saved_checkpointed,
                    "peak checkpointed": pl.activations["checkpointed"],
                    "peak fp8+checkpointed": pl.activations["fp8+checkpointed"]})
    ranks = "".join(f" {'rank ' + str(r):>10s} {'m/p':>6s}" for r in range(len(measured)))
    rows = [f"{'':22s} {'plan MiB':>10s}" + ranks]
    for key, want in planned.items():
        got = [m["activations"][key[4:]] if key.startswith("act ") else m["peaks"].get(key[5:], 0)
               if key.startswith("peak ") else m["state"].get(key, 0) for m in measured]
        if not want and not any(got):
            continue
        cells = "".join(f" {g / 2**20:10.2f} {g / want if want else float('nan'):6.3f}" for g in got)
        rows.append(f"{key:22s} {want / 2**20:10.2f}{cells}")
    other = [m["state"].get("other", 0) for m in measured]
    rows.append(f"{'other (unplanned)':22s} {0:10.2f}" + "".join(f" {o / 2**20:10.2f} {'':6s}" for o in other))
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--plan", required=True, help="world=W,ep=E,zero=Z,dtype=D[,offload=cpu][,mbs=B,seq=S]")
    ap.add_argument("--json", default=None, help="write plan and measurements here (rank 0)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg0 = load_config(args.config, args.overrides)
    lay = parse_plan(args.plan, cfg0)
    cfg = load_config(args.config, list(args.overrides) + layout_overrides(lay))
    lay = replace(lay, pp_overlap=cfg.parallel.pp_overlap)
    if int(os.environ.get("WORLD_SIZE", 1)) != lay.world:
        raise ValueError(f"--plan world={lay.world}, but this run has {os.environ.get('WORLD_SIZE', 1)} "
                         "process(es): start it with deepspeed --num_gpus WORLD")
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from parallel.engine import cpu_threads_per_rank, init_distributed

    rank, world, local_rank = init_distributed()
    cpu_threads_per_rank()
    device = torch.device(get_accelerator().device_name(local_rank))
    mine = measure_pipeline(cfg, lay, device) if lay.pp > 1 else measure(cfg, lay, device)
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        pl = plan(cfg.model, lay)
        print(f"{args.config or 'configs/tiny.yaml'} {' '.join(args.overrides)}\n--plan {args.plan}: "
              f"{pl.params.total / 1e6:.2f}M parameters, device {device}, torch {torch.__version__}")
        print(pipeline_table(pl, every, lay, cfg.model) if lay.pp > 1 else table(pl, every, lay, cfg))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"plan": pl.as_dict(), "measured": every, "GiB": GiB}, f, indent=1)
    # before the interpreter's teardown: under EP a gloo all-to-all work of the last checkpointed step is
    # still referenced, and destroyed there it aborts the process (return code -6) after the results
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
