"""Shared pieces of the training tests: a tiny model config, a small corpus, a ``python train.py``
runner with a clean environment (no inherited RANK/MASTER_PORT), and two ways to start N ranks:
``launch`` (DeepSpeed's launcher, ``deepspeed --num_gpus N``) and ``spawn_ranks`` (the same
environment and arguments the launcher gives each rank, without the launcher's two processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8", "model.v_head_dim=16",
]
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def make_corpus(root: Path, n_docs: int = 12) -> Path:
    """A few small Python-like documents: real enough for a BPE, tiny enough for seconds."""
    d = root / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [f"def f{i}_{j}(x, y={j}):\n    return x * {i + j} + y  # doc {i}\n" for j in range(8)]
        (d / f"doc{i:02d}.py").write_text("".join(lines), encoding="utf-8")
    return d


def run_args(tmp: Path, corpus: Path, out: str = "run", extra: list[str] = ()) -> list[str]:
    return TINY_MODEL + [
        f"data.path={corpus}", f"data.cache_dir={tmp / 'cache'}", "data.seq_len=32", "data.val_fraction=0.05",
        f"train.out_dir={tmp / out}", "train.micro_batch_size=4", "train.log_every=1",
        "train.eval_every=4", "train.eval_batches=1", "train.warmup_steps=2", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.bias_update_speed=0.01", "logging.progress=false",
        "deepspeed.zero_optimization.stage=1",
    ] + list(extra)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_train_py(argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    """In a process forked from the preloaded server: ``python -u train.py ARGV`` with ``env``."""
    import runpy

    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        with open(path, "w") as f:
            os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)      # line-buffered, as -u would keep it
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [str(ROOT / "train.py"), *argv]
    code = 0
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_CONTEXT = None


def _context():  # noqa: ANN202
    """A forkserver that has imported torch, DeepSpeed, datasets, transformers and the project once:
    every train.py process of the tests is forked from it instead of paying those imports (about
    4 s of each start on 2 cores). Nothing has run in it, so no thread pool is forked half-started;
    train.py's own code (its module, parse, validate, build, loop) runs fresh in each child."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "deepspeed", "datasets", "transformers", "torch.distributed.checkpoint",
                                    "configs.schema", "data", "model.transformer", "parallel.build",
                                    "parallel.state.checkpoint", "parallel.metrics.record"])
        _CONTEXT = ctx
    return _CONTEXT


def _start(argv: list[str], env: dict[str, str], logs: str, name: str):  # noqa: ANN202
    out, err = f"{logs}/{name}.out", f"{logs}/{name}.err"
    proc = _context().Process(target=_run_train_py, args=(argv, env, out, err), daemon=False)
    proc.start()
    return proc, out, err


class _TimedOut(Exception):
    pass


def _wait(procs: list, timeout: float) -> int:  # noqa: ANN001
    """Wait for every process; a failing one ends the others (as DeepSpeed's launcher does).
    -> the first non-zero exit code (a signal's is negative), else 0; _TimedOut past the deadline."""
    deadline, code = time.monotonic() + timeout, 0
    while any(p.exitcode is None for p in procs):
        failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        late = time.monotonic() > deadline
        if failed or late:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
            for p in procs:
                p.join()
            if not failed:
                raise _TimedOut()
            code = failed[0]
            break
        time.sleep(0.05)
    for p in procs:
        p.join()
    return code or next((p.exitcode for p in procs if p.exitcode), 0)


def train(args: list[str], check: bool = True, timeout: int = 240, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a clean environment (a process forked from the preloaded server)."""
    with tempfile.TemporaryDirectory() as logs:
        proc, out, err = _start(list(args), {**clean_env(), **(env or {})}, logs, "train")
        try:
            code = _wait([proc], timeout)
        except _TimedOut:
            raise subprocess.TimeoutExpired(["train.py", *args], timeout) from None
        p = subprocess.CompletedProcess(args, code, open(out).read(), open(err).read())
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]


def launch(n: int, args: list[str], timeout: int = 600, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus n train.py ARGS`` on a free port; fails the test on a non-zero exit.
    ``env`` adds variables (e.g. MOE_FAULTS) to the clean environment."""
    from tests.helpers import free_port

    cmd = ["deepspeed", "--num_gpus", str(n), "--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**clean_env(), **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def launcher_env(n: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """What DeepSpeed's launcher (deepspeed/launcher/launch.py) gives every one of n local ranks, on a free port,
    over the clean environment and ``env``; ``rank_env`` adds each rank's own."""
    from tests.helpers import free_port

    return {**clean_env(), **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(n), "LOCAL_SIZE": str(n), "CROSS_RANK": "0", "CROSS_SIZE": "1"}


def rank_env(base: dict[str, str], r: int) -> dict[str, str]:
    return {**base, "RANK": str(r), "LOCAL_RANK": str(r)}


def spawn_ranks(n: int, args: list[str], timeout: int = 600, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """N ranks of ``train.py`` started directly (forked from the preloaded server), each with what DeepSpeed's launcher
    (deepspeed/launcher/launch.py) gives it: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR,
    MASTER_PORT, CROSS_RANK, CROSS_SIZE and ``--local_rank=R``. For the runs that check what training
    computes (EP, resharding, shares, sites): the launcher's runner and per-node process cost about
    6 s per start on 2 cores, and its own behaviour (a failing or hung rank, SIGTERM, a config error
    on every rank, the CLI) is tested through ``launch`` and the reliability tests. Like the
    launcher, a failing rank ends the others. Fails the test on a non-zero exit; stdout and stderr
    are every rank's, in rank order."""
    base = launcher_env(n, env)
    with tempfile.TemporaryDirectory() as logs:
        started = [_start([f"--local_rank={r}", *args], rank_env(base, r), logs, str(r)) for r in range(n)]
        try:
            code = _wait([p for p, _, _ in started], timeout)
        except _TimedOut:
            code = "timed out"
        texts = [(open(out).read(), open(err).read()) for _, out, err in started]
    stdout, stderr = "".join(o for o, _ in texts), "".join(e for _, e in texts)
    assert code == 0, f"ranks: {code}:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(args, code, stdout, stderr)


def _patched_rank(patch: Callable[[], None] | None, argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    """In the forked rank: ``patch()`` (if any), then train.py."""
    if patch is not None:
        patch()
    _run_train_py(argv, env, out, err)


def spawn_each(n: int, args: list[str], patches: dict[int, Callable[[], None]] | None = None,
               env: dict[str, str] | None = None, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """N ranks of train.py (the environment ``spawn_ranks`` gives each), rank r first running ``patches[r]()``
    where given (a module-level function: it is pickled to the forkserver by name). Unlike ``spawn_ranks``, every
    rank runs until it exits by itself (all are killed only past ``timeout``, which fails the test). -> each
    rank's exit code, stdout, stderr."""
    base = launcher_env(n, env)
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        for r in range(n):
            out, err = f"{logs}/{r}.out", f"{logs}/{r}.err"
            p = _context().Process(target=_patched_rank, args=((patches or {}).get(r), [f"--local_rank={r}", *args],
                                                                rank_env(base, r), out, err))
            p.start()
            procs.append((p, out, err))
        deadline = time.monotonic() + timeout
        for p, _, _ in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        late = [p for p, _, _ in procs if p.exitcode is None]
        for p in late:
            p.kill()
            p.join()
        results = [subprocess.CompletedProcess(args, p.exitcode, open(out).read(), open(err).read())
                   for p, out, err in procs]
    tails = "\n".join(r.stderr[-2000:] for r in results)
    assert not late, f"ranks still running after {timeout} s:\n{tails}"
    return results
