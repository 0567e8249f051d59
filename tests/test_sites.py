"""Multi-site training: config and layout errors, the delta encodings, the outer step against
reference computations (4 gloo processes, 2 sites x 2 ranks), and a 2-site training run of
train.py (4 ranks, tests.train_helpers.spawn_ranks) with a resume in the middle of an outer round."""
from __future__ import annotations

import os

import pytest
import torch

from configs.schema import load_config
from parallel.multisite.groups import check_sites
from parallel.multisite.outer import decode, encode
from tests.helpers import free_port


@pytest.mark.parametrize("overrides, world, match", [
    (["parallel.sites=3"], 4, r"parallel.sites=3: the world size 4"),
    (["parallel.sites=2", "parallel.ep=4"], 4, r"parallel.ep=4: the site size 2"),
    (["parallel.outer_every=0"], 4, r"parallel.outer_every=0"),
    (["parallel.outer_dtype=int4"], 4, r"parallel.outer_dtype='int4'"),
    (["parallel.outer_every=5", "parallel.outer_overlap=5"], 4, r"parallel.outer_overlap=5"),
    (["parallel.outer_every=4", "parallel.outer_fragments=5"], 4, r"parallel.outer_fragments=5"),
    (["parallel.outer_start_step=-1"], 4, r"parallel.outer_start_step=-1"),
    (["parallel.outer_start_every=0"], 4, r"parallel.outer_start_every=0"),
])
def test_bad_inputs(overrides, world, match):
    with pytest.raises(ValueError, match=match):
        check_sites(load_config(None, overrides), world)


@pytest.mark.parametrize("dtype, nbytes, tol", [("bf16", 2000, 2**-8), ("int8", 4 * (256 + 4), 1 / 254),
                                                 ("fp8", 4 * (256 + 4), 2**-3)])
def test_encodings(dtype, nbytes, tol):
    """Each block of 256 keeps its own fp32 scale: small and large blocks are both resolved."""
    x = torch.cat([torch.randn(300) * 1e-6, torch.randn(700) * 10.0])
    payload = encode(x, dtype)
    y = decode(payload, dtype, x.numel())
    assert payload.dtype == torch.uint8 and payload.numel() == nbytes
    for part in (slice(0, 256), slice(512, 1000)):
        err = (y[part] - x[part]).abs().max() / x[part].abs().max()
        assert err <= tol, (dtype, part, float(err))


# ---------------------------------------------------------------- the outer step, in process

STEPS, D = 10, 24


