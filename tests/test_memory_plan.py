"""The memory plan (model/memory_plan.py) against what torch and DeepSpeed really allocate:
saved-for-backward tensors op by op on one device, and a real single-rank engine's state and
activations (measured with benchmarks/measure_memory.py's own census); bad --plan strings."""
import gc
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.measure_memory import heap_in_use
from configs.schema import load_config
from model.memory_plan import activation_plan, checkpoint_bytes, plan
from model.transformer import DeepseekV3
from parallel.layout import parse_plan
from tests.helpers import free_port
from tests.train_helpers import TINY_MODEL

# widths that are multiples of 4 (the CPU grouped GEMM's native path); a 128-wide model so FP8 tiles are whole
SMALL = ["model.hidden_size=128", "model.intermediate_size=256", "model.moe_intermediate_size=64",
         "model.num_hidden_layers=3", "model.n_routed_experts=8", "model.num_experts_per_tok=2",
         "model.n_group=2", "model.topk_group=1", "model.vocab_size=512", "model.num_attention_heads=2",
         "deepspeed.zero_optimization.reduce_bucket_size=300000"]


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves in a forward with labels, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("extra", [
    [],
    ["train.dtype=bf16"],
    ["model.q_lora_rank=null", "model.num_nextn_predict_layers=0", "model.tie_word_embeddings=true"],
    ["fp8"],
    ["fp8", "train.dtype=bf16", "model.n_shared_experts=2"],
])
def test_saved_activations_match_autograd(extra):
    fp8 = "fp8" in extra
    cfg = load_config(None, SMALL + [e for e in extra if e != "fp8"])
    lay = parse_plan("world=1,mbs=2,seq=32", cfg)
    torch.manual_seed(0)
    model = DeepseekV3(cfg.model).to(torch.bfloat16 if lay.dtype == "bf16" else torch.float32).train()
    if fp8:
        from configs.schema import FP8Config
        from model.fp8_swap import apply_fp8
        apply_fp8(model, FP8Config(enabled=True, backend="emulated"))
    x = torch.randint(0, cfg.model.vocab_size, (lay.mbs, lay.seq), generator=torch.Generator().manual_seed(1))
    want = activation_plan(cfg.model, lay, fp8=fp8).saved
    assert saved_bytes(model, x) == pytest.approx(want, rel=0.01)


