"""Writing trace lines ``dpcore simulate`` reads: salted block ids and one JSON line a request.

Both ``dpcore serve --record`` and ``dpcore trace convert`` write Mooncake-style lines::

    {"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...], "block_size": bs}

:class:`Salted` turns dpcore block hashes (:func:`dpcore.hashing.block_hashes`) into the ids
written: a keyed pseudo-random function with a key drawn per recording, so equal prefixes
keep equal ids within one file set while nobody can hash a known prompt and look for it. A
prompt gets ``ceil(n / block_size)`` ids, as the format wants: the partial last block, and
any block past what the sender hashed, get ids of their own that match nothing.

The function is SipHash-2-4 (a keyed hash made for short inputs such as one 64-bit block
hash), computed for a whole batch at once with numpy when it is installed; without numpy it
is keyed BLAKE2b, one call per distinct block. Ids are only ever compared within one
recording, and a recording keeps one function (:attr:`Salted.kind`, chosen when it starts).
Every id has exactly :data:`ID_DIGITS` decimal digits, so a batch's ids are formatted as one
block of fixed-width text (:meth:`Salted.salt_text`) and cut per line.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from hashlib import blake2b
from typing import Any

#: Decimal digits of every id: ids are in [10**17, 10**18), below 2**63 like the hashes.
ID_DIGITS = 18
#: Bytes per id in :meth:`Salted.salt_text`: its digits and ``", "``.
ID_TEXT = ID_DIGITS + 2
_ID_LOW = 10 ** (ID_DIGITS - 1)
_ID_SPAN = 9 * _ID_LOW
#: Salted ids remembered by the BLAKE2b function, so a shared prefix is hashed once; cleared when full.
_CACHE = 1 << 20
#: Block hashes salted per numpy call.
_CHUNK = 16384
#: The two ways of salting (:attr:`Salted.kind`).
SIPHASH, BLAKE2B = "siphash", "blake2b"
#: Tweak of the key for the ids of blocks the sender did not hash, so they match no block's id.
_TAIL_TWEAK = 0x7461696C2D696473
#: A block hash is salted as a 64-bit word: a sender's integer outside 0 .. 2**64-1 (msgpack
#: carries -2**63 .. -1 too) as its two's complement, so no header can stop the writer.
_WORD = (1 << 64) - 1


def default_kind() -> str:
    """:data:`SIPHASH` when numpy is installed, else :data:`BLAKE2B`."""
    return SIPHASH if importlib.util.find_spec("numpy") is not None else BLAKE2B


class Salted:
    """Salted ids of block hashes: ``salt(hashes)`` for many at once, ``ids(...)`` for one prompt.

    :param kind: :data:`SIPHASH` (needs numpy) or :data:`BLAKE2B`; default :func:`default_kind`.
    """

    def __init__(self, block_size: int, salt: bytes | None = None, kind: str | None = None) -> None:
        self.block_size = block_size
        self._salt = os.urandom(16) if salt is None else salt
        self.kind = default_kind() if kind is None else kind
        self._tail = 0
        self._ids: dict[int, int] = {}
        if self.kind == SIPHASH:
            import numpy as np

            self._np = np
            k0 = int.from_bytes(self._salt[:8], "little")
            k1 = int.from_bytes(self._salt[8:16], "little")
            self._keys = (k0, k1)
        elif self.kind != BLAKE2B:
            msg = f"salting must be {SIPHASH!r} or {BLAKE2B!r}, got {self.kind!r}"
            raise ValueError(msg)

    @property
    def siphash_key(self) -> tuple[int, int, int]:
        """SipHash's key ``(k0, k1)`` and the tweak of ``k1`` for tail ids (:data:`SIPHASH` only),
        for a compiled pass that salts as :meth:`salt_text` does."""
        return (*self._keys, _TAIL_TWEAK)

    @property
    def tails_given(self) -> int:
        """Tail ids given so far: the next one is of number ``tails_given + 1``."""
        return self._tail

    def gave_tails(self, total: int) -> None:
        """A compiled pass gave tail ids up to number *total* (see :attr:`tails_given`)."""
        self._tail = total

    def salt(self, hashes: Sequence[int]) -> list[int]:
        """The id of each block hash in *hashes* (63-bit integers)."""
        if not len(hashes):
            return []
        if self.kind == SIPHASH:
            m = self._words(hashes)
            return self._sip(m, len(m)).tolist()  # type: ignore[no-any-return]
        cache = self._ids
        out = []
        for h in hashes:
            s = cache.get(h)
            if s is None:
                if len(cache) >= _CACHE:
                    cache.clear()
                word = (h & _WORD).to_bytes(8, "little")
                s = cache[h] = _int(blake2b(word, key=self._salt, digest_size=8).digest())
            out.append(s)
        return out

    def _words(self, hashes: Sequence[int]) -> Any:
        """*hashes* as a uint64 array (see :data:`_WORD`)."""
        np = self._np
        try:
            return np.array(hashes, np.uint64)
        except OverflowError:
            return np.array([h & _WORD for h in hashes], np.uint64)

    def tails(self, n: int) -> list[int]:
        """*n* ids that match no block and no other tail id (blocks the sender did not hash)."""
        if n <= 0:
            return []
        if self.kind == SIPHASH:
            return self._sip(self._counters(n), 0).tolist()  # type: ignore[no-any-return]
        first, self._tail = self._tail + 1, self._tail + n
        return [
            _int(blake2b(i.to_bytes(8, "little"), key=self._salt, digest_size=8, person=b"dpcore-tail").digest())
            for i in range(first, first + n)
        ]

    def salt_text(self, hashes: Sequence[int], tails: int = 0) -> bytes:
        """The ids of *hashes*, then *tails* more :meth:`tails`, as text, :data:`ID_TEXT` bytes
        each (``"<18 digits>, "``); with numpy, all of them in one pass."""
        if self.kind == SIPHASH and (len(hashes) or tails > 0):
            np = self._np
            m = self._words(hashes)
            if tails > 0:
                m = np.concatenate((m, self._counters(tails)))
            return b"".join([_digits(np, c) for c in self._sip_chunks(m, len(hashes))])
        return "".join([f"{x}, " for x in (*self.salt(hashes), *self.tails(tails))]).encode()

    def tails_text(self, n: int) -> bytes:
        """:meth:`tails` as text, like :meth:`salt_text`."""
        return self.salt_text((), n)

    def _counters(self, n: int) -> Any:
        """The next *n* tail numbers (a uint64 array); a tail's id is theirs under the tweaked key."""
        first, self._tail = self._tail + 1, self._tail + n
        return self._np.arange(first, first + n, dtype=self._np.uint64)

    def _sip(self, m: Any, tails_from: int) -> Any:
        return self._np.concatenate(list(self._sip_chunks(m, tails_from)))

    def _sip_chunks(self, m: Any, tails_from: int) -> Iterator[Any]:
        """The ids of the uint64s *m* (block hashes, then tail numbers from index *tails_from*),
        in slices that stay in the CPU's cache (a whole batch's would not)."""
        np = self._np
        span, low = np.uint64(_ID_SPAN), np.uint64(_ID_LOW)
        for i in range(0, len(m), _CHUNK):
            out = siphash24(np, *self._keys, m[i : i + _CHUNK], tweak_from=max(tails_from - i, 0))
            # out % span + low, the remainder as in _digits (half the time of numpy's ``%``)
            q = out // span
            q *= span
            out -= q
            out += low
            yield out

    def wanted(self, n_hashes: int, n_tokens: int, *, known: bool = False) -> int:
        """How many ids a prompt of *n_tokens* with *n_hashes* sender hashes gets: ``0`` (no
        prefix information) when there are none and the prompt was not *known* (a sender that
        hashed nothing), or when there are more than ``ceil(n_tokens / block_size)`` (they were
        made with a smaller block); else ``ceil(n_tokens / block_size)``."""
        want = -(-n_tokens // self.block_size)
        if (not n_hashes and not known) or n_hashes > want:
            return 0
        return want

    def ids(self, hashes: Sequence[int], n_tokens: int, *, known: bool = False) -> list[int]:
        """The ids of one prompt of *n_tokens* whose whole blocks hash to *hashes* (see :meth:`wanted`)."""
        want = self.wanted(len(hashes), n_tokens, known=known)
        if not want:
            return []
        return self.salt(hashes) + self.tails(want - len(hashes))


def siphash24(np: Any, k0: int, k1: int, m: Any, tweak_from: int | None = None) -> Any:
    """SipHash-2-4 with key ``(k0, k1)`` of each 8-byte little-endian message in the uint64 array *m*;
    from index *tweak_from* on, with key ``(k0, k1 ^`` :data:`_TAIL_TWEAK` ``)``."""
    u = np.uint64
    v0 = np.full(m.shape, k0 ^ 0x736F6D6570736575, u)
    v1 = np.full(m.shape, k1 ^ 0x646F72616E646F6D, u)
    v2 = np.full(m.shape, k0 ^ 0x6C7967656E657261, u)
    v3 = np.full(m.shape, k1 ^ 0x7465646279746573, u)
    if tweak_from is not None and tweak_from < len(m):  # k1 enters only v1 and v3
        v1[tweak_from:] ^= u(_TAIL_TWEAK)
        v3[tweak_from:] ^= u(_TAIL_TWEAK)
    tmp = np.empty_like(v0)
    shl, shr, bor = np.left_shift, np.right_shift, np.bitwise_or
    amounts = {b: (u(b), u(64 - b)) for b in (13, 16, 17, 21, 32)}

    def rotl(x: Any, b: int) -> None:  # in place: no array is allocated per step
        left, right = amounts[b]
        shl(x, left, out=tmp)
        shr(x, right, out=x)
        bor(x, tmp, out=x)

    def rounds(k: int) -> None:
        nonlocal v0, v1, v2, v3  # updated in place; the names are only rebound to themselves
        for _ in range(k):
            v0 += v1
            rotl(v1, 13)
            v1 ^= v0
            rotl(v0, 32)
            v2 += v3
            rotl(v3, 16)
            v3 ^= v2
            v0 += v3
            rotl(v3, 21)
            v3 ^= v0
            v2 += v1
            rotl(v1, 17)
            v1 ^= v2
            rotl(v2, 32)

    # One 8-byte word of message, then the final word holding the length (8) in its top byte.
    for word in (m, u(8 << 56)):
        v3 ^= word
        rounds(2)
        v0 ^= word
    v2 ^= u(0xFF)
    rounds(4)
    v0 ^= v1
    v2 ^= v3
    v0 ^= v2
    return v0


def _int(digest: bytes) -> int:
    return int.from_bytes(digest, "little") % _ID_SPAN + _ID_LOW


_QUADS: list[Any] = []


def _digits(np: Any, ids: Any) -> bytes:
    """*ids* (uint64, each of :data:`ID_DIGITS` digits) as ``"<digits>, "`` text, all at once:
    two digits and four groups of four each, looked up in a table of ``"0000"`` .. ``"9999"``."""
    if not _QUADS:
        _QUADS.append(np.frombuffer("".join(f"{i:04d}" for i in range(10_000)).encode(), dtype=np.uint32))
    quads = _QUADS[0]
    u32, take = np.uint32, np.take  # take: numpy's fancy indexing gathers at a third of its speed
    out = np.empty((len(ids), ID_TEXT // 4), dtype=u32)  # 18 digits + ", " = 5 x 4 bytes
    # A remainder as x - (x // d) * d: numpy divides by a constant quickly, but not so its ``%``.
    hi64 = ids // np.uint64(10**9)
    lo = (ids - hi64 * np.uint64(10**9)).astype(u32)  # the last 9 digits
    hi = hi64.astype(u32)  # the first 9
    # Bytes: [d d d d][d d d d][d d d d][d d d d][d d , ' ']: digits 1-4, 5-8, 9-12, 13-16, 17-18.
    q = hi // u32(100_000)
    out[:, 0] = take(quads, q)
    rest = hi - q * u32(100_000)  # digits 5-9
    r10 = rest // u32(10)
    out[:, 1] = take(quads, r10)
    l6 = lo // u32(1_000_000)
    out[:, 2] = take(quads, (rest - r10 * u32(10)) * u32(1000) + l6)  # digits 9-12
    low6 = lo - l6 * u32(1_000_000)  # digits 13-18
    l2 = low6 // u32(100)
    out[:, 3] = take(quads, l2)
    tail = take(quads, low6 - l2 * u32(100))  # "00dd": keep the last two digits, then ", "
    out[:, 4] = (tail >> u32(16)) | u32(int.from_bytes(b"\0\0, ", "little"))
    return out.tobytes()  # type: ignore[no-any-return]


def line(
    timestamp_ms: float, input_length: int, output_length: int, ids: str, block_size: int, output_from: str = ""
) -> str:
    """One trace line (with its newline); *ids*: the ids, comma-separated (:func:`ids_text`).
    *output_from*: where ``output_length`` came from (``generated`` or ``budget``), written when given."""
    tail = f', "output_from": "{output_from}"' if output_from else ""
    return (
        f'{{"timestamp": {timestamp_ms:.3f}, "input_length": {input_length}, "output_length": {output_length}, '
        f'"hash_ids": [{ids}], "block_size": {block_size}{tail}}}\n'
    )


def ids_text(ids: Sequence[int]) -> str:
    """*ids* as the inside of a trace line's ``hash_ids`` list."""
    return ", ".join(map(str, ids))
