"""The pipe between the recorder (in the controller) and its writer process: framing and batches.

Frames are length-prefixed msgpack (:data:`PREFIX` bytes, little-endian). A batch frame is
``[arrival times, request headers, completions]``, spliced by the controller from the
headers' own bytes (:func:`batch_body`) and read by the writer (:func:`decode_batch`), which
decodes only the fields a trace line needs.
"""

from __future__ import annotations

import os
import select
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack

from dpcore import tracefile

try:  # reads only the header fields a line needs; without it, msgpack builds every field
    import msgspec
except ImportError:  # pragma: no cover - the fallback is tested by disabling it
    msgspec = None

try:  # dpcore-speedups: the writer's per-batch work in one compiled pass (same records and lines)
    import dpcore_speedups as speedups
except ImportError:  # pragma: no cover - the Python path is tested by disabling it
    speedups = None

#: Bytes of a frame's length prefix (little-endian).
PREFIX = 4
#: Largest frame the writer reads (a batch of the default 65,536 queued records fits).
MAX_FRAME = 1 << 30
#: The header fields the writer reads, as decoded with msgpack's ``raw=False`` and ``raw=True``.
_KEYS = ("rid", "n", "mnt", "bh")
_RAW_KEYS = tuple(k.encode() for k in _KEYS)


def frame(obj: Any) -> bytes:
    """*obj* as one length-prefixed msgpack frame."""
    data = msgpack.packb(obj)
    return len(data).to_bytes(PREFIX, "little") + data


if msgspec is not None:

    class _Header(msgspec.Struct, gc=False):
        """The fields of a request header a line needs; the others are skipped, not built.
        The block hashes stay msgpack (:func:`_words_of`)."""

        rid: str
        n: int = 0
        mnt: int = 0
        bh: msgspec.Raw = msgspec.Raw(b"\x90")

    class _TypedHeader(msgspec.Struct, gc=False):
        rid: str
        n: int = 0
        mnt: int = 0
        bh: tuple[int, ...] = ()

    _BATCH: Any = msgspec.msgpack.Decoder(tuple[bytes, list[_Header], list[tuple[str, int]]])
    _TYPED: Any = msgspec.msgpack.Decoder(tuple[bytes, list[_TypedHeader], list[tuple[str, int]]])
    _BAD_BATCH: tuple[type[Exception], ...] = (msgspec.DecodeError,)
else:  # pragma: no cover
    _BATCH, _TYPED, _BAD_BATCH = None, None, ()

_WORD = (1 << 64) - 1
#: Whether a batch's hashes are read with numpy (the writer salts with it then, too).
_NUMPY = tracefile.default_kind() == tracefile.SIPHASH


def packed(hashes: Sequence[int]) -> bytes:
    """*hashes* as big-endian 64-bit words (an integer outside 64 bits as its two's complement,
    as :class:`dpcore.tracefile.Salted` salts it)."""
    try:
        return struct.pack(f">{len(hashes)}Q", *hashes)
    except struct.error:
        return struct.pack(f">{len(hashes)}Q", *[h & _WORD for h in hashes])


def load_numpy() -> Any:
    import numpy

    return numpy


def _words_of(raws: list[Any]) -> list[bytes] | None:
    """Each msgpack array in *raws* as :func:`packed` words, in a few passes over the batch;
    ``None`` unless every one is an array (up to 65,535 long) of 64-bit integers as msgpack
    writes hashes of 33 bits and more (``0xcf`` unsigned, ``0xd3`` signed)."""
    np = load_numpy()
    lens = np.fromiter(map(len, raws), np.int64, len(raws))
    data = np.frombuffer(b"".join(raws), np.uint8)
    short = lens % 9 == 1  # a fixarray: one byte of header, then 9 a hash
    if not (short | (lens % 9 == 3)).all():  # else three: 0xdc and a 16-bit length
        return None
    k = (lens - np.where(short, 1, 3)) // 9
    starts = np.cumsum(lens) - lens
    if not ((data[starts[short]] == 0x90 + k[short]) & (k[short] <= 15)).all():
        return None
    long = starts[~short]
    if not ((data[long] == 0xDC) & (data[long + 1].astype(np.int64) * 256 + data[long + 2] == k[~short])).all():
        return None
    keep = np.ones(len(data), bool)
    keep[starts] = False
    keep[long + 1] = False
    keep[long + 2] = False
    items = data[keep].reshape(-1, 9)
    if not ((items[:, 0] == 0xCF) | (items[:, 0] == 0xD3)).all():
        return None
    words = items[:, 1:].tobytes()
    ends = np.cumsum(k) * 8
    return [words[a:b] for a, b in zip((ends - k * 8).tolist(), ends.tolist())]


