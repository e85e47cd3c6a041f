"""``req``: a request's header frame, sender → controller ingress, and what the ingress accepts
(a request or a control message).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from dpcore.errors import MalformedRequestError, WireError
from dpcore.model import Request, make_request
from dpcore.wire.control import Control, control_from_header
from dpcore.wire.header import CTL, REQ, VERSION, _expect, _unpack, show
from dpcore.wire.limits import DEFAULT_LIMITS, Limits, valid_reply


class MalformedHeader(WireError):
    """A request header is invalid, but says where its sender listens.

    :ivar reply: The sender's reply endpoint.
    :ivar rid: The request id, when it could be read.
    """

    code = MalformedRequestError.code

    def __init__(self, msg: str, *, reply: str, rid: str | None) -> None:
        super().__init__(msg)
        self.reply = reply
        self.rid = rid


def encode_request(
    rid: str,
    *,
    num_tokens: int,
    reply: str,
    block_hashes: Sequence[int] = (),
    bootstrap_room: int | None = None,
    routed_dp_rank: Any = None,
    data_parallel_rank: Any = None,
    disagg_prefill_dp_rank: Any = None,
    max_new_tokens: int | None = None,
) -> bytes:
    """The header frame of a request (the payload travels as the next frame)."""
    h: dict[str, Any] = {"v": VERSION, "t": REQ, "rid": rid, "n": num_tokens, "reply": reply}
    # Optional keys are omitted when unset: smaller frames, faster decode.
    if block_hashes:
        h["bh"] = list(block_hashes)
    if bootstrap_room is not None:
        h["room"] = bootstrap_room
    if routed_dp_rank is not None:
        h["rdr"] = routed_dp_rank
    if data_parallel_rank is not None:
        h["dpr"] = data_parallel_rank
    if disagg_prefill_dp_rank is not None:
        h["pdr"] = disagg_prefill_dp_rank
    if max_new_tokens is not None:
        h["mnt"] = max_new_tokens
    return msgpack.packb(h)


def request_from_header(h: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> tuple[Request, str | None]:
    """Validate a decoded ``req`` header; return the :class:`Request` and reply endpoint.

    Numbers are checked against *limits*. Ranks (``rdr``/``dpr``/``pdr``) are passed through
    unchecked: the core validates them against ``dp_size`` and liveness and rejects the
    request with its own reason.
    """
    get = h.get
    rid = get("rid")
    n = get("n")
    reply = get("reply")
    bh = get("bh")
    room = get("room")
    mnt = get("mnt")
    top = limits.max_tokens
    # The controller's hot path: one combined check; the slow path finds what is wrong.
    # The length of ``bh`` is checked before its items are looked at.
    if (
        type(rid) is str
        and rid
        and type(n) is int
        and 0 <= n <= top
        and valid_reply(reply)
        and (bh is None or (type(bh) is list and len(bh) <= limits.max_hashes(n) and all(type(x) is int for x in bh)))
        and (room is None or type(room) is int)
        and (mnt is None or (type(mnt) is int and 0 <= mnt <= top))
    ):
        return make_request(rid, n, tuple(bh) if bh else (), room, get("rdr"), get("dpr"), get("pdr"), mnt), reply
    raise _request_error(h, limits)


def _request_error(h: Mapping[str, Any], limits: Limits) -> WireError:
    """The precise error for a request header that failed the fast check."""
    reply = h.get("reply")
    if not valid_reply(reply):
        reply = None
    rid = h.get("rid")
    n = h.get("n")
    bh = h.get("bh")
    room = h.get("room")
    mnt = h.get("mnt")
    top = limits.max_tokens
    if type(rid) is not str or not rid:
        msg = f"request: field 'rid' must be a non-empty string, got {show(rid)}"
    elif type(n) is not int or not 0 <= n <= top:
        msg = (
            f"request {show(rid)}: field 'n' (num_tokens) must be an integer in 0..{top} "
            f"(the controller's --max-context-tokens), got {show(n)}"
        )
    elif bh is not None and type(bh) is not list:
        msg = f"request {show(rid)}: field 'bh' (block_hashes) must be a list of integers"
    elif bh is not None and len(bh) > limits.max_hashes(n):
        msg = (
            f"request {show(rid)}: field 'bh' has {len(bh)} block hashes for {n} tokens; at most "
            f"{limits.max_hashes(n)} (one per {limits.min_block_size} tokens, at most "
            f"{limits.max_block_hashes})"
        )
    elif bh is not None and not all(type(x) is int for x in bh):
        msg = f"request {show(rid)}: field 'bh' (block_hashes) must be a list of integers"
    elif room is not None and type(room) is not int:
        msg = f"request {show(rid)}: field 'room' (bootstrap_room) must be an integer, got {show(room)}"
    elif mnt is not None and (type(mnt) is not int or not 0 <= mnt <= top):
        msg = f"request {show(rid)}: field 'mnt' (max_new_tokens) must be an integer in 0..{top}, got {show(mnt)}"
    else:
        msg = f"request {show(rid)}: field 'reply' must be an endpoint string like ipc://... or tcp://..."
    if reply is None:
        return WireError(msg)
    return MalformedHeader(msg, reply=reply, rid=rid if type(rid) is str else None)


def decode_request(buf: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[Request, str | None]:
    """Decode a ``req`` header frame: the :class:`Request` and its sender's reply endpoint.

    Raises :class:`MalformedHeader` when the header is bad but names a reply endpoint,
    plain :class:`WireError` when it does not.
    """
    h = _unpack(buf, "request")
    _expect(h, (REQ,), "request")
    return request_from_header(h, limits)


def decode_ingress(buf: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[Request, str | None] | Control:
    """Decode what a controller's ingress receives: a request or a control message."""
    h = _unpack(buf, "ingress")
    t = _expect(h, (REQ, CTL), "ingress")
    if t == REQ:
        return request_from_header(h, limits)
    if len(buf) > limits.max_control_bytes:
        # The controller copies a control frame (other than an abort) to every rank: a big one multiplies.
        msg = f"ctl: {len(buf)} bytes is over the control frame limit of {limits.max_control_bytes}"
        raise WireError(msg)
    return control_from_header(h)
