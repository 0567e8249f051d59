"""Hugging Face export and import on real files: a short ``python train.py`` run is exported
with scripts/export_hf.py and loaded by transformers (no remote code), logits compared with the
training model in fp32; import -> export is bit-exact; no project file unpickles unsafely."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import ModelConfig
from model.hf import mtp_key_pattern, read_safetensors_dir, save_hf, weight_reader
from model.transformer import DeepseekV3
from parallel.state import checkpoint, init_from
from tests.helpers import YARN, tiny_cfg
from tests.train_helpers import ROOT, clean_env, make_corpus, run_args, train

MAX_ABS = 1e-4


def _script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=180)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (or import directory), read through parallel.state.checkpoint's reader."""
    reader = weight_reader.open_weights(ckpt)
    return {k: reader.read(k) for k in reader.names()}


def _training_model(ckpt: Path) -> DeepseekV3:
    """The trained weights as the trainer saved them, in this project's model."""
    cfg = ModelConfig.from_dict(weight_reader.read_model_config(ckpt))
    model = DeepseekV3(cfg).eval()
    model.load_state_dict(_weights(ckpt))
    return model


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose dtype, shape or bytes differ (raises if the key sets differ)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:8]
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
            or not torch.equal(a[k].contiguous().reshape(-1).view(torch.uint8),
                               b[k].contiguous().reshape(-1).view(torch.uint8))]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _from_pretrained(path: Path, **kw):
    """AutoModelForCausalLM.from_pretrained, returning (model, loading info, warnings logged)."""
    from transformers import AutoModelForCausalLM

    handler, lib = _Records(), logging.getLogger("transformers")   # transformers does not propagate
    lib.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kw)
    finally:
        lib.removeHandler(handler)
    return model.eval(), info, handler.messages


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 3-step tiny run (MTP depth 1, 16 experts, bias updates on): its checkpoint directory."""
    tmp = tmp_path_factory.mktemp("export_run")
    corpus = make_corpus(tmp)
    train(run_args(tmp, corpus, "run", ["train.max_steps=3", "train.save_every=100"]))
    return checkpoint.complete_checkpoints(str(tmp / "run"))[-1]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tiny"
    # a run dir; MTP inline (DeepSeek's indexed layout), as a sharded export writes it
    _script("export_hf.py", "--checkpoint", str(trained.parent.parent), "--out", str(out), "--mtp", "inline")
    return out


def test_checkpoint_holds_full_weights_and_tokenizer(trained):
    sd = _weights(trained)
    model = _training_model(trained)
    assert sd.keys() == model.state_dict().keys()
    moe_bias = [k for k in sd if k.endswith("e_score_correction_bias")]
    assert len(moe_bias) == len(model.moe_layers())
    assert any(sd[k].abs().sum() > 0 for k in moe_bias), "bias updates should have moved the router bias"
    from data import load_tokenizer, tokenizer_fingerprint
    state = checkpoint.read_state(trained)
    assert tokenizer_fingerprint(load_tokenizer(str(trained / checkpoint.TOKENIZER))) == state["tokenizer_fingerprint"]


def test_export_logits_match_training_model(trained, exported):
    from transformers import AutoTokenizer

    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and "auto_map" not in cfg
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    # nothing executable or pickled: weights in safetensors, everything else JSON
    files = sorted(f.name for f in exported.iterdir())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["bos_token_id"] == cfg["bos_token_id"]
    hf, info, _ = _from_pretrained(exported, dtype=torch.float32)
    on_disk = read_safetensors_dir(str(exported))
    mtp = {k for k in on_disk if re.search(mtp_key_pattern(hf.config), k)}
    assert mtp and not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    # transformers 5.23 ignores only layer 61's MTP keys (DeepSeek-V3 has 61 layers): it reports the MTP
    # layer of other depths as unexpected, and nothing else (--mtp separate gives a silent load, below)
    L = hf.config.num_hidden_layers
    assert all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert on_disk["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    ids = tok(["def f3_1(x, y=1):\n    return x * 4 + y", "import os\nprint(os.getcwd())  # doc 7"],
              return_tensors="pt", padding=True).input_ids
    ours = _training_model(trained)
    with torch.no_grad():
        err = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print(f"exported vs training model: max-abs logit error {err:.2e} (fp32)")
    assert err < MAX_ABS
    out = hf.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 8)
    assert isinstance(tok.decode(out[0]), str)


def test_mtp_weights_usable_for_speculative_decoding(trained, exported):
    """transformers' MtpModel (generate(use_mtp=True)) loads the MTP layer from DeepSeek's layout."""
    from transformers.modeling_layers import MtpModel

    from model.hf import enable_transformers_mtp

    hf, _, _ = _from_pretrained(exported, dtype=torch.float32)
    enable_transformers_mtp(hf)
    mtp = MtpModel.from_pretrained(hf)
    ours = _training_model(trained)
    got, want = mtp.layers[0], ours.mtp[0]
    assert torch.equal(got.eh_proj.weight, want.eh_proj.weight)
    assert torch.equal(got.post_norm.weight, want.norm.weight)
    assert torch.equal(got.mtp_block.self_attn.o_proj.weight, want.block.self_attn.o_proj.weight)
    ids = torch.randint(1, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    spec = hf.generate(ids, max_new_tokens=6, do_sample=False, use_mtp=True, pad_token_id=0)
    assert torch.equal(plain, spec)   # greedy speculative decoding gives the same tokens


def test_default_unsharded_export_loads_silently(trained, tmp_path):
    """--mtp auto on an export that fits one file: MTP in mtp.safetensors beside model.safetensors."""
    out = tmp_path / "hf"
    _script("export_hf.py", "--checkpoint", str(trained), "--out", str(out))
    assert (out / "mtp.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    hf, info, warnings = _from_pretrained(out, dtype=torch.float32)
    assert not any(info.values()), info
    assert not [m for m in warnings if re.search("UNEXPECTED|MISSING|MISMATCH", m)], warnings
    from model.hf import load_hf
    back = load_hf(str(out))                     # the MTP layer comes back from mtp.safetensors
    assert not _bitwise_equal(back.state_dict(), _training_model(trained).state_dict())


def test_bf16_sharded_export(trained, tmp_path):
    out = tmp_path / "hf"
    _script("export_hf.py", "--checkpoint", str(trained), "--out", str(out), "--dtype", "bf16",
            "--max-shard-size", "150KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    on_disk = read_safetensors_dir(str(out))
    assert set(index["weight_map"]) == set(on_disk)
    for k, v in on_disk.items():
        assert v.dtype == (torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16), k
    hf, info, _ = _from_pretrained(out)
    assert hf.dtype == torch.bfloat16 and not info["missing_keys"]
    ours = _training_model(trained)
    w = ours.state_dict()["layers.1.mlp.experts.w_down"][3].t().bfloat16()       # (D, F) of expert 3
    assert torch.equal(on_disk["model.layers.1.mlp.experts.3.down_proj.weight"], w)
    assert torch.equal(on_disk["model.layers.1.mlp.gate.e_score_correction_bias"],
                       ours.state_dict()["layers.1.mlp.gate.e_score_correction_bias"])


def test_missing_or_incomplete_checkpoint_is_a_clear_error(trained, tmp_path):
    broken = tmp_path / "run" / "checkpoints" / trained.name
    shutil.copytree(trained, broken)
    (broken / checkpoint.MARKER).unlink()
    for src in (broken, tmp_path / "run", tmp_path / "nowhere"):
        p = _script("export_hf.py", "--checkpoint", str(src), "--out", str(tmp_path / "out"), check=False)
        assert p.returncode != 0 and str(src) in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "out" / "config.json").exists()


# ---------------------------------------------------------------- import

def _random_model(seed: int = 0, **kw) -> DeepseekV3:
    torch.manual_seed(seed)
    m = DeepseekV3(tiny_cfg(num_nextn_predict_layers=1, rope_scaling=YARN, **kw)).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_export_is_bit_exact(tmp_path, dtype):
    src = _random_model()
    save_hf(src, str(tmp_path / "hf"), dtype=dtype, max_shard_size="40KB")
    _script("import_hf.py", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "init"))
    _script("export_hf.py", "--checkpoint", str(tmp_path / "init"), "--out", str(tmp_path / "hf2"))
    original, again = read_safetensors_dir(str(tmp_path / "hf")), read_safetensors_dir(str(tmp_path / "hf2"))
    bad = _bitwise_equal(original, again)
    print(f"HF({dtype}) -> import -> export: {len(original)} tensors, {len(bad)} differ")
    assert not bad, bad[:5]
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "hf2"))
    assert a == b
    # ours -> import dir -> export -> import: the imported state dict is the original one, bit for bit
    _script("import_hf.py", "--hf", str(tmp_path / "hf2"), "--out", str(tmp_path / "init2"))
    assert not _bitwise_equal(load_file(str(tmp_path / "init" / weight_reader.MODEL)),
                              load_file(str(tmp_path / "init2" / weight_reader.MODEL)))


def test_load_init_weights(tmp_path):
    src = _random_model(seed=1)
    save_hf(src, str(tmp_path / "hf"))
    _script("import_hf.py", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "init"))
    torch.manual_seed(5)
    fresh = DeepseekV3(src.config)
    init_from.load_init_weights(fresh, tmp_path / "init")
    assert not _bitwise_equal(fresh.state_dict(), src.state_dict())
    other = DeepseekV3(tiny_cfg(num_nextn_predict_layers=1, rope_scaling=YARN, n_routed_experts=16))
    with pytest.raises(ValueError, match=r"model\.n_routed_experts=8.*model\.n_routed_experts=16"):
        init_from.load_init_weights(other, tmp_path / "init")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_from.load_init_weights(fresh, tmp_path / "nowhere")


def test_import_rejects_other_quantisations_and_foreign_dirs(tmp_path):
    save_hf(_random_model(), str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    p = _script("import_hf.py", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "quantization_config.weight_block_size=[64, 64]" in p.stderr, p.stderr
    p = _script("import_hf.py", "--hf", str(tmp_path / "none"), "--out", str(tmp_path / "o"), check=False)
    assert p.returncode != 0 and "config.json" in p.stderr


# ---------------------------------------------------------------- EP=2

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_export_after_expert_parallel_training(tmp_path):
    """2 processes, parallel.ep=2: each rank holds half the experts; the checkpoint gathers them."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    corpus = make_corpus(tmp_path)
    args = run_args(tmp_path, corpus, "ep", ["train.max_steps=3", "train.save_every=100", "parallel.ep=2",
                                             "train.micro_batch_size=2"])
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "train.py"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    ckpt = checkpoint.complete_checkpoints(str(tmp_path / "ep"))[-1]
    ours = _training_model(ckpt)                      # all 16 experts of every MoE layer
    assert ours.state_dict()["layers.1.mlp.experts.w_down"].shape[0] == ours.config.n_routed_experts
    _script("export_hf.py", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    hf, info, _ = _from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print(f"EP=2 export vs training model: max-abs logit error {err:.2e} (fp32)")
    assert err < MAX_ABS
    hf.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    # gathered in global expert order: the same run on 1 rank (same global batches) has each expert
    # closest to the expert of the same index
    train(run_args(tmp_path, corpus, "one", ["train.max_steps=3", "train.save_every=100",
                                             "train.micro_batch_size=4"]))
    one = _weights(checkpoint.complete_checkpoints(str(tmp_path / "one"))[-1])
    two = ours.state_dict()
    for key in [k for k in one if k.endswith(("experts.w_gate_up", "experts.w_down"))]:
        dist = torch.cdist(two[key].flatten(1), one[key].flatten(1))         # (E, E)
        assert torch.equal(dist.argmin(1), torch.arange(dist.shape[0])), key
        assert (two[key] - one[key]).abs().max() < 1e-2, key


# The unpickling / remote-code lint is
# tests/test_security.py::test_no_unsafe_deserialisation_or_remote_code_in_the_project.


def test_scripts_importable_without_side_effects():
    for name in ("export_hf", "import_hf"):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert callable(mod.main)


def test_train_init_from_imported_weights(trained, exported, tmp_path):
    """export -> import_hf -> train.init_from: the run starts from exactly those weights."""
    imported = tmp_path / "imported"
    _script("import_hf.py", "--hf", str(exported), "--out", str(imported))
    corpus = make_corpus(tmp_path)
    args = run_args(tmp_path, corpus, "init", ["train.max_steps=1", "train.lr=1e-12", "train.min_lr=0",
                                               "train.warmup_steps=0", f"train.init_from={imported}",
                                               f"data.tokenizer={imported / 'tokenizer'}"])
    train(args)
    after = _weights(checkpoint.complete_checkpoints(str(tmp_path / "init"))[-1])
    start = _weights(trained)
    for k, v in start.items():
        if k.endswith("e_score_correction_bias"):
            continue  # the bias update moves by gamma after the step, independent of the lr
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6, msg=k)
    # a config that does not match the imported weights is refused, naming the field
    bad = train(args[:-2] + ["model.n_routed_experts=8", f"train.init_from={imported}", "train.overwrite=true"],
                check=False)
    assert bad.returncode != 0 and "n_routed_experts" in bad.stderr


