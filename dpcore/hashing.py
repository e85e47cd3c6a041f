"""Stable block hashes of token ids, shared by the client SDK, the simulator and adapters.

A prompt is cut into blocks of ``block_size`` tokens; block ``i``'s hash covers the hash of
block ``i-1`` and the tokens of block ``i``, so equal hashes mean equal prefixes. Only whole
blocks are hashed (a partial last block cannot be shared by a prefix cache). The hash is
BLAKE2b, so it is the same in every process and on every host (unlike ``hash()``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 64
_MASK = (1 << 63) - 1


def block_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, ...]:
    """Chained 63-bit hashes of the whole ``block_size``-token blocks of *token_ids*."""
    if block_size < 1:
        msg = f"block_size must be >= 1, got {block_size}"
        raise ValueError(msg)
    n = len(token_ids) // block_size
    if n == 0:
        return ()
    # 'q' holds any token id an engine uses; the bytes are what is hashed.
    data = array("q", token_ids[: n * block_size]).tobytes()
    step = 8 * block_size
    out = []
    prev = ROOT
    for i in range(n):
        prev = _digest(prev, data[i * step : (i + 1) * step])
        out.append(key_of(prev))
    return tuple(out)


#: The digest a prompt's first block chains from.
ROOT = b"\0" * 8


def _digest(prev: bytes, data: bytes) -> bytes:
    h = hashlib.blake2b(prev, digest_size=8)
    h.update(data)
    return h.digest()


def next_block(prev: bytes, tokens: Sequence[int]) -> bytes:
    """The chain digest of one more block of *tokens* after the block whose digest is *prev*
    (:data:`ROOT` for the first block); :func:`key_of` turns it into the block's hash. For
    callers that learn a prompt a block at a time (e.g. an engine's KV events)."""
    return _digest(prev, array("q", tokens).tobytes())


def key_of(digest: bytes) -> int:
    """The block hash (as in :func:`block_hashes`) of a chain digest."""
    return int.from_bytes(digest, "little") & _MASK
