"""Fault injection for the reliability tests: make a chosen rank misbehave at a chosen step.

Off unless the environment variable ``MOE_FAULTS`` is set (never from the config, so a
saved config can never carry one into a real run). Its value is a ``;``-separated list of

    KIND[=VALUE]@STEP[,STEP...][/RANK]

    nan_loss@3/1        rank 1's loss (hence its gradients) is NaN at step 3
    inf_loss@2,3,4      every rank's loss is scaled by +inf at steps 2-4 (gradients non-finite)
    exit=7@3/1          rank 1 exits with status 7 at the start of step 3
    hang@3/1            rank 1 stops answering at step 3 (sleeps forever; the others time out)
    sleep=0.5@1-100     every rank sleeps 0.5 s per step 1..100 (a slow job to signal)
    kill_in_save@4/0    rank 0 is SIGKILLed in the middle of writing the step-4 checkpoint

Steps are 1-based optimizer steps (the step being computed; for kill_in_save the step being
saved). A range ``A-B`` is inclusive. No ``/RANK`` means every rank.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass

ENV = "MOE_FAULTS"
KINDS = {"nan_loss", "inf_loss", "exit", "hang", "sleep", "kill_in_save"}


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float | None
    steps: frozenset[int]
    rank: int | None

    def hits(self, step: int, rank: int) -> bool:
        return step in self.steps and (self.rank is None or self.rank == rank)


def _steps(text: str, spec: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{ENV}: bad step list {text!r} in {spec!r} (expected e.g. 3 or 2,5 or 1-10)") from None
        out.update(range(a, b + 1))
    return frozenset(out)


def parse(value: str | None) -> list[Fault]:
    """``MOE_FAULTS`` text -> faults; a ValueError names the bad entry."""
    faults = []
    for spec in filter(None, (s.strip() for s in (value or "").split(";"))):
        what, at, where = spec.partition("@")
        if not at:
            raise ValueError(f"{ENV}: {spec!r} has no '@STEP' (expected KIND[=VALUE]@STEPS[/RANK])")
        kind, _, val = what.partition("=")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r} in {spec!r}; known: {', '.join(sorted(KINDS))}")
        steps, _, rank = where.partition("/")
        try:
            number = float(val) if val else None
            rank_id = int(rank) if rank else None
        except ValueError:
            raise ValueError(f"{ENV}: bad value or rank in {spec!r}") from None
        faults.append(Fault(kind, number, _steps(steps, spec), rank_id))
    return faults


class Faults:
    """The faults of this process; every method is a no-op when none is configured."""

    def __init__(self, rank: int, value: str | None = None):
        self.rank = rank
        self.faults = parse(os.environ.get(ENV) if value is None else value)

    def _hit(self, kind: str, step: int) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind and f.hits(step, self.rank)), None)

    def before_step(self, step: int) -> None:
        """Called at the start of optimizer step ``step`` (1-based)."""
        if (f := self._hit("sleep", step)) is not None:
            time.sleep(f.value or 0.0)
        if (f := self._hit("exit", step)) is not None:
            print(f"[faults] rank {self.rank}: exiting with status {int(f.value or 1)} at step {step} "
                  f"t={time.time():.3f}", flush=True)
            os._exit(int(f.value or 1))   # no cleanup, no barrier: a crashed process
        if self._hit("hang", step) is not None:
            print(f"[faults] rank {self.rank}: hanging at step {step} t={time.time():.3f}", flush=True)
            # like a rank stuck inside a collective: deaf to the trainer's SIGTERM handling, but the
            # launcher's terminate still ends it (a C-level hang would wait for its SIGKILL instead)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(3600)

    def loss_scale(self, step: int) -> float:
        """Multiplier for the loss of step ``step``: NaN/inf poison the loss and every gradient."""
        if self._hit("nan_loss", step) is not None:
            return math.nan
        if self._hit("inf_loss", step) is not None:
            return math.inf
        return 1.0

    def in_save(self, step: int) -> None:
        """Called after the engine files of checkpoint ``step`` are written, before it is complete."""
        if self._hit("kill_in_save", step) is not None:
            print(f"[faults] rank {self.rank}: killed while saving step {step} t={time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
