"""``dispatch``: one request as the controller sends it to a rank (a small frame of its own in
front of the request header and payload, which travel untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack
from attrs import frozen

from dpcore.wire.header import DISPATCH, REQ, VERSION, _expect, _frames, _opt_int, _req_int, _unpack


@frozen
class Dispatch:
    """One request as a rank receives it.

    :ivar rank: The rank it was sent to.
    :ivar seq: Its dispatch sequence number on that rank (acknowledge it in load reports).
    :ivar prefill_rank: For PD decode: the prefill rank holding its KV, else ``None``.
    :ivar header: The request header as the sender wrote it (see :func:`encode_request`).
    :ivar payload: The sender's opaque payload.
    """

    rank: int
    seq: int
    prefill_rank: int | None
    header: Mapping[str, Any]
    payload: bytes


def _dispatch_header(rank: int, seq: int, prefill_rank: int | None) -> dict[str, Any]:
    return {"v": VERSION, "t": DISPATCH, "rank": rank, "seq": seq, "pr": prefill_rank}


def encode_dispatch(rank: int, seq: int, prefill_rank: int | None = None) -> bytes:
    """The first frame of a dispatch; the request header and payload follow unchanged."""
    return msgpack.packb(_dispatch_header(rank, seq, prefill_rank))


def dispatch_encoder() -> Callable[[int, int, int | None], bytes]:
    """:func:`encode_dispatch` with a packer of its own, for one thread's hot loop.

    Reusing one ``msgpack.Packer`` saves its construction per message; a packer is not
    thread-safe, so each caller (the controller's loop) takes its own.
    """
    pack = msgpack.Packer(use_bin_type=True).pack

    def encode(rank: int, seq: int, prefill_rank: int | None = None) -> bytes:
        return pack(_dispatch_header(rank, seq, prefill_rank))  # type: ignore[no-any-return]

    return encode


def dispatch_frames(rank: int, seq: int, req_header: Any, payload: Any, prefill_rank: int | None = None) -> list[Any]:
    """All frames of a dispatch."""
    return [encode_dispatch(rank, seq, prefill_rank), req_header, payload]


def decode_dispatch(frames: Sequence[Any]) -> Dispatch:
    """Decode the three frames of a dispatch (as a rank receives them)."""
    _frames(frames, (3,), "dispatch")
    d = _unpack(frames[0], "dispatch")
    _expect(d, (DISPATCH,), "dispatch")
    rank = _req_int(d, "rank", "dispatch")
    seq = _req_int(d, "seq", "dispatch")
    pr = _opt_int(d, "pr", "dispatch")
    h = _unpack(frames[1], "dispatch: request header")
    _expect(h, (REQ,), "dispatch: request header")
    return Dispatch(rank, seq, pr, h, bytes(frames[2]))