# ---------------------------------------------------------------- streaming safetensors writer

def test_streaming_writer_is_byte_identical_to_save_file(tmp_path):
    """Header order, JSON and padding, and data as save_file writes them, for every dtype an export
    holds (fp8 weights, fp32 scales, bf16), scalars, empty and non-ASCII names, in any write order."""
    from safetensors.torch import save_file

    from model.hf.safetensors_stream import SafetensorsWriter, save_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.randn(2, 7, generator=g),
               "w_scale_inv": torch.rand(1, 2, generator=g),
               "q": torch.randn(130, 3, generator=g).to(torch.float8_e4m3fn),
               "ids": torch.arange(5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
               "ünï": torch.ones(3, dtype=torch.float16)}
    for meta in (None, {"format": "pt"}):
        save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=meta)
        save_streaming(tensors, tmp_path / "ours.safetensors", metadata=meta)
        assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()
    # reversed order, the 130-row tensor in two pieces along dim 0
    specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "pieces.safetensors", specs, {"format": "pt"}) as w:
        for k, v in reversed(tensors.items()):
            if k == "q":
                w.write(k, v[100:], row=100)
                w.write(k, v[:100])
            else:
                w.write(k, v)
    assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "pieces.safetensors").read_bytes()


def test_streaming_writer_refuses_incomplete_or_unplanned_tensors(tmp_path):
    from model.hf.safetensors_stream import SafetensorsWriter

    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (4, 3)), ("b", torch.bfloat16, (2,))])
    w.write("a", torch.ones(2, 3), row=2)
    with pytest.raises(ValueError, match=r"b planned as torch\.bfloat16"):
        w.write("b", torch.ones(2))
    with pytest.raises(ValueError, match=r"a has shape \(4, 3\); cannot write a \(3, 3\) piece at row 2"):
        w.write("a", torch.ones(3, 3), row=2)
    with pytest.raises(ValueError, match="c is not in this file's plan"):
        w.write("c", torch.ones(1))
    with pytest.raises(ValueError, match=r"a got 24 of 48 bytes \(2 tensor\(s\) incomplete\)"):
        w.close()
    assert not list(tmp_path.iterdir())          # nothing left behind, not even the temporary file
