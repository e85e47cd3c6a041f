"""Text ↔ token ids for the HTTP front when no model tokenizer is installed.

The controller only needs token ids to count tokens and hash prefix blocks; it never runs a
model. Without a model tokenizer the front uses :class:`ByteTokenizer`: a token is one byte
of the UTF-8 encoding. It is deterministic across processes and hosts, and keeps the
property the cache-aware policies rely on: prompts that share a text prefix share a token
prefix. Token counts are byte counts, so they overstate a real tokenizer's by about 3-4x on
English text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte: ids 0..255."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Ids outside 0..255 come from a client that used another tokenizer; show them as
        # U+FFFD (0xFF is never valid UTF-8) instead of failing the whole response.
        return bytes(i if 0 <= i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")