def records_from_maps(times: Iterable[float], headers: Iterable[Any], raw: bool) -> list[list[Any]]:
    """Records of headers decoded to maps (keys as bytes when *raw*)."""
    k_rid, k_n, k_mnt, k_bh = _RAW_KEYS if raw else _KEYS
    return [[t, h.get(k_n) or 0, h.get(k_mnt) or 0, packed(h.get(k_bh) or ()), None, h.get(k_rid)]
            for t, h in zip(times, headers)]  # fmt: skip


def decode_batch(body: Any, handed_back: Callable[[], None] | None = None) -> tuple[list[list[Any]], Any]:
    """A batch frame's records (:meth:`TraceWriter.take`) and completions.

    With msgspec installed, only the fields a line needs are decoded (the reply address and
    other fields are skipped unbuilt), and with numpy the block hashes of the whole batch go
    from msgpack to words at once. A header they cannot type (a field of another type than
    the controller's validation lets through, hashes under 33 bits) sends the batch through
    a slower path instead, which gives the same records. The compiled decoder
    (:data:`speedups`) reads the batch first, and hands any frame it does not read exactly
    to these paths (then *handed_back* is called, to count it)."""
    if speedups is not None:
        got = speedups.decode_batch(body)
        if got is not None:
            return got  # type: ignore[no-any-return]
        if handed_back is not None:
            handed_back()
    return decode_batch_python(body)


def decode_batch_python(body: Any) -> tuple[list[list[Any]], Any]:
    """:func:`decode_batch` without the compiled decoder (what it hands back comes here)."""
    times = array("d")
    if _BATCH is not None:
        try:
            tb, headers, ends = _BATCH.decode(body)
            words = _words_of([h.bh for h in headers]) if _NUMPY else None
            if words is None:
                tb, headers, ends = _TYPED.decode(body)
                words = [packed(h.bh) for h in headers]
        except _BAD_BATCH:
            pass
        else:
            times.frombytes(tb)
            return [[t, h.n, h.mnt, w, None, h.rid] for t, h, w in zip(times, headers, words)], ends
    # Without msgspec, strings stay bytes (no UTF-8 decoding); with it, ids are text in
    # every batch, so a completion still finds its request across a batch decoded here.
    raw = _BATCH is None
    tb, headers, ends = msgpack.unpackb(body, use_list=False, raw=raw)
    times.frombytes(tb)
    return records_from_maps(times, headers, raw), ends


def batch_body(times: array, headers: Sequence[Any], ends: list[tuple[str, int]]) -> bytes:
    """A batch frame's msgpack body, spliced from the request headers' own bytes (no re-encoding).

    *times*: ``array('d')`` of arrivals; *headers*: msgpack maps as bytes or buffers (zmq frames)."""
    tb = times.tobytes()
    n = len(headers)
    return b"".join((b"\x93\xc6", len(tb).to_bytes(4, "big"), tb, b"\xdd", n.to_bytes(4, "big"), *headers,
                     msgpack.packb(ends)))  # fmt: skip


class FrameReader:
    """Length-prefixed frames from a file descriptor, waiting with a timeout."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def next(self, timeout_s: float | None, *, raw: bool = False) -> Any:
        """The next frame's object; ``None`` when *timeout_s* passed first or at the end.
        *raw*: strings stay bytes (msgpack's ``raw=True``)."""
        body = self.body(timeout_s)
        return None if body is None else msgpack.unpackb(body, use_list=False, raw=raw)

    def body(self, timeout_s: float | None) -> bytes | None:
        """The next frame's bytes; ``None`` when *timeout_s* passed first or at the end."""
        while True:
            buf = self.buf
            if len(buf) >= PREFIX:
                size = int.from_bytes(buf[:PREFIX], "little")
                if size > MAX_FRAME:
                    msg = f"frame of {size} bytes, more than {MAX_FRAME}"
                    raise ValueError(msg)
                if len(buf) >= PREFIX + size:
                    body = bytes(memoryview(buf)[PREFIX : PREFIX + size])
                    del buf[: PREFIX + size]
                    return body
            if self.eof:
                return None
            if timeout_s is not None and not select.select([self.fd], [], [], max(timeout_s, 0.0))[0]:
                return None
            data = os.read(self.fd, 1 << 20)
            if not data:
                self.eof = True
            buf += data
