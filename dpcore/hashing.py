"""Stable block hashes of token ids, shared by the client SDK, the simulator and adapters.

A prompt is cut into blocks of ``block_size`` tokens; block ``i``'s hash covers the hash of
block ``i-1`` and the tokens of block ``i``, so equal hashes mean equal prefixes. Only whole
blocks are hashed (a partial last block cannot be shared by a prefix cache). The hash is
BLAKE2b, so it is the same in every process and on every host (unlike ``hash()``).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

DEFAULT_BLOCK_SIZE = 64
_MASK = (1 << 63) - 1
#: Bytes per token id in what is hashed: a native signed 64-bit integer (``array('q')``).
_TOKEN_BYTES = 8

#: The digest a prompt's first block chains from.
ROOT = b"\0" * 8
#: Bytes per block hash in :func:`block_key_bytes`: a little-endian signed 64-bit integer.
KEY_BYTES = 8
#: Clears the top bit of a byte: a key is its digest, read little-endian, with bit 63 cleared.
_CLEAR_TOP_BIT = bytes(b & 0x7F for b in range(256))
_LITTLE_ENDIAN = sys.byteorder == "little"


def _token_bytes(token_ids: Sequence[int], count: int) -> bytes | memoryview:
    """The first *count* token ids as native signed 64-bit integers, copied only if needed."""
    if type(token_ids) is array and token_ids.typecode == "q":
        # SGLang's tokenized requests carry array('q') (TokenizerManager builds them so):
        # its buffer already holds exactly these bytes.
        return memoryview(token_ids).cast("B")[: count * _TOKEN_BYTES]
    # struct packs a list about three times faster than array('q', list) does.
    return struct.pack(f"{count}q", *token_ids[:count])


def block_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, ...]:
    """Chained 63-bit hashes of the whole ``block_size``-token blocks of *token_ids*."""
    return _unpack(_keys(token_ids, block_size))


def block_key_bytes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> bytes:
    """:func:`block_hashes` of *token_ids* as :data:`KEY_BYTES`-byte little-endian integers, one
    after the other: the form that travels between processes (:func:`keys_of_bytes` reads it)."""
    return bytes(_keys(token_ids, block_size))


def _keys(token_ids: Sequence[int], block_size: int) -> bytearray:
    if block_size < 1:
        msg = f"block_size must be >= 1, got {block_size}"
        raise ValueError(msg)
    n = len(token_ids) // block_size
    if n == 0:
        return bytearray()
    step = _TOKEN_BYTES * block_size
    data = _token_bytes(token_ids, n * block_size)
    digests = []
    keep = digests.append
    prev = ROOT
    # _digest, inlined: this runs for every block of every prompt. The keys are made from the
    # digests in one pass afterwards, not one integer per block here.
    for i in range(0, n * step, step):
        h = blake2b(prev, digest_size=8)
        h.update(data[i : i + step])
        prev = h.digest()
        keep(prev)
    keys = bytearray(b"".join(digests))
    keys[KEY_BYTES - 1 :: KEY_BYTES] = keys[KEY_BYTES - 1 :: KEY_BYTES].translate(_CLEAR_TOP_BIT)
    return keys


def _unpack(raw: bytes | bytearray) -> tuple[int, ...]:
    if _LITTLE_ENDIAN:
        return tuple(memoryview(raw).cast("q"))
    return tuple(int.from_bytes(raw[i : i + KEY_BYTES], "little", signed=True) for i in range(0, len(raw), KEY_BYTES))


def keys_of_bytes(raw: bytes | bytearray) -> tuple[int, ...]:
    """The block hashes packed in *raw* by :func:`block_key_bytes`.

    :raises ValueError: *raw* is not a whole number of keys, or holds a value that is not a
        block hash (negative: bit 63 set).
    """
    if len(raw) % KEY_BYTES:
        msg = f"block hashes take {KEY_BYTES} bytes each, got {len(raw)} bytes"
        raise ValueError(msg)
    keys = tuple(memoryview(raw).cast("q")) if _LITTLE_ENDIAN else _unpack(raw)
    if keys and min(keys) < 0:
        msg = "a block hash has bit 63 set; block hashes are 63-bit"
        raise ValueError(msg)
    return keys


def _digest(prev: bytes, data: bytes | memoryview) -> bytes:
    h = blake2b(prev, digest_size=8)
    h.update(data)
    return h.digest()


def next_block(prev: bytes, tokens: Sequence[int]) -> bytes:
    """The chain digest of one more block of *tokens* after the block whose digest is *prev*
    (:data:`ROOT` for the first block); :func:`key_of` turns it into the block's hash. For
    callers that learn a prompt a block at a time (e.g. an engine's KV events)."""
    return _digest(prev, _token_bytes(tokens, len(tokens)))


def key_of(digest: bytes) -> int:
    """The block hash (as in :func:`block_hashes`) of a chain digest."""
    return int.from_bytes(digest, "little") & _MASK
