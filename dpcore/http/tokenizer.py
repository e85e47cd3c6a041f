"""Text ↔ token ids for the HTTP front.

With ``--tokenizer PATH`` the front uses the model's own tokenizer from a local
``tokenizer.json`` (the Hugging Face ``tokenizers`` format every recent model ships; PATH is
the file or the model directory holding it). It is read from disk only, never from a hub,
and needs the ``tokenizers`` package (``pip install 'dpcore[tokenizer]'``). Token counts and
block hashes then match what the engine computes, so ``total_tokens`` and ``cache_aware``
see the engine's numbers.

The controller only needs token ids to count tokens and hash prefix blocks; it never runs a
model. Without a model tokenizer the front uses :class:`ByteTokenizer`: a token is one byte
of the UTF-8 encoding. It is deterministic across processes and hosts, and keeps the
property the cache-aware policies rely on: prompts that share a text prefix share a token
prefix. Token counts are byte counts, so they overstate a real tokenizer's by about 3-4x on
English text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from dpcore.errors import ConfigError


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


#: Bytes turned into ids per C call: a call holds the GIL throughout, so a huge prompt
#: encoded on a worker thread in one call would still stall the event loop.
_CHUNK = 1 << 18


class ByteTokenizer:
    """One token per UTF-8 byte: ids 0..255."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        if len(data) <= _CHUNK:
            return list(data)
        out: list[int] = []
        for i in range(0, len(data), _CHUNK):
            out.extend(data[i : i + _CHUNK])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        # Ids outside 0..255 come from a client that used another tokenizer; show them as
        # U+FFFD (0xFF is never valid UTF-8) instead of failing the whole response.
        return bytes(i if 0 <= i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")


class FileTokenizer:
    """A model's tokenizer from a local ``tokenizer.json`` (no network access).

    :param path: The ``tokenizer.json`` file, or a directory that holds one.
    :param add_special_tokens: Add the model's special tokens (BOS...) when encoding, as the
        engine does for text prompts.
    :raises ConfigError: The file is missing, unreadable, or ``tokenizers`` is not installed.
    """

    def __init__(self, path: str, *, add_special_tokens: bool = True) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            msg = f"--tokenizer {path}: no tokenizer.json there (give the file or the model directory holding it)"
            raise ConfigError(msg)
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            msg = "--tokenizer needs the tokenizers package: pip install 'dpcore[tokenizer]'"
            raise ConfigError(msg) from None
        try:
            self._tok: Any = _HF.from_file(str(p))
        except Exception as exc:  # the library raises its own exception type for bad files
            msg = f"--tokenizer {p}: not a tokenizer.json the tokenizers library can read ({exc})"
            raise ConfigError(msg) from None
        self.name = str(p)
        self.vocab_size = int(self._tok.get_vocab_size())
        self.add_special_tokens = add_special_tokens

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        # Ids past the vocabulary come from a client that used another tokenizer: skipped.
        n = self.vocab_size
        return str(self._tok.decode([i for i in ids if 0 <= i < n]))


def load(path: str | None) -> Tokenizer:
    """``--tokenizer``: the file's tokenizer, or :class:`ByteTokenizer` when *path* is ``None``."""
    return ByteTokenizer() if path is None else FileTokenizer(path)
