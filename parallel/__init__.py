"""Everything that knows about ranks (``model/`` stays single-device), by concern.

    engine.py        process group, AdamW, the DeepSpeed config and ``deepspeed.initialize``
    build.py         the one ordered build: fp8 swap -> EP sharding -> init_from -> recompute -> compile -> engine
    collectives.py   the loop's small collectives: means for the log, stop/skip agreement, per-rank times
    balance.py       aux-loss-free router bias update from counts summed over data-parallel ranks
    layout.py        the layout a config describes: memory-plan layout, the run's expert placement
    link.py          emulated interconnects (an EP link, a cross-site WAN) for benchmarks
    faults.py        fault injection for the reliability tests (MOE_FAULTS), by rank and step
    expert/          expert parallelism: groups and sharding, the all-to-all dispatcher, placement
    multisite/       sites: groups inside each site, the outer (DiLoCo-style) step across them
    unequal/         ranks of unequal speed: token shares (and auto's probe), the per-rank clock
    state/           checkpoint state: save/load, registered run state, DCP storage, owned slices,
                     init_from, the DeepSpeed loader that refuses pickled code
    metrics/         the metrics record, its rank-0 writer, peak FLOP/s, traffic counters, validation loss
"""
