"""Bytes sent per rank, for the metrics record: the expert all-to-alls and DeepSpeed's own collectives."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parallel.expert.dispatcher import AllToAllDispatcher
    from parallel.metrics.record import StepStats


def comm_bytes(dispatchers: list[AllToAllDispatcher]) -> dict[str, int]:
    """Cumulative all-to-all bytes this rank sent, by kind (dispatch, combine, and their gradients)."""
    total: dict[str, int] = {}
    for d in dispatchers:
        for k, v in d.stats.items():
            total[k] = total.get(k, 0) + v
    return total


def deepspeed_comm_bytes() -> dict[str, int]:
    """Cumulative payload bytes DeepSpeed's own collectives were handed on this rank, by op, from
    its comms logger (``deepspeed.comms_logger.enabled=true``): what synchronous data parallelism
    sends for gradients (all_reduce / reduce_scatter) and ZeRO's parameter all-gathers. Empty when
    the logger is off."""
    from deepspeed import comm

    logger = getattr(comm, "comms_logger", None)
    if logger is None or not logger.enabled:
        return {}
    out: dict[str, int] = {}
    for op, sizes in logger.comms_dict.items():
        out[op] = out.get(op, 0) + sum(int(size) * rec[0] for size, rec in sizes.items())
    return out


class TrafficFields:
    """Metrics fields: the all-to-all bytes this rank sent per step since the last record, by kind, and
    DeepSpeed's own cumulative payloads (when its comms logger is on)."""

    def __init__(self, dispatchers: list[AllToAllDispatcher], start_step: int):
        self.dispatchers, self.seen, self.since = dispatchers, {}, start_step

    def fields(self, s: StepStats) -> dict:
        out = {}
        if self.dispatchers:
            sent = comm_bytes(self.dispatchers)
            out = {k: (v - self.seen.get(k, 0)) / max(1, s.step - self.since) for k, v in sent.items()}
            self.seen, self.since = sent, s.step
        ds_sent = deepspeed_comm_bytes()
        if ds_sent:
            out["ds_comm_bytes"] = ds_sent
        return out