def test_each_block_saves_what_the_plan_says():
    """Block by block (a pipeline stage holds some blocks only): the dense block and a MoE block of the tiny
    model. The whole-model sum above hid a dense FFN counted too wide and a shared expert too narrow."""
    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = DeepseekV3(cfg.model).train()
    lay = parse_plan("world=1,mbs=2,seq=32", cfg)
    per_token = activation_plan(cfg.model, lay).blocks_per_token
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i in (0, 1):
        seen.clear()
        x = torch.randn(lay.mbs, lay.seq, cfg.model.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[i](x, model.rotary(lay.seq, x.device, x.dtype))
        assert sum(seen.values()) == pytest.approx(per_token[i] * lay.mbs * lay.seq, rel=0.01), i


class _HeapHighWater(TorchDispatchMode):
    """The heap in use after every op (forward and backward ops alike): its high-water mark, op by op. Python's
    cyclic garbage collector is off inside (a collection of earlier garbage mid-measurement would lower the heap
    under the baseline taken before); take the baseline right after gc.collect()."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __enter__(self):  # noqa: ANN204
        gc.disable()
        return super().__enter__()

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        gc.enable()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


def _block_peaks(fp8: bool, seq: int, sizes: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(block, tokens, heap high-water mark above the heap before) of the checkpointed backward of the tiny
    model's dense block (0) and a MoE block (1), op by op, at each of ``sizes`` tokens; each measured after a
    first backward of its shape (lazy caches; with ``fp8``, emulated kernels, the weights' FP8 copies)."""
    from configs.schema import FP8Config
    from model.fp8_swap import apply_fp8
    from model.recompute import apply_activation_checkpointing

    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = DeepseekV3(cfg.model).train()
    if fp8:
        apply_fp8(model, FP8Config(enabled=True, backend="emulated"))
    apply_activation_checkpointing(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)               # accumulated in place: .grad is state, not the backward's
    rope = model.rotary(seq, torch.device("cpu"), torch.float32)

    def high_water(i: int, tokens: int) -> int:
        x = torch.randn(tokens // seq, seq, cfg.model.hidden_size, requires_grad=True)
        h, _ = model.layers[i](x, rope)
        grad, watch = torch.ones_like(h), _HeapHighWater()
        gc.collect()
        before = heap_in_use()
        with watch:
            h.backward(grad)
        return watch.peak - before

    peaks = []
    with torch.backends.mkldnn.flags(enabled=False):
        for i in (0, 1):
            for tokens in sizes:
                high_water(i, tokens)
                peaks.append((i, tokens, high_water(i, tokens)))
    return peaks


def test_checkpointed_block_backward_holds_its_set_and_what_it_starts_with():
    """A checkpointed block's backward recomputes the block, then walks it back: its heap high-water mark above
    the heap before it (op by op; the dense block and a MoE block of the tiny model, 512 and 2048 tokens: the
    MoE block's term is its weight gradient at the one, token-wide at the other) is the block's saved set plus
    block_backward_bytes; the set alone (the rule before: a backward adds the recomputed block's set) is short
    of it by more than the tolerance. ~5 s."""
    from model.recompute_plan import block_backward_bytes

    cfg, seq = load_config(None, []), 256
    for i, tokens, got in _block_peaks(False, seq, (512, 2048)):
        lay = parse_plan(f"world=1,mbs={tokens // seq},seq={seq}", cfg)
        saved = tokens * activation_plan(cfg.model, lay).blocks_per_token[i]
        want = saved + block_backward_bytes(cfg.model, lay, cfg.model.is_moe_layer(i), tokens)
        assert got == pytest.approx(want, rel=0.05), (i, tokens, got / 2**20, want / 2**20)
        assert got > 1.05 * saved, (i, tokens)


def test_checkpointed_fp8_block_backward_peaks_in_its_first_weight_gradient():
    """The same op by op with FP8 swapped in (emulated kernels, the weights' FP8 copies cached by a first
    backward): the dense block and a MoE block at 128 tokens (MoE: the gate/up dgrad's dequantized expert weights)
    and 1024 (the down projection's fp32 wgrad operands) peak at their set plus block_backward_bytes(fp8=True);
    the rule without FP8 is short of every one by more than the tolerance. Measured in a fresh process: inside
    the whole suite's process (CI) the MoE block at 1024 tokens once peaked at 9.9 MiB instead of 40.9; not
    reproduced after the suite's single-process tests, nor with the compiled-dispatch flag or garbage collected
    mid-measurement; cause not found. ~8 s."""
    from concurrent.futures import ProcessPoolExecutor

    from model.recompute_plan import block_backward_bytes
    from tests.train_helpers import _context

    cfg = load_config(None, [])
    with ProcessPoolExecutor(max_workers=1, mp_context=_context()) as pool:
        peaks = pool.submit(_block_peaks, True, 128, (128, 1024)).result(timeout=300)
    assert [(i, tokens) for i, tokens, _ in peaks] == [(0, 128), (0, 1024), (1, 128), (1, 1024)]
    for i, tokens, got in peaks:
        lay, moe = parse_plan(f"world=1,mbs={tokens // 128},seq=128", cfg), cfg.model.is_moe_layer(i)
        saved = tokens * activation_plan(cfg.model, lay, fp8=True).blocks_per_token[i]
        want = saved + block_backward_bytes(cfg.model, lay, moe, tokens, fp8=True)
        assert got == pytest.approx(want, rel=0.05), (i, tokens, got / 2**20, want / 2**20)
        assert got > 1.05 * (saved + block_backward_bytes(cfg.model, lay, moe, tokens)), (i, tokens)


def test_checkpointed_model_peaks_where_the_plan_says():
    """The whole tiny model (pp=1) with every block checkpointed, forward and backward op by op: the heap's
    high-water mark above the heap before the forward is plan()'s "checkpointed" figure, at 128 tokens (the
    main loss's moment: gradients waiting for their weight's other use) and at 512 (the MTP block's recompute
    and backward); the rule before (the forward's set plus the largest block's) is short of both. ~4 s."""
    from model.recompute import apply_activation_checkpointing

    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = DeepseekV3(cfg.model).train()
    apply_activation_checkpointing(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.backends.mkldnn.flags(enabled=False):
        for mbs, seq in ((1, 128), (2, 256)):
            lay = parse_plan(f"world=1,mbs={mbs},seq={seq}", cfg)
            for _ in range(2):                          # the first step of a shape also builds lazy caches
                ids = torch.randint(0, cfg.model.vocab_size, (mbs, seq))
                watch = _HeapHighWater()
                gc.collect()
                before = heap_in_use()
                with watch:
                    model(ids, ids).loss.backward()
            got, ap = watch.peak - before, activation_plan(cfg.model, lay)
            old = ap.saved_checkpointed + max(ap.tokens * b + k for b, k in zip(ap.blocks_per_token,
                                                                               ap.block_constants))
            assert got == pytest.approx(plan(cfg.model, lay).activations["checkpointed"], rel=0.05), (mbs, seq)
            assert got > 1.05 * old, (mbs, seq)


def _engine_worker(rank: int, port: int, layouts: list[str], out: str, world: int = 1, extra: tuple = (),
                   variants: tuple = ("plain", "checkpointed")) -> None:
    """One rank: build each layout's engine as train.py does and measure it (benchmarks/measure_memory.py);
    rank r writes ``out`` + r."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    from benchmarks.measure_memory import layout_overrides, measure
    from parallel.engine import init_distributed

    init_distributed()
    torch.set_num_threads(1)       # a tiny model: a second thread only spins on a shared 2-core machine
    results = {}
    for text in layouts:
        lay = parse_plan(text, load_config(None, SMALL + list(extra)))
        cfg = load_config(None, SMALL + list(extra) + layout_overrides(lay))
        results[text] = measure(cfg, lay, torch.device("cpu"), variants=variants)
    with open(out + ("" if world == 1 else str(rank)), "w") as f:
        json.dump(results, f)


def test_plan_matches_a_real_engine(tmp_path):
    # fp32 only: bf16 GEMMs are ~30x slower on this CPU (bf16 state and activations: the hooks test
    # above and benchmarks/measure_memory.py's multi-rank runs in benchmarks/results/memory.md)
    layouts = ["world=1,zero=0,dtype=fp32,mbs=16,seq=64", "world=1,zero=1,dtype=fp32,mbs=16,seq=64",
               "world=1,zero=2,dtype=fp32,mbs=16,seq=64"]
    out = tmp_path / "measured.json"
    mp.spawn(_engine_worker, args=(free_port(), layouts, str(out)), nprocs=1, join=True)
    measured = json.loads(out.read_text())
    cfg = load_config(None, SMALL)
    for text in layouts:
        lay = parse_plan(text, cfg)
        pl, got = plan(cfg.model, lay), measured[text]
        for key in ("weights", "grads", "master", "moments", "buffers"):
            assert got["state"].get(key, 0) == pytest.approx(getattr(pl.state, key), rel=0.02), (text, key)
        assert got["state"].get("other", 0) < 0.01 * pl.state.device, text      # nothing unplanned of size
        acts = {v: activation_plan(cfg.model, lay, fp8=v.startswith("fp8")) for v in got["activations"]}
        for v, a in acts.items():
            want = a.saved_checkpointed if v.endswith("checkpointed") else a.saved
            assert got["activations"][v] == pytest.approx(want, rel=0.1), (text, v)


UNEVEN = ["parallel.ep=2", "parallel.expert_placement=capacity", "parallel.rank_capacity=[3,1]"]


def test_uneven_placement_plans_the_largest_rank():
    """capacity [3, 1] over 8 experts: EP rank 0 holds 6, so the plan holds 6/8 of the routed experts'
    weights and state and 1.5x the balanced routed copies; equal capacities plan like the even layout."""
    text = "world=2,ep=2,zero=1,mbs=16,seq=64"
    even = plan(load_config(None, SMALL).model, parse_plan(text, load_config(None, SMALL + ["parallel.ep=2"])))
    cfg = load_config(None, SMALL + UNEVEN)
    lay = parse_plan(text, cfg)
    assert (lay.rank_experts, lay.rank_copies) == (6, 1.5)
    pl = plan(cfg.model, lay)
    experts, dense = pl.params.experts, pl.params.dense
    assert pl.state.weights == 4 * (dense + experts * 6 // 8)
    assert pl.state.moments == 8 * (dense / 2 + experts * 6 // 8)           # dense over 2 ranks, experts own
    assert pl.state.weights > even.state.weights and pl.activations["plain"] > even.activations["plain"]
    same = load_config(None, SMALL + UNEVEN[:2] + ["parallel.rank_capacity=[1,1]"])
    assert plan(same.model, parse_plan(text, same)).state == even.state
    assert plan(same.model, parse_plan(text, same)).activations == even.activations
    auto = load_config(None, SMALL + UNEVEN[:2] + ["parallel.rank_capacity=auto"])
    with pytest.raises(ValueError, match="rank_capacity=auto"):
        parse_plan(text, auto)


def test_load_placement_plans_the_measured_hot_rank(tmp_path):
    """Measured loads with one hot expert (8 of every 15 tokens' copies in each of the 3 MoE layers):
    the load placement keeps 4 experts per rank and puts the hot one with the 3 coldest, so its rank
    computes 11/15 of the copies: 2 x 11/15 of the balanced share."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 10, "expert_load": [[8, 1, 1, 1, 1, 1, 1, 1]] * 3}) + "\n")
    cfg = load_config(None, SMALL + ["parallel.ep=2", "parallel.expert_placement=load",
                                     f"parallel.expert_load_from={metrics}"])
    lay = parse_plan("world=2,ep=2,zero=1,mbs=16,seq=64", cfg)
    assert lay.rank_experts == 4 and lay.rank_copies == pytest.approx(22 / 15)
    even = load_config(None, SMALL + ["parallel.ep=2"])
    hot, flat = (activation_plan(c.model, parse_plan("world=2,ep=2,zero=1,mbs=16,seq=64", c)) for c in (cfg, even))
    assert hot.saved > flat.saved


@pytest.mark.slow
def test_uneven_plan_matches_the_largest_real_rank(tmp_path):
    """Two real EP ranks under capacity [3, 1]: rank 0 (6 of 8 experts) measures what the plan says,
    rank 1 (2 experts) less."""
    text = "world=2,ep=2,zero=1,dtype=fp32,mbs=16,seq=64"
    out = str(tmp_path / "measured")
    mp.spawn(_engine_worker, args=(free_port(), [text], out, 2, tuple(UNEVEN), ("plain",)), nprocs=2, join=True)
    got = [json.loads(open(out + str(r)).read())[text] for r in range(2)]
    cfg = load_config(None, SMALL + UNEVEN)
    lay = parse_plan(text, cfg)
    pl = plan(cfg.model, lay)
    for key in ("weights", "grads", "master", "moments"):
        assert got[0]["state"][key] == pytest.approx(getattr(pl.state, key), rel=0.02), key
        assert got[1]["state"][key] < 0.8 * getattr(pl.state, key), key
    assert got[0]["activations"]["plain"] == pytest.approx(activation_plan(cfg.model, lay).saved, rel=0.1)
    assert got[1]["activations"]["plain"] < got[0]["activations"]["plain"]


def test_checkpoint_is_12_bytes_per_parameter():
    cfg = load_config(None, TINY_MODEL)
    model = DeepseekV3(cfg.model)
    biases = sum(m.gate.e_score_correction_bias.numel() for m in model.moe_layers())
    assert checkpoint_bytes(cfg.model) == 12 * sum(p.numel() for p in model.parameters()) + 4 * biases


def test_zero_stages_and_offload_move_the_state_where_they_say():
    cfg = load_config("configs/deepseek_v3_16b.yaml")
    z1, z2, off = (plan(cfg.model, parse_plan(t, cfg)).state for t in
                   ("world=32,ep=8,zero=1", "world=32,ep=8,zero=2", "world=32,ep=8,zero=2,offload=cpu"))
    assert z1.master == z2.master and z1.moments == z2.moments and z2.grads < z1.grads / 2
    assert off.master == off.moments == 0 and off.master_host == z2.master and off.moments_host == z2.moments
    assert off.device < z2.device
    # world = ep: no expert-data-parallel group to partition over, so the step's fp32 copy of the
    # expert gradients (4 bytes each) is the peak whichever the stage
    z1, z2 = (plan(cfg.model, parse_plan(f"world=8,ep=8,zero={z}", cfg)).state for z in (1, 2))
    assert z1.grads == z2.grads == 4 * plan(cfg.model, parse_plan("world=8,ep=8", cfg)).params.experts // 8


@pytest.mark.parametrize("text, named", [
    ("world=3,ep=2", ["ep=2", "world=3"]),
    ("world=6,ep=3", ["ep=3", "n_routed_experts=64"]),
    ("ep=2", ["world"]),
    ("world=2,ep=2,zero=3", ["zero=3"]),
    ("world=2,ep=2,dtype=fp16", ["dtype='fp16'"]),
    ("world=2,ep=2,zero=0,offload=cpu", ["offload", "zero=0"]),
    ("world=2,ep=2,offload=nvme", ["offload='nvme'"]),
    ("world=two", ["world='two'"]),
    ("world=2,gpus=8", ["'gpus'", "known fields"]),
    ("world=2,world=4", ["'world' given twice"]),
    ("world=0", ["world=0"]),
    ("world", ["'world' is not field=value"]),
])
def test_bad_plan_strings_name_the_field(text, named):
    cfg = load_config("configs/deepseek_v3_16b.yaml")
    with pytest.raises(ValueError) as e:
        parse_plan(text, cfg)
    for part in named:
        assert part in str(e.value), (text, str(e.value))


def test_model_summary_prints_the_plan(capsys):
    from scripts.model_summary import main

    out = main(["--config", "configs/deepseek_v3_16b.yaml", "--plan", "world=8,ep=8,zero=2,offload=cpu",
                "--gpu-gib", "24", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    assert out["state"]["master"] == 0 and out["state"]["master_host"] > 0
    # 24 GB cards: the 16B preset fits with activation checkpointing only
    assert out["fits"] == {"plain": False, "checkpointed": True, "fp8": False, "fp8+checkpointed": True}
    main(["--config", "configs/deepseek_v3_16b.yaml", "--plan", "world=8,ep=8,zero=2", "--gpu-gib", "24"])
    text = capsys.readouterr().out
    assert "does not fit" in text and "smallest world that fits" in text
