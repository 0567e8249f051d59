"""Pieces -> token ids, in order, in `num_proc` worker processes with a bounded number of batches in flight.

Each batch is a list of pieces (data/pieces.py) with, for each, whether it ends its document: the ids
of a batch are its pieces' ids in order, with EOS after each document's last piece. A special token's
string inside a document is text (`<|endoftext|>` in code or a page about GPT-2 becomes ordinary
tokens, never the EOS id), and such strings are counted.

Memory: the reader's batch, at most 2 x num_proc batches in flight (each about `BATCH_CHARS` of text and
its ids), and one tokenizer per worker. Workers run with TOKENIZERS_PARALLELISM=false (one thread each: the
processes are the parallelism); with num_proc=1 the batch is encoded here, on the tokenizers library's own
threads. Workers are never forked from this process: by the time it prepares data it runs other threads (torch's,
the tokenizers pool that trained the BPE, the process group's store server on rank 0), a fork copies every lock
they hold at that moment, and a worker that needs one waits forever (seen once: a rank-0 preparation that never
finished). They come from a forkserver, a fresh single-threaded process with this module imported (a few
seconds, once per process; data/cache.py keeps small corpora in one process).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .tokenizer import literal_pattern, special_token_strings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BATCH_CHARS = 1 << 20   # characters of text per batch (a batch is also cut at BATCH_PIECES pieces)
BATCH_PIECES = 1024


@dataclass
class Encoded:
    ids: np.ndarray             # int64 (tokens of the batch, EOS after each ended document)
    pieces: int                 # pieces in the batch
    ends: int                   # documents ended in the batch
    special_counts: np.ndarray  # (len(specials),) occurrences of each special-token string
    special_pieces: np.ndarray  # bool (pieces,): the piece holds a special-token string
    end_flags: list[bool]       # (pieces,): the piece ends its document


class Encoder:
    """A picklable encoder of batches: the tokenizer travels as its JSON definition (fast tokenizers)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.eos, self.vocab_size = tokenizer.eos_token_id, len(tokenizer)
        self.name = str(getattr(tokenizer, "name_or_path", ""))
        self.specials = special_token_strings(tokenizer)
        self.pattern = literal_pattern(self.specials)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.spec = backend.to_str() if backend is not None else None
        self.slow = tokenizer if backend is None else None   # a slow tokenizer is used as is, in this process
        self._backend = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_backend": None}

    def _tokenizer(self):  # noqa: ANN202 (tokenizers.Tokenizer)
        if self._backend is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.spec)
            tok.encode_special_tokens = True   # special-token strings in documents are text
            tok.no_truncation()   # a tokenizer.json may carry a truncation length: documents are never cut
            tok.no_padding()
            self._backend = tok
        return self._backend

    def __call__(self, batch: tuple[list[str], list[bool]]) -> Encoded:
        pieces, ends = batch
        if self.spec is not None:
            ids = [e.ids for e in self._tokenizer().encode_batch_fast(pieces, add_special_tokens=False)]
        else:
            ids = self.slow(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        eos = np.array([self.eos], dtype=np.int64)
        parts = [a for x, end in zip(ids, ends) for a in ((np.asarray(x, dtype=np.int64), eos) if end else
                                                        (np.asarray(x, dtype=np.int64),))]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        n_ends = sum(ends)
        if len(flat) and (flat.max() >= self.vocab_size or flat.min() < 0):
            raise ValueError(f"tokenizer produced id {flat.max()} outside [0, {self.vocab_size})")
        if np.count_nonzero(flat == self.eos) != n_ends:   # one appended to each document, no other
            raise ValueError(f"the tokenizer {self.name!r} encodes document text to its EOS id {self.eos}: "
                             "documents could not be told apart in the packed rows")
        counts = np.zeros(len(self.specials), dtype=np.int64)
        found = np.zeros(len(pieces), dtype=bool)
        if self.pattern is not None:
            index = {t: i for i, t in enumerate(self.specials)}
            for i, p in enumerate(pieces):
                hits = self.pattern.findall(p)
                if hits:
                    found[i] = True
                    counts += np.bincount([index[h] for h in hits], minlength=len(self.specials))
        return Encoded(flat, len(pieces), n_ends, counts, found, ends)


def batches(pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
    """Consecutive pieces, about BATCH_CHARS of text or BATCH_PIECES pieces a batch (ids do not depend on it)."""
    chars, max_pieces = BATCH_CHARS, BATCH_PIECES
    texts, ends, size = [], [], 0
    for piece, end in pieces:
        texts.append(piece)
        ends.append(end)
        size += len(piece)
        if size >= chars or len(texts) >= max_pieces:
            yield texts, ends
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read when the worker's tokenizer first runs
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the parent's stop handler is not the worker's: it just ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the parent, which ends the pool
    _WORKER = encoder


def _encode(batch: tuple[list[str], list[bool]]) -> Encoded:
    return _WORKER(batch)


def pool_context() -> mp.context.BaseContext:
    """A forkserver with this module imported (module docstring): never a fork of this process."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data.encode"])
    return ctx


def encode_stream(pieces: Iterable[tuple[str, bool]], encoder: Encoder, num_proc: int = 1) -> Iterator[Encoded]:
    """The encoded batches of `pieces`, in order."""
    if num_proc <= 1 or encoder.spec is None:
        for batch in batches(pieces):
            yield encoder(batch)
        return
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # read by the forked workers; restored here below
    try:
        pool = pool_context().Pool(num_proc, initializer=_init_worker, initargs=(encoder,))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:   # leaving (an error, a stop) terminates the workers
        pending: deque = deque()
        for batch in batches(pieces):
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
