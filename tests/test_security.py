"""Security: no code path unpickles or runs remote code, untrusted data files carrying a pickle
payload are refused without running it, and API keys never reach a file the run writes.

The lint reads every project .py file with ``ast``: calls are matched by what they resolve to
through the file's imports, so strings and comments (this file's own snippets included) never
count, and aliases (``from torch import load as L``) do.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from data import TokenShards, build_dataset_cache, load_tokenizer, prepare_shards, train_bpe_tokenizer
from tests.helpers import PicklePayload
from tests.train_helpers import ROOT, clean_env, make_corpus, run_args, train

# ---------------------------------------------------------------- a. lint

SCANNED_DIRS = ("model", "parallel", "data", "configs", "scripts", "benchmarks", "tests")
UNPICKLING_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib")
UNPICKLING_CALLS = {f"{m}.{f}" for m in UNPICKLING_MODULES for f in ("load", "loads", "Unpickler")} | {
    "pandas.read_pickle", "yaml.unsafe_load"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader"}

# Deliberate unsafe loads in tests, each an oracle proving a payload is live (it runs under the
# stock loader); at most this many per file and kind. Product code gets no exceptions.
ORACLES = {
    ("tests/test_security.py", "pickle.loads"): 1,
}


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _remote_code_on(value) -> bool:
    """Anything but a literal False or None (the default) may turn remote code on."""
    return not (_is_const(value, False) or _is_const(value, None))


def lint_source(source: str) -> list[tuple[int, str]]:
    """(line, what) for every unsafe deserialisation or remote-code switch in ``source``."""
    tree = ast.parse(source)
    origin: dict[str, str] = {}   # local name -> the dotted name it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                origin[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                origin[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr) -> str | None:
        if isinstance(expr, ast.Name):
            return origin.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):   # options handed on as **{"trust_remote_code": ...}
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _remote_code_on(v):
                    found.append((node.lineno, "trust_remote_code not False"))
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}   # None: **kwargs, whose contents are unknown
        if "trust_remote_code" in kw and _remote_code_on(kw["trust_remote_code"]):
            found.append((node.lineno, "trust_remote_code not False"))
        if name in TORCH_LOADS and not _is_const(kw.get("weights_only"), True):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in UNPICKLING_CALLS:
            found.append((node.lineno, name))
        elif name == "numpy.load" and (None in kw or "allow_pickle" in kw
                                       and not _is_const(kw["allow_pickle"], False)):
            found.append((node.lineno, "numpy.load with allow_pickle"))
        elif name == "yaml.load" and dotted(kw.get("Loader")) not in SAFE_YAML_LOADERS:
            found.append((node.lineno, "yaml.load without a safe Loader"))
    return sorted(found)


def project_files() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for d in SCANNED_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def test_no_unsafe_deserialisation_or_remote_code_in_the_project():
    offenders, used = [], {}
    files = project_files()
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        for line, what in lint_source(f.read_text(encoding="utf-8")):
            used[(rel, what)] = used.get((rel, what), 0) + 1
            if used[(rel, what)] > ORACLES.get((rel, what), 0):
                offenders.append(f"{rel}:{line}: {what}")
    assert not offenders, "\n".join(offenders)
    names = {f.relative_to(ROOT).as_posix() for f in files}
    assert {"train.py", "data/shards.py", "parallel/state/checkpoint.py", "scripts/export_hf.py",
            "tests/test_security.py"} <= names


# Built by concatenation: tests/test_export.py greps the raw text of every file for these calls.
_TORCH_LOAD, _REMOTE = "torch" + ".load", "trust_remote_code" + "=True"
UNSAFE_SNIPPET = f"""
import torch, pickle, yaml
import numpy as np
from torch import load as L
from pickle import loads
from transformers import AutoModel
a = {_TORCH_LOAD}(f)
b = {_TORCH_LOAD}(f, weights_only=False)
c = L(f)
d = pickle.load(fh)
e = loads(blob)
g = np.load(f, allow_pickle=True)
h = AutoModel.from_pretrained(p, {_REMOTE})
i = yaml.load(text, Loader=yaml.Loader)
j = {{"trust_remote_code": True}}
"""
SAFE_SNIPPET = f"""
import torch, json, yaml
import numpy as np
a = {_TORCH_LOAD}(f, weights_only=True)
b = np.load(f)
c = json.load(fh)
d = yaml.safe_load(text)
e = yaml.load(text, Loader=yaml.SafeLoader)
s = "{_TORCH_LOAD}(f) and pickle.loads(x)"   # {_TORCH_LOAD}(f) in a comment
"""


def test_the_lint_flags_a_synthetic_offender():
    assert lint_source(UNSAFE_SNIPPET) == [
        (7, "torch.load without weights_only=True"), (8, "torch.load without weights_only=True"),
        (9, "torch.load without weights_only=True"), (10, "pickle.load"), (11, "pickle.loads"),
        (12, "numpy.load with allow_pickle"), (13, "trust_remote_code not False"),
        (14, "yaml.load without a safe Loader"), (15, "trust_remote_code not False")]
    assert lint_source(SAFE_SNIPPET) == []


# ---------------------------------------------------------------- b. untrusted data files


DOCS = [f"def g{i}(x):\n    return x + {i}  # a small document\n" * 3 for i in range(30)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    tok = train_bpe_tokenizer(DOCS, 300, str(root / "tok"))
    prepare_shards(datasets.Dataset.from_dict({"text": DOCS}), tok, str(root / "shards"), seq_len=16,
                   val_fraction=0.1)
    return root


def _build(path: Path, tmp: Path) -> str:
    """data preparation exactly as train.prepare_data calls it"""
    return build_dataset_cache(str(path), "text", None, 300, 16, str(tmp / "cache"), 0.1)


def _pickle_file(tmp, sentinel, name):
    f = tmp / name
    f.write_bytes(pickle.dumps(PicklePayload(sentinel)))
    return f


def _npy_object_file(tmp, sentinel, name):
    f = tmp / name
    np.save(f, np.array([PicklePayload(sentinel)], dtype=object), allow_pickle=True)
    return f


def _torch_file(tmp, sentinel, name):
    f = tmp / name
    torch.save({"w": torch.ones(2), "x": PicklePayload(sentinel)}, f)
    return f


def _saved_dataset_with_pickled_arrow(tmp, sentinel, name):
    d = tmp / name
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(d))
    for f in d.glob("*.arrow"):
        f.write_bytes(pickle.dumps(PicklePayload(sentinel)))
    return d


def _folder_of_pickles(tmp, sentinel, name):
    d = tmp / name
    d.mkdir()
    _pickle_file(d, sentinel, "docs.pkl")
    _npy_object_file(d, sentinel, "docs.npy")
    return d


CORPUS_CASES = [
    ("pickle-file", _pickle_file, "corpus.pkl", r"corpus file .*corpus\.pkl: \.pkl files hold serialized objects"),
    ("npy-object-array", _npy_object_file, "corpus.npy", r"corpus\.npy: \.npy files hold serialized objects"),
    ("torch-file", _torch_file, "corpus.pt", r"corpus\.pt: \.pt files hold serialized objects"),
    ("pickle-named-jsonl", _pickle_file, "corpus.jsonl", r"cannot read json corpus file\(s\) .*corpus\.jsonl"),
    ("pickle-named-parquet", _pickle_file, "corpus.parquet",
     r"cannot read parquet corpus file\(s\) .*corpus\.parquet"),
    ("pickle-as-saved-dataset-arrow", _saved_dataset_with_pickled_arrow, "saved",
     r"cannot read the saved dataset .*saved"),
    ("folder-of-pickles", _folder_of_pickles, "folder", r"no usable files in corpus folder .*folder"),
]


@pytest.mark.parametrize("make, name, pattern", [c[1:] for c in CORPUS_CASES], ids=[c[0] for c in CORPUS_CASES])
def test_pickled_corpus_is_refused_and_never_runs(tmp_path, make, name, pattern):
    sentinel = tmp_path / "PWNED"
    path = make(tmp_path, sentinel, name)
    with pytest.raises(ValueError, match=pattern):
        _build(path, tmp_path)
    assert not sentinel.exists()


def test_pickles_beside_text_are_ignored(tmp_path):
    sentinel = tmp_path / "PWNED"
    folder = make_corpus(tmp_path)
    _pickle_file(folder, sentinel, "extra.pkl")
    _npy_object_file(folder, sentinel, "extra.npy")
    shards = TokenShards(_build(folder, tmp_path))
    assert len(shards) > 0 and not sentinel.exists()


def test_pickle_in_place_of_a_token_shard_is_refused(prepared, tmp_path):
    """Shards are memory-mapped raw integers, never deserialised: a pickle there fails the size
    check, and one padded to the exact size is read as token ids that fail the vocabulary check."""
    sentinel = tmp_path / "PWNED"
    d = tmp_path / "shards"
    shutil.copytree(prepared / "shards", d)
    shard = d / "train_00000.bin"
    size = shard.stat().st_size
    payload = pickle.dumps(PicklePayload(sentinel))
    assert len(payload) < size
    shard.write_bytes(payload)
    with pytest.raises(ValueError, match=rf"train_00000\.bin has {len(payload)} bytes .*truncated or corrupt"):
        TokenShards(str(d), expected_vocab_size=300)
    shard.write_bytes(payload + bytes(size - len(payload)))
    with pytest.raises(ValueError, match=r"train_00000\.bin contains token id \d+ >= vocab size 300"):
        TokenShards(str(d), expected_vocab_size=300)
    assert not sentinel.exists()


def test_tokenizer_with_custom_code_is_refused_and_never_runs(prepared, tmp_path):
    sentinel = tmp_path / "PWNED"
    tok = tmp_path / "tok"
    shutil.copytree(prepared / "tok", tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n"
                                 "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    with pytest.raises(ValueError, match=r"could not load a tokenizer from .*tok: .*custom code"):
        load_tokenizer(str(tok))
    assert not sentinel.exists()


def test_the_payload_is_live(tmp_path):
    """The oracle for the tests above: the stock unpickler runs the payload."""
    sentinel = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(PicklePayload(sentinel)))
    assert sentinel.exists()


def test_train_refuses_a_pickled_corpus(tmp_path):
    sentinel = tmp_path / "PWNED"
    payload = _pickle_file(tmp_path, sentinel, "corpus.pkl")
    p = train(run_args(tmp_path, payload, "run", ["train.max_steps=1"]), check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert f"error: corpus file {payload}: .pkl files hold serialized objects" in p.stderr
    assert "Traceback" not in p.stderr and not sentinel.exists()


# ---------------------------------------------------------------- c. secrets stay in the environment

@pytest.mark.slow
def test_api_keys_never_reach_a_written_file(tmp_path):
    wandb_key, hf_token = uuid.uuid4().hex + uuid.uuid4().hex[:8], "hf_" + uuid.uuid4().hex
    # every tool's home for logs, settings and caches inside tmp_path, so the walk below sees it
    homes = {name: str(tmp_path / "homes" / name.lower()) for name in (
        "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "HF_HOME",
        "HF_DATASETS_CACHE", "TMPDIR")}
    for d in homes.values():
        os.makedirs(d)
    env = dict(homes, WANDB_API_KEY=wandb_key, HF_TOKEN=hf_token, HUGGING_FACE_HUB_TOKEN=hf_token,
               WANDB_MODE="offline")
    started = time.time()
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run"
    run = train(run_args(tmp_path, corpus, "run", ["train.max_steps=2", "train.save_every=2",
                                                   "logging.wandb=offline"]), env=env)
    export = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--checkpoint", str(out),
                             "--out", str(tmp_path / "export")], cwd=ROOT, env={**clean_env(), **env},
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]

    # everything under tmp_path, and whatever wandb still put in its per-user folders during the run
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for d in (Path.home() / ".cache" / "wandb", Path.home() / ".config" / "wandb", Path.home() / ".netrc"):
        found = [d] if d.is_file() else list(d.rglob("*")) if d.is_dir() else []
        files += [p for p in found if p.is_file() and p.stat().st_mtime >= started]
    secrets = {"WANDB_API_KEY": wandb_key.encode(), "HF_TOKEN": hf_token.encode()}
    leaks = [f"{name} in {f}" for f in files for name, s in secrets.items() if s in f.read_bytes()]
    for stream, text in (("train stdout", run.stdout), ("train stderr", run.stderr),
                         ("export stdout", export.stdout), ("export stderr", export.stderr)):
        leaks += [f"{name} in {stream}" for name, s in secrets.items() if s.decode() in text]
    assert not leaks, leaks

    # the walk saw what matters: wandb's run file (it holds the logged config, so a key written
    # there would be found as raw bytes), the checkpoint and the export
    wandb_runs = [f for f in files if f.suffix == ".wandb"]
    assert wandb_runs and any(str(out).encode() in f.read_bytes() for f in wandb_runs)
    names = {f.name for f in files}
    assert {"metrics.jsonl", "run.json", "trainer_state.json", "model.safetensors", "config.json",
            "tokenizer.json", "debug.log"} <= names
