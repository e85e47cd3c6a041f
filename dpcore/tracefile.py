"""Writing trace lines ``dpcore simulate`` reads: salted block ids and one JSON line a request.

Both ``dpcore serve --record`` and ``dpcore trace convert`` write Mooncake-style lines::

    {"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...], "block_size": bs}

:class:`Salted` turns dpcore block hashes (:func:`dpcore.hashing.block_hashes`) into the ids
written: a keyed BLAKE2b with a salt drawn per recording, so equal prefixes keep equal ids
within one file set while nobody can hash a known prompt and look for it. A prompt gets
``ceil(n / block_size)`` ids, as the format wants: the partial last block, and any block past
what the sender hashed, get ids of their own that match nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from hashlib import blake2b

_MASK = (1 << 63) - 1
#: Salted ids remembered, so a prefix shared by many requests is hashed once; cleared when full.
_CACHE = 1 << 20


class Salted:
    """Salted ids of block hashes, as the decimal text written to a trace line."""

    def __init__(self, block_size: int, salt: bytes | None = None) -> None:
        self.block_size = block_size
        self._salt = os.urandom(16) if salt is None else salt
        self._ids: dict[int, str] = {}
        self._tail = 0

    def ids(self, hashes: Sequence[int], n_tokens: int, *, known: bool = False) -> str:
        """The comma-separated ids of a prompt of *n_tokens* whose whole blocks hash to
        *hashes*; ``""`` (no prefix information) when there are none and the prompt was not
        *known* (a sender that hashed nothing), or when there are more than
        ``ceil(n_tokens / block_size)`` (they were made with a smaller block)."""
        want = -(-n_tokens // self.block_size)
        if (not hashes and not known) or len(hashes) > want:
            return ""
        cache = self._ids
        out = []
        for h in hashes:
            s = cache.get(h)
            if s is None:
                if len(cache) >= _CACHE:
                    cache.clear()
                s = cache[h] = _text(blake2b(h.to_bytes(8, "little"), key=self._salt, digest_size=8).digest())
            out.append(s)
        for _ in range(want - len(hashes)):
            self._tail += 1
            tail = blake2b(self._tail.to_bytes(8, "little"), key=self._salt, digest_size=8, person=b"dpcore-tail")
            out.append(_text(tail.digest()))
        return ", ".join(out)


def _text(digest: bytes) -> str:
    return str(int.from_bytes(digest, "little") & _MASK)


def line(timestamp_ms: float, input_length: int, output_length: int, ids: str, block_size: int) -> str:
    """One trace line (with its newline); *ids* from :meth:`Salted.ids`."""
    return (
        f'{{"timestamp": {timestamp_ms:.3f}, "input_length": {input_length}, "output_length": {output_length}, '
        f'"hash_ids": [{ids}], "block_size": {block_size}}}\n'
    )
