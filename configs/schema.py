"""The run configuration: YAML sections validated into typed dataclasses.

``load_config(path, overrides)`` reads a preset, applies ``section.key=value`` overrides
(values parsed as YAML, so ``train.lr=3e-4`` is a float and ``model.q_lora_rank=null`` is None),
and validates everything before any process group or weight exists. Unknown sections or keys
(also inside ``model.rope_scaling`` and at the top of ``deepspeed:``) and invalid values raise
``ValueError`` naming the field and the value.

Config files are read strictly: anchors and aliases (``&a`` / ``*a``: a 1 kB alias bomb expands to
gigabytes once the config is copied), merge keys and duplicate keys at any depth are refused, naming
the file and the line; a file without a ``model:`` section is refused (the dataclass defaults are the
full DeepSeek-V3-671B).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from configs.nested_keys import check_deepspeed_keys, check_rope_scaling
from configs.sources import normalize_sources
from configs.yaml_reader import read_yaml
from model.config import ModelConfig

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "tiny.yaml")
# data.tokenizer.MIN_VOCAB_SIZE (256 byte symbols + EOS), repeated here so that validating a config
# does not import the tokenizer libraries; tests/test_bad_inputs.py checks the two agree
MIN_BPE_VOCAB_SIZE = 256 + 1
# Fields naming a file or directory: "" would silently mean the current directory
OUTER_DTYPES = ("fp32", "bf16", "int8", "fp8")   # parallel.outer_dtype
PLACEMENTS = ("even", "capacity", "load")         # parallel.expert_placement
_PATH_FIELDS = (("data", "path"), ("data", "tokenizer"), ("data", "cache_dir"), ("data", "text_field"),
                ("data", "prepared"), ("train", "out_dir"), ("train", "init_from"))


@dataclass
class DataConfig:
    path: str | None = None               # None: the embedded default corpus (Python's stdlib sources)
    text_field: str = "text"              # column holding the text in JSONL/Parquet/saved datasets
    tokenizer: str | None = None          # local HF tokenizer dir; None: train a byte-level BPE
    seq_len: int = 256
    val_fraction: float = 0.01
    max_files: int | None = None          # cap on files read from a folder / the default corpus
    cache_dir: str = ".cache/data"        # tokenizer and packed shards are prepared here once
    # a shard directory made by scripts/prepare_data.py: read by every rank as is, nothing prepared (docs/data.md)
    prepared: str | None = None
    num_proc: int | None = None           # tokenizer processes when preparing; null: the cores (1 under 16 MiB)
    tokenizer_sample_bytes: int = 256_000_000  # text the BPE is trained on, spread over the corpus
    max_skipped_files: int | None = 100   # binary / non-UTF-8 text files skipped (named in the log); more: refused
    prepare_wait_s: float | None = None   # seconds a rank waits for its node's preparer; null: no limit
    # a weighted mixture instead of data.path: [{path, weight, text_field, name, max_files}, ...], each source
    # prepared to its own shards with one tokenizer, rows drawn by weight (configs/sources.py, data/mixture.py)
    sources: Any = None
    # separate validation sets, each with its own val loss: [{path, text_field, name, weight}, ...]; null: the
    # val_fraction split of the training data (of each source, with data.sources)
    val_sources: Any = None
    document_mask: bool = False           # attention, positions and targets kept inside each packed document


@dataclass
class TrainConfig:
    max_steps: int = 300
    stop_at: int | None = None            # end this invocation after this step (schedule still spans max_steps)
    micro_batch_size: int = 8             # sequences per rank per micro step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    lr_schedule: str = "cosine"           # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2       # WSD: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    out_dir: str = "runs/tiny"
    resume: str | None = None             # None | "auto" | a checkpoint path
    overwrite: bool = False               # a fresh run may replace the checkpoints of another run in out_dir
    init_from: str | None = None          # a checkpoint made by scripts/import_hf.py
    log_every: int = 10
    save_every: int = 100
    async_save: bool = False              # write checkpoints in the background (training goes on; one in flight)
    eval_every: int = 100
    eval_batches: int = 4
    keep_last: int = 2
    bias_update_speed: float = 0.001      # gamma of the aux-loss-free balancing
    bias_update_stop_fraction: float = 1.0  # gamma drops to 0 after this fraction of max_steps
    # MTP loss weight schedule (DeepSeek-V3: 0.3 for the first 10T of 14.8T tokens, then 0.1):
    # model.mtp_loss_weight until mtp_late_fraction of max_steps, mtp_loss_weight_late after;
    # null keeps model.mtp_loss_weight throughout
    mtp_loss_weight_late: float | None = None
    mtp_late_fraction: float = 0.676
    activation_checkpointing: bool = False
    compile: bool = False                 # torch.compile the decoder blocks (model/compile.py); pays on long runs
    # AdamW kernel: fused (one multi-tensor kernel per group, CPU and CUDA; what HF's Trainer uses
    # by default) | foreach | loop (one tensor at a time: the reference). Same update, fp32 rounding apart
    optimizer_impl: str = "fused"
    dtype: str = "fp32"                   # fp32 | bf16
    deterministic: bool = False           # torch.use_deterministic_algorithms (slower; for debugging)
    tf32: bool = True                     # fp32 matmuls on CUDA through TF32 tensor cores (parallel/device.py)
    max_consecutive_skips: int = 3        # a step with a non-finite loss/gradient is skipped; stop after this
                                          # many in a row
    # the peak MFU is taken against, in TFLOP/s for the whole job (null: measured at start by a matmul
    # benchmark, and raised to any higher rate a step achieves: parallel/metrics/peak.py)
    peak_tflops: float | None = None


@dataclass
class ParallelConfig:
    ep: int = 1                           # expert-parallel degree; world = ep x expert-data-parallel
    overlap: bool = True                  # overlap all-to-all with computation
    chunks: int = 2                       # token chunks per MoE layer for the overlap pipeline
    fp8_dispatch: bool = False            # send dispatched tokens as E4M3 + 1x128 scales (combine stays full width)
    link_bandwidth_gbps: float | None = None   # emulated interconnect for experiments (None: off)
    link_latency_us: float = 0.0
    collective_timeout_s: float = 1800.0  # a collective waiting longer (a hung or dead rank) fails the job
    # multi-site training (parallel/multisite/groups.py, parallel/multisite/outer.py): the world split into
    # `sites` equal sites in rank order; EP, ZeRO and router counts stay inside a site, and every
    # `outer_every` inner steps an outer Nesterov step on the sites' averaged parameter change crosses them
    sites: int = 1
    outer_every: int = 50                 # H: inner steps per outer round
    outer_lr: float = 0.7                 # outer SGD learning rate (DiLoCo)
    outer_momentum: float = 0.9           # outer Nesterov momentum (DiLoCo)
    outer_fragments: int = 1              # parameter fragments synced at staggered steps (Streaming DiLoCo)
    outer_overlap: int = 0                # tau: inner steps that run while a fragment's exchange is in flight
    outer_dtype: str = "fp32"             # deltas sent as fp32 | bf16 | int8 | fp8 (scaled), summed in fp32
    wan_bandwidth_gbps: float | None = None   # emulated link between sites, a site's uplink (None: off)
    wan_latency_ms: float = 0.0
    outer_start_step: int = 0             # warm-up: until this inner step the sites' weights are averaged
    outer_start_every: int = 1            # every this many steps (plain mean, bytes counted); rounds after
    # mixed hardware (parallel/unequal/shares.py, parallel/expert/placement.py): ranks of unequal speed get unequal
    # shares of the same global batch (losses weighted so the update is the equal split's) and,
    # under ep, unequal numbers of experts. Validated against the world size in parallel/unequal/shares.py.
    rank_capacity: Any = None             # null: equal shares | [c0, c1, ...] one per rank | "auto": measured
    capacity_probe_steps: int = 5         # auto: steps whose median compute time fixes the shares (the first is
                                          # skipped)
    expert_placement: str = "even"        # even | capacity | load (experts per EP rank)
    expert_load_from: str | None = None   # load: a metrics.jsonl or checkpoint dir with router counts
    emulate_slowdown: Any = None          # tests/benchmarks: {rank: factor >= 1}, sleep (factor-1) x compute
    # pipeline parallelism (parallel/pipeline/): world = pp x ep x expert-data-parallel; EP and ZeRO inside a stage
    pp: int = 1                           # pipeline ranks; 1: no pipeline
    pp_schedule: str = "1f1b"             # 1f1b | interleaved (2 looped stages per rank) | dualpipev (2, V-shaped)
    pp_layers: Any = None                 # [n0, n1, ...] decoder layers per stage (overrides the planned split)
    pp_overlap: bool = True               # dualpipev: run each paired forward and backward at the same time


@dataclass
class FP8Config:
    enabled: bool = False
    backend: str = "auto"                 # auto | emulated | cuda
    include: list[str] = field(default_factory=list)   # module-name patterns to convert (empty: all eligible)
    exclude: list[str] = field(default_factory=list)
    pow2_scales: bool = False             # round every scale up to a power of two (exact rescaling)


@dataclass
class LoggingConfig:
    wandb: str = "disabled"               # disabled | offline | online
    project: str = "moe"
    run_name: str | None = None
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)   # passed to deepspeed.initialize

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig,
             "fp8": FP8Config, "logging": LoggingConfig}


def _check_type(where: str, value: Any, hint: Any) -> None:
    """Shallow type check of YAML scalars against the dataclass annotation."""
    s = hint.__name__ if isinstance(hint, type) else str(hint)   # "float", "int | None", ...
    if value is None:
        if "None" not in s:
            raise ValueError(f"{where}=None: a value is required")
        return
    if s.startswith("int") and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{where}={value!r}: expected an integer")
    if s.startswith("float") and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise ValueError(f"{where}={value!r}: expected a number")
    if s.startswith("float") and not math.isfinite(value):
        # nan slips through every range check below (all comparisons are False)
        raise ValueError(f"{where}={value!r}: expected a finite number")
    if s.startswith("list") and (not isinstance(value, list) or not all(isinstance(x, str) for x in value)):
        raise ValueError(f"{where}={value!r}: expected a list of strings")
    if s.startswith("bool") and not isinstance(value, bool):
        raise ValueError(f"{where}={value!r}: expected true or false")
    if s.startswith("str") and not isinstance(value, str):
        raise ValueError(f"{where}={value!r}: expected a string")


def _build(cls: type[Any], raw: dict[str, Any], section: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{section}: expected a mapping, got {raw!r}")
    raw = dict(raw)   # values are normalised below; the caller's mapping stays as read
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    for k, v in raw.items():
        is_float = hints[k] is float or str(hints[k]).startswith("float")
        if is_float and isinstance(v, str):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                v = raw[k] = float(v)
            except ValueError:
                pass
        _check_type(f"{section}.{k}", v, hints[k])
        if is_float and isinstance(v, int):
            raw[k] = float(v)
    return cls(**raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ValueError(f"override {text!r}: expected section.key=value")
    return path, read_yaml(value, f"override {text!r}") if value != "" else None


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        raw = read_yaml(f.read(), path) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections")
    if not raw.get("model"):   # the dataclass defaults are DeepSeek-V3-671B: never silently
        raise ValueError(f"{path} has {'an empty' if 'model' in raw else 'no'} model: section (the defaults are the "
                         "full DeepSeek-V3-671B); copy one from configs/tiny.yaml or another preset in configs/")
    for ov in overrides:
        keys, value = parse_override(ov)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {k} is not a section")
        node[keys[-1]] = value
    unknown = sorted(set(raw) - set(_SECTIONS) - {"deepspeed"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: {sorted(list(_SECTIONS) + ['deepspeed'])}")
    sections = {name: _build(cls, raw.get(name) or {}, name) for name, cls in _SECTIONS.items()}
    ds = raw.get("deepspeed") or {}
    if not isinstance(ds, dict):
        raise ValueError(f"deepspeed: expected a mapping, got {ds!r}")
    check_deepspeed_keys(ds)
    cfg = Config(deepspeed=ds, **sections)
    validate(cfg)
    return cfg


def _validate_capacity(p: ParallelConfig) -> None:
    """The world-size-free checks of the mixed-hardware fields (lengths are checked against the
    world in parallel/unequal/shares.py, once it is known)."""
    c = p.rank_capacity
    if c is not None and c != "auto":
        if not isinstance(c, list) or not c:
            raise ValueError(f"parallel.rank_capacity={c!r}: expected null, 'auto' or a list of numbers, one per rank")
        for i, v in enumerate(c):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"parallel.rank_capacity[{i}]={v!r}: must be a finite number > 0")
    if p.capacity_probe_steps < 2:
        raise ValueError(f"parallel.capacity_probe_steps={p.capacity_probe_steps}: must be >= 2 (the first "
                         "step is not timed)")
    s = p.emulate_slowdown
    if s is not None:
        if not isinstance(s, dict):
            raise ValueError(f"parallel.emulate_slowdown={s!r}: expected a mapping {{rank: factor}}")
        for r, f in s.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise ValueError(f"parallel.emulate_slowdown: rank {r!r} must be an integer >= 0")
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1:
                raise ValueError(f"parallel.emulate_slowdown[{r}]={f!r}: the factor must be a finite number >= 1")


def validate(cfg: Config) -> None:
    check_rope_scaling(cfg.model.rope_scaling)   # before the model's own checks compare its values
    cfg.model.validate("model")
    d, t, p, f, lg = cfg.data, cfg.train, cfg.parallel, cfg.fp8, cfg.logging
    for section, name in _PATH_FIELDS:
        if getattr(getattr(cfg, section), name) == "":
            raise ValueError(f"{section}.{name}='': empty (give a path, or null where a default exists)")
    d.sources, d.val_sources = normalize_sources(d.sources, "data.sources"), normalize_sources(d.val_sources,
                                                                                              "data.val_sources")
    if d.sources and d.path is not None:
        raise ValueError(f"data.path={d.path!r} with data.sources: give that corpus as one of data.sources")
    if d.max_files is not None and d.max_files < 1:
        raise ValueError(f"data.max_files={d.max_files}: must be >= 1 or null")
    if d.tokenizer is None and cfg.model.vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size}: the byte-level BPE trained when "
                         f"data.tokenizer is null needs >= {MIN_BPE_VOCAB_SIZE} (256 bytes + EOS)")
    if d.seq_len < 2:
        raise ValueError(f"data.seq_len={d.seq_len}: must be >= 2")
    if d.seq_len > cfg.model.max_position_embeddings:
        raise ValueError(f"data.seq_len={d.seq_len}: exceeds model.max_position_embeddings="
                         f"{cfg.model.max_position_embeddings}")
    if not 0 <= d.val_fraction < 1:
        raise ValueError(f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
    if d.num_proc is not None and d.num_proc < 1:
        raise ValueError(f"data.num_proc={d.num_proc}: must be >= 1 or null (the cores available)")
    if d.tokenizer_sample_bytes < 1:
        raise ValueError(f"data.tokenizer_sample_bytes={d.tokenizer_sample_bytes}: must be >= 1")
    if d.max_skipped_files is not None and d.max_skipped_files < 0:
        raise ValueError(f"data.max_skipped_files={d.max_skipped_files}: must be >= 0 or null (no limit)")
    if d.prepared is not None and (d.sources or d.val_sources):
        raise ValueError(f"data.prepared={d.prepared!r} with data.sources/data.val_sources: a prepared directory "
                         "is one corpus; give one or the other")
    if d.prepare_wait_s is not None and not d.prepare_wait_s > 0:
        raise ValueError(f"data.prepare_wait_s={d.prepare_wait_s}: must be > 0 seconds or null (no limit)")
    for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "save_every", "eval_every", "keep_last",
                 "max_consecutive_skips"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name}={getattr(t, name)}: must be >= 1")
    if t.stop_at is not None and t.stop_at < 1:
        raise ValueError(f"train.stop_at={t.stop_at}: must be >= 1 or null")
    if t.peak_tflops is not None and not (isinstance(t.peak_tflops, (int, float))
                                          and 0 < t.peak_tflops < float("inf")):
        raise ValueError(f"train.peak_tflops={t.peak_tflops!r}: must be a number > 0 (TFLOP/s of the whole job) "
                         "or null")
    if t.warmup_steps < 0 or t.eval_batches < 0:
        raise ValueError(f"train.warmup_steps={t.warmup_steps}/eval_batches={t.eval_batches}: must be >= 0")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ValueError(f"train.lr={t.lr}, train.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0")
    if not 0 <= t.seed < 2**32:   # numpy's seeding range; torch and the sampler accept it too
        raise ValueError(f"train.seed={t.seed}: must be in [0, 2**32)")
    if t.weight_decay < 0 or t.grad_clip < 0:
        raise ValueError(f"train.weight_decay={t.weight_decay}, train.grad_clip={t.grad_clip}: must be >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ValueError(f"train.{name}={getattr(t, name)}: must be in [0, 1)")
    if t.mtp_loss_weight_late is not None and t.mtp_loss_weight_late < 0:
        raise ValueError(f"train.mtp_loss_weight_late={t.mtp_loss_weight_late}: must be >= 0 or null")
    if not 0 <= t.mtp_late_fraction <= 1:
        raise ValueError(f"train.mtp_late_fraction={t.mtp_late_fraction}: must be in [0, 1]")
    if t.compile and t.activation_checkpointing:
        raise ValueError("train.compile=true with train.activation_checkpointing=true: choose one (the "
                         "checkpointed blocks' recompute hooks are not compiled)")
    if t.lr_schedule not in ("cosine", "wsd", "constant"):
        raise ValueError(f"train.lr_schedule={t.lr_schedule!r}: must be cosine, wsd or constant")
    if not 0 < t.wsd_decay_fraction <= 1:
        raise ValueError(f"train.wsd_decay_fraction={t.wsd_decay_fraction}: must be in (0, 1]")
    if t.bias_update_speed < 0 or not 0 <= t.bias_update_stop_fraction <= 1:
        raise ValueError(f"train.bias_update_speed={t.bias_update_speed}, bias_update_stop_fraction="
                         f"{t.bias_update_stop_fraction}: speed must be >= 0 and the fraction in [0, 1]")
    if t.dtype not in ("fp32", "bf16"):
        raise ValueError(f"train.dtype={t.dtype!r}: must be fp32 or bf16")
    if t.optimizer_impl not in ("fused", "foreach", "loop"):
        raise ValueError(f"train.optimizer_impl={t.optimizer_impl!r}: must be fused, foreach or loop")
    if t.resume is not None and not t.resume:
        raise ValueError("train.resume='': use null, 'auto' or a checkpoint path")
    if t.overwrite and t.resume is not None:
        raise ValueError(f"train.overwrite=true with train.resume={t.resume!r}: a resume continues the checkpoints "
                         "that overwrite would remove; choose one")
    if p.ep < 1:
        raise ValueError(f"parallel.ep={p.ep}: must be >= 1")
    if p.expert_placement not in PLACEMENTS:
        raise ValueError(f"parallel.expert_placement={p.expert_placement!r}: must be one of {', '.join(PLACEMENTS)}")
    if p.expert_placement != "even" and p.ep == 1:
        raise ValueError(f"parallel.expert_placement={p.expert_placement!r}: needs parallel.ep > 1 (with one "
                         "expert-parallel rank every expert is local)")
    if p.ep > cfg.model.n_routed_experts:
        raise ValueError(f"parallel.ep={p.ep}: more expert-parallel ranks than model.n_routed_experts="
                         f"{cfg.model.n_routed_experts} (every rank needs an expert)")
    _validate_capacity(p)
    if p.expert_placement == "even" and cfg.model.n_routed_experts % p.ep:
        raise ValueError(f"parallel.ep={p.ep}: model.n_routed_experts={cfg.model.n_routed_experts} "
                         "is not divisible by it (or place experts by parallel.expert_placement=capacity)")
    ng = cfg.model.n_group
    if p.expert_placement == "even" and p.ep > 1 and ng % p.ep and p.ep % ng:
        # node-limited routing: experts sit on ranks in order, so a router group must cover whole
        # ranks (ep | n_group) or a whole node of ranks (n_group | ep) for a token that picks
        # topk_group groups to reach at most topk_group ranks/nodes
        raise ValueError(f"parallel.ep={p.ep}: router groups (model.n_group={ng}) cannot map onto ranks; "
                         "one of ep and n_group must divide the other")
    if p.collective_timeout_s <= 0:
        raise ValueError(f"parallel.collective_timeout_s={p.collective_timeout_s}: must be > 0")
    if p.sites < 1:
        raise ValueError(f"parallel.sites={p.sites}: must be >= 1")
    if p.outer_every < 1:
        raise ValueError(f"parallel.outer_every={p.outer_every}: must be >= 1")
    if p.outer_dtype not in OUTER_DTYPES:
        raise ValueError(f"parallel.outer_dtype={p.outer_dtype!r}: must be one of {', '.join(OUTER_DTYPES)}")
    if not 1 <= p.outer_fragments <= p.outer_every:
        raise ValueError(f"parallel.outer_fragments={p.outer_fragments}: must be in [1, parallel.outer_every="
                         f"{p.outer_every}] (each fragment syncs once per round)")
    if not 0 <= p.outer_overlap < p.outer_every:
        raise ValueError(f"parallel.outer_overlap={p.outer_overlap}: must be in [0, parallel.outer_every="
                         f"{p.outer_every}) (a fragment's exchange must land before its next one starts)")
    if p.outer_lr <= 0 or not 0 <= p.outer_momentum < 1:
        raise ValueError(f"parallel.outer_lr={p.outer_lr}, parallel.outer_momentum={p.outer_momentum}: "
                         "need lr > 0 and momentum in [0, 1)")
    if p.outer_start_step < 0:
        raise ValueError(f"parallel.outer_start_step={p.outer_start_step}: must be >= 0 (0: no warm-up)")
    if p.outer_start_every < 1:
        raise ValueError(f"parallel.outer_start_every={p.outer_start_every}: must be >= 1")
    if p.wan_bandwidth_gbps is not None and p.wan_bandwidth_gbps <= 0 or p.wan_latency_ms < 0:
        raise ValueError(f"parallel.wan_bandwidth_gbps={p.wan_bandwidth_gbps}, parallel.wan_latency_ms="
                         f"{p.wan_latency_ms}: bandwidth must be positive (or null), latency >= 0")
    if p.chunks < 1:
        raise ValueError(f"parallel.chunks={p.chunks}: must be >= 1")
    if p.pp < 1:
        raise ValueError(f"parallel.pp={p.pp}: must be >= 1")
    if p.pp_schedule not in ("1f1b", "interleaved", "dualpipev"):
        raise ValueError(f"parallel.pp_schedule={p.pp_schedule!r}: must be 1f1b, interleaved or dualpipev")
    if p.pp_layers is not None and (not isinstance(p.pp_layers, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in p.pp_layers)):
        raise ValueError(f"parallel.pp_layers={p.pp_layers!r}: must be a list of layer counts >= 1, one per stage")
    if p.link_bandwidth_gbps is not None and p.link_bandwidth_gbps <= 0 or p.link_latency_us < 0:
        raise ValueError(f"parallel.link_bandwidth_gbps={p.link_bandwidth_gbps}, parallel.link_latency_us="
                         f"{p.link_latency_us}: bandwidth must be positive (or null), latency >= 0")
    if f.backend not in ("auto", "emulated", "cuda"):
        raise ValueError(f"fp8.backend={f.backend!r}: must be auto, emulated or cuda")
    if lg.wandb not in ("disabled", "offline", "online"):
        raise ValueError(f"logging.wandb={lg.wandb!r}: must be disabled, offline or online")
