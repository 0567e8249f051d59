"""Tokenizer: train a small byte-level BPE locally, load local HF tokenizers, fingerprint them.

The fingerprint is stored in shard metadata so that token ids are never silently
interpreted with a different vocabulary than the one that produced them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols + the special token(s): anything smaller cannot encode arbitrary text.
MIN_VOCAB_SIZE = 256 + 1


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE and save it as an HF tokenizer directory.

    A single special token `<|endoftext|>` serves as EOS (document separator), BOS and
    pad, as in GPT-2; byte-level means no unknown tokens, so there is no UNK.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seed with all 256 bytes so text unseen in training still encodes losslessly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        # Documents are packed into rows later, so per-text length limits do not apply.
        model_max_length=int(1e30),
    )
    save_tokenizer(fast, Path(out_dir))
    return fast


def save_tokenizer(tok: PreTrainedTokenizerBase, out: Path) -> None:
    """save_pretrained into a temp dir, then swap it in: a crash never leaves half a tokenizer."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load an HF tokenizer from a local directory only (never from a hub)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory does not exist: {path}")
    try:
        # trust_remote_code=False: a tokenizer_config.json with an auto_map is refused outright
        # (left unset, transformers asks on a terminal whether to run the directory's code)
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types; surface one clear message
        raise ValueError(f"could not load a tokenizer from {path}: {type(e).__name__}: {e}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos_token; one is needed to separate documents")
    return tok


def special_token_strings(tok: PreTrainedTokenizerBase) -> list[str]:
    """Every special token's text (EOS, BOS, pad, the added specials), sorted: in a document these
    strings are text and must be encoded as such, never as the token they name."""
    specials = set(tok.all_special_tokens)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        specials.update(t.content for t in backend.get_added_tokens_decoder().values() if t.special)
    return sorted(s for s in specials if s)


def literal_pattern(strings: list[str]) -> re.Pattern[str] | None:
    """One regex matching any of `strings`, leftmost-longest, built as a trie: a tokenizer with hundreds
    of special tokens (DeepSeek-V3 has ~800) costs one pass over the text, not one per string."""
    trie: dict = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}  # a string ends here

    def alternation(node: dict) -> str:
        branches = [re.escape(ch) + alternation(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # greedy optional: a longer string wins over one that ends here (leftmost-longest, as tokenizers match)
        return f"(?:{body})?" if "" in node else body

    return re.compile(alternation(trie)) if trie else None


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's serialized definition; equal for the same tokenizer reloaded."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Padding/truncation are runtime call settings, not part of the vocabulary.
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:  # slow (e.g. sentencepiece) tokenizer: the vocab and specials define it
        spec = {"vocab": sorted(tok.get_vocab().items()), "special": sorted(tok.all_special_tokens)}
    spec = {"tokenizer": spec, "eos_token": tok.eos_token}
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
