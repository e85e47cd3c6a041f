"""``out``, ``rej`` and ``fail``: what a sender receives for its requests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
from attrs import field, frozen

from dpcore.errors import WireError
from dpcore.wire.header import (
    FAIL,
    OUT,
    REJ,
    REPLY_TYPES,
    VERSION,
    _expect,
    _frames,
    _opt_int,
    _req_int,
    _str,
    _unpack,
    show,
)


@frozen
class Reply:
    """What a sender receives for one of its requests.

    :ivar kind: ``"out"`` (output from the rank), ``"rej"`` (the controller refused the
        request) or ``"fail"`` (the request was lost with its rank, or could not be sent).
    :ivar rid: The request id.
    :ivar rank: The rank that served or lost it (``None`` for a rejection).
    :ivar final: Whether no more replies will come for *rid* (always true for rej/fail).
    :ivar code: Machine-readable reason for rej/fail (``RequestRejected.code``).
    :ivar msg: Human-readable reason for rej/fail.
    :ivar meta: For ``out``: token counts and whatever else the engine reports.
    :ivar payload: For ``out``: generated text or token bytes, opaque to dpcore.
    """

    kind: str
    rid: str
    rank: int | None = None
    final: bool = True
    code: str = ""
    msg: str = ""
    meta: Mapping[str, Any] = field(factory=dict)
    payload: bytes = b""


def encode_rej(rid: str | None, code: str, msg: str) -> bytes:
    return msgpack.packb({"v": VERSION, "t": REJ, "rid": rid, "code": code, "msg": msg})


def encode_fail(rid: str, rank: int | None, code: str, msg: str) -> bytes:
    return msgpack.packb({"v": VERSION, "t": FAIL, "rid": rid, "rank": rank, "code": code, "msg": msg})


def encode_out(rid: str, rank: int, final: bool, meta: Mapping[str, Any] | None = None) -> bytes:
    """The header frame of an output; the payload (text or token bytes) is the next frame."""
    return msgpack.packb({"v": VERSION, "t": OUT, "rid": rid, "rank": rank, "final": final, "meta": meta or {}})


def decode_reply(frames: Sequence[Any]) -> Reply:
    """Decode an ``out``, ``rej`` or ``fail`` message into a :class:`Reply`."""
    if not frames:
        raise WireError("reply: empty message")
    h = _unpack(frames[0], "reply")
    t = _expect(h, REPLY_TYPES, "reply")
    rid = h.get("rid")
    if t == OUT:
        _frames(frames, (1, 2), "out")
        rid = _str(h, "rid", "out")
        rank = _req_int(h, "rank", "out")
        final = h.get("final")
        if type(final) is not bool:
            msg = f"out {show(rid)}: field 'final' must be a boolean, got {show(final)}"
            raise WireError(msg)
        meta = h.get("meta")
        if meta is None:
            meta = {}
        elif type(meta) is not dict:
            msg = f"out {show(rid)}: field 'meta' must be a map, got {type(meta).__name__}"
            raise WireError(msg)
        payload = bytes(frames[1]) if len(frames) == 2 else b""
        return Reply(OUT, rid, rank, final, "", "", meta, payload)
    _frames(frames, (1,), t)
    if rid is not None and type(rid) is not str:
        msg = f"{t}: field 'rid' must be a string, got {show(rid)}"
        raise WireError(msg)
    code = _str(h, "code", t)
    text = _str(h, "msg", t)
    rank = _opt_int(h, "rank", t) if t == FAIL else None
    return Reply(t, rid or "", rank, True, code, text)
