"""Data pipeline: corpus -> tokenizer -> packed token shards -> resumable sampler.

Single-process library code: ranks arrive as plain ints, nothing here touches
torch.distributed.
"""

from .cache import build_dataset_cache, echo_log, run_tokenizer_fingerprint, run_tokenizer_path
from .corpus import Corpus, load_corpus, source_signature, stdlib_files
from .prepare import cached_shards, default_num_proc, prepare_shards
from .sampler import ShardedSampler, batch_from_rows
from .shards import TokenShards, read_meta, verify_shards
from .tokenizer import load_tokenizer, special_token_strings, tokenizer_fingerprint, train_bpe_tokenizer

__all__ = [
    "build_dataset_cache", "echo_log", "run_tokenizer_fingerprint", "run_tokenizer_path",
    "Corpus", "load_corpus", "source_signature", "stdlib_files", "default_num_proc",
    "ShardedSampler", "batch_from_rows", "TokenShards", "cached_shards", "prepare_shards",
    "read_meta", "verify_shards", "load_tokenizer", "special_token_strings", "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]