class _Engine:
    """What OuterSync needs of a DeepSpeed engine at ZeRO-0 in fp32: the module (its weights are
    their own masters) and an optimizer; every rank of a site replicates every parameter."""

    def __init__(self, module, opt):
        self.module, self.optimizer, self.basic_optimizer = module, opt, opt


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh(), torch.nn.Linear(D, 1))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, D, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def _grad_step(model, opt, rank, step, group, size) -> float:
    import torch.distributed as dist

    x, y = _batch(rank, step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    for p in model.parameters():                                  # data parallelism over `group`
        dist.all_reduce(p.grad, group=group)
        p.grad /= size
    opt.step()
    return float(loss)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _halves(model) -> list[list[int]]:
    """Flat-vector indices of rank j's chunk of each parameter (ZeRO-0: a site's 2 ranks split every
    parameter in two and each sends its half)."""
    out, off = [[], []], 0
    for p in model.parameters():
        n = p.numel()
        out[0] += range(off, off + n // 2)
        out[1] += range(off + n // 2, off + n)
        off += n
    return out


def _reference(steps: int, H: int, lr: float, mu: float, dtype: str, sites: int = 2, size: int = 2,
               start: int = 0, every: int = 1):
    """DiLoCo on whole parameter vectors in one process: each site SGDs on its ranks' mean gradient
    for H steps; each rank's half of the site's delta is encoded and decoded; the mean delta drives
    outer Nesterov on the anchor, which every site then starts from. For the first ``start`` steps
    (warm-up) the anchor becomes the sites' mean every ``every`` steps, the momentum untouched."""
    models = [_model() for _ in range(sites)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    anchor = _flat(models[0])
    buf, halves = torch.zeros_like(anchor), _halves(models[0])
    for step in range(1, steps + 1):
        for s, (m, o) in enumerate(zip(models, opts)):
            grads = []
            for r in range(size):
                x, y = _batch(s * size + r, step)
                m.zero_grad()
                torch.nn.functional.mse_loss(m(x), y).backward()
                grads.append([p.grad.clone() for p in m.parameters()])
            for p, *gs in zip(m.parameters(), *grads):
                p.grad = sum(gs) / size
            o.step()
        if (step % every == 0) if step <= start else (step % H == 0):
            avg = torch.zeros_like(anchor)
            for m in models:
                d = anchor - _flat(m)
                for idx in halves:
                    avg[idx] += decode(encode(d[idx], dtype), dtype, len(idx)) / sites
            if step <= start:
                anchor = anchor - avg
            else:
                buf = mu * buf + avg
                anchor = anchor - lr * (avg + mu * buf)
            for m in models:
                torch.nn.utils.vector_to_parameters(anchor.clone(), m.parameters())
    return anchor


def _worker(rank: int, world: int, port: int, q) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from parallel.multisite.groups import build_sites
    from parallel.multisite.outer import OuterSync

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sites = build_sites(2)
        out = {}
        # (a) synchronous 4-rank data parallelism
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        out["sync"] = [_grad_step(model, opt, rank, s, None, world) for s in range(1, STEPS + 1)]
        # (b) 2 sites, H=1, outer lr 1, momentum 0, fp32: the same trajectory (SGD is linear)
        # (c) H=3, DiLoCo's lr 0.7 / momentum 0.9, int8: as the whole-vector reference
        # (d) warm-up over all 10 steps, H=50, Nesterov: plain means every step, synchronous DP again
        # (e) warm-up to step 4, a mean every 2 steps, then H=3 Nesterov int8 rounds at steps 6 and 9
        for name, H, lr, mu, dtype, steps, start, every in (("h1", 1, 1.0, 0.0, "fp32", STEPS, 0, 1),
                                                            ("h3", 3, 0.7, 0.9, "int8", 9, 0, 1),
                                                            ("warm_all", 50, 0.7, 0.9, "fp32", STEPS, STEPS, 1),
                                                            ("warm4_h3", 3, 0.7, 0.9, "int8", 9, 4, 2)):
            model = _model()
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            p = SimpleNamespace(outer_every=H, outer_fragments=1, outer_overlap=0, outer_lr=lr,
                                outer_momentum=mu, outer_dtype=dtype, wan_bandwidth_gbps=None, wan_latency_ms=0.0,
                                outer_start_step=start, outer_start_every=every)
            outer = OuterSync(_Engine(model, opt), sites, p)
            losses = []
            for s in range(1, steps + 1):
                losses.append(_grad_step(model, opt, rank, s, sites.group, sites.size))
                outer.after_inner_step(s)
            out[name] = losses
            out[name + "_params"] = _flat(model)
            out[name + "_bytes"] = outer.link.sent_bytes
        # plain lists: a tensor in the queue is fetched from this process's shared memory, which is
        # gone if it exits before the parent reads (a race on a loaded machine)
        q.put((rank, {k: v.tolist() if torch.is_tensor(v) else v for k, v in out.items()}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outer_runs():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q, world, port = ctx.Queue(), 4, free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return {r: {k: torch.tensor(v) if k.endswith("_params") else v for k, v in out.items()}
            for r, out in results.items()}


@pytest.mark.slow
def test_h1_outer_step_is_synchronous_data_parallelism(outer_runs):
    """Sites=2, H=1, outer lr 1, momentum 0, fp32 deltas == synchronous DP over all 4 ranks, for an
    inner optimizer linear in the gradient (SGD). (With AdamW the sites' updates are normalised
    before they are averaged, so no such identity holds; see the README.)"""
    sync = torch.tensor([outer_runs[r]["sync"] for r in range(4)])
    h1 = torch.tensor([outer_runs[r]["h1"] for r in range(4)])
    # each rank's loss on its own batch: same weights at every step -> same loss
    assert torch.allclose(h1, sync, rtol=1e-5, atol=0), (h1 - sync).abs().max()
    params = [outer_runs[r]["h1_params"] for r in range(4)]
    assert all(torch.equal(params[0], q) for q in params[1:])      # every site holds the same weights
    assert (sync[:, -1] < sync[:, 0]).all()                         # and it trained


@pytest.mark.slow
def test_outer_nesterov_int8_matches_reference(outer_runs):
    """H=3, lr 0.7, Nesterov 0.9, int8 deltas split over a site's 2 ranks == the whole-vector
    reference; the bytes sent are the int8 payloads (1/4 of fp32, plus scales), 3 rounds."""
    ref = _reference(steps=9, H=3, lr=0.7, mu=0.9, dtype="int8")
    for r in range(4):                                              # step 9 ends the 3rd round
        assert torch.allclose(outer_runs[r]["h3_params"], ref, rtol=0, atol=1e-6), \
            (outer_runs[r]["h3_params"] - ref).abs().max()
    halves = _halves(_model())
    for r in range(4):
        n = len(halves[r % 2])
        assert outer_runs[r]["h3_bytes"] == 3 * (-(-n // 256) * (256 + 4)), r   # 3 rounds of one payload


@pytest.mark.slow
def test_warmup_averages_every_step(outer_runs):
    """parallel.outer_start_step / outer_start_every: a plain mean of the sites' weights every few
    steps of the warm-up (the outer momentum left at zero), then the usual rounds. Every step over
    all 10 steps with SGD is synchronous DP again; a mean at steps 2 and 4, then H=3 Nesterov int8
    (rounds at steps 6 and 9) matches the whole-vector reference, each exchange one payload."""
    sync = torch.tensor([outer_runs[r]["sync"] for r in range(4)])
    warm = torch.tensor([outer_runs[r]["warm_all"] for r in range(4)])
    assert torch.allclose(warm, sync, rtol=1e-5, atol=0), (warm - sync).abs().max()
    ref = _reference(steps=9, H=3, lr=0.7, mu=0.9, dtype="int8", start=4, every=2)
    halves = _halves(_model())
    for r in range(4):
        assert torch.allclose(outer_runs[r]["warm4_h3_params"], ref, rtol=0, atol=1e-6), \
            (outer_runs[r]["warm4_h3_params"] - ref).abs().max()
        n = len(halves[r % 2])
        assert outer_runs[r]["warm4_h3_bytes"] == (2 + 2) * (-(-n // 256) * (256 + 4)), r


def _wan_worker(rank: int, world: int, port: int, q) -> None:
    import time

    import deepspeed
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    from parallel.link import emulate_wan_on_deepspeed
    from parallel.multisite.groups import build_sites

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sites = build_sites(2)
        deepspeed.init_distributed(dist_backend="gloo")
        link = emulate_wan_on_deepspeed(0.1, 50.0, site_size=2)
        x, y = torch.ones(1000), torch.ones(1000)
        t0 = time.perf_counter()
        ds_comm.all_reduce(x)                                    # world: crosses the sites
        dt = time.perf_counter() - t0
        ds_comm.all_reduce(y, group=sites.group)                 # inside a site: free
        q.put((rank, (link.sent_bytes, dt, float(x[0]), float(y[0]))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_reductions_over_emulated_wan():
    """bench_sites' synchronous run over the link: a world all-reduce of 4,000 bytes per rank is
    booked as a hierarchical one (each rank sends its half's ring share, 2,000 bytes) and returns
    no sooner than the 50 ms latency; a reduction inside a site is not booked."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q, world, port = ctx.Queue(), 4, free_port()
    procs = [ctx.Process(target=_wan_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for r in range(4):
        sent, dt, x, y = results[r]
        assert (sent, x, y) == (2000, 4.0, 2.0), results[r]
        assert dt >= 0.05


# ---------------------------------------------------------------- train.py on 4 ranks

@pytest.mark.slow
def test_two_sites_train_and_resume_mid_round(tmp_path):
    """2 sites x 2 ranks (ep=2 inside each), 2 staggered fragments, 1 step of overlap, int8: the
    metrics count the rounds and the cross-site bytes; a NaN on rank 2 at step 3 skips that step in
    site 1 only (a site's own decision; the world still logs and stops together); a resume from step 4
    (fragment 1's exchange in flight, fragment 0 half-way through its round) continues with the same
    losses, bit for bit;
    a resume with another parallel.sites fails naming it."""
    from tests.train_helpers import make_corpus, metrics, run_args, spawn_ranks, train

    corpus = make_corpus(tmp_path)
    sites = ["parallel.ep=2", "parallel.sites=2", "parallel.outer_every=4", "parallel.outer_fragments=2",
             "parallel.outer_overlap=1", "parallel.outer_dtype=int8", "train.max_steps=7", "train.save_every=4"]
    spawn_ranks(4, run_args(tmp_path, corpus, "full", sites), env={"MOE_FAULTS": "nan_loss@3/2"})
    full = {r["step"]: r for r in metrics(tmp_path / "full")}
    # fragment 0 sends at steps 2, 6 and lands at 3, 7; fragment 1 sends at 4 and lands at 5
    assert [full[s]["outer_steps"] for s in range(1, 8)] == [0, 0, 1, 1, 2, 2, 3]
    assert full[1]["wan_bytes_per_step"] == 0 and full[2]["wan_bytes_per_step"] > 0
    assert len(full[1]["site_loss"]) == 2 and full[1]["site_loss"][0] != full[1]["site_loss"][1]
    assert full[3]["site_loss"][0] < 10 and full[3]["site_loss"][1] != full[3]["site_loss"][1]   # NaN in site 1
    assert not full[3]["skipped"]                                   # rank 0's site applied step 3
    ckpt = tmp_path / "full" / "checkpoints" / "step_0000004"
    spawn_ranks(4, run_args(tmp_path, corpus, "resumed", sites + [f"train.resume={ckpt}"]))
    resumed = {r["step"]: r for r in metrics(tmp_path / "resumed")}
    assert sorted(resumed) == [5, 6, 7]
    for s in (5, 6, 7):
        assert resumed[s]["loss"] == full[s]["loss"] and resumed[s]["site_loss"] == full[s]["site_loss"], s
        assert resumed[s]["outer_steps"] == full[s]["outer_steps"]
    p = train(run_args(tmp_path, corpus, "one_site", [f"train.resume={ckpt}"]), check=False)   # 1 process
    assert p.returncode == 2 and "parallel.sites=1" in p.stderr, p.stderr[-2000:]
