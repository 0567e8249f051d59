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
# 2. a lone whitespace character, 3. the last one of a longer run: as seen in the reversed window
_CUTS_REVERSED = (re.compile(r"\S\s(?=\S)"), re.compile(r"\S\s(?=\s)"))


def _cut(text: str, start: int, limit: int) -> int:
    """Where to end the piece that starts at `start` (len(text) - start > limit): a safe boundary at most
    `limit` characters on, as an index into `text`."""
    lo, hi = start + max(1, limit - _LOOKBACK), start + limit
    i = text.rfind(" ", lo, hi)
    while i > lo:   # 1. a lone space, searched from the end (in prose the first one found)
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", lo, i)
    backwards = text[lo:hi + 1][::-1]   # one character past the limit (the lookahead of a cut at the limit)
    for pattern in _CUTS_REVERSED:      # the first match backwards is the last one forwards
        m = pattern.search(backwards)
        if m is not None:
            return hi - m.start() - 1   # the whitespace character (after the matched \S) starts the next piece
    return start + limit


def _pieces(text: str, limit: int, keep: int) -> Iterator[tuple[str, int]]:
    """(piece, where it ends) while more than `keep` characters would remain after it; no copy of the text."""
    start = 0
    while len(text) - start > keep:
        end = _cut(text, start, limit)
        yield text[start:end], end
        start = end


def split_text(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """The pieces of one in-memory document, in order (one piece when it is short)."""
    start = 0
    for piece, start in _pieces(text, limit, limit):  # noqa: B007 (start: where the rest begins)
        yield piece
    if start < len(text):
        yield text[start:]


def split_stream(chunks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """The pieces of one document that arrives in chunks (a large file read block by block); at most
    2 x limit characters are held besides the chunk being read."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        start = 0
        for piece, start in _pieces(buf, limit, 2 * limit):  # noqa: B007 (a full limit kept for the boundary test)
            yield piece
        buf = buf[start:]
    yield from split_text(buf, limit)
