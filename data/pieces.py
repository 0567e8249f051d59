"""Bounded pieces of documents: what the tokenizer is given, in BPE training and in packing.

A tokenizer's memory grows with the text of one call (about 130-180 bytes per byte for a byte-level
BPE), so a document longer than `PIECE_CHARS` is cut into pieces and each is encoded on its own. The
cut goes where the GPT-2 byte-level pre-tokenizer puts a boundary anyway, so the ids are the ones the
whole document gives: before the last character of a whitespace run that sits between two non-space
characters (the regex makes that character a pre-token of its own or the start of the next word's,
and the rest of the run one pre-token). Preferred, in this order, within the last half of the window:

  1. a lone space ("x y": " y" is a pre-token in every GPT-style regex, Llama 3's included),
  2. a lone newline or other whitespace ("x\ny"),
  3. the last character of a longer run ("x\n\ny"; Llama 3's regex would join that run),
  4. none (PIECE_CHARS without whitespace: base64, minified code): a cut at PIECE_CHARS exactly.

A document of at most PIECE_CHARS characters is one piece: its ids are unchanged. Tokenizers whose
pre-tokenizer adds a prefix at the start of every call (sentencepiece's Metaspace) see one extra
prefix per cut, only in documents longer than PIECE_CHARS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

PIECE_CHARS = 64 * 1024   # characters per tokenizer call at most (a few MB of tokenizer memory)
_LOOKBACK = PIECE_CHARS // 2   # how far before the limit a safe boundary is looked for
_CUTS = (re.compile(r"(?<=\S) (?=\S)"), re.compile(r"(?<=\S)\s(?=\S)"), re.compile(r"(?<=\s)\s(?=\S)"))


def _cut(text: str, limit: int) -> int:
    """Where to end the first piece of `text` (len(text) > limit): a safe boundary at or before limit."""
    lo = max(1, limit - _LOOKBACK)
    window = text[lo:limit + 1]   # one character past the limit: the lookahead of a cut at the limit
    for pattern in _CUTS:
        last = None
        for last in pattern.finditer(window):  # noqa: B007 (the last match is the one wanted)
            pass
        if last is not None:
            return lo + last.start()   # the whitespace character starts the next piece
    return limit


def split_text(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """The pieces of one in-memory document, in order (one piece when it is short)."""
    yield from split_stream([text], limit)


def split_stream(chunks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """The pieces of one document that arrives in chunks (a large file read block by block); at most
    2 x limit characters are held besides the chunk being read."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        while len(buf) > 2 * limit:   # keep a full limit after the cut, so the boundary test sees it
            end = _cut(buf, limit)
            yield buf[:end]
            buf = buf[end:]
    while len(buf) > limit:
        end = _cut(buf, limit)
        yield buf[:end]
        buf = buf[end:]
    if buf:
        yield buf
