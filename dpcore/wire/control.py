"""``ctl``: control messages (sender → ingress, controller → ranks), and the one a sender uses to
give a request up, ``abort``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
from attrs import frozen

from dpcore.errors import WireError
from dpcore.wire.header import CTL, VERSION, _expect, _str, _unpack, show
from dpcore.wire.limits import valid_reply


@frozen
class Control:
    """A control message: ``op`` names it, ``data`` is any msgpack-able value."""

    op: str
    data: Any = None


def encode_ctl(op: str, data: Any = None) -> bytes:
    return msgpack.packb({"v": VERSION, "t": CTL, "op": op, "data": data})


def control_from_header(h: Mapping[str, Any]) -> Control:
    op = _str(h, "op", "ctl")
    if not op:
        raise WireError("ctl: field 'op' must not be empty")
    return Control(op, h.get("data"))


def decode_ctl(buf: Any) -> Control:
    h = _unpack(buf, "ctl")
    _expect(h, (CTL,), "ctl")
    return control_from_header(h)


#: The control op of an abort.
ABORT = "abort"


#: Why a sender gave a request up (the abort's ``reason``): its caller's connection closed;
#: no reply came in time; its reader fell too far behind; its caller asked.
ABORT_CLIENT_GONE = "client_gone"
ABORT_TIMEOUT = "timeout"
ABORT_TOO_SLOW = "too_slow"
ABORT_CALLER = "caller"
#: The reasons an abort may give; any other is counted as :data:`ABORT_OTHER`.
ABORT_REASONS = frozenset({ABORT_CLIENT_GONE, ABORT_TIMEOUT, ABORT_TOO_SLOW, ABORT_CALLER})
ABORT_OTHER = "other"
#: What an abort without a ``reason`` (an older sender's) is counted as.
ABORT_UNSPECIFIED = "unspecified"


def encode_abort(rid: str, reply: str, reason: str | None = None) -> bytes:
    """Ask the rank holding request *rid* of the sender listening at *reply* to drop it (not
    started) or stop it (started), because of *reason* (one of :data:`ABORT_REASONS`, or
    ``None``). No reply comes back for it."""
    if reason is None:
        return encode_ctl(ABORT, {"rid": rid, "reply": reply})
    if reason not in ABORT_REASONS:
        msg = f"abort reason {reason!r} is not one of {sorted(ABORT_REASONS)}"
        raise ValueError(msg)
    return encode_ctl(ABORT, {"rid": rid, "reply": reply, "reason": reason})


def abort_reason(ctl: Control) -> str:
    """The reason an abort gives, as counted: one of :data:`ABORT_REASONS`,
    :data:`ABORT_UNSPECIFIED` (none given) or :data:`ABORT_OTHER` (anything else). A reason
    never makes an abort invalid: the request is given up whatever it says."""
    d = ctl.data
    why = d.get("reason") if type(d) is dict else None
    if why is None:
        return ABORT_UNSPECIFIED
    return why if type(why) is str and why in ABORT_REASONS else ABORT_OTHER


def abort_target(ctl: Control) -> tuple[str, str]:
    """The ``(rid, reply)`` an abort control message names."""
    d = ctl.data
    if type(d) is not dict or type(d.get("rid")) is not str or not valid_reply(d.get("reply")):
        msg = f"abort: data must be a map with a string 'rid' and a reply endpoint 'reply', got {show(d)}"
        raise WireError(msg)
    return d["rid"], d["reply"]
