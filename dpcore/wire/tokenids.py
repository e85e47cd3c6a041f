"""Token ids as a compact payload (little-endian uint32), for engines that want ids, not text."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

from dpcore.errors import WireError

_BIG_ENDIAN = sys.byteorder == "big"


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes: a compact payload for engines that want ids."""
    a = array("I", token_ids)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tobytes()


def unpack_token_ids(buf: bytes) -> list[int]:
    """Inverse of :func:`pack_token_ids`."""
    if len(buf) % 4:
        msg = f"token ids: {len(buf)} bytes is not a whole number of uint32"
        raise WireError(msg)
    a = array("I")
    a.frombytes(buf)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tolist()
