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
    prev = b"\0" * 8
    for i in range(n):
        h = hashlib.blake2b(prev, digest_size=8)
        h.update(data[i * step : (i + 1) * step])
        prev = h.digest()
        out.append(int.from_bytes(prev, "little") & _MASK)
    return tuple(out)
